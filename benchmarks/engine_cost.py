"""What the training engine costs: the same student, data and batch size trained by a plain single-process
PyTorch loop and by the real job (Ray Train + DeepSpeed, 2 CPU workers), in one run.

    python benchmarks/engine_cost.py --workdir .vlmrec/movielens --epochs 3 --out benchmarks/results/engine.json

The workspace must be ingested with per-event sequence snapshots (`vlmrec ingest --sequences snapshots`: the
in-memory path reads Feast's point-in-time join), embedded and materialized.
Throughput = training sequences per second over whole epochs (the Ray figure counts both workers' shards
over the epoch wall time of the slower one); peak memory = max RSS of each training process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from training import train
from training.config import LossConfig, ModelConfig, TrainConfig
from training.data import Examples, iterate_batches
from training.losses import SeqRecLoss
from training.model import SeqRec
from vlmrec.workspace import Workspace


def plain_loop(
    data: train.TrainingData, model_cfg: ModelConfig, loss_cfg: LossConfig, cfg: TrainConfig, epochs: int
):
    torch.manual_seed(cfg.seed)
    teacher = data.items.teacher_matrix() if model_cfg.is_content else None
    model = SeqRec(model_cfg, teacher=teacher, item_ids=np.concatenate([[-1], data.items.item_ids]))
    counts = np.bincount(data.targets[data.targets > 0], minlength=model_cfg.n_items + 1)
    criterion = SeqRecLoss(loss_cfg, model_cfg, counts)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    per_epoch = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        model.train()
        for x, y in iterate_batches(Examples(data.inputs, data.targets), cfg.batch_size, rng):
            if len(x) < cfg.batch_size:
                continue  # the job drops the last partial batch too
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            cand = criterion.sample_candidates(y)
            loss, _ = criterion(model(x, y, cand), y, cand)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            n += len(x)
        per_epoch.append(n / (time.perf_counter() - t0))
    return {
        "seq_per_s": float(np.median(per_epoch)),
        "per_epoch": per_epoch,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--item-space", default="adapter")
    p.add_argument("--out", default="benchmarks/results/engine.json")
    args = p.parse_args()

    ws = Workspace(args.workdir)
    job = train.JobConfig(workdir=str(ws.root), name="bench-engine", num_workers=2)
    data = train.prepare_data(ws, job, args.max_len)
    model_cfg = train._fit_vocabulary(
        ModelConfig(n_items=1, teacher_dim=1, item_space=args.item_space, max_len=args.max_len), data
    )
    loss_cfg, cfg = (
        LossConfig(),
        TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=args.epochs + 1),
    )

    plain = plain_loop(data, model_cfg, loss_cfg, cfg, args.epochs)
    print(f"plain loop: {plain['seq_per_s']:.1f} seq/s, peak RSS {plain['peak_rss_mb']:.0f} MB")

    import shutil

    shutil.rmtree(ws.runs / job.name, ignore_errors=True)  # a fresh run, not a resume
    _, info = train.train(job, model_cfg, loss_cfg, cfg)
    history = info["kept_checkpoints"] + [info["last"]]
    epochs = {m["epoch"]: m for m in history}
    # 2 workers each train their shard in epoch_s: the job's throughput is both shards over the epoch time
    ray_rates = [2 * m["seq_per_s_worker"] for m in epochs.values()]
    ray = {
        "seq_per_s": float(np.median(ray_rates)),
        "per_epoch": ray_rates,
        "peak_rss_mb_per_worker": max(m["peak_rss_mb"] for m in epochs.values()),
        "fit_s_total": info["timing_s"]["fit"],
        "workers": 2,
    }
    print(
        f"Ray Train + DeepSpeed: {ray['seq_per_s']:.1f} seq/s, peak RSS per worker {ray['peak_rss_mb_per_worker']:.0f} MB"
    )
    result = {
        "command": "python benchmarks/engine_cost.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "train_examples": len(data.inputs),
        "model": model_cfg.to_dict(),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "plain": plain,
        "ray_deepspeed": ray,
        "ratio_ray_over_plain": ray["seq_per_s"] / plain["seq_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"ratio (Ray Train + DeepSpeed / plain): {result['ratio_ray_over_plain']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
