"""Producer latency, throughput and freshness over HTTP on 127.0.0.1, against a no-op Serve endpoint.

    python benchmarks/producer.py --workdir .vlmrec/ml --out benchmarks/results/producer.json

The workspace must hold the run's export (benchmarks/movielens.py trains it). The script builds an Edge
index of the run's item vectors under <workdir>/bench-index/<run> (unless present), starts Ray Serve with
two applications behind one HTTP proxy: the real Producer (serving.cli.start) and `noop`, a FastAPI
deployment that validates the same request body and returns a fixed response of k candidates: the
framework floor (proxy, routing, JSON). Then, for concurrency 1, 8 and 32 (closed loop: each client sends
its next request when the last one returns), both endpoints get the same requests for random known users,
k=100: p50/p99 latency, requests/s, errors; the Producer's per-stage times come from its `timings_ms`, the
batches its coalescer formed from each answer's `batch_size`. Access logs are off for both endpoints.
Freshness: for a user, POST /v1/events with the current top candidate, then POST /v1/candidates until that
item is gone (exclude_seen): the time from the event's send to the first candidates answer reflecting it,
for --freshness-trials users (200: a p99 of 30 would be the slowest trial), with the replica's own time per
POST.
Each Producer point says how often its user-vector cache was used (`vector_cache`: rows found, rows computed,
from /readyz): the random users repeat, and a user asking again with no new click reuses the vector. So c1 and
c32 are run again with one new click per request (`load_new_clicks`: a random item in recent_item_ids, the
same bodies to the no-op), where no request reuses one: every answer pays its forward.
The c1 point is then repeated three times, Producer and no-op in turn, for its spread (`c1_alternation`),
and the c32 point likewise with repeating users and with new clicks (`c32_alternation`: the requests/s
ratio of each pair and of the pooled runs).
Coalescer wait: the Producer at c8 and c32 under each max_wait_ms of `--waits`, against the no-op.
Search path: the index searched by the replica's exact scan against its HNSW graph (`scan_max_points` 0), in
turn, at c1 and c32 with new clicks (`search_path`).
Scale-out: the same c32 load against the Producer and the no-op with 1 and 2 replicas each (`--replicas`),
each Producer replica with its own Edge copy. The load generator runs on the same machine (2 cores here):
figures include its cost, and each point says where a request's CPU went (`cpu_ms_per_request`: replicas,
proxy, load generator, other; from /proc, so the machine must be otherwise idle).
"""

# No `from __future__ import annotations`: FastAPI resolves the no-op endpoint's body type at runtime.
import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vlmrec.workspace import Workspace


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": len(a)}


def noop_app(k: int, replicas: int = 1):
    """The floor: same route and body validation as the Producer, a constant answer, no work."""
    from fastapi import FastAPI
    from ray import serve

    from serving.api import CandidatesRequest

    api = FastAPI()
    body = {
        "producer": "noop",
        "model_version": "noop",
        "index_version": "noop",
        "candidates": [{"item_id": i, "score": 1.0 / (i + 1), "rank": i + 1} for i in range(k)],
        "fallback": None,
        "warnings": [],
    }

    @serve.deployment(max_ongoing_requests=32)
    @serve.ingress(api)
    class Noop:
        @api.post("/v1/candidates")
        async def candidates(self, request: CandidatesRequest) -> dict:
            return body

    # no CPU reserved: its replicas fit beside the Producer's on a small local cluster (Ray schedules by it)
    return Noop.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0}).bind()


async def load(
    url: str,
    users: np.ndarray,
    n: int,
    concurrency: int,
    k: int,
    seed: int,
    keep_latencies: bool = False,
    new_clicks: np.ndarray | None = None,
) -> dict:
    """Closed-loop load: `concurrency` clients, n requests in all. -> latency percentiles, rps, stage times.
    `new_clicks`: item ids; each request then carries one of them at random in recent_item_ids, a click the
    store does not hold yet, so no two requests have the same model input (none reuses a user vector)."""
    import httpx

    rng = np.random.default_rng(seed)
    picks = iter(rng.choice(users, size=n).tolist())
    clicks = iter(rng.choice(new_clicks, size=n).tolist()) if new_clicks is not None else None
    lat, stages, errors = [], {"feature": [], "model": [], "search": [], "total": []}, 0
    batches: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for user in picks:
            body = {"user_id": int(user), "k": k}
            if clicks is not None:
                body["recent_item_ids"] = [int(next(clicks))]
            t0 = time.perf_counter()
            try:
                r = await http.post(url, json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            lat.append((time.perf_counter() - t0) * 1000)
            if not ok:
                errors += 1
                continue
            answer = r.json()
            for stage, ms in (answer.get("timings_ms") or {}).items():
                stages[stage].append(ms)
            if "batch_size" in answer:
                batches.append(answer["batch_size"])

    async with httpx.AsyncClient(limits=limits, timeout=30.0) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "latency_ms": percentiles(lat),
        "requests_per_s": len(lat) / wall,
        "errors": errors,
        "stages_ms": {s: percentiles(v) for s, v in stages.items() if v},
        **({"batch_sizes": batch_summary(batches)} if batches else {}),
        **({"latencies_ms": lat} if keep_latencies else {}),
    }


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) and command line of every process on this machine (Linux /proc)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out[int(pid)] = ((int(stat[11]) + int(stat[12])) / tick, cmd)
    return out


def cpu_per_request(before: dict, after: dict, n: int) -> dict[str, float]:
    """Where one request's CPU went between two cpu_seconds() snapshots, ms: the serving replicas, the
    HTTP proxy, this load generator, everything else (Ray's own processes, the OS)."""
    groups = {"replica": 0.0, "proxy": 0.0, "load_generator": 0.0, "other": 0.0}
    for pid, (cpu, cmd) in after.items():
        spent = cpu - before.get(pid, (0.0, ""))[0]
        group = (
            "replica" if "ServeReplica" in cmd
            else "proxy" if "ProxyActor" in cmd
            else "load_generator" if pid == os.getpid()
            else "other"
        )  # fmt: skip
        groups[group] += spent
    return {g: round(v / n * 1000, 3) for g, v in groups.items()}


def batch_summary(sizes: list[int]) -> dict:
    """The coalescer's batches as the requests saw them: how many requests rode in a batch of each size."""
    values, counts = np.unique(np.asarray(sizes), return_counts=True)
    return {
        "requests_by_batch_size": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "mean_per_request": float(np.mean(sizes)),
        "max": int(np.max(sizes)),
    }


def vector_cache(base: str) -> dict:
    """The student's user-vector cache counts (entries, hits, misses) from the replica's /readyz."""
    import httpx

    return httpx.get(f"{base}/readyz", timeout=30.0).json()["producers"]["student"]["vector_cache"]


def cache_use(before: dict, after: dict) -> dict:
    """What one load point did with the user-vector cache: rows found in it, rows computed, the hit rate."""
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {"hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1)}


async def freshness(base: str, users: np.ndarray, trials: int, k: int) -> dict:
    """Time from sending a click to the first /v1/candidates answer that no longer offers the clicked item;
    beside it each event POST as the client saw it and as the replica timed it (its answer's timings_ms), and
    the slowest POSTs in full (where their time went)."""
    import httpx

    out, event_ms, polls, server = [], [], [], []
    async with httpx.AsyncClient(timeout=30.0) as http:
        for user in users[:trials]:
            first = (await http.post(f"{base}/v1/candidates", json={"user_id": int(user), "k": k})).json()
            if first.get("fallback") or not first["candidates"]:
                continue
            item = first["candidates"][0]["item_id"]
            t0 = time.perf_counter()
            r = await http.post(f"{base}/v1/events", json={"user_id": int(user), "item_id": item})
            event_ms.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            server.append(r.json()["timings_ms"])
            n = 0
            while True:
                n += 1
                got = (await http.post(f"{base}/v1/candidates", json={"user_id": int(user), "k": k})).json()
                if item not in {c["item_id"] for c in got["candidates"]}:
                    break
                if n == 1000:
                    raise RuntimeError(f"user {user}: the click on {item} never reached the candidates")
            out.append((time.perf_counter() - t0) * 1000)
            polls.append(n)
    slowest = sorted(range(len(event_ms)), key=lambda i: -event_ms[i])[:5]
    return {
        "event_to_candidates_ms": percentiles(out),
        "event_post_ms": percentiles(event_ms),
        "event_server_ms": {stage: percentiles([t[stage] for t in server]) for stage in ("write", "total")},
        "max_ms": {"event_to_candidates": max(out), "event_post": max(event_ms)},
        "slowest_posts": [
            {"trial": i, "post_ms": event_ms[i], "server_ms": server[i], "event_to_candidates_ms": out[i]}
            for i in slowest
        ],
        "polls": polls,
    }


def producer_recall(base: str, config, export: Path, users: np.ndarray, k: int) -> dict:
    """Recall@k of the Producer's answer against the exact cosine top-k for the same user vector, computed
    here from the export and the online store with the Producer's own path (serving.state's loaded
    student, serving.asks' Ask, the source's inputs() and user_vectors(); history excluded)."""
    import httpx

    from serving.api import CandidatesRequest
    from serving.asks import Ask, Features
    from serving.online import read_sequences
    from serving.state import load_state

    table = pq.read_table(export / "item_vectors.parquet").to_pandas()
    ids = table["item_id"].to_numpy(np.int64)
    mat = np.stack(table["vector"].to_numpy()).astype(np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    state = load_state(config)
    try:
        student = state.sources["student"]
        features = Features(read_sequences(state.store, [int(u) for u in users]), None, 0.0)
        ask = Ask.of([CandidatesRequest(user_id=int(u)) for u in users], features, config)
        seqs = ask.seqs
        vecs = student.user_vectors(student.inputs(ask, range(len(users))).ids)
    finally:
        state.close()
    recalls = []
    with httpx.Client(timeout=30.0) as http:
        for user, seq, vec in zip(users, seqs, vecs, strict=True):
            if not any(seq):
                continue
            scores = mat @ (vec / np.linalg.norm(vec))
            scores[np.isin(ids, seq)] = -np.inf
            exact = set(ids[np.argsort(-scores, kind="stable")[:k]].tolist())
            got = http.post(f"{base}/v1/candidates", json={"user_id": int(user), "k": k}).json()
            recalls.append(len(exact & {c["item_id"] for c in got["candidates"]}) / k)
    return {"users": len(recalls), "mean_recall_at_k": float(np.mean(recalls)), "min": float(np.min(recalls))}


def in_turn(
    config,
    args,
    users,
    settings: dict[str, dict],
    concurrency,
    rounds: int,
    new_clicks=None,
    noop: bool = False,
) -> dict[str, dict[str, dict]]:
    """The Producer reconfigured to each of `settings` (name -> ProducerConfig fields) in turn, `rounds`
    times; at each, the load at every `concurrency` (then the no-op's, with `noop`). -> {"c<n>": {setting:
    latency over all its requests, mean requests/s, mean batch per request, the search stage's mean p50,
    the no-op's mean requests/s}}; the Producer goes back to `config` at the end."""
    from dataclasses import replace

    from serving.cli import start

    runs: dict[str, dict[str, dict[str, list]]] = {}
    for _ in range(rounds):
        for name, fields in settings.items():
            base = start(replace(config, **fields), port=args.port, access_log=False)
            asyncio.run(load(f"{base}/v1/candidates", users, 50, 4, args.k, seed=99))
            for c in concurrency:
                got = runs.setdefault(f"c{c}", {}).setdefault(
                    name, {k: [] for k in ("lat", "rps", "batch", "search", "noop_rps")}
                )
                r = asyncio.run(load(f"{base}/v1/candidates", users, args.requests, c, args.k, seed=c,
                                     keep_latencies=True, new_clicks=new_clicks))  # fmt: skip
                got["lat"] += r["latencies_ms"]
                got["rps"].append(r["requests_per_s"])
                got["batch"].append(r["batch_sizes"]["mean_per_request"])
                got["search"].append(r["stages_ms"]["search"]["p50"])
                against = ""
                if noop:
                    n = asyncio.run(load(f"{base}/noop/v1/candidates", users, args.requests, c, args.k, seed=c,
                                         new_clicks=new_clicks))  # fmt: skip
                    got["noop_rps"].append(n["requests_per_s"])
                    against = f" against the no-op's {n['requests_per_s']:.0f}"
                print(f"{name}, c{c}: p99 {r['latency_ms']['p99']:.1f} ms, {r['requests_per_s']:.0f} req/s"
                      f"{against}, mean batch {got['batch'][-1]:.1f}, search stage p50 {got['search'][-1]:.2f} ms",
                      flush=True)  # fmt: skip
    start(config, port=args.port, access_log=False)  # back to the config under test
    return {
        c: {
            name: {
                "latency_ms": percentiles(got["lat"]),
                "requests_per_s": float(np.mean(got["rps"])),
                "mean_batch": float(np.mean(got["batch"])),
                "search_stage_p50_ms": float(np.mean(got["search"])),
                **({"noop_requests_per_s": float(np.mean(got["noop_rps"]))} if noop else {}),
            }
            for name, got in by_setting.items()
        }
        for c, by_setting in runs.items()
    }


def exposure_log_cost(config, args, users: np.ndarray) -> dict:
    """The Producer with its exposure log off, then on (one record per answer, serving/exposures.py), three
    times each in alternation at c1 and c32 (`in_turn`: a config update of the same replica): p50/p99 per
    setting over all its requests and the on/off ratios."""
    turns = in_turn(config, args, users, {"off": {"exposure_path": ""}, "on": {"exposure_path": None}},
                    (1, 32), rounds=3)  # fmt: skip
    out: dict[str, dict] = {}
    for c, got in turns.items():
        point = {setting: got[setting]["latency_ms"] for setting in ("off", "on")}
        point["p99_ratio"] = point["on"]["p99"] / point["off"]["p99"]
        point["p50_ratio"] = point["on"]["p50"] / point["off"]["p50"]
        out[c] = point
    return out


def alternation(
    targets: dict[str, str], users: np.ndarray, args, c: int = 1, pairs: int = 3, new_clicks=None
) -> dict:
    """The point at concurrency c again, Producer then no-op, `pairs` times in turn: each pair's p99 and
    requests/s ratios (their spread is the figure's run-to-run noise) and the ratios of the pooled figures
    (pairs x requests each; requests/s = all requests over all their seconds)."""
    lat: dict[str, list[float]] = {"producer": [], "noop": []}
    seconds = {"producer": 0.0, "noop": 0.0}
    ratios, rps_ratios = [], []
    for pair in range(pairs):
        p99, rps = {}, {}
        for name, url in targets.items():
            r = asyncio.run(
                load(url, users, args.requests, c, args.k, seed=100 + pair, keep_latencies=True,
                     new_clicks=new_clicks)
            )  # fmt: skip
            lat[name] += r["latencies_ms"]
            seconds[name] += args.requests / r["requests_per_s"]
            p99[name], rps[name] = r["latency_ms"]["p99"], r["requests_per_s"]
        ratios.append(p99["producer"] / p99["noop"])
        rps_ratios.append(rps["producer"] / rps["noop"])
        print(
            f"c{c} pair {pair}: p99 {p99['producer']:.1f} against {p99['noop']:.1f} ms, "
            f"{rps['producer']:.0f} against {rps['noop']:.0f} req/s",
            flush=True,
        )
    pooled = {name: percentiles(ms) for name, ms in lat.items()}
    return {
        "pairs": pairs,
        "new_clicks": new_clicks is not None,
        "ratio_p99_per_pair": ratios,
        "ratio_p99_pooled": pooled["producer"]["p99"] / pooled["noop"]["p99"],
        "ratio_p50_pooled": pooled["producer"]["p50"] / pooled["noop"]["p50"],
        "ratio_rps_per_pair": rps_ratios,
        "ratio_rps_pooled": seconds["noop"] / seconds["producer"],
        **pooled,
    }


def coalescer_wait(config, args, users: np.ndarray) -> dict:
    """The coalescer's max_wait_ms (serving/pipeline.py): the Producer reconfigured to each wait in
    `--waits`, in turn, twice (`in_turn`), each point followed by the no-op at the same concurrency (8 and
    32): requests/s of each (mean of the two), latency over both runs' requests, the batches formed, the
    ratio to the no-op."""
    settings = {str(wait): {"max_wait_ms": wait} for wait in args.waits}
    turns = in_turn(config, args, users, settings, (8, 32), rounds=2, noop=True)
    return {
        c: {
            wait: {
                "latency_ms": got["latency_ms"],
                "requests_per_s": got["requests_per_s"],
                "noop_requests_per_s": got["noop_requests_per_s"],
                "ratio_rps": got["requests_per_s"] / got["noop_requests_per_s"],
                "mean_batch": got["mean_batch"],
            }
            for wait, got in waits.items()
        }
        for c, waits in turns.items()
    }


def search_paths(config, args, users: np.ndarray, items: np.ndarray) -> dict:
    """The replica's search of this index: the exact scan (index/scan.py, the default up to scan_max_points)
    against the shard's HNSW graph (scan_max_points 0), the Producer reconfigured to each in turn, three
    times (`in_turn`), at c1 and c32 with a new click in every request (each answer pays its forward and its
    search): latency over all runs' requests, mean requests/s, the search stage's mean p50, graph / scan."""
    settings = {"scan": {"scan_max_points": config.scan_max_points}, "graph": {"scan_max_points": 0}}
    turns = in_turn(config, args, users, settings, (1, 32), rounds=3, new_clicks=items)
    out: dict[str, dict] = {}
    for c, paths in turns.items():
        out[c] = {
            path: {k: got[k] for k in ("latency_ms", "requests_per_s", "search_stage_p50_ms")}
            for path, got in paths.items()
        }
        scan, graph = out[c]["scan"], out[c]["graph"]
        out[c]["graph_over_scan"] = {
            "p50": graph["latency_ms"]["p50"] / scan["latency_ms"]["p50"],
            "p99": graph["latency_ms"]["p99"] / scan["latency_ms"]["p99"],
            "requests_per_s": graph["requests_per_s"] / scan["requests_per_s"],
        }
    return out


def point(targets: dict[str, str], base: str, users: np.ndarray, c: int, args, new_clicks=None) -> dict:
    """One load point: the Producer, then the no-op, the same requests at concurrency c; the Producer's use
    of its user-vector cache over the point, CPU per request, and the Producer / no-op ratios."""
    out: dict = {}
    for name, url in targets.items():
        cache = vector_cache(base) if name == "producer" else None
        before = cpu_seconds()
        r = asyncio.run(load(url, users, args.requests, c, args.k, seed=c, new_clicks=new_clicks))
        r["cpu_ms_per_request"] = cpu_per_request(before, cpu_seconds(), args.requests)
        if cache is not None:
            r["vector_cache"] = cache_use(cache, vector_cache(base))
        out[name] = r
        lat, what = r["latency_ms"], " (new clicks)" if new_clicks is not None else ""
        hit = f", cache hit rate {r['vector_cache']['hit_rate']:.2f}" if cache is not None else ""
        print(
            f"concurrency {c:>2} {name:>8}{what}: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
            f"{r['requests_per_s']:.0f} req/s, {r['errors']} errors{hit}",
            flush=True,
        )
    prod, noop = out["producer"], out["noop"]
    out["ratio_p50"] = prod["latency_ms"]["p50"] / noop["latency_ms"]["p50"]
    out["ratio_p99"] = prod["latency_ms"]["p99"] / noop["latency_ms"]["p99"]
    out["ratio_rps"] = prod["requests_per_s"] / noop["requests_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".vlmrec/ml")
    p.add_argument("--run", default="student-hybrid-age-fusion", help="the student export to serve")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--requests", type=int, default=600, help="requests per endpoint and concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--freshness-trials", type=int, default=200)
    p.add_argument("--replicas", type=int, nargs="*", default=[1, 2], help="scale-out: c32 per replica count")
    p.add_argument("--waits", type=float, nargs="*", default=[5.0, 25.0, 100.0], help="coalescer max_wait_ms")
    p.add_argument("--out", default="benchmarks/results/producer.json")
    args = p.parse_args()

    from ray import serve

    from serving.cli import start, stop
    from serving.config import ProducerConfig

    ws = Workspace(args.workdir)
    export = ws.runs / args.run / "export"
    index_dir = ws.root / "bench-index" / args.run
    if not (export / "run.json").exists():
        sys.exit(f"{export} is missing: train the run first (benchmarks/movielens.py)")
    if not index_dir.exists():
        vlmrec = str(Path(sys.executable).with_name("vlmrec"))
        subprocess.run(
            [
                vlmrec,
                "index",
                "build",
                "--workdir",
                args.workdir,
                "--index-dir",
                str(index_dir),
                "--vectors",
                str(export / "item_vectors.parquet"),
            ],  # fmt: skip
            check=True,
        )
    users = np.unique(pq.read_table(ws.events, columns=["user_id"]).column(0).to_numpy())
    loadavg = {"start": [round(x, 2) for x in os.getloadavg()]}
    config = ProducerConfig(workdir=args.workdir, run=args.run, index_dir=str(index_dir))
    base = start(config, port=args.port, access_log=False)
    try:
        serve.run(
            noop_app(args.k), name="noop", route_prefix="/noop", logging_config={"enable_access_log": False}
        )
        targets = {"producer": f"{base}/v1/candidates", "noop": f"{base}/noop/v1/candidates"}
        for url in targets.values():  # warm-up: connections, lazy imports, first forward
            asyncio.run(load(url, users, 50, 4, args.k, seed=99))
        results = {f"c{c}": point(targets, base, users, c, args) for c in args.concurrency}
        items = pq.read_table(export / "item_vectors.parquet", columns=["item_id"]).column(0).to_numpy()
        new_clicks = {f"c{c}": point(targets, base, users, c, args, items) for c in (1, 32)}
        c1_pairs = alternation(targets, users, args) if 1 in args.concurrency else {}
        c32_pairs = {  # the throughput goal's point, in turn: with repeating users, and with new clicks
            "reuse": alternation(targets, users, args, c=32),
            "new_clicks": alternation(targets, users, args, c=32, new_clicks=items),
        }
        rng = np.random.default_rng(7)
        recall = producer_recall(base, config, export, rng.choice(users, 200, replace=False), args.k)
        print(f"Producer recall@{args.k} vs exact: {recall['mean_recall_at_k']:.4f}", flush=True)
        fresh = asyncio.run(freshness(base, rng.permutation(users), args.freshness_trials, args.k))
        print(
            f"freshness: event -> candidates p50 {fresh['event_to_candidates_ms']['p50']:.1f} ms", flush=True
        )
        waits = coalescer_wait(config, args, users) if args.waits else {}
        paths = search_paths(config, args, users, items)
        exposure_log = exposure_log_cost(config, args, users)
        scale_out: dict[str, dict] = {}
        scale_noop: dict[str, dict] = {}
        # scale-out: the same c32 load, Producer and no-op with n replicas each (each its own Edge copy)
        for n in args.replicas:
            stop()
            base = start(config, port=args.port, replicas=n, access_log=False)
            serve.run(
                noop_app(args.k, n),
                name="noop",
                route_prefix="/noop",
                logging_config={"enable_access_log": False},
            )
            for name, url, out in (
                ("producer", f"{base}/v1/candidates", scale_out),
                ("noop", f"{base}/noop/v1/candidates", scale_noop),
            ):
                asyncio.run(load(url, users, 50, 4, args.k, seed=99))
                before = cpu_seconds()
                r = asyncio.run(load(url, users, args.requests, 32, args.k, seed=32))
                r["cpu_ms_per_request"] = cpu_per_request(before, cpu_seconds(), args.requests)
                out[str(n)] = r
                print(
                    f"{n} replica(s) {name:>8}, c32: {r['requests_per_s']:.0f} req/s, "
                    f"p99 {r['latency_ms']['p99']:.1f} ms",
                    flush=True,
                )
            scale_noop[f"ratio_rps_producer_over_noop_{n}"] = (
                scale_out[str(n)]["requests_per_s"] / scale_noop[str(n)]["requests_per_s"]
            )
        if "1" in scale_out and "2" in scale_out:
            scale_out["ratio_rps_2_over_1"] = (
                scale_out["2"]["requests_per_s"] / scale_out["1"]["requests_per_s"]
            )
    finally:
        stop()
    loadavg["end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "command": " ".join(["python", "benchmarks/producer.py", *sys.argv[1:]]),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "run": args.run,
        "k": args.k,
        "requests_per_point": args.requests,
        "load": results,
        "load_new_clicks": new_clicks,
        "vector_cache_size": config.vector_cache,
        "c1_alternation": c1_pairs,
        "c32_alternation": c32_pairs,
        "producer_recall_vs_exact": recall,
        "freshness": fresh,
        "scale_out_c32": scale_out,
        "scale_out_c32_noop": scale_noop,
        "exposure_log": exposure_log,
        "coalescer_wait": waits,
        "search_path": paths,
        "load_average": loadavg,
        "access_log": False,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
