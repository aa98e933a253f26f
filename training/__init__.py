"""The student: a SASRec encoder over a user's clicks that predicts the next item's vector in an item space.

Plain PyTorch, runnable without Ray or DeepSpeed (those wrap it):
config (frozen dataclasses saved with every checkpoint) -> data (the one input-building function, shared
with serving) -> model (SeqRec) -> losses (distillation, corrected sampled softmax, id baselines) ->
metrics (ranks, HR/NDCG/MRR, leave-one-out and temporal splits).
"""
