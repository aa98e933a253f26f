"""The student's epoch through the training job's DeepSpeed engine on one device, without Ray: the per-worker
loop's own state and epoch (training.train `worker_state`, `train_epoch`, `validation_ndcg`) over the example
files and arrays of the job's example build. This is how `--use-gpu`'s path runs on a GPU machine that Ray
cannot travel to (no package index there); on a cluster `vlmrec train --use-gpu` runs the same functions in
Ray Train's workers.

    # here (Ray): the job's example files and arrays for a workspace, built with `vlmrec train`'s flags
    python benchmarks/gpu_epoch.py prepare --workdir .vlmrec/ml --out .gpu/ml -- \
        --max-len 200 --d-model 64 --n-blocks 2 --dropout 0.2 --batch-size 32
    # on each device: a warm-up epoch, then --epochs timed ones; the results file keeps the other devices'
    # entries, and each entry's ratio is against the same-precision CPU entry where there is one
    python benchmarks/gpu_epoch.py run --data .gpu/ml --device cpu --out benchmarks/results/gpu_epoch.json
    python benchmarks/gpu_epoch.py run --data .gpu/ml --device cuda --out benchmarks/results/gpu_epoch.json

One process, world size 1 (gloo on CPU, NCCL on CUDA, as `engine.initialize` chooses): the micro-batch is the
whole batch, where the 2-worker CPU job splits it in two. Sequences/s = training sequences over the epoch's
wall time (CUDA synchronised before the clock stops); validation NDCG@10 is timed apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(workdir: str, out: Path, train_flags: list[str]) -> None:
    """The job's example build for `workdir` with `vlmrec train`'s flags; its files under out/examples, its
    arrays in out/arrays.npz, its configs in out/config.json."""
    import ray

    from training import train
    from training.config import LossConfig, ModelConfig, TrainConfig
    from vlmrec.workspace import Workspace

    parser = argparse.ArgumentParser(prog="gpu_epoch.py prepare --")
    train.add_arguments(parser)
    args = train.resolve_defaults(parser.parse_args(["--workdir", workdir, *train_flags]))
    job = train.JobConfig.from_args(args)
    model_cfg = ModelConfig.from_args(args, n_items=1, teacher_dim=0 if args.item_space == "id" else 1)
    shards, model_cfg = train.job_examples(Workspace(workdir), job, model_cfg, out / "examples", args.seed)
    arrays = ray.get(shards.arrays)
    # what the worker reads (the popular list is the export's, not the loop's)
    np.savez(
        out / "arrays.npz",
        **{k: v for k, v in arrays.items() if isinstance(v, np.ndarray) and v.dtype != object},
    )
    config = {
        "model": model_cfg.to_dict(),
        "loss": LossConfig.from_args(args).to_dict(),
        "train": TrainConfig.from_args(args).to_dict(),
        "job": job.to_dict(),
        "examples": "examples/train",
        "n_train": shards.n_train,
        "workdir": workdir,
        "train_flags": train_flags,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    print(
        f"prepare: {shards.n_train} examples, {shards.n_valid} validation queries, {shards.n_items} items -> {out}"
    )


def run(data: Path, device: str, precision: str, epochs: int, warmup: int) -> dict:
    """Warm-up + timed epochs of the prepared job on `device`; -> the entry for the results file."""
    from benchmarks.machine import free_port

    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), DS_ACCELERATOR=device,
    )  # fmt: skip
    import torch

    import engine
    from training.config import TrainConfig
    from training.example_files import stream_batches, worker_rows
    from training.train import JobConfig, epoch_seed_of, train_epoch, worker_state
    from training.validation import validation_ndcg

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run: --device cuda, but torch sees no CUDA device here")
    saved = json.loads((data / "config.json").read_text())
    train_cfg = TrainConfig.from_dict(saved["train"])
    job = dataclasses.replace(
        JobConfig.from_dict(saved["job"]), num_workers=1, use_gpu=device == "cuda", precision=precision
    )
    config = {
        **saved,
        "job": job.to_dict(),
        "ds": engine.ds_config(
            job.engine(), train_cfg.batch_size, train_cfg.lr, train_cfg.weight_decay, 1, train_cfg.grad_clip
        ),
        "init_from": None,
    }
    with np.load(data / "arrays.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays.setdefault("teacher", None)
    ds_engine, criterion, rows, added_days = worker_state(config, arrays, rank=0)
    micro = config["ds"]["train_micro_batch_size_per_gpu"]
    pieces = worker_rows(data / saved["examples"], 0, 1)
    steps = saved["n_train"] // micro

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    history = []
    for epoch in range(warmup + epochs):
        seed = epoch_seed_of(train_cfg.seed, epoch, 0)
        torch.manual_seed(seed)
        batches = stream_batches(pieces, micro, train_cfg.shuffle_window, seed)
        sync()
        t0 = time.perf_counter()
        n_seq, losses = train_epoch(
            ds_engine, criterion, rows, batches, steps, added_days, precision == "bf16"
        )
        sync()
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        ndcg = validation_ndcg(
            ds_engine.module, arrays["valid_inputs"], arrays["valid_targets"], arrays["valid_days"],
            arrays["added_days"],
        )  # fmt: skip
        sync()
        history.append(
            {
                "epoch": epoch + 1,
                "warmup": epoch < warmup,
                "epoch_s": round(seconds, 4),
                "seq_per_s": round(n_seq / seconds, 2),
                "loss": round(float(np.mean(losses)), 5),
                "val_ndcg10": round(ndcg, 5),
                "validation_s": round(time.perf_counter() - t0, 4),
            }
        )
        print(f"run: {device} {precision} epoch {epoch + 1}: {json.dumps(history[-1])}", flush=True)
    timed = [h for h in history if not h["warmup"]]
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "deepspeed": __import__("deepspeed").__version__,
        "backend": "nccl" if device == "cuda" else "gloo",
        "torch_threads": torch.get_num_threads(),
        "precision": precision,
        "sparse_ids": train_cfg.sparse_ids,
        "micro_batch": micro,
        "steps_per_epoch": steps,
        "sequences_per_epoch": steps * micro,
        "seq_per_s_median": statistics.median(h["seq_per_s"] for h in timed),
        "epoch_s_median": statistics.median(h["epoch_s"] for h in timed),
        "validation_s_median": statistics.median(h["validation_s"] for h in timed),
        "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
        "peak_rss_mb": round(engine.peak_rss_mb(), 1),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "epochs": history,
    }


def _cpu_name() -> str:
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        return f"{names[0]} x{len(names)}"
    except (OSError, IndexError):
        return platform.processor()


def _commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="stage", required=True)
    pp = sub.add_parser("prepare", help="build the job's examples here (needs Ray)")
    pp.add_argument("--workdir", required=True)
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("train_flags", nargs="*", help="`vlmrec train`'s flags, after --")
    pr = sub.add_parser("run", help="time epochs on one device (no Ray)")
    pr.add_argument("--data", type=Path, required=True, help="a prepare stage's --out")
    pr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pr.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    pr.add_argument("--epochs", type=int, default=5, help="timed epochs, after --warmup")
    pr.add_argument("--warmup", type=int, default=1)
    pr.add_argument("--commit", default=None, help="the code's commit, where the tree has no .git")
    pr.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.stage == "prepare":
        args.out.mkdir(parents=True, exist_ok=True)
        prepare(args.workdir, args.out, args.train_flags)
        return
    if args.epochs < 1 or args.warmup < 0:
        p.error("--epochs must be >= 1 and --warmup >= 0")
    if not (args.data / "config.json").is_file():
        p.error(f"--data: no prepared job at {args.data} (run the prepare stage)")
    entry = run(args.data, args.device, args.precision, args.epochs, args.warmup)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    saved = json.loads((args.data / "config.json").read_text())
    results["data"] = {
        "workdir": saved["workdir"],
        "train_flags": saved["train_flags"],
        "n_train": saved["n_train"],
    }
    entry["command"] = " ".join(["python", "benchmarks/gpu_epoch.py", *sys.argv[1:]])
    entry["commit"] = args.commit or _commit()
    results["runs"][f"{args.device}-{args.precision}"] = entry
    for key, other in results["runs"].items():
        cpu = results["runs"].get(f"cpu-{other['precision']}")
        other["seq_per_s_ratio_to_cpu"] = (
            round(other["seq_per_s_median"] / cpu["seq_per_s_median"], 2)
            if cpu and key != f"cpu-{other['precision']}"
            else None
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"run: {args.device} {args.precision}: {entry['seq_per_s_median']} sequences/s (median) -> {args.out}"
    )


if __name__ == "__main__":
    main()
