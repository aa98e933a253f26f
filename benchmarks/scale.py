"""Cost curves of the data path (issue 20): every stage's wall time and peak memory, driver and workers,
on MovieLens-small grown to 100k, 1M and 10M events.

    python benchmarks/scale.py --base .vlmrec/ml --sizes 100000 1000000 --out benchmarks/results/scale.json

Per size, in <workroot>/<events>: `python -m vlmrec.scale` grows the base workspace's events and catalogue
(items = events / 10 or --n-items, seed 0), then each stage runs as its own process, as a user runs it:

    ingest        vlmrec ingest
    embed         vlmrec embed (minilm at --embed-precision, its default actor pool); a catalogue above
                  --embed-max-items is not embedded here (minilm on two cores takes minutes per 10k items):
                  its clones get their base item's vector plus noise instead, and the stage is recorded
                  as not run
    materialize   vlmrec features (feast apply + materialize into sqlite), the default sequence layout
                  (a row per user); up to --snapshots-max-events the per-event layout is ingested and
                  materialized beside it (`sequence_layouts`: rows, ids, bytes, both stages)
    pit_join      vlmrec train's example build: the Ray tasks that turn events into example files
    epoch         vlmrec train's one epoch (--epochs 1), the workers streaming those files
Above --train-max-events the training job runs until --memory-limit-gb or 600 s stop it (its driver's peak
through the example build and the workers' start is the size's driver figure), then the example build alone
(`python -m training.examples`) gives pit_join, and the index is built from the teacher vectors.
    index_build   vlmrec index build --run scale
With --only embed each size is generated, ingested and embedded (whatever its catalogue's size); with --only
pit_join the example build runs alone on each size's workspace (grown, its vectors derived, where --workroot
has none). Only those entries in --out are replaced, each carrying its own command, commit and load average.

A sampler reads each stage's process tree every 0.2 s: the stage's own process is the driver, its Ray worker
processes (`ray::...`) the workers (their RSS counts the object-store pages they map). pit_join and epoch
come from the run's run.json (each step's task reports its own peak RSS); a stage with no Ray workers
(ingest, materialize, index_build) reports its one process as its worker figure. The sampler reads RSS
only, and PSS (a walk of a process's page tables) only past the memory limit: at millions of events those
walks took a share of the machine from the stage they measured.
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
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--max-len", "50", "--d-model", "64", "--n-blocks", "2", "--batch-size", "128", "--epochs", "1"]
TRAIN += ["--no-tune-fusion", "--name", "scale"]
VLMREC = [sys.executable, "-m", "vlmrec.cli"]


_LIMIT_MB: float | None = None  # --memory-limit-gb: a stage whose processes hold more is killed


def sample_tree(
    proc: subprocess.Popen,
    every_s: float = 0.2,
    limit_mb: float | None = None,
    max_s: float | None = None,
    pss: bool = False,
) -> dict:
    """Wait for `proc`, polling its own RSS, its Ray workers' and what its whole process tree holds -> {wall_s,
    driver_mb, workers_mb}, and tree_mb with `pss`. What the tree holds is the sum of its processes'
    proportional set sizes (PSS: a page shared by n processes counts 1/n in each, so Ray's object store, mapped
    by every worker, counts once; a sum of RSS counts it in every process that touched it). When the tree holds
    more than limit_mb (the machine would swap, or the kernel kill something else) or it runs past max_s, it is
    killed and `stopped` says so.

    RSS is one cheap read (/proc/pid/statm); PSS makes the kernel walk a process's page tables under its memory
    lock (about 0.1 s for an 8 GB worker, which stalls the worker's own page faults meanwhile), so it is read
    only when needed: every poll with `pss` (the tree's peak PSS is the figure asked for), else only when the
    tree's RSS sum passes limit_mb (a sum of PSS never exceeds a sum of RSS, so below it the tree is within)."""
    import psutil

    me, driver, workers, tree, stopped = psutil.Process(proc.pid), 0, 0, 0, None
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            procs = [me, *me.children(recursive=True)]
            rss = {}
            for p in procs:
                try:
                    rss[p] = p.memory_info().rss
                    if p is not me and " ".join(p.cmdline()[:1]).startswith("ray::"):
                        workers = max(workers, rss[p])
                except psutil.Error:
                    continue
            driver = max(driver, rss.get(me, 0))
            total, kind = sum(rss.values()), "RSS"
            if pss or (limit_mb is not None and total > limit_mb * 2**20):
                total, kind = sum(_pss(p) for p in rss), "PSS"
                tree = max(tree, total)
            held = f"its processes held {total / 2**20:,.0f} MB ({kind})"
            if limit_mb is not None and total > limit_mb * 2**20:
                stopped = f"killed after {time.perf_counter() - t0:.0f} s: {held}"
            elif max_s is not None and time.perf_counter() - t0 > max_s:
                stopped = f"killed at its time limit, {max_s:.0f} s ({held})"
            if stopped:
                for p in [*me.children(recursive=True), me]:
                    p.kill()
                proc.wait()
                break
        except psutil.Error:
            pass
        time.sleep(every_s)
    got = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "driver_mb": round(driver / 2**20, 1),
        "workers_mb": round(workers / 2**20, 1),
        **({"tree_mb": round(tree / 2**20, 1)} if pss else {}),
    }
    return {**got, "stopped": stopped} if stopped else got


def _pss(process) -> int:
    """A process's proportional set size (its RSS where the kernel does not say; 0 once it has exited)."""
    import psutil

    try:
        return process.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):
        return process.memory_info().rss
    except psutil.Error:
        return 0


def stage(
    name: str,
    argv: list[str],
    log: Path,
    stdout: Path | None = None,
    may_stop: bool = False,
    max_s: float | None = None,
    pss: bool = False,
) -> dict:
    """Run one stage as its own process (its output appended to `log`, or its stdout to `stdout`). A stage
    over --memory-limit-gb (or past max_s) is killed: recorded when `may_stop` (nothing after it needs its
    output), as is a `may_stop` stage that fails on its own (Ray's memory monitor); else the benchmark
    stops."""
    print(f"$ {' '.join(argv)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each stage its own local Ray
    with open(log, "a") as out, open(stdout or os.devnull, "w") as printed:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        target = printed if stdout else out
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=target, stderr=out)
        got = sample_tree(proc, limit_mb=_LIMIT_MB, max_s=max_s, pss=pss)
    if proc.returncode != 0 and may_stop and not got.get("stopped"):  # e.g. Ray's memory monitor
        got["stopped"] = f"failed (exit {proc.returncode}) after {got['wall_s']:.0f} s: see {log}"
    if got.get("stopped") and may_stop:
        print(f"  {name}: {got['stopped']}")
        # a killed or failed job can leave its local Ray behind, holding memory the next stage needs
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)
        return got
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


def catalogue_size(n: int, args: argparse.Namespace) -> int:
    """The n-event workspace's catalogue: --n-items, else events / 10."""
    return args.n_items or max(n // 10, 1)


class Grown(NamedTuple):
    """An n-event workspace: its root folder, the workspace, the generated raw files, the stages' log."""

    root: Path
    ws: Path
    raw: Path
    log: Path
    ingest: dict


def grow(n: int, args: argparse.Namespace) -> Grown:
    """Generate the n-event workspace and ingest it."""
    root = args.workroot / str(n)
    shutil.rmtree(root, ignore_errors=True)
    ws, raw, log = root / "ws", root / "raw", root / "log.txt"
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    stage("generate", [sys.executable, "-m", "vlmrec.scale", "--events", str(args.base / "data" / "events.parquet"),
                       "--catalogue", str(args.base / "data" / "items.parquet"), "--n-events", str(n), "--n-items",
                       str(catalogue_size(n, args)), "--seed", "0", "--out", str(raw)], log)  # fmt: skip
    print(f"  generated in {time.perf_counter() - t0:.1f} s")
    got = stage("ingest", [*VLMREC, "ingest", "--events", str(raw / "events.parquet"), "--catalogue",
                           str(raw / "catalogue.parquet"), "--workdir", str(ws), "--max-len", "50"], log)  # fmt: skip
    ingest = {
        "wall_s": got["wall_s"],
        "worker_peak_rss_mb": got["driver_mb"],
        "driver_peak_rss_mb": got["driver_mb"],
    }
    return Grown(root, ws, raw, log, ingest)


def embed(ws: Path, log: Path, args: argparse.Namespace) -> dict:
    """The embed stage: vlmrec embed at --embed-precision, its default actor pool."""
    import pyarrow.parquet as pq

    n_items = pq.ParquetFile(ws / "data" / "items.parquet").metadata.num_rows
    got = stage("embed", [*VLMREC, "embed", "--workdir", str(ws), "--precision", args.embed_precision], log)
    return {"wall_s": got["wall_s"], "worker_peak_rss_mb": got["workers_mb"], "driver_peak_rss_mb": got["driver_mb"],
            "items": n_items, "precision": args.embed_precision}  # fmt: skip


def example_build(root: Path, ws: Path, log: Path) -> tuple[dict, dict]:
    """The example build alone, in its own driver (`python -m training.examples`) -> (its process figures,
    what it printed: counts and each step's wall time and peak RSS)."""
    cmd = [sys.executable, "-m", "training.examples", "--workdir", str(ws), "--out", str(root / "examples")]
    alone = stage("examples", [*cmd, "--max-len", "50"], log, stdout=root / "examples.json")
    return alone, json.loads((root / "examples.json").read_text())


def pit_join(steps: dict) -> dict:
    """The pit_join stage from the example build's steps: their wall times summed, their largest peak RSS."""
    build = {s: steps[s] for s in ("partition", "windows", "arrays")}
    return {
        "wall_s": round(sum(s["wall_s"] for s in build.values()), 2),
        "worker_peak_rss_mb": max(s["worker_peak_rss_mb"] for s in build.values()),
        "steps": build,
    }


def pit_join_alone(n: int, args: argparse.Namespace) -> dict:
    """--only pit_join: the example build of the n-event workspace in <workroot>, grown first (its vectors
    derived from the base's) unless it holds events and item vectors already."""
    root = args.workroot / str(n)
    ws, log = root / "ws", root / "log.txt"
    if not (ws / "data" / "item_embeddings.parquet").exists():
        root, ws, _, log, _ = grow(n, args)
        derive_vectors(args.base, ws, seed=0)
    alone, built = example_build(root, ws, log)
    return {
        **pit_join(built["stages"]),
        "examples": built["n_train"],
        "driver_peak_rss_mb": alone["driver_mb"],
    }


def one_size(n: int, args: argparse.Namespace) -> dict:
    root, ws, raw, log, ingest = grow(n, args)
    stages = {"ingest": ingest}
    n_items = catalogue_size(n, args)
    if n_items <= args.embed_max_items:
        stages["embed"] = embed(ws, log, args)
    else:
        items = derive_vectors(args.base, ws, seed=0)
        stages["embed"] = {"wall_s": None, "worker_peak_rss_mb": None, "items": items,
                           "not_run": f"{items} items above --embed-max-items {args.embed_max_items}: vectors "
                           "derived from the base items' minilm vectors"}  # fmt: skip
    got = stage("materialize", [*VLMREC, "features", "--workdir", str(ws)], log, may_stop=True)
    stages["materialize"] = {
        "wall_s": None if got.get("stopped") else got["wall_s"],
        "worker_peak_rss_mb": got["driver_mb"],
        "driver_peak_rss_mb": got["driver_mb"],
        **({"not_run": f"stopped: {got['stopped']} (--memory-limit-gb)"} if got.get("stopped") else {}),
    }
    layouts = {
        "latest": {**sequence_file(ws), "ingest": stages["ingest"], "materialize": stages["materialize"]}
    }
    if n <= args.snapshots_max_events:  # the per-event layout, measured beside the default
        snap = root / "ws-snapshots"
        got = stage("ingest snapshots", [*VLMREC, "ingest", "--events", str(raw / "events.parquet"), "--catalogue",
                                         str(raw / "catalogue.parquet"), "--workdir", str(snap), "--max-len", "50",
                                         "--sequences", "snapshots"], log)  # fmt: skip
        shutil.copy(ws / "data" / "item_embeddings.parquet", snap / "data" / "item_embeddings.parquet")
        mat = stage("materialize snapshots", [*VLMREC, "features", "--workdir", str(snap)], log)
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
    train = None
    if n <= args.train_max_events:  # the training job: the example build, one epoch, the export
        train = stage("train", [*VLMREC, "train", "--workdir", str(ws), *TRAIN], log, may_stop=True)
    if train is not None and not train.get("stopped"):
        run = json.loads((ws / "runs" / "scale" / "export" / "run.json").read_text())
        steps, n_train = run["data"]["stages"], run["data"]["train_examples"]
        epoch = run["last"]
        stages["epoch"] = {
            "wall_s": round(epoch["epoch_s"], 2),
            "worker_peak_rss_mb": round(epoch["peak_rss_mb"], 1),
            "examples": n_train,
            "seq_per_s_worker": round(epoch["seq_per_s_worker"], 1),
        }
        job = {"driver_peak_rss_mb": train["driver_mb"], "train_job": {
            "wall_s": train["wall_s"], "workers_peak_rss_mb": train["workers_mb"],
            "finish_worker_peak_rss_mb": steps.get("finish", {}).get("worker_peak_rss_mb")}}  # fmt: skip
        job["valid_queries"] = int(run["data"]["valid_queries"])
        index = ["--run", "scale"]
    else:  # the job's driver through the example build and the workers' start (the job is then stopped:
        # its epoch is not run, docs/BENCHMARKS.md says why), or up to where the memory limit stopped the
        # whole job; then the example build alone, in its own driver
        train = train or stage(
            "train", [*VLMREC, "train", "--workdir", str(ws), *TRAIN], log, may_stop=True, max_s=600
        )
        if not train.get("stopped"):
            raise SystemExit(
                f"the {n}-event training job ended within 600 s: run it with --train-max-events {n}"
            )
        alone, built = example_build(root, ws, log)
        steps, n_train = built["stages"], built["n_train"]
        why = (
            f"{n} events above --train-max-events {args.train_max_events}"
            if n > args.train_max_events
            else f"the training job was stopped: {train['stopped']}"
        )
        stages["epoch"] = {"wall_s": None, "worker_peak_rss_mb": None, "examples": n_train, "not_run": why}  # fmt: skip
        job = {
            "driver_peak_rss_mb": train["driver_mb"],  # up to the stop
            "train_job": {
                "wall_s": None,
                "workers_peak_rss_mb": train["workers_mb"],
                "stopped": train["stopped"],
            },
            "example_build_driver_peak_rss_mb": alone["driver_mb"],
        }
        job["valid_queries"] = built["n_valid"]
        index = ["--teacher"]
    stages["pit_join"] = pit_join(steps)
    got = stage("index_build", [*VLMREC, "index", "build", "--workdir", str(ws), *index], log)
    stages["index_build"] = {
        "wall_s": got["wall_s"],
        "worker_peak_rss_mb": got["driver_mb"],
        "driver_peak_rss_mb": got["driver_mb"],
        "vectors": "the run's export"
        if index[0] == "--run"
        else "the teacher's (data/item_embeddings.parquet)",
    }
    return {
        **job,  # driver_peak_rss_mb: the training job's driver (or the example build's, above the limit)
        "items": n_items,
        "stages": stages,
        "sequence_layouts": layouts,
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the MovieLens workspace (items, embeddings)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--workroot", type=Path, default=Path(".vlmrec/scale"))
    p.add_argument(
        "--n-items",
        type=int,
        help="one catalogue size for every size (default: events / 10), to vary events alone",
    )
    p.add_argument("--embed-max-items", type=int, default=20_000)
    p.add_argument(
        "--embed-precision", choices=("fp32", "bf16"), default="fp32", help="vlmrec embed --precision"
    )
    p.add_argument(
        "--train-max-events",
        type=int,
        default=1_000_000,
        help="run the training job (one epoch) up to this size; above it the example build alone",
    )
    p.add_argument(
        "--snapshots-max-events",
        type=int,
        default=1_000_000,
        help="also ingest and materialize the per-event sequence layout up to this size (it grows N x events)",
    )
    p.add_argument(
        "--only",
        choices=("embed", "pit_join"),
        help="one stage per size, replacing only its entries in --out, each with its own command, commit and load "
        "average. embed: generate, ingest and embed each size (--embed-max-items ignored); pit_join: the example "
        "build alone, on the size's workspace in --workroot when it holds item vectors",
    )
    p.add_argument("--embed-only", action="store_const", dest="only", const="embed", help="--only embed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    p.add_argument("--memory-limit-gb", type=float, default=18.0, help="a stage holding more is killed")
    args = p.parse_args(argv)
    global _LIMIT_MB
    _LIMIT_MB = args.memory_limit_gb * 1024
    out = json.loads(args.out.read_text()) if args.out.exists() else {"sizes": {}}
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = git.stdout.strip()
    command = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for n in args.sizes:
        if args.only:  # the other stages keep the figures of the run that made them
            if args.only == "embed":
                grown = grow(n, args)
                got = embed(grown.ws, grown.log, args)
            else:
                got = pit_join_alone(n, args)
            got.update(command=command, commit=commit, load_average=list(os.getloadavg()))
            out["sizes"].setdefault(str(n), {"stages": {}})["stages"][args.only] = got
            args.out.write_text(json.dumps(out, indent=2))
            continue
        out["sizes"][str(n)] = {**one_size(n, args), "commit": commit}  # sizes may differ
        out["command"] = command
        out["commit"] = commit
        out["machine"] = f"{os.cpu_count()} cores"
        args.out.write_text(json.dumps(out, indent=2))  # each size as it finishes
    print(json.dumps(out["sizes"], indent=1)[:2000])


if __name__ == "__main__":
    main()
