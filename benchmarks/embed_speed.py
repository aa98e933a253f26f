"""Embedding throughput: `vlmrec embed`'s path over a workspace's catalogue in catalogue order and sorted by
text length (the default), in one run, and where the time goes.

    nice -n 5 .venv/bin/python benchmarks/embed_speed.py --workdir .vlmrec/ml --out benchmarks/results/embed.json

Each order runs `embed_catalogue` (Ray Data, one actor, the default minilm teacher, batch 64) into a scratch
copy of the workspace, `--rounds` times, alternating the orders; items/s is the median round. Three more
runs per round, sorted: `sorted_pool` (the default: the pool grows to one actor per CPU but one), `sorted_bf16` (one
actor, `--precision bf16`) and `sorted_pool_bf16`, each as a ratio to one fp32 actor; `bf16_agreement`: how
close the bf16 vectors are to the fp32 ones (cosine, nearest-neighbour overlap). Where time goes:
per order, the tokens the model computes (each batch padded to its longest text) against the real tokens;
and, on one sorted and one catalogue-order pass without Ray, seconds in tokenisation vs the forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def padding(lengths: np.ndarray, batch: int) -> dict:
    """Tokens computed (each batch padded to its longest) vs real tokens, for one order of `lengths`."""
    computed = sum(
        int(chunk.max()) * len(chunk) for chunk in np.array_split(lengths, max(1, -(-len(lengths) // batch)))
    )
    real = int(lengths.sum())
    return {"real_tokens": real, "computed_tokens": computed, "padding_share": round(1 - real / computed, 3)}


def agreement(full: np.ndarray, low: np.ndarray, queries: int = 2000, k: int = 10) -> dict:
    """How far bf16 vectors are from fp32 ones: cosine per item, and the overlap of each of `queries`
    items' k nearest neighbours (itself left out) over the whole catalogue."""
    cos = (full * low).sum(axis=1)
    pick = np.random.default_rng(0).choice(len(full), size=min(queries, len(full)), replace=False)
    overlap = []
    for q in pick:
        a, b = full @ full[q], low @ low[q]
        a[q] = b[q] = -np.inf
        overlap.append(len(set(np.argpartition(-a, k)[:k]) & set(np.argpartition(-b, k)[:k])) / k)
    return {
        "cosine_min": round(float(cos.min()), 6),
        "cosine_median": round(float(np.median(cos)), 6),
        f"top{k}_overlap": round(float(np.mean(overlap)), 4),
    }


def split_time(teacher, texts: list[str], batch: int) -> dict:
    """Seconds in the tokenizer vs the model forward for `texts` in the given order (no Ray, 1 thread)."""
    import torch

    tok = fwd = 0.0
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            t0 = time.perf_counter()
            enc = teacher.tokenizer(
                texts[i : i + batch], padding=True, truncation=True, max_length=teacher.config.max_length,
                return_tensors="pt",
            )  # fmt: skip
            t1 = time.perf_counter()
            teacher.model(**enc)
            t2 = time.perf_counter()
            tok, fwd = tok + t1 - t0, fwd + t2 - t1
    return {
        "tokenize_s": round(tok, 2),
        "forward_s": round(fwd, 2),
        "items_per_s": round(len(texts) / (tok + fwd), 1),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="a workspace with data/items.parquet")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embed.json")
    args = p.parse_args(argv)

    import torch

    from teacher.embed import EmbedConfig, embed_catalogue
    from teacher.encoders import TeacherConfig, item_text, load_teacher
    from vlmrec.workspace import Workspace

    src = Workspace(args.workdir)
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    scratch = Workspace(Path(tempfile.mkdtemp(prefix="vlmrec-embed-")))
    scratch.data.mkdir(parents=True)
    shutil.copy(src.items, scratch.items)
    plan = (  # name, sorted by length, actors (None: the default pool), precision
        ("catalogue_order", False, 1, "fp32"),
        ("sorted_by_length", True, 1, "fp32"),
        ("sorted_pool", True, None, "fp32"),
        ("sorted_bf16", True, 1, "bf16"),
        ("sorted_pool_bf16", True, None, "bf16"),
    )
    runs: dict[str, list[float]] = {name: [] for name, *_ in plan}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, sort, actors, precision in plan:
            cfg = EmbedConfig(
                teacher=TeacherConfig(batch_size=args.batch_size, precision=precision),
                batch_size=args.batch_size,
                num_actors=actors,
                sort_by_length=sort,
                in_process_max_items=0,  # on Ray Data whatever the catalogue's size
            )
            report = embed_catalogue(scratch, cfg)
            runs[name].append(report["items_per_s"])
            print(f"{name}: {report['items_per_s']} items/s ({report['seconds']} s)", flush=True)
            if name in ("sorted_by_length", "sorted_bf16"):
                vectors[precision] = np.stack(
                    pq.read_table(scratch.embeddings, columns=["vector"])[0].to_numpy()
                )
    items = pq.read_table(src.items, columns=["title", "text"]).to_pandas()
    texts = [item_text(t, x) for t, x in zip(items["title"], items["text"], strict=True)]
    teacher = load_teacher(TeacherConfig())
    lengths = np.array(
        [
            len(ids)
            for ids in teacher.tokenizer(texts, truncation=True, max_length=teacher.config.max_length)[
                "input_ids"
            ]
        ]
    )
    order = np.argsort([len(t) for t in texts], kind="stable")  # what embed_catalogue sorts by: characters
    torch.set_num_threads(1)  # as a Ray Data actor runs
    sample = np.random.default_rng(0).choice(len(texts), size=min(2000, len(texts)), replace=False)
    by_chars = sample[np.argsort([len(texts[i]) for i in sample], kind="stable")]

    def ratio(name: str) -> float:  # against one actor, sorted, fp32
        return round(float(np.median(runs[name]) / np.median(runs["sorted_by_length"])), 2)

    result = {
        "command": "benchmarks/embed_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "items": len(texts),
        "batch_size": args.batch_size,
        "items_per_s": {k: float(np.median(v)) for k, v in runs.items()},
        "rounds": runs,
        "speedup": round(float(np.median(runs["sorted_by_length"]) / np.median(runs["catalogue_order"])), 2),
        "pool_speedup": ratio("sorted_pool"),
        "bf16_speedup": ratio("sorted_bf16"),
        "pool_bf16_speedup": ratio("sorted_pool_bf16"),
        "bf16_agreement": agreement(vectors["fp32"], vectors["bf16"]),
        "tokens": {
            "catalogue_order": padding(lengths, args.batch_size),
            "sorted_by_length": padding(lengths[order], args.batch_size),
            "p50": int(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "time_split_2000_items_no_ray": {
            "catalogue_order": split_time(teacher, [texts[i] for i in sample], args.batch_size),
            "sorted_by_length": split_time(teacher, [texts[i] for i in by_chars], args.batch_size),
        },
        "load_average": {**load, "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": {"cpus": os.cpu_count()},
    }
    shutil.rmtree(scratch.root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "items_per_s",
                    "speedup",
                    "pool_speedup",
                    "bf16_speedup",
                    "pool_bf16_speedup",
                    "bf16_agreement",
                )
            },
            indent=2,
        )
    )
    return result


if __name__ == "__main__":
    main()
