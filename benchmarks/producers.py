"""What each producer returns that the others do not, on MovieLens-small, through the running Producer.

    nice -n 10 .venv/bin/python benchmarks/producers.py --workdir .vlmrec/bench-producers \
        --student-run student --sasrec-run sasrec --queries 2000 --out benchmarks/results/producers.json

The workspace must hold the ingested MovieLens-small (`--format movielens`), its embeddings and features,
and two trained runs: a student and an id-space SASRec, both trained on the temporal split's train events
(`vlmrec train` does). The script builds the three indexes the producers read (student: <workdir>/index,
sasrec: indexes/<run>, dot product; similar: indexes/teacher) unless --no-build, starts the Producer on
127.0.0.1 (Ray Serve, one replica) with `popular` counting train-period events only (popular_until = the
first test event's time: no test event leaks into it), and then, for a seeded sample of the temporal
split's test queries (shared/data/README.md: every test event, history = all the user's earlier events):

- asks every producer for its top 100 (POST /v1/candidates) and the Mixer for 100 (POST /v1/mix, equal
  weights), each query as an anonymous user whose clicks are the history (`recent_item_ids`, its last 1000,
  excluded from the answers), so no stored sequence from after the query's time is read;
- quality: HR@100 (= Recall@100, one target) and NDCG@10 of the query's target in each list (a target not
  in the list counts as a miss), per event (micro) with a 95% bootstrap interval over users, and macro;
- overlap: the mean Jaccard of every pair of producers' top-100 sets on the same queries;
- latency: client-side wall time of each call (same run, same queries, calls in turn): p50 / p99 per
  producer, of the slowest producer per query, and of the Mixer;
- `similar`'s N (the last N distinct clicks whose neighbours it returns): the same rule computed offline
  with numpy from the stored teacher vectors for N in --similar-sweep, on the same queries; the N the
  Producer served must give the same lists (a check of the serving path).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import machine_facts  # noqa: E402

from serving.config import PRODUCERS, ProducerConfig  # noqa: E402
from training.metrics import metrics_from_ranks, temporal_split  # noqa: E402
from vlmrec.workspace import Workspace  # noqa: E402

K = 100
MISS = 10**9  # the rank of a target that is not in the list
ANONYMOUS = 10**12  # query q is user ANONYMOUS + q: no stored clicks


def build_indexes(ws: Workspace, student: str, sasrec: str) -> dict:
    from index import cli as index_cli

    parser = argparse.ArgumentParser()
    index_cli.add_arguments(parser)
    t0 = time.perf_counter()
    vectors = ws.runs / student / "export" / "item_vectors.parquet"
    for argv in (["--vectors", str(vectors)], ["--run", sasrec], ["--teacher"]):
        index_cli.run(parser.parse_args(["build", "--workdir", str(ws.root), *argv]))
    return {"build_s": round(time.perf_counter() - t0, 1)}


def similar_offline(ws: Workspace, histories: list[np.ndarray], last_n: int, k: int = K) -> list[list[int]]:
    """`similar` in numpy: each item's best cosine to the last `last_n` distinct clicks, the history's
    items (its last 1000, as sent) excluded, top k."""
    table = pq.read_table(ws.embeddings, columns=["item_id", "vector"]).to_pandas()
    ids = table["item_id"].to_numpy(np.int64)
    x = np.stack(table["vector"].to_numpy()).astype(np.float32)  # (N, D), unit rows
    row = {int(i): r for r, i in enumerate(ids)}
    out = []
    for hist in histories:
        hist = hist[-1000:]
        last = [row[i] for i in dict.fromkeys(int(h) for h in hist[::-1]) if i in row][:last_n]
        best = (x[last] @ x.T).max(0)  # (N,)
        best[[row[int(h)] for h in hist if int(h) in row]] = -np.inf
        top = np.argpartition(-best, k)[:k]
        out.append(ids[top[np.argsort(-best[top], kind="stable")]].tolist())
    return out


def rank_metrics(lists: list[list[int]], targets, users, cold) -> dict:
    ranks = np.array([lst.index(t) if t in lst else MISS for lst, t in zip(lists, targets, strict=True)])
    m = metrics_from_ranks(ranks, ks=(10, K), users=users)
    c = metrics_from_ranks(ranks[cold], ks=(10, K), users=users[cold], n_bootstrap=0) if cold.any() else None
    return {
        f"HR@{K}": m["micro"][f"HR@{K}"],
        "NDCG@10": m["micro"]["NDCG@10"],
        f"HR@{K}_ci95": m["micro_ci95"][f"HR@{K}"],
        "NDCG@10_ci95": m["micro_ci95"]["NDCG@10"],
        f"macro_HR@{K}": m["macro"][f"HR@{K}"],
        "macro_NDCG@10": m["macro"]["NDCG@10"],
        f"cold_HR@{K}": c["micro"][f"HR@{K}"] if c else None,
        "mean_list_length": float(np.mean([len(x) for x in lists])),
    }


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2)}


def run(args: argparse.Namespace) -> dict:
    from serving import cli as serving_cli

    ws = Workspace(args.workdir)
    result: dict = {
        "machine": machine_facts(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "workdir": str(ws.root),
        "runs": {"student": args.student_run, "sasrec": args.sasrec_run},
        "protocol": "ML-time-split, sampled test queries; top-100 lists from the running Producer",
    }
    if not args.no_build:
        result["indexes"] = build_indexes(ws, args.student_run, args.sasrec_run)
    events = pq.read_table(ws.events).to_pandas()
    split = temporal_split(events, args.train_fraction)
    q = split.test
    first_test = events["event_timestamp"].sort_values(kind="stable").iloc[len(split.train)]
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(q), size=min(args.queries, len(q)), replace=False))
    result["queries"] = {
        "sampled": len(chosen),
        "of": len(q),
        "seed": args.seed,
        "users": int(len(np.unique(q.user_ids[chosen]))),
        "cold_targets": int(q.cold[chosen].sum()),
        "popular_until": first_test.isoformat(),
        "history_passed": "the last 1000 clicks (MAX_RECENT); 1000 or fewer for "
        f"{int(sum(len(q.histories[i]) <= 1000 for i in chosen))} of {len(chosen)} queries",
    }
    config = ProducerConfig(
        workdir=str(ws.root),
        run=args.student_run,
        sasrec_run=args.sasrec_run,
        popular_until=first_test.isoformat(),
        default_k=K,
        mix_budget_ms=args.budget_ms,
    )
    url = serving_cli.start(config, port=args.port)
    lists: dict[str, list[list[int]]] = {p: [] for p in (*PRODUCERS, "mix")}
    ms: dict[str, list[float]] = {p: [] for p in (*PRODUCERS, "mix")}
    server_ms: dict[str, list[float]] = {p: [] for p in (*PRODUCERS, "mix")}
    dropped: dict[str, int] = dict.fromkeys(PRODUCERS, 0)
    fallbacks: dict[str, int] = dict.fromkeys(PRODUCERS, 0)
    t_run = time.perf_counter()
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            ready = http.get("/readyz").json()
            result["producers"] = ready["producers"]
            missing = [p for p, r in ready["producers"].items() if not r["ready"]]
            if missing:
                raise RuntimeError(f"producers not ready: {missing}: {ready['producers']}")
            for n, i in enumerate(chosen):
                body = {
                    "user_id": ANONYMOUS + int(i),
                    "k": K,
                    "recent_item_ids": [int(x) for x in q.histories[i][-1000:]],
                }
                for p in PRODUCERS:
                    t0 = time.perf_counter()
                    r = http.post("/v1/candidates", json={**body, "producer": p})
                    ms[p].append((time.perf_counter() - t0) * 1e3)
                    r.raise_for_status()
                    got = r.json()
                    lists[p].append([c["item_id"] for c in got["candidates"]])
                    server_ms[p].append(got["timings_ms"]["total"])
                    fallbacks[p] += got["fallback"] is not None
                t0 = time.perf_counter()
                r = http.post("/v1/mix", json=body)
                ms["mix"].append((time.perf_counter() - t0) * 1e3)
                r.raise_for_status()
                got = r.json()
                lists["mix"].append([c["item_id"] for c in got["candidates"]])
                server_ms["mix"].append(got["timings_ms"]["total"])
                for p, rep in got["producers"].items():
                    dropped[p] += rep["status"] != "ok"
                if (n + 1) % 200 == 0:
                    print(f"{n + 1}/{len(chosen)} queries, {time.perf_counter() - t_run:.0f}s", flush=True)
    finally:
        serving_cli.stop()
    result["run_s"] = round(time.perf_counter() - t_run, 1)

    targets, users, cold = q.targets[chosen], q.user_ids[chosen], q.cold[chosen]
    result["quality"] = {p: rank_metrics(ls, targets, users, cold) for p, ls in lists.items()}
    histories = [q.histories[i] for i in chosen]
    sweep = {}
    for n in args.similar_sweep:
        offline = similar_offline(ws, histories, n)
        sweep[n] = rank_metrics(offline, targets, users, cold)
        if n == config.similar_last_n:
            same = sum(a == b for a, b in zip(offline, lists["similar"], strict=True))
            sweep[n]["same_lists_as_served"] = f"{same} of {len(offline)}"
    result["similar_last_n_offline"] = sweep
    result["fallbacks"] = fallbacks
    result["mix_dropped"] = dropped
    result["jaccard_top100"] = {
        f"{a}|{b}": round(
            float(
                np.mean(
                    [
                        len(set(x) & set(y)) / max(len(set(x) | set(y)), 1)
                        for x, y in zip(lists[a], lists[b], strict=True)
                    ]
                )
            ),
            4,
        )
        for a, b in itertools.combinations(PRODUCERS, 2)
    }
    slowest = np.max(np.array([ms[p] for p in PRODUCERS]), axis=0)  # (Q,) the slowest producer per query
    result["latency_ms"] = {
        "client": {p: percentiles(v) for p, v in ms.items()},
        "client_slowest_producer": percentiles(list(slowest)),
        "server_total": {p: percentiles(v) for p, v in server_ms.items()},
        "mix_budget_ms": args.budget_ms,
    }
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/producers.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a MovieLens-small workspace (see above)")
    parser.add_argument("--student-run", default="student")
    parser.add_argument("--sasrec-run", default="sasrec")
    parser.add_argument("--queries", type=int, default=2000, help="test queries sampled (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-fraction", type=float, default=0.8)
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="the Mixer's time budget")
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--similar-sweep", type=int, nargs="*", default=[1, 3, 5], help="offline N values")
    parser.add_argument("--no-build", action="store_true", help="use the indexes already in the workspace")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "producers.json")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("quality", "jaccard_top100", "latency_ms")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
