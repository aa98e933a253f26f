"""The job's validation: full-ranking ranks and NDCG@10 of the validation queries (every epoch, for early
stopping), and the fusion chosen on them after training (--tune-fusion).

    ndcg = validation_ndcg(model, inputs, targets, days, added_days)         # the epoch's figure
    ndcg = validation_ndcg(..., rank=rank, world=world)                      # the same, shared by a group
    model, scores = choose_fusion(model, inputs, targets, days, added_days)  # sets fusion_weight / _last
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from training.metrics import ndcg_at, rank_of_target
from training.model import SeqRec

SCORE_CELLS = 2**23  # validation scores at most this many (query, item) pairs at a time (32 MB of floats)


def validation_ranks(
    model: SeqRec,
    inputs: np.ndarray,
    targets: np.ndarray,
    days: np.ndarray | None = None,
    added_days: np.ndarray | None = None,
) -> np.ndarray:
    """(Q,) 0-based full-ranking rank of each validation target by the model's own scores (item age at each
    target's time when the model has it), the history and padding excluded."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    first = None if added_days is None else torch.as_tensor(added_days, device=device)
    ranks = []
    with torch.no_grad():
        items = model.item_vectors()  # once for the pass, not once per batch
        rows = max(1, min(512, SCORE_CELLS // len(items)))  # a batch's (rows, items) scores stay bounded
        for a in range(0, len(inputs), rows):
            x = inputs[a : a + rows]
            request = None if days is None else torch.as_tensor(days[a : a + rows], device=device)
            s = (
                model.scores(torch.as_tensor(x, device=device), request, first, items).float().cpu()
            )  # (b, n+1)
            exclude = [np.concatenate([[0], row[row > 0]]) for row in x]
            ranks.append(rank_of_target(s, targets[a : a + rows], exclude))
    model.train(was_training)
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def validation_ndcg(
    model: SeqRec,
    inputs: np.ndarray,
    targets: np.ndarray,
    days: np.ndarray | None = None,
    added_days: np.ndarray | None = None,
    rank: int = 0,
    world: int = 1,
) -> float:
    """Full-ranking NDCG@10 of the validation targets (validation_ranks), the mean over queries.
    world > 1 (a torch.distributed group of that size): this rank ranks every world-th query from `rank` and
    the group adds up its sums, so every rank gets the same figure for 1/world of the work."""
    share = slice(rank, None, world)
    ranks = validation_ranks(
        model, inputs[share], targets[share], None if days is None else days[share], added_days
    )
    device = next(model.parameters()).device
    total = torch.tensor([ndcg_at(ranks, 10).sum(), len(ranks)], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")


# (fusion_weight, fusion_last) pairs tried on validation (--tune-fusion); weight 0 = no fusion
FUSION_GRID = ((0.0, 1), *((w, n) for n in (1, 3, 5, 10) for w in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)))


def fusion_key(weight: float, last: int) -> str:
    return f"{weight:g}@{last}"


def fusion_choice(ndcg: dict[tuple[float, int], np.ndarray]) -> tuple[float, int]:
    """The one-standard-error rule, leaning on content: among the pairs whose validation NDCG@10 is within one
    standard error of the best's (the error of the per-query difference, the same queries), the one with the
    most content in the query (largest weight, then most clicks). Validation targets are items the model
    trained on; what a new item needs, content, is what it cannot see, so it breaks its ties.
    ndcg: (weight, last) -> (Q,) per-query NDCG@10."""
    best = max(ndcg, key=lambda p: ndcg[p].mean())  # the first of ties
    n = len(ndcg[best])

    def close(pair: tuple[float, int]) -> bool:
        diff = ndcg[best] - ndcg[pair]
        return diff.mean() <= (diff.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0)

    return max((p for p in ndcg if close(p)), key=lambda p: (p[0], p[1]))


def choose_fusion(
    model: SeqRec,
    inputs: np.ndarray,
    targets: np.ndarray,
    days: np.ndarray | None = None,
    added_days: np.ndarray | None = None,
) -> tuple[SeqRec, dict[str, float]]:
    """Set the model's fusion_weight and fusion_last to the FUSION_GRID pair that `fusion_choice` takes on
    the validation queries. -> (the model, validation NDCG@10 per "weight@last")"""
    per_query = {}
    base = dataclasses.replace(model.cfg, fusion_weight=0.0)
    for weight, last in FUSION_GRID:
        model.cfg = dataclasses.replace(base, fusion_weight=weight, fusion_last=last)
        per_query[weight, last] = ndcg_at(validation_ranks(model, inputs, targets, days, added_days), 10)
    weight, last = fusion_choice(per_query)
    model.cfg = dataclasses.replace(base, fusion_weight=weight, fusion_last=last)
    return model, {fusion_key(*p): float(v.mean()) for p, v in per_query.items()}
