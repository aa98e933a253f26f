"""The teacher: a vision-language (or text) encoder that puts every product in one space.

teacher/encoders.py     minilm, SigLIP, Jina-CLIP-v2 (and tuned / LiT teachers): configs, loading, embedding
teacher/weights.py      which weights a teacher loads and their name (model_id, tuned folders, QLoRA, pins)
teacher/image_tower.py  the small ViT image tower a LiT teacher trains
teacher/embed.py        `vlmrec embed`: the catalogue's item vectors (Ray Data)
teacher/pairs.py        co-engagement and image-title pairs from the events before the cut
teacher/tune/           `vlmrec tune`: config -> model -> loop -> export, on the shared engine (engine/)
"""
