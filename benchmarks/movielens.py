"""The student issue's table: every model on movielens-small, temporal split, full ranking, one run.

    python benchmarks/movielens.py --data ../shared/data/movielens-small --workdir .vlmrec/ml \
        --out benchmarks/results/movielens.json

Everything goes through the real entry points: `vlmrec ingest/embed/features` (when the workspace lacks
them), one `vlmrec train` (Ray Train + DeepSpeed, 2 CPU workers) per model in MODELS, then one
`vlmrec evaluate --split temporal --protocols full` over all of them plus `popular` and `knn`.
`--only` picks models; a run whose export exists is reused unless `--retrain`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vlmrec.workspace import Workspace

# Shared by every model: SASRec's ML-1M shape (RESEARCH.md calibration: d 64, 2 blocks, maxlen 200, dropout
# 0.2). Batch 32, not 128: ML-small gives ~740 windows of 200 clicks, so 128 means only ~6 steps an epoch.
COMMON = ["--max-len", "200", "--d-model", "64", "--n-blocks", "2", "--dropout", "0.2", "--batch-size", "32"]

# The job's defaults when this table was made (the default student has changed since: training/train.py
# STUDENT_DEFAULTS); every row starts from them so the table reproduces.
PLAIN = ["--no-use-id-embedding", "--id-dropout", "0", "--negative-pool", "catalogue", "--no-tune-fusion"]

# name -> the flags that make it; the ablations are configs of the same job.
MODELS: dict[str, list[str]] = {
    "sasrec": ["--item-space", "id", "--id-loss", "sampled", "--n-sampled-negatives", "2048"],
    "student-adapter": ["--item-space", "adapter"],
    "student-frozen": ["--item-space", "frozen"],
    "student-whitened": ["--item-space", "whitened"],
    "student-hybrid": ["--item-space", "adapter", "--use-id-embedding"],
    "ablation-trained-negatives": ["--item-space", "adapter", "--negative-pool", "trained"],
    # distillation alone in a LEARNED space may collapse it (every item one vector: cosine 1 for free);
    # in the fixed whitened space it is the clean test of "predict the next item's teacher vector"
    "ablation-distill-only": ["--item-space", "adapter", "--contrastive-weight", "0"],
    "ablation-distill-only-whitened": ["--item-space", "whitened", "--contrastive-weight", "0"],
    "ablation-no-logq": ["--item-space", "adapter", "--no-logq-correction"],
    "ablation-no-distill": ["--item-space", "adapter", "--distill-weight", "0"],
}


def sh(args: list[str], log: Path) -> float:
    """Run one vlmrec command, its output appended to `log`; -> seconds. A failure stops the benchmark."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def prepare_workspace(vlmrec: list[str], data: str, workdir: str, log: Path) -> dict[str, float]:
    """ingest (max_len 200) -> embed -> features for the stages the workspace lacks; -> seconds per stage."""
    ws = Workspace(workdir)
    seconds: dict[str, float] = {}
    if not ws.events.exists():
        seconds["ingest"] = sh([*vlmrec, "ingest", "--format", "movielens", "--data", data,
                                "--workdir", workdir, "--max-len", "200"], log)  # fmt: skip
    if not ws.embeddings.exists():
        seconds["embed"] = sh([*vlmrec, "embed", "--workdir", workdir], log)
    if not (ws.root / "registry.db").exists():
        seconds["features"] = sh([*vlmrec, "features", "--workdir", workdir], log)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the movielens-small folder")
    p.add_argument("--workdir", default=".vlmrec/ml")
    p.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping ends runs")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--out", default="benchmarks/results/movielens.json")
    args = p.parse_args()

    ws = Workspace(args.workdir)
    vlmrec = [str(Path(sys.executable).with_name("vlmrec"))]
    log = Path(args.out).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    seconds = prepare_workspace(vlmrec, args.data, args.workdir, log)

    for name in args.only:
        if args.retrain or not (ws.runs / name / "export" / "run.json").exists():
            budget = ["--epochs", str(args.epochs), "--patience", str(args.patience)]
            seconds[f"train {name}"] = sh(
                [
                    *vlmrec,
                    "train",
                    "--workdir",
                    args.workdir,
                    "--name",
                    name,
                    *COMMON,
                    *PLAIN,
                    *budget,
                    *MODELS[name],
                ],
                log,
            )
            print(f"{name}: trained in {seconds[f'train {name}']:.0f} s", flush=True)

    eval_name = "movielens-table"
    seconds["evaluate"] = sh(
        [
            *vlmrec,
            "evaluate",
            "--workdir",
            args.workdir,
            "--runs",
            *args.only,
            "--split",
            "temporal",
            "--protocols",
            "full",
            "--name",
            eval_name,
        ],  # fmt: skip
        log,
    )
    metrics = json.loads((ws.root / "eval" / eval_name / "metrics.json").read_text())
    runs = {}
    for name in args.only:
        info = json.loads((ws.runs / name / "export" / "run.json").read_text())
        runs[name] = {
            "flags": COMMON + PLAIN + MODELS[name],
            "best_epoch": info["best"]["epoch"],
            "best_val_ndcg10": info["best"]["val_ndcg10"],
            "epochs_run": info["last"]["epoch"],
            "timing_s": info["timing_s"],
        }
    result = {
        "command": " ".join(["python", "benchmarks/movielens.py", *sys.argv[1:]]),
        "runs": runs,
        "seconds": seconds,
        "evaluation": metrics,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print((ws.root / "eval" / eval_name / "metrics.md").read_text())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
