"""HNSW settings at one catalogue size: recall@100 against exact search and query latency for each graph
(m, ef_construct) and search (oversampling of the int8 candidates, ef), so a row of index.config's
HNSW_BY_SIZE can be chosen, or a custom one checked, on your own vectors.

    python benchmarks/hnsw_grid.py --data ../shared/data/movielens-small --vectors .vlmrec/ml --n 100000 \
        --out benchmarks/results/hnsw_grid.json

Vectors and queries as benchmarks/search.py makes them (real-like mixes of the real teacher vectors above the
catalogue's size; user-like queries, the mean of 5 item vectors). Every search is the shipped kind: int8
scores, the top k x oversampling candidates rescored with the float vectors, through open_index with the
scan off (the shard's graph). Exact numpy's p50/p99 (the baseline of the issue's "query p99 <= 0.2x exact")
is timed before and after the grid, so a drift of the machine shows. A few minutes at 100k: one build per
(m, ef_construct).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from machine import machine_facts  # benchmarks/ is on sys.path when run as a script
from search import K, exact_search, real_set, recall, sized_set, timed, user_queries

from index.build import build_index
from index.config import IndexConfig
from index.search import open_index


def grid(x, items, teacher, queries: np.ndarray, exact: list, args) -> list[dict]:
    """One build per (m, ef_construct), every (oversampling, ef) searched on it; `exact`: the exact top K of
    each query."""
    ids = items["item_id"].to_numpy()
    vectors = pd.DataFrame({"item_id": ids, "vector": list(x), "teacher_id": teacher})
    out = []
    for m in args.m:
        for ef_construct in args.ef_construct:
            config = replace(IndexConfig(), hnsw_m=m, hnsw_ef_construct=ef_construct, scan_max_points=0)
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                built = build_index(vectors, items, Path(tmp) / "edge", config)
                row = {
                    "m": m,
                    "ef_construct": ef_construct,
                    "build_s": round(built.seconds, 1),
                    "searches": [],
                }
                for oversampling in args.oversampling:
                    for ef in args.ef:
                        at = replace(config, hnsw_ef=ef, oversampling=oversampling)
                        with open_index(Path(tmp) / "edge", at) as idx:
                            got, ms = timed(lambda q, idx=idx: idx.search(q, K), queries)
                        row["searches"].append(
                            {"oversampling": oversampling, "ef": ef, "recall": recall(got, exact), **ms}
                        )
                        print(f"m {m} ef_construct {ef_construct} oversampling {oversampling} ef {ef}: "
                              f"{row['searches'][-1]}", flush=True)  # fmt: skip
            out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="movielens-small (titles for a vector parquet)")
    p.add_argument("--vectors", type=Path, required=True, help="a workspace folder or an item vector parquet")
    p.add_argument("--n", type=int, default=100_000, help="catalogue size (real-like above the real one)")
    p.add_argument("--m", type=int, nargs="+", default=[16, 32])
    p.add_argument("--ef-construct", type=int, nargs="+", default=[100, 256])
    p.add_argument("--ef", type=int, nargs="+", default=[100, 128, 160, 200, 256])
    p.add_argument("--oversampling", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--tmp", type=Path, default=None, help="where the Edge shards are built")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/hnsw_grid.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Payload indexes have no effect")
    for name in ("m", "ef_construct", "ef", "queries"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.oversampling) < 1.0:
        p.error("--oversampling must be >= 1")

    x, items, teacher, source = sized_set(real_set(args.vectors, args.data), args.n)
    x = np.ascontiguousarray(x)
    exact_fn = exact_search(x, items["item_id"].to_numpy())
    queries = user_queries(x, args.queries)
    t0 = time.perf_counter()
    exact, before = timed(exact_fn, queries)
    rows = grid(x, items, teacher, queries, exact, args)
    after = timed(exact_fn, queries)[1]
    report = {
        "command": "python benchmarks/hnsw_grid.py " + " ".join(sys.argv[1:]),
        "machine": machine_facts(),
        "load_average": list(os.getloadavg()),
        "n": args.n,
        "dim": int(x.shape[1]),
        "source": source,
        "k": K,
        "queries": args.queries,
        "shipped": IndexConfig().for_size(args.n).to_dict(),
        "exact_ms": {"before": before, "after": after},
        "grid": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
