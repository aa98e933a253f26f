"""Where one training step's time goes as the catalogue grows: the default student's step (one worker's
micro-batch, the loss, backward, the optimizer) timed part by part on random data at several catalogue sizes.

    python benchmarks/step_cost.py --sizes 10000 100000 1000000 --out benchmarks/results/step_cost.json

One process, plain torch (no Ray, no DeepSpeed): the model, loss and AdamW the job's workers run, with the
default student's flags (`vlmrec train` with only --max-len, --d-model, --n-blocks as in benchmarks/scale.py)
and a teacher of 384 dimensions. Batches are drawn from a Zipf(1.1) item popularity; every position holds a
target, as in a long history. Per size: the median over --steps steps (after two warm-up steps) of
forward + loss, backward, clip + optimizer step; the parameters and the bytes of gradient a step produces
(what a data-parallel all-reduce moves between workers). Two optimizers on the same batches, in the same
run: every parameter dense through AdamW (the keys at the size's top level), and the job's default, the id
tables row-sparse through engine.rows.RowSparseAdam and the rest through AdamW (`row_sparse`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLAGS = ["--max-len", "50", "--d-model", "64", "--n-blocks", "2", "--batch-size", "128"]  # scale.py's


def configs(n_items: int, teacher_dim: int):
    from training import train
    from training.config import LossConfig, ModelConfig, TrainConfig

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = train.resolve_defaults(parser.parse_args(FLAGS))
    model = ModelConfig.from_args(args, n_items=n_items, teacher_dim=teacher_dim)
    return model, LossConfig.from_args(args), TrainConfig.from_args(args)


def one_size(n_items: int, steps: int, micro: int, teacher_dim: int, seed: int, sparse: bool) -> dict:
    import engine
    from engine.rows import RowSparseAdam
    from training.losses import SeqRecLoss
    from training.model import SeqRec

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model_cfg, loss_cfg, train_cfg = configs(n_items, teacher_dim)
    teacher = rng.standard_normal((n_items + 1, teacher_dim)).astype(np.float32)
    model = SeqRec(model_cfg, teacher=teacher)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    popularity /= popularity.sum()
    counts = np.r_[0, rng.multinomial(10 * n_items, popularity)]
    criterion = SeqRecLoss(loss_cfg, model_cfg, counts)
    ds = engine.ds_config(engine.EngineConfig(), micro, train_cfg.lr, 0.0, 1, train_cfg.grad_clip)
    rows = RowSparseAdam(model.id_tables(), ds) if sparse else None
    tables = {id(p) for p in rows.params} if rows else set()
    dense = [p for p in model.parameters() if id(p) not in tables]
    opt = torch.optim.AdamW(dense, lr=train_cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    added = torch.zeros(n_items + 1, dtype=torch.float64)
    width = model_cfg.max_len
    parts: dict[str, list[float]] = {"forward_loss": [], "backward": [], "optimizer": []}
    model.train()
    for step in range(steps + 2):
        seq = torch.from_numpy(rng.choice(n_items, (micro, width + 1), p=popularity) + 1)
        x, y = seq[:, :-1], seq[:, 1:]
        days = torch.full(y.shape, 100.0, dtype=torch.float64)
        t0 = time.perf_counter()
        candidates = criterion.sample_candidates(y)
        loss, _ = criterion(model(x, y, candidates, days, added), y, candidates)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        t2 = time.perf_counter()
        grads = sum(_grad_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(dense, train_cfg.grad_clip)
        opt.step()
        if rows is not None:
            rows.step()
        t3 = time.perf_counter()
        if step >= 2:
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[name].append(dt * 1000)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    id_tables = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("id_in", "id_out")))
    out = {name: round(float(np.median(v)), 1) for name, v in parts.items()}
    out["step_ms"] = round(sum(out.values()), 1)
    out.update(
        params=params,
        id_table_params=id_tables,
        grad_mb=round(grads / 2**20, 1),
        positions_per_step=micro * width,
    )
    return out


def _grad_bytes(g: torch.Tensor) -> int:
    """A gradient's bytes as ranks exchange it: a sparse one's touched rows (and their indices) once each."""
    if g.is_sparse:
        g = g.coalesce()
        return g.values().numel() * g.values().element_size() + g.indices().numel() * 8
    return g.numel() * g.element_size()


def one_size_both(n_items: int, steps: int, micro: int, teacher_dim: int, seed: int) -> dict:
    """Dense AdamW (top-level keys, as before) and the row-sparse id tables (`row_sparse`), same batches."""
    dense = one_size(n_items, steps, micro, teacher_dim, seed, sparse=False)
    dense["dense_grad_mb"] = dense.pop("grad_mb")
    sparse = one_size(n_items, steps, micro, teacher_dim, seed, sparse=True)
    keep = ("forward_loss", "backward", "optimizer", "step_ms", "grad_mb")
    dense["row_sparse"] = {k: sparse[k] for k in keep}
    dense["row_sparse"]["speedup"] = round(dense["step_ms"] / sparse["step_ms"], 2)
    return dense


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=64, help="one worker's share of --batch-size 128")
    p.add_argument("--teacher-dim", type=int, default=384)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/step_cost.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one worker's CPU, as each of the job's two workers has
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    out = {"sizes": {}, "threads": 1, "micro_batch": args.micro_batch}
    for n in args.sizes:
        out["sizes"][str(n)] = got = one_size_both(n, args.steps, args.micro_batch, args.teacher_dim, seed=0)
        print(n, got, flush=True)
    out["command"] = "python benchmarks/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out["commit"] = commit.stdout.strip()
    out["load_average"] = list(os.getloadavg())
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
