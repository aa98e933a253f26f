"""Search benchmark: Qdrant Edge vs qdrant-client local mode vs exact numpy, top-100 cosine.

    python benchmarks/search.py --data ../shared/data/movielens-small --sizes 10000 100000 \
        --vectors .vlmrec/movielens --out benchmarks/results/search.json

For each size: build seconds (Edge through index.build.build_index, local mode ":memory:" through the same
code, numpy = stacking the matrix), query p50/p99 for single user-like queries (the mean of 5 random item
vectors, normalised), plain, filtered to one category holding ~1 in 20 items, and leaving out a random "seen"
set of 20-300 items per query as the Producer does (alone and in batches of 32), recall@100 against exact at
the shipped hnsw_ef, and an ef sweep. The plain queries run twice on the freshly opened copy: `edge` is the
first pass (the figure compared with exact numpy), `edge_again` the same queries once more on that copy.
Vectors: the real teacher embeddings when --vectors names a workspace (data/item_embeddings.parquet +
data/items.parquet) or a vector parquet (titles and first genres then come from --data/movies.csv). Sizes
above the real catalogue: `--synthetic real-like` (the default with real vectors) mixes two random real
vectors and adds Gaussian noise (`real_like_set`), keeping the real vectors' anisotropic shape; `gaussian`
(the default without) draws Gaussian clusters of the same dim. On the real vectors the sweep is also run with
the graph forced (thresholds 1 KB): the curve of the graph whatever the shipped thresholds choose at that size
(scan or graph). The shipped settings are IndexConfig()'s, HNSW chosen from each size (index.config.hnsw_for);
each size records them, the build's peak RSS, and the query p99 over exact numpy's. Up to
IndexConfig.scan_max_points the shipped search is the replica's exact scan (index/scan.py: `searched_by`
"scan"); there the shard's own search of the same copy is measured too (`shard`, `shard_*`), and the scan's
matrix product (torch's) against numpy's for 1, 4 and 32 query rows (`scan_product_ms`); the ef sweeps
always search the shard. Runtime: a few minutes at 100k; at 1M the build takes most of an hour on 2
cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from index.build import build_index, load_vector_table
from index.config import IndexConfig
from index.search import open_index
from index.store import vectors_of

K = 100
EFS = (64, 128, 256, 512, 1024)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def real_set(vectors: Path, data: Path | None) -> tuple[np.ndarray, pd.DataFrame, str]:
    """-> vectors (N, D), catalogue (item_id, title, category, created_at), teacher id."""
    ws_items = vectors / "data" / "items.parquet"
    table = load_vector_table(vectors / "data" / "item_embeddings.parquet" if vectors.is_dir() else vectors)
    if ws_items.exists():
        items = pd.read_parquet(ws_items)
    elif data is not None:
        movies = pd.read_csv(data / "movies.csv")
        items = pd.DataFrame(
            {
                "item_id": movies["movieId"],
                "title": movies["title"],
                "category": movies["genres"].str.split("|").str[0],
                "created_at": pd.Timestamp(0, tz="UTC"),
            }
        )
    else:
        raise SystemExit("a vector parquet needs --data (movies.csv) or a workspace folder")
    ids = table.column("item_id").to_numpy()
    items = items.set_index("item_id").loc[ids].reset_index()
    return vectors_of(table), items, table.column("teacher_id")[0].as_py()


def synthetic_set(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, str]:
    """Gaussian clusters (n / 200 of them), 20 equal categories, built in chunks (1M x 384 = 1.5 GB)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(10, n // 200), d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        x[a:b] = unit(centers[rng.integers(0, len(centers), b - a)] + 0.7 * rng.normal(size=(b - a, d)))
    ids = np.arange(n)
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": "",
            "category": [f"c{i % 20}" for i in ids],
            "created_at": pd.Timestamp(0, tz="UTC"),
        }
    )
    return x, items, "synthetic"


def real_like_set(real: tuple[np.ndarray, pd.DataFrame, str], n: int, noise: float = 0.3, seed: int = 0):
    """n vectors like the real ones: unit(a * v_i + (1 - a) * v_j + noise * g / sqrt(D)), v_i, v_j random real
    vectors, a ~ U(0.5, 1), g standard normal (noise is the expected norm of the noise term); the category of
    v_i. Built in chunks."""
    x_real, items_real, teacher = real
    rng = np.random.default_rng(seed)
    d = x_real.shape[1]
    x = np.empty((n, d), np.float32)
    parent = rng.integers(0, len(x_real), n)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        other = x_real[rng.integers(0, len(x_real), b - a)]
        w = rng.uniform(0.5, 1.0, (b - a, 1)).astype(np.float32)
        g = rng.normal(size=(b - a, d)).astype(np.float32) * (noise / np.sqrt(d))
        x[a:b] = unit(w * x_real[parent[a:b]] + (1 - w) * other + g)
    ids = np.arange(n)
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": "",
            "category": items_real["category"].to_numpy()[parent],
            "created_at": pd.Timestamp(0, tz="UTC"),
        }
    )
    return x, items, f"{teacher} (real-like)"


def sized_set(real: tuple[np.ndarray, pd.DataFrame, str], n: int):
    """-> vectors, catalogue, teacher id, source: the real vectors where n is about the catalogue's size
    ("10000" on MovieLens means its 9,742 titles), else n real-like ones."""
    if n <= 1.1 * len(real[0]):
        return real[0][:n], real[1].iloc[:n], real[2], "real"
    return (*real_like_set(real, n), "real-like")


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def user_queries(x: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit(x[rng.integers(0, len(x), (n, 5))].mean(1))  # (n, D)


def pct(ms: list[float]) -> dict:
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}


def timed(fn, queries) -> tuple[list, dict]:
    for q in queries[:5]:  # warm-up
        fn(q)
    out, ms = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        ms.append((time.perf_counter() - t) * 1e3)
    return out, pct(ms)


def recall(got: list[list[tuple[int, float]]], exact: list[np.ndarray]) -> float:
    return round(
        float(
            np.mean(
                [len({i for i, _ in g} & set(e.tolist())) / len(e) for g, e in zip(got, exact, strict=True)]
            )
        ),
        4,
    )


def top_ids(s: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The ids of the K best scores s (N,), best first."""
    part = np.argpartition(-s, min(K, len(s) - 1))[:K]
    return ids[part[np.argsort(-s[part])]]


def exact_search(x: np.ndarray, ids: np.ndarray, rows: np.ndarray | None = None):
    sub, sub_ids = (x, ids) if rows is None else (x[rows], ids[rows])
    return lambda q: top_ids(sub @ q, sub_ids)


def histories(ids: np.ndarray, n: int, seed: int = 2) -> list[np.ndarray]:
    """n random sets of 20 to 300 item ids: the seen items a Producer query excludes."""
    rng = np.random.default_rng(seed)
    return [rng.choice(ids, int(rng.integers(20, 301)), replace=False) for _ in range(n)]


def exact_excluding(x: np.ndarray, ids: np.ndarray, queries: np.ndarray, seen: list[np.ndarray]) -> list:
    """The exact top K of each query with its seen ids left out."""
    row = {int(i): r for r, i in enumerate(ids)}
    out = []
    for q, excluded in zip(queries, seen, strict=True):
        s = x @ q
        s[[row[int(i)] for i in excluded]] = -np.inf
        out.append(top_ids(s, ids))
    return out


def bench_size(x, items, teacher, args, config: IndexConfig, source: str) -> dict:
    n, d = x.shape
    real = source == "real"
    ids = items["item_id"].to_numpy()

    def vec() -> pd.DataFrame:  # made when a build needs it: at 1M every copy is 1.5 GB
        return pd.DataFrame({"item_id": ids, "vector": list(x), "teacher_id": teacher})

    shares = items["category"].value_counts(normalize=True)
    category = (shares - 0.05).abs().idxmin()  # the category closest to 1 in 20
    rows = np.flatnonzero(items["category"].to_numpy() == category)
    queries = user_queries(x, args.queries)
    shipped = config.for_size(n)
    res = {"n": n, "dim": d, "source": source, "teacher_id": teacher}
    res["settings"] = {k: getattr(shipped, k) for k in ("hnsw_m", "hnsw_ef_construct", "hnsw_ef")}
    res["filter"] = {"category": str(category), "share": round(float(shares[category]), 4)}
    print(
        f"\n== {n} x {d} ({res['source']}); filter category {category} ({shares[category]:.3f})", flush=True
    )

    t = time.perf_counter()
    xm = np.ascontiguousarray(x)
    res["build_s"] = {"numpy": round(time.perf_counter() - t, 3)}
    exact, res_q = {}, {}
    exact["plain"], res_q["exact"] = timed(exact_search(xm, ids), queries)
    exact["filtered"], res_q["exact_filtered"] = timed(exact_search(xm, ids, rows), queries)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        v = build_index(vec(), items, Path(tmp) / "edge", config)
        res["build_s"]["edge"] = round(v.seconds, 2)
        res["peak_rss_mb_after_build"] = peak_rss_mb()
        res["edge_indexed"] = v.indexed
        filt = {"category": str(category)}
        with open_index(Path(tmp) / "edge", config) as idx:
            res["searched_by"] = "graph" if idx._replica.peek().scan is None else "scan"
            got, res_q["edge"] = timed(lambda q: idx.search(q, K), queries)
            _, res_q["edge_again"] = timed(lambda q: idx.search(q, K), queries)  # the same copy again
            got_f, res_q["edge_filtered"] = timed(lambda q: idx.search(q, K, filters=filt), queries)
            t = time.perf_counter()
            for a in range(0, len(queries), 32):
                idx.search_batch(queries[a : a + 32], K)
            res_q["edge_batch32_per_query_ms"] = round((time.perf_counter() - t) * 1e3 / len(queries), 3)
            # as the Producer asks: each query leaves out a user's seen items, alone and in batches of 32
            seen = histories(ids, len(queries))
            got_x, res_q["edge_excluding_seen"] = timed(
                lambda i: idx.search(queries[i], K, exclude_ids=seen[i]), range(len(queries))
            )
            t = time.perf_counter()
            for a in range(0, len(queries), 32):
                idx.search_batch(queries[a : a + 32], K, exclude_ids=seen[a : a + 32])
            res_q["edge_excluding_seen_batch32_per_query_ms"] = round(
                (time.perf_counter() - t) * 1e3 / len(queries), 3
            )
        res["recall_at_100"] = {
            "edge": recall(got, exact["plain"]),
            "edge_filtered": recall(got_f, exact["filtered"]),
            "edge_excluding_seen": recall(got_x, exact_excluding(xm, ids, queries, seen)),
        }
        if res["searched_by"] == "scan":  # the same copy searched by the shard itself, in the same run
            with open_index(Path(tmp) / "edge", replace(config, scan_max_points=0)) as idx:
                got_s, res_q["shard"] = timed(lambda q: idx.search(q, K), queries)
                t = time.perf_counter()
                for a in range(0, len(queries), 32):
                    idx.search_batch(queries[a : a + 32], K, exclude_ids=seen[a : a + 32])
                res_q["shard_excluding_seen_batch32_per_query_ms"] = round(
                    (time.perf_counter() - t) * 1e3 / len(queries), 3
                )
            res["recall_at_100"]["shard"] = recall(got_s, exact["plain"])
            res_q["scan_product_ms"] = product_times(xm, queries)
        res["p99_over_exact_p99"] = round(res_q["edge"]["p99"] / res_q["exact"]["p99"], 4)
        res["ef_sweep"] = ef_sweep(Path(tmp) / "edge", config, queries, exact["plain"])
        print(f"   edge build {v.seconds:.1f} s, indexed {v.indexed}; {res_q}; recall {res['recall_at_100']}")
        if real:  # the same vectors with a graph whatever the thresholds choose at this size
            forced = replace(config, full_scan_threshold_kb=1, indexing_threshold_kb=1)
            v = build_index(vec(), items, Path(tmp) / "graph", forced)
            res["forced_graph"] = {
                "build_s": round(v.seconds, 2),
                "ef_sweep": ef_sweep(Path(tmp) / "graph", forced, queries, exact["plain"]),
            }

    if n <= args.local_max:
        from qdrant_client import QdrantClient

        client = QdrantClient(":memory:")
        local = replace(config, backend="server")
        v = build_index(vec(), items, None, local, client=client)
        res["build_s"]["local"] = round(v.seconds, 2)
        few = queries[: args.local_queries]
        with open_index(None, local, client=client) as idx:
            got, res_q["local"] = timed(lambda q: idx.search(q, K), few)
            _, res_q["local_filtered"] = timed(
                lambda q: idx.search(q, K, filters={"category": str(category)}), few
            )
        res["recall_at_100"]["local"] = recall(got, exact["plain"][: len(few)])
        client.close()
    res["query_ms"] = res_q
    print(f"   build_s {res['build_s']}", flush=True)
    return res


def product_times(x: np.ndarray, queries: np.ndarray, reps: int = 50) -> dict:
    """The scan's matrix product (torch's BLAS: index/scan.py) against numpy's `q @ x.T` on the same
    vectors, for 1, 4 and 32 query rows: median ms of `reps`."""
    import torch

    xt = torch.from_numpy(x)
    out = {}
    for m in (1, 4, 32):
        q = np.ascontiguousarray(queries[:m])
        qt = torch.from_numpy(q)
        products = {"numpy": lambda q=q: q @ x.T, "torch": lambda qt=qt: torch.nn.functional.linear(qt, xt)}
        out[str(m)] = {
            name: timed(lambda _, fn=fn: fn(), range(reps))[1]["p50"] for name, fn in products.items()
        }
    return out


def ef_sweep(folder: Path, config: IndexConfig, queries: np.ndarray, exact: list) -> list[dict]:
    out = []
    for ef in EFS:
        with open_index(folder, replace(config, hnsw_ef=ef, scan_max_points=0)) as idx:  # the shard's graph
            got, lat = timed(lambda q, idx=idx: idx.search(q, K), queries)
        out.append({"ef": ef, "recall": recall(got, exact), **lat})
        print(f"   ef {ef}: recall {out[-1]['recall']} p50 {lat['p50']} p99 {lat['p99']} ms", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, default=None, help="movielens-small (titles/genres for a vector parquet)"
    )
    p.add_argument("--vectors", type=Path, default=None, help="a workspace folder or an item vector parquet")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--local-max", type=int, default=100_000, help="skip local mode above this size")
    p.add_argument("--local-queries", type=int, default=50, help="local mode is slow: fewer queries")
    p.add_argument("--dim", type=int, default=384, help="synthetic dim when there are no real vectors")
    p.add_argument(
        "--synthetic",
        choices=["real-like", "gaussian"],
        default=None,
        help="vectors for sizes above the real catalogue (default: real-like with --vectors, else gaussian)",
    )
    p.add_argument("--tmp", type=Path, default=None, help="where the Edge shards are built")
    p.add_argument(
        "--full-scan-threshold-kb",
        type=int,
        default=None,
        help="build and search with this full-scan (and indexing) threshold instead of IndexConfig's",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/search.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="(Payload indexes have no effect|Local mode performs exact)")
    config = IndexConfig()
    if args.full_scan_threshold_kb is not None:
        kb = args.full_scan_threshold_kb
        config = replace(config, full_scan_threshold_kb=kb, indexing_threshold_kb=kb)

    real = real_set(args.vectors, args.data) if args.vectors else None
    results = []
    t0 = time.perf_counter()
    synthetic = args.synthetic or ("real-like" if real is not None else "gaussian")
    if synthetic == "real-like" and real is None:
        raise SystemExit("--synthetic real-like needs --vectors")
    for n in args.sizes:
        if real is not None and (synthetic == "real-like" or n <= 1.1 * len(real[0])):
            x, items, teacher, source = sized_set(real, n)
            results.append(bench_size(x, items, teacher, args, config, source))
        else:
            d = real[0].shape[1] if real is not None else args.dim
            results.append(bench_size(*synthetic_set(n, d), args, config, "gaussian"))
    report = {
        "command": "python benchmarks/search.py " + " ".join(sys.argv[1:]),
        "load_average": list(os.getloadavg()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": config.to_dict(),
        "k": K,
        "queries": args.queries,
        "seconds": round(time.perf_counter() - t0, 1),
        "sizes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
