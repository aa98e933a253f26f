"""Build a Qdrant index of item vectors, and search it (kept apart: build.py writes, through
writers.py's Edge and server backends; search.py reads).

    vlmrec index build  --workdir W [--vectors item_vectors.parquet] [--backend edge|server]
    vlmrec index upsert --workdir W --vectors new_items.parquet --items new_catalogue.parquet

Two backends, one interface (`index.search.open_index(...).search(vec, k, exclude_ids, filters)`):
Qdrant Edge (the engine in-process, one shard folder per version under <workdir>/index, a CURRENT pointer
file) and a Qdrant server (a collection per version behind the alias "items"). Settings: index.config.
"""
