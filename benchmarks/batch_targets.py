"""How many distinct targets a training micro-batch holds: what sets the in-batch candidates, and so a
step's (positions x candidates) cost, as the data grows (docs/BENCHMARKS.md, issue 20).

    python benchmarks/batch_targets.py .vlmrec/scale/100000/ws .vlmrec/scale/1000000/ws

Reads each workspace's `runs/<run>/examples/train/part-*.parquet` (written by `vlmrec train`) and draws
--batches random micro-batches of --rows example rows (seeded): the mean count of distinct targets and of
target positions per batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def batch_targets(workspace: Path, run: str, rows: int, batches: int, seed: int) -> dict:
    parts = sorted((workspace / "runs" / run / "examples" / "train").glob("part-*.parquet"))
    if not parts:
        raise SystemExit(f"{workspace}: no training shards under runs/{run}/examples/train")
    targets = np.concatenate(
        [
            np.stack(pq.read_table(p, columns=["targets"]).column(0).to_numpy(zero_copy_only=False))
            for p in parts
        ]
    )
    rng = np.random.default_rng(seed)
    distinct, positions = [], []
    for _ in range(batches):
        batch = targets[rng.choice(len(targets), min(rows, len(targets)), replace=False)]
        distinct.append(len(np.unique(batch[batch > 0])))
        positions.append(int((batch > 0).sum()))
    return {
        "examples": len(targets),
        "distinct_targets_per_batch": round(float(np.mean(distinct)), 1),
        "positions_per_batch": round(float(np.mean(positions)), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workspaces", type=Path, nargs="+")
    p.add_argument("--run", default="scale", help="the run whose shards to read (benchmarks/scale.py's)")
    p.add_argument("--rows", type=int, default=64, help="one worker's micro-batch (scale.py: 128 over 2)")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = {str(ws): batch_targets(ws, args.run, args.rows, args.batches, args.seed) for ws in args.workspaces}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
