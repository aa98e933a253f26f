"""Cost curves of the data path (issue 20): every stage's wall time and peak memory, driver and workers,
on MovieLens-small grown to 100k, 1M and 10M events.

    python benchmarks/scale.py --base .vlmrec/ml --sizes 100000 1000000 --out benchmarks/results/scale.json

Per size, in <workroot>/<events>: `python -m vlmrec.scale` grows the base workspace's events and catalogue
(items = events / 10, seed 0), then each stage runs as its own process, as a user runs it:

    ingest        vlmrec ingest
    embed         vlmrec embed (minilm); a catalogue above --embed-max-items is not embedded here (minilm
                  on two cores takes about a minute per 10k items): its clones get their base item's vector
                  plus noise instead, and the stage is recorded as not run
    materialize   vlmrec features (feast apply + materialize into sqlite), the default sequence layout
                  (a row per user); up to --snapshots-max-events the per-event layout is ingested and
                  materialized beside it (`sequence_layouts`: rows, ids, bytes, both stages)
    pit_join      vlmrec train's example build: the Ray tasks that turn events into example files
    epoch         vlmrec train's one epoch (--epochs 1), the workers streaming those files
    index_build   vlmrec index build --run scale

A sampler reads each stage's process tree every 0.2 s: the stage's own process is the driver, its Ray worker
processes (`ray::...`) the workers (their RSS counts the object-store pages they map). pit_join and epoch
come from the run's run.json (each step's task reports its own peak RSS); a stage with no Ray workers
(ingest, materialize, index_build) reports its one process as its worker figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--max-len", "50", "--d-model", "64", "--n-blocks", "2", "--batch-size", "128", "--epochs", "1"]
TRAIN += ["--no-tune-fusion", "--name", "scale"]


def sample_tree(proc: subprocess.Popen, every_s: float = 0.2) -> dict:
    """Wait for `proc`, polling its own RSS and its Ray workers' -> {wall_s, driver_mb, workers_mb}."""
    import psutil

    me, driver, workers = psutil.Process(proc.pid), 0, 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            driver = max(driver, me.memory_info().rss)
            for child in me.children(recursive=True):
                try:
                    if " ".join(child.cmdline()[:1]).startswith("ray::"):
                        workers = max(workers, child.memory_info().rss)
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        time.sleep(every_s)
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "driver_mb": round(driver / 2**20, 1),
        "workers_mb": round(workers / 2**20, 1),
    }


def stage(name: str, argv: list[str], log: Path) -> dict:
    print(f"$ {' '.join(argv)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each stage its own local Ray
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        got = sample_tree(proc)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}): see {log}")
    print(
        f"  {name}: {got['wall_s']:.1f} s, driver {got['driver_mb']:.0f} MB, workers {got['workers_mb']:.0f} MB"
    )
    return got


def derive_vectors(base: Path, ws: Path, seed: int) -> int:
    """Item vectors for a grown catalogue from the base's: clone c of item i (id c * stride + i) gets
    normalise(v_i + noise), noise of norm 0.1 (a clone's text is its item's plus an edition mark)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmrec.schema import ITEM_EMBEDDINGS

    table = pq.read_table(base / "data" / "item_embeddings.parquet").sort_by("item_id")
    base_ids = table.column("item_id").to_numpy()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    teacher = table.column("teacher_id")[0].as_py()
    items = pq.read_table(ws / "data" / "items.parquet", columns=["item_id", "event_timestamp"])
    ids, stamps = items.column("item_id").to_numpy(), items.column("event_timestamp")
    stride = int(base_ids.max()) + 1
    row = np.searchsorted(base_ids, ids % stride)
    keep = (row < len(base_ids)) & (base_ids[row.clip(max=len(base_ids) - 1)] == ids % stride)
    ids, row, stamps = ids[keep], row[keep], stamps.filter(pa.array(keep))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(ids), vectors.shape[1])).astype(np.float32)
    noise *= 0.1 / np.linalg.norm(noise, axis=1, keepdims=True)
    out = vectors[row] + np.where((ids >= stride)[:, None], noise, 0.0)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    columns = {
        "item_id": pa.array(ids, pa.int64()),
        "event_timestamp": stamps,
        "vector": pa.array(list(out.astype(np.float32)), pa.list_(pa.float32())),
        "teacher_id": pa.array([teacher] * len(ids), pa.string()),
    }
    pq.write_table(pa.table(columns).cast(ITEM_EMBEDDINGS), ws / "data" / "item_embeddings.parquet")
    return len(ids)


def sequence_file(ws: Path) -> dict:
    """The click-sequence table's rows, ids and bytes on disk."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = ws / "data" / "click_sequences.parquet"
    ids = pq.read_table(path, columns=["item_ids"])["item_ids"]
    return {
        "rows": pq.ParquetFile(path).metadata.num_rows,
        "ids": int(pc.sum(pc.list_value_length(ids)).as_py() or 0),
        "bytes_on_disk": path.stat().st_size,
    }


def one_size(n: int, args: argparse.Namespace) -> dict:
    root = args.workroot / str(n)
    shutil.rmtree(root, ignore_errors=True)
    ws, raw, log = root / "ws", root / "raw", root / "log.txt"
    root.mkdir(parents=True)
    py, vlmrec = sys.executable, [sys.executable, "-m", "vlmrec.cli"]
    n_items = max(n // 10, 1)
    t0 = time.perf_counter()
    stage("generate", [py, "-m", "vlmrec.scale", "--events", str(args.base / "data" / "events.parquet"), "--catalogue",
                       str(args.base / "data" / "items.parquet"), "--n-events", str(n), "--n-items",
                       str(n_items), "--seed", "0", "--out", str(raw)], log)  # fmt: skip
    print(f"  generated in {time.perf_counter() - t0:.1f} s")
    stages: dict[str, dict] = {}
    got = stage("ingest", [*vlmrec, "ingest", "--events", str(raw / "events.parquet"), "--catalogue",
                           str(raw / "catalogue.parquet"), "--workdir", str(ws), "--max-len", "50"], log)  # fmt: skip
    stages["ingest"] = {
        "wall_s": got["wall_s"],
        "worker_peak_rss_mb": got["driver_mb"],
        "driver_peak_rss_mb": got["driver_mb"],
    }
    if n_items <= args.embed_max_items:
        got = stage("embed", [*vlmrec, "embed", "--workdir", str(ws)], log)
        stages["embed"] = {"wall_s": got["wall_s"], "worker_peak_rss_mb": got["workers_mb"],
                           "driver_peak_rss_mb": got["driver_mb"], "items": n_items}  # fmt: skip
    else:
        items = derive_vectors(args.base, ws, seed=0)
        stages["embed"] = {"wall_s": None, "worker_peak_rss_mb": None, "items": items,
                           "not_run": f"{items} items above --embed-max-items {args.embed_max_items}: vectors "
                           "derived from the base items' minilm vectors"}  # fmt: skip
    got = stage("materialize", [*vlmrec, "features", "--workdir", str(ws)], log)
    stages["materialize"] = {
        "wall_s": got["wall_s"],
        "worker_peak_rss_mb": got["driver_mb"],
        "driver_peak_rss_mb": got["driver_mb"],
    }
    layouts = {
        "latest": {**sequence_file(ws), "ingest": stages["ingest"], "materialize": stages["materialize"]}
    }
    if n <= args.snapshots_max_events:  # the per-event layout, measured beside the default
        snap = root / "ws-snapshots"
        got = stage("ingest snapshots", [*vlmrec, "ingest", "--events", str(raw / "events.parquet"), "--catalogue",
                                         str(raw / "catalogue.parquet"), "--workdir", str(snap), "--max-len", "50",
                                         "--sequences", "snapshots"], log)  # fmt: skip
        shutil.copy(ws / "data" / "item_embeddings.parquet", snap / "data" / "item_embeddings.parquet")
        mat = stage("materialize snapshots", [*vlmrec, "features", "--workdir", str(snap)], log)
        layouts["snapshots"] = {
            **sequence_file(snap),
            "ingest": {"wall_s": got["wall_s"], "worker_peak_rss_mb": got["driver_mb"]},
            "materialize": {"wall_s": mat["wall_s"], "worker_peak_rss_mb": mat["driver_mb"]},
        }
        shutil.rmtree(snap)
    else:
        layouts["snapshots"] = {
            "not_run": f"{n} events above --snapshots-max-events {args.snapshots_max_events}"
        }
    train = stage("train", [*vlmrec, "train", "--workdir", str(ws), *TRAIN], log)
    run = json.loads((ws / "runs" / "scale" / "export" / "run.json").read_text())
    steps = run["data"]["stages"]
    build = [steps[s] for s in ("partition", "windows", "arrays")]
    stages["pit_join"] = {
        "wall_s": round(sum(s["wall_s"] for s in build), 2),
        "worker_peak_rss_mb": max(s["worker_peak_rss_mb"] for s in build),
        "steps": {s: steps[s] for s in ("partition", "windows", "arrays")},
    }
    epoch = run["last"]
    stages["epoch"] = {
        "wall_s": round(epoch["epoch_s"], 2),
        "worker_peak_rss_mb": round(epoch["peak_rss_mb"], 1),
        "examples": run["data"]["train_examples"],
        "seq_per_s_worker": round(epoch["seq_per_s_worker"], 1),
    }
    got = stage("index_build", [*vlmrec, "index", "build", "--workdir", str(ws), "--run", "scale"], log)
    stages["index_build"] = {
        "wall_s": got["wall_s"],
        "worker_peak_rss_mb": got["driver_mb"],
        "driver_peak_rss_mb": got["driver_mb"],
    }
    return {
        "driver_peak_rss_mb": train["driver_mb"],  # the training job's driver
        "train_job": {
            "wall_s": train["wall_s"],
            "workers_peak_rss_mb": train["workers_mb"],
            "finish_worker_peak_rss_mb": steps.get("finish", {}).get("worker_peak_rss_mb"),
        },  # fmt: skip
        "items": n_items,
        "valid_queries": int(run["data"]["valid_queries"]),
        "stages": stages,
        "sequence_layouts": layouts,
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the MovieLens workspace (items, embeddings)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--workroot", type=Path, default=Path(".vlmrec/scale"))
    p.add_argument("--embed-max-items", type=int, default=20_000)
    p.add_argument(
        "--snapshots-max-events",
        type=int,
        default=1_000_000,
        help="also ingest and materialize the per-event sequence layout up to this size (it grows N x events)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = p.parse_args(argv)
    out = json.loads(args.out.read_text()) if args.out.exists() else {"sizes": {}}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    for n in args.sizes:
        out["sizes"][str(n)] = one_size(n, args)
        out["command"] = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out["commit"] = commit.stdout.strip()
        out["machine"] = f"{os.cpu_count()} cores"
        args.out.write_text(json.dumps(out, indent=2))  # each size as it finishes
    print(json.dumps(out["sizes"], indent=1)[:2000])


if __name__ == "__main__":
    main()
