"""The behavioural baseline through the real job: `vlmrec train --split loo --item-space id` (Ray Train +
DeepSpeed, 2 CPU workers, examples from Feast) on the SASRec paper's Games file, scored by `vlmrec evaluate`.

    python benchmarks/games_job.py --data ../shared/data/amazon-games/Video.txt --workdir .vlmrec/games \
        --out benchmarks/results/games_job.json

The model and loss of benchmarks/sasrec_games.py (the plain single-process loop): the paper's Games shape
(d 50, 2 blocks, 1 head, max_len 50, dropout 0.5, batch 128, lr 1e-3; the job clips gradients at norm 1,
`--grad-clip 0` runs without, as the paper and the plain loop) with a softmax over 2,048 uniformly
sampled items (logQ-corrected), no in-batch negatives. Leave-one-out: the last event is the test target; the
job early-stops on full-ranking NDCG@10 of each user's last training event. No teacher: nothing is embedded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from movielens import sh  # benchmarks/ is on sys.path when this file runs as a script

from vlmrec.workspace import Workspace

FLAGS = ["--split", "loo", "--item-space", "id", "--d-model", "50", "--n-blocks", "2", "--n-heads", "1",
         "--max-len", "50", "--dropout", "0.5", "--batch-size", "128", "--lr", "1e-3", "--id-loss", "sampled",
         "--n-sampled-negatives", "2048", "--no-in-batch-negatives"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="amazon-games/Video.txt")
    p.add_argument("--workdir", default=".vlmrec/games")
    p.add_argument("--name", default="sasrec-games")
    p.add_argument("--grad-clip", default=None, help="the job's --grad-clip (default: the job's own)")
    p.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping ends the run")
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/games_job.json")
    args = p.parse_args()

    ws = Workspace(args.workdir)
    vlmrec = [str(Path(sys.executable).with_name("vlmrec"))]
    log = Path(args.out).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    load = {"start": list(os.getloadavg())}
    seconds: dict[str, float] = {}
    if not ws.events.exists():
        seconds["ingest"] = sh([*vlmrec, "ingest", "--format", "sasrec", "--data", args.data,
                                "--workdir", args.workdir, "--max-len", "50"], log)  # fmt: skip
    if not (ws.root / "registry.db").exists():
        seconds["features"] = sh([*vlmrec, "features", "--workdir", args.workdir], log)
    if not (ws.runs / args.name / "export" / "run.json").exists():
        budget = ["--epochs", str(args.epochs), "--patience", str(args.patience)]
        budget += ["--grad-clip", args.grad_clip] if args.grad_clip is not None else []
        seconds["train"] = sh(
            [*vlmrec, "train", "--workdir", args.workdir, "--name", args.name, *FLAGS, *budget], log
        )
    seconds["evaluate"] = sh([*vlmrec, "evaluate", "--workdir", args.workdir, "--runs", args.name, "--split", "loo",
                              "--protocols", "full", "sampled", "--name", "games-job"], log)  # fmt: skip
    load["end"] = list(os.getloadavg())
    metrics = json.loads((ws.root / "eval" / "games-job" / "metrics.json").read_text())
    info = json.loads((ws.runs / args.name / "export" / "run.json").read_text())
    res = metrics["results"][args.name]
    pick = ("HR@10", "NDCG@10", "HR@5", "NDCG@5", "MRR")
    plain = json.loads(Path("benchmarks/results/sasrec_games.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    result = {
        "command": " ".join(["python", "benchmarks/games_job.py", *sys.argv[1:]]),
        "commit": commit.strip(),
        "protocols": {
            "sampled": "Games-LOO-sampled: the target among 100 items the user never touched",
            "full": "Games-LOO-full: the target among all items, the history excluded",
        },
        "sampled": {k: res["sampled"]["all"]["micro"][k] for k in pick},
        "full": {k: res["full"]["all"]["micro"][k] for k in pick},
        "ci95": {p: res[p]["all"]["micro_ci95"]["NDCG@10"] for p in ("sampled", "full")},
        "n_queries": metrics["n_queries"],
        "flags": FLAGS + (["--grad-clip", args.grad_clip] if args.grad_clip is not None else []),
        "best_epoch": info["best"]["epoch"],
        "epochs_run": info["last"]["epoch"],
        "best_val_ndcg10": info["best"]["val_ndcg10"],
        "timing_s": info["timing_s"],
        "seconds": seconds,
        "load_average": load,
        "plain_loop": {p: {k: plain["test"][p]["micro"][k] for k in pick} for p in ("sampled", "full")},
        "paper_sampled": {"HR@10": 0.7410, "NDCG@10": 0.5360},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("sampled", "full", "plain_loop")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
