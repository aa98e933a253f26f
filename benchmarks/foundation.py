"""Foundation benchmark (issue 2): ingest, embed, features on MovieLens-small, and one teacher sanity check.

    nice -n 5 .venv/bin/python benchmarks/foundation.py --data ../shared/data/movielens-small \
        --workdir .vlmrec/bench-ml --out benchmarks/results/foundation.json

Every stage runs through the real `vlmrec` command path: a child process parses the stage's flags with the
CLI's own parser (`vlmrec.cli.build_parser`) and calls the module's `run(args)`, exactly as `vlmrec <stage>`
does, then hands back the report `run` returns. The wall time of that child is the command's wall time
(interpreter start, imports, Ray start, the work, the writes).

1. ingest    vlmrec ingest --format movielens --data D --workdir W
2. embed     vlmrec embed --workdir W --num-actors 1|2 (minilm, Ray Data actor pool, batch 64)
3. features  vlmrec features --workdir W [--online-store redis], Redis = a throwaway redis-server started here
4. online    vlmrec.features.online_sequences (the Producer's path): 1 and 100 random users per call,
             warm-up, then `--reps` timed calls; every returned sequence is checked against the last
             click-sequence snapshot of its user
5. quality   genre agreement of each movie's 10 nearest teacher neighbours (cosine, itself excluded) vs 10
             random movies (same seed); plus a control embedded from titles only (no genre words)
6. diagnostics (skip with --no-diagnostics): teacher load time and direct (no Ray) throughput on a random
             subset, file order vs token-length order, 1 vs 2 torch threads; materialize time per feature
             view; the torch threads a Ray Data actor gets; the real path's ItemEmbedder with N actors over
             blocks cut in the driver (no repartition task)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from machine import RedisServer, machine_facts  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
MARKER = ".foundation-bench"  # the workdir holds it: only such a folder is ever wiped
CHILD = "_child"
K = 10  # neighbours in the quality check
ENV = {  # offline, as in the tests
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


# ------------------------------------------------------------------------------------------- plumbing


def _child(report_path: str, argv: list[str]) -> None:
    """What `vlmrec <stage> ...` does (vlmrec.cli.main), plus writing the returned report as JSON."""
    from vlmrec.cli import build_parser

    args = build_parser(argv[0]).parse_args(argv)
    report = importlib.import_module(args._module).run(args)
    report = report.to_dict() if hasattr(report, "to_dict") else report
    Path(report_path).write_text(json.dumps(report, default=str))


def run_command(
    argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None, retries: int = 4
) -> dict:
    """Run `vlmrec <argv>` in a fresh process (its own session); its report, wall seconds and command line.

    A run past `timeout` is killed with everything it started (Ray included) and reported as hung, with
    the last Ray Data progress lines it printed as evidence. A run that fails is retried (`retries` times)
    and the failures are recorded: on a shared machine another user's `ray stop --force` kills every Ray.
    """
    failures: list[str] = []
    for _ in range(retries + 1):
        out = _run_once(argv, env, timeout)
        if out["status"] != "failed":
            if failures:
                out["failed_attempts"] = failures
            return out
        failures.append(out["error"])
        print(f"  failed: {out['error']}", flush=True)
        time.sleep(30)
    raise SystemExit(f"vlmrec {' '.join(argv)} failed {len(failures)} times; last: {failures[-1]}")


def _run_once(argv: list[str], env: dict[str, str] | None, timeout: float | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cmd-"))
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD, str(tmp / "report.json"), *argv]
    print(f"$ vlmrec {' '.join(argv)}", flush=True)
    out: dict = {"command": "vlmrec " + " ".join(argv)}
    with open(tmp / "log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **ENV, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_session(proc)
        out["wall_s"] = round(time.perf_counter() - t0, 2)
    text = (tmp / "log").read_text(errors="replace")
    if proc.returncode == 0 and (tmp / "report.json").exists():
        out.update(status="ok", report=json.loads((tmp / "report.json").read_text()))
        print(f"  {out['wall_s']:.1f} s wall", flush=True)
    elif out["wall_s"] >= (timeout or float("inf")):
        progress = [ln.split(" -- ", 1)[-1] for ln in text.splitlines() if "logging_progress" in ln]
        out.update(status=f"hung: killed after {timeout:.0f} s", evidence=progress[-6:])
        print(f"  HUNG, killed after {out['wall_s']:.0f} s", flush=True)
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "logging_progress" not in ln]
        hints = [ln for ln in lines if re.search(r"Error|error|GCS|terminated", ln)] or lines or [""]
        out.update(status="failed", error=f"exit {proc.returncode}: {hints[-1][:300]}")
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (it leads its own session), SIGKILL what is left after 15 s."""
    import signal

    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def prepare_workdir(workdir: Path) -> None:
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise SystemExit(f"{workdir} exists and was not made by this benchmark (no {MARKER}): pick another")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by benchmarks/foundation.py; wiped at its next run\n")


def _ms(ns: list[int]) -> dict:
    a = np.asarray(ns, dtype=np.float64) / 1e6
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


# ---------------------------------------------------------------------------------------------- stages


def online_latency(workdir: Path, reps: int, warmup: int, seed: int, env: dict[str, str]) -> dict:
    """p50/p99 of online_sequences for 1 and 100 random users per call; every answer checked."""
    from vlmrec.features import STUDENT_SERVICE, online_sequences, open_store
    from vlmrec.workspace import Workspace

    os.environ.update(env)  # the Redis yaml reads REDIS_CONNECTION_STRING when the store opens
    ws = Workspace(workdir)
    seq = pq.read_table(ws.sequences).to_pandas()
    last = seq.sort_values(["user_id", "event_timestamp"]).groupby("user_id").tail(1)
    expected = {int(u): [int(i) for i in s] for u, s in zip(last["user_id"], last["item_ids"], strict=True)}
    users = np.array(sorted(expected))
    store = open_store(ws)
    rng = np.random.default_rng(seed)
    service = store.get_feature_service(STUDENT_SERVICE)

    def resolved_once(call: list[int]) -> dict[int, list[int]]:  # the same read, the service looked up once
        resp = store.get_online_features(
            features=service, entity_rows=[{"user_id": u} for u in call]
        ).to_dict()
        return {int(u): list(s or []) for u, s in zip(resp["user_id"], resp["item_ids"], strict=True)}

    out: dict = {"users_in_store": len(users), "warmup_calls": warmup, "timed_calls": reps}
    for label, read in (
        ("", lambda call: online_sequences(store, call)),
        ("service_resolved_once_", resolved_once),
    ):
        for n in (1, 100):
            calls = [rng.choice(users, size=n, replace=False).tolist() for _ in range(warmup + reps)]
            times, wrong = [], 0
            for k, call in enumerate(calls):
                t0 = time.perf_counter_ns()
                got = read(call)
                dt = time.perf_counter_ns() - t0
                if k >= warmup:
                    times.append(dt)
                wrong += sum(got[u] != expected[u] for u in call)
            out[f"{label}users_{n}"] = {**_ms(times), "wrong_sequences": wrong}
    return out


def quality(data: Path, workdir: Path, seed: int, title_vectors: np.ndarray | None) -> dict:
    """Genre agreement of the K nearest teacher neighbours vs K random movies, over movies with genres."""
    from vlmrec.workspace import Workspace

    emb = pq.read_table(Workspace(workdir).embeddings).to_pandas()
    movies = pd.read_csv(data / "movies.csv")
    genres = movies.set_index("movieId")["genres"].reindex(emb["item_id"].to_numpy()).fillna("")
    sets = [[g for g in s.split("|") if g and g != "(no genres listed)"] for s in genres]
    vocab = sorted({g for s in sets for g in s})
    mask = np.array([sum(1 << vocab.index(g) for g in s) for s in sets], dtype=np.int64)
    has = mask != 0
    vectors = np.stack(emb["vector"].to_numpy()).astype(np.float32)  # (N, D), unit rows
    n = len(vectors)
    rng = np.random.default_rng(seed)
    random_nb = np.stack([rng.choice(n - 1, size=K, replace=False) for _ in range(n)])  # (N, K) of n - 1
    random_nb += random_nb >= np.arange(n)[:, None]  # skip itself

    def scores(nb: np.ndarray) -> dict:
        a, b = mask[has][:, None], mask[nb[has]]  # (Q, 1), (Q, K)
        share = (a & b) != 0
        jac = np.bitwise_count(a & b) / np.bitwise_count(a | b)
        return {
            "agreement": round(float(share.mean()), 4),
            "jaccard": round(float(jac.mean()), 4),
        }

    out = {
        "movies": n,
        "movies_with_genres": int(has.sum()),
        "movies_without_genres_excluded": int((~has).sum()),
        "genres": len(vocab),
        "k": K,
        "seed": seed,
        "teacher_text": scores(nb := _neighbours(vectors)),
        "random": scores(random_nb),
    }
    if title_vectors is not None:
        out["teacher_title_only"] = scores(_neighbours(title_vectors))
    # a readable example: the nearest neighbours of the first movie (Toy Story in MovieLens)
    titles = movies.set_index("movieId")["title"].reindex(emb["item_id"].to_numpy()).to_numpy()
    out["example"] = {"movie": str(titles[0]), "neighbours": [str(titles[j]) for j in nb[0][:5]]}
    return out


def _neighbours(vectors: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(N, K) indices of each row's K highest cosine scores among the other rows (unit rows: dot = cosine)."""
    out = np.empty((len(vectors), K), dtype=np.int64)
    for a in range(0, len(vectors), chunk):
        s = vectors[a : a + chunk] @ vectors.T  # (c, N)
        s[np.arange(len(s)), np.arange(a, a + len(s))] = -np.inf  # never itself
        top = np.argpartition(-s, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
        out[a : a + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def title_only_vectors(workdir: Path) -> tuple[np.ndarray, float]:
    """The control: the same teacher on titles alone (no genre or tag words), direct, no Ray."""
    from teacher.encoders import TeacherConfig, load_teacher
    from vlmrec.workspace import Workspace

    emb_ids = pq.read_table(Workspace(workdir).embeddings, columns=["item_id"]).column(0).to_numpy()
    items = pq.read_table(Workspace(workdir).items, columns=["item_id", "title"]).to_pandas()
    titles = items.set_index("item_id")["title"].reindex(emb_ids).tolist()
    import torch

    teacher = load_teacher(TeacherConfig())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is the steadier on a shared machine
    t0 = time.perf_counter()
    vectors = teacher.embed_texts(titles)
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return vectors, seconds


def diagnostics(
    workdir: Path, seed: int, subset: int, num_actors: int, batch_size: int, rounds: int = 3
) -> dict:
    """Where embed time goes: model load, padding, torch threads, Ray Data blocks."""
    import ray
    import torch

    from teacher.embed import ItemEmbedder
    from teacher.encoders import TeacherConfig, item_text, load_teacher
    from vlmrec.raycluster import init_ray
    from vlmrec.workspace import Workspace

    ws = Workspace(workdir)
    items = pq.read_table(ws.items).to_pandas()
    texts = [item_text(t, x) for t, x in zip(items["title"], items["text"], strict=True)]
    out: dict = {}
    t0 = time.perf_counter()
    teacher = load_teacher(TeacherConfig(batch_size=batch_size))
    out["teacher_load_s"] = round(time.perf_counter() - t0, 2)
    lengths = np.array([len(ids) for ids in teacher.tokenizer(texts)["input_ids"]])
    out["tokens_per_text"] = {
        "p50": int(np.percentile(lengths, 50)),
        "p99": int(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
        "over_max_length": int((lengths > teacher.config.max_length).sum()),
    }
    pick = np.random.default_rng(seed).choice(len(texts), size=min(subset, len(texts)), replace=False)
    sample = [texts[i] for i in pick]
    by_length = [sample[i] for i in np.argsort(lengths[pick], kind="stable")]
    default_threads = torch.get_num_threads()
    cases = {
        "file_order_1_thread": (1, sample),
        "file_order_2_threads": (2, sample),
        "length_sorted_1_thread": (1, by_length),
        "length_sorted_2_threads": (2, by_length),
    }
    teacher.embed_texts(sample[:batch_size])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):  # interleaved, so a change in the machine's load hits every case alike
        for name, (threads, texts_in_order) in cases.items():
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            teacher.embed_texts(texts_in_order)
            rates[name].append(round(len(texts_in_order) / (time.perf_counter() - t0), 1))
    torch.set_num_threads(default_threads)
    out["direct_items_per_s"] = {
        "subset": len(sample),
        "batch_size": batch_size,
        "rounds": rounds,
        "median": {name: float(np.median(r)) for name, r in rates.items()},
        "all": rates,
    }

    # materialize, one view at a time, into the sqlite store `vlmrec features` made (idempotent rewrite)
    from vlmrec.features import _time_range, open_store

    store = open_store(ws)
    start, end = _time_range([ws.sequences, ws.items, ws.embeddings])
    out["materialize_s_per_view"] = {}
    for view in ("user_click_sequence", "item_metadata", "item_embedding"):
        t0 = time.perf_counter()
        store.materialize(start_date=start, end_date=end, feature_views=[view])
        out["materialize_s_per_view"][view] = round(time.perf_counter() - t0, 2)

    init_ray()

    @ray.remote(num_cpus=1)
    def threads_in_worker() -> dict:
        import torch

        return {
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }

    out["ray_worker"] = ray.get(threads_in_worker.remote())
    # The real ItemEmbedder over blocks cut in the driver (ray.data.from_pandas of a list): no Ray task has to
    # run before the actor pool, so the pool may hold every CPU.
    blocks = 4 * num_actors
    cols = items[["item_id", "title", "text", "image_uri"]]
    t0 = time.perf_counter()
    ds = ray.data.from_pandas([cols.iloc[i::blocks] for i in range(blocks)])
    done = ds.map_batches(
        ItemEmbedder,
        fn_constructor_kwargs={"teacher": TeacherConfig(batch_size=batch_size)},
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
    ).to_pandas()
    seconds = time.perf_counter() - t0
    out["ray_driver_blocks"] = {
        "blocks": blocks,
        "actors": num_actors,
        "batch_size": batch_size,
        "items": len(done),
        "seconds": round(seconds, 1),
        "items_per_s": round(len(done) / seconds, 1),
    }
    ray.shutdown()
    return out


# ------------------------------------------------------------------------------------------------ main


def _dumper(out: Path, paths: dict[str, str]):
    """Writes the result as JSON, with this machine's absolute paths shown as they were typed."""

    def dump(result: dict) -> str:
        text = json.dumps(result, indent=1) + "\n"
        for absolute, typed in paths.items():
            text = text.replace(absolute, typed)
        out.write_text(text)
        return text

    return dump


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD:
        _child(argv[1], argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/movielens-small"))
    parser.add_argument("--workdir", type=Path, default=Path(".vlmrec/bench-ml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/foundation.json"))
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="embed runs, one per pool size")
    parser.add_argument("--batch-size", type=int, default=64, help="embed --batch-size")
    parser.add_argument(
        "--embed-timeout", type=float, default=1800, help="seconds before an embed run is hung"
    )
    parser.add_argument("--reps", type=int, default=300, help="timed online reads per case")
    parser.add_argument("--warmup", type=int, default=30, help="untimed online reads first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=1000, help="items in the direct-throughput diagnostics")
    parser.add_argument("--no-diagnostics", dest="diagnostics", action="store_false")
    args = parser.parse_args(argv)

    data = args.data.absolute()
    workdir = args.workdir.absolute()
    if not (data / "movies.csv").is_file():
        raise SystemExit(f"{data}: not a MovieLens folder (no movies.csv)")
    prepare_workdir(workdir)
    result: dict = {
        "benchmark": "foundation",
        "data": data.name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    t_all = time.perf_counter()

    r = run_command(["ingest", "--format", "movielens", "--data", str(data), "--workdir", str(workdir)])
    result["ingest"] = {
        "command": r["command"],
        "wall_s": r["wall_s"],
        **{
            k: r["report"][k]
            for k in (
                "seconds",
                "events_kept",
                "users",
                "items",
                "images_ok",
                "images_missing",
                "timestamp_ties_moved",
                "sequence_rows",
                "sequence_ids",
                "sequence_bytes_on_disk",
            )
        },
    }

    result["embed"], vectors = [], {}
    timeout = args.embed_timeout
    for actors in args.actors:
        r = run_command(
            ["embed", "--workdir", str(workdir), "--num-actors", str(actors)]
            + ["--batch-size", str(args.batch_size)],
            timeout=timeout,
        )
        row = {
            "command": r["command"],
            "actors": actors,
            "batch_size": args.batch_size,
            "wall_s": r["wall_s"],
        }
        if "failed_attempts" in r:
            row["failed_attempts"] = r["failed_attempts"]
        if r["status"] != "ok":
            result["embed"].append({**row, "status": r["status"], "evidence": r["evidence"]})
            continue
        rep = r["report"]
        result["embed"].append(
            {
                **row,
                "status": "ok",
                "ray_data_s": rep["seconds"],  # from the Dataset's creation to its last row (module's figure)
                "items_per_s": rep["items_per_s"],
                "items_per_s_wall": round(rep["items"] / r["wall_s"], 1),
                "items": rep["items"],
                "dim": rep["dim"],
                "teacher_id": rep["teacher_id"],
            }
        )
        emb = pq.read_table(workdir / "data" / "item_embeddings.parquet").to_pandas()
        vectors[actors] = np.stack(emb["vector"].to_numpy())
        # a later run 2x slower than a finished one is not slow but stuck: do not wait the full limit
        timeout = min(args.embed_timeout, max(300.0, 2 * r["wall_s"]))
    if not vectors:
        raise SystemExit("no embed run finished")
    if len(vectors) > 1:
        first, *rest = vectors.values()
        result["embed_runs_max_abs_diff"] = float(max(np.abs(first - v).max() for v in rest))
    result["embed_bytes_on_disk"] = (workdir / "data" / "item_embeddings.parquet").stat().st_size

    result["features"], result["online"] = {}, {}
    r = run_command(["features", "--workdir", str(workdir)])
    result["features"]["sqlite"] = {"command": r["command"], "wall_s": r["wall_s"], **r["report"]}
    result["features"]["sqlite"]["online_db_mb"] = round((workdir / "online.db").stat().st_size / 1e6, 1)
    result["online"]["sqlite"] = online_latency(workdir, args.reps, args.warmup, args.seed, {})

    redis_ws = workdir / "redis"  # its own registry and yaml; the same parquet sources
    shutil.copytree(workdir / "data", redis_ws / "data")
    with RedisServer() as server:
        env = {"REDIS_CONNECTION_STRING": server.url}
        r = run_command(["features", "--workdir", str(redis_ws), "--online-store", "redis"], env)
        result["features"]["redis"] = {
            "command": "REDIS_CONNECTION_STRING=127.0.0.1:<port> " + r["command"],
            "wall_s": r["wall_s"],
            **r["report"],
            **server.memory(),
        }
        result["online"]["redis"] = online_latency(redis_ws, args.reps, args.warmup, args.seed, env)
    print("online reads done", flush=True)

    titles, title_s = title_only_vectors(workdir)
    result["quality"] = quality(data, workdir, args.seed, titles)
    result["quality"]["title_only_embed_s"] = round(title_s, 1)
    print("quality done", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    dump = _dumper(args.out, {str(data): str(args.data), str(workdir): str(args.workdir)})
    dump(result)  # the figures so far, should diagnostics fail
    if args.diagnostics:
        result["diagnostics"] = diagnostics(
            workdir, args.seed, args.subset, max(args.actors), args.batch_size
        )
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    print(dump(result))


if __name__ == "__main__":
    main()
