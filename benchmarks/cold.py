"""The cold / launch issue's table: which student ranks what nobody has clicked yet, on movielens-small.

    python benchmarks/cold.py --data ../shared/data/movielens-small --workdir .vlmrec/ml \
        --out benchmarks/results/cold.json

Every model is one `vlmrec train` (Ray Train + DeepSpeed, 2 CPU workers, early stopping on validation)
in two worlds of the same temporal split: `natural` (every event before the cut) and `launch` (10% of the
items with train events, popularity-stratified, launched after the cut: `--cold launch`). Then one
`vlmrec evaluate` per world (full ranking; the launch slice is the same queries in both), and:
  cold parity = launch-slice HR@10 of the model trained without the launched items
                / launch-slice HR@10 of the same config trained with them.
The default is chosen on validation only, never on test: the shipped default (what `vlmrec train` trains
with no model flags) stays unless another config's validation NDCG@10 beats it significantly on the same
validation queries (`default_choice`). `--only` picks models; an existing export is reused unless --retrain.
Then the Mixer's weights for the default: `vlmrec tune-mix --test` validated on the window of events before
the cut (the default and sasrec retrained on the cut MIX_WINDOW earlier: `<run>-backtest<percent>`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from movielens import COMMON, prepare_workspace, sh  # benchmarks/ is on sys.path when run as a script

from training.validation import FUSION_GRID, fusion_key
from vlmrec.workspace import Workspace

# training run -> flags: the behavioural baseline and the cold-aware student configs of the one training job.
# Every student run picks its fusion weight on validation (--tune-fusion); its "no fusion" twin below is the
# same weights with fusion_weight 0 (a copy of the export), so fusion is measured on one set of weights.
# Every STUDENT_DEFAULTS flag is said (a flag left out takes the shipped default); the age configs add it.
BASE = ["--item-space", "adapter", "--no-use-id-embedding", "--id-dropout", "0", "--negative-pool", "trained",
        "--no-item-age", "--tune-fusion"]  # fmt: skip
HYBRID = [*BASE, "--use-id-embedding", "--id-dropout", "0.5"]
TRAINED: dict[str, list[str]] = {
    "sasrec": ["--item-space", "id", "--id-loss", "sampled", "--n-sampled-negatives", "2048"],
    "student-fusion": BASE,
    "student-age-fusion": [*BASE, "--item-age"],
    "student-hybrid-dropout-fusion": HYBRID,
    "student-hybrid-age-fusion": [*HYBRID, "--item-age"],
    "student-hybrid08-age-fusion": [*BASE, "--use-id-embedding", "--id-dropout", "0.8", "--item-age"],
}
# model -> (training run, fusion kept?)
MODELS: dict[str, tuple[str, bool]] = {
    "sasrec": ("sasrec", True),
    "student-trained-negatives": ("student-fusion", False),
    "student-fusion": ("student-fusion", True),
    "student-age": ("student-age-fusion", False),
    "student-age-fusion": ("student-age-fusion", True),
    "student-hybrid-dropout": ("student-hybrid-dropout-fusion", False),
    "student-hybrid-dropout-fusion": ("student-hybrid-dropout-fusion", True),
    "student-hybrid-age": ("student-hybrid-age-fusion", False),
    "student-hybrid-age-fusion": ("student-hybrid-age-fusion", True),
    "student-hybrid08-age-fusion": ("student-hybrid08-age-fusion", True),
}
STUDENTS = [m for m in MODELS if m.startswith("student")]
LAUNCH = ["--cold", "launch", "--launch-fraction", "0.1", "--launch-seed", "0"]
TRAIN_FRACTION = 0.8  # the split's cut (the job's default)
# The Mixer's validation window: as long as the test period (the events of the last 0.2 before the cut), so
# the backtest runs face what the served runs face on test, one horizon earlier.
MIX_WINDOW = 0.2


def without_fusion(ws: Workspace, source: str, name: str) -> None:
    """runs/<name>/export: runs/<source>/export with fusion_weight 0 (the same weights, fusion off)."""
    src, dst = ws.runs / source / "export", ws.runs / name / "export"
    if (dst / "run.json").exists() and (dst / "run.json").stat().st_mtime >= (
        src / "run.json"
    ).stat().st_mtime:
        return  # made from this export already
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "model" / "config.json").read_text())
    cfg["model"]["fusion_weight"] = 0.0
    (dst / "model" / "config.json").write_text(json.dumps(cfg, indent=2))
    info = json.loads((dst / "run.json").read_text())
    info["configs"]["model"]["fusion_weight"] = 0.0
    info["name"], info["derived_from"] = name, f"{source} with fusion_weight 0"
    (dst / "run.json").write_text(json.dumps(info, indent=2))


def _fresh(metrics_path: Path, ws: Workspace, runs: list[str]) -> bool:
    """An evaluation of exactly these runs, newer than each of their exports."""
    metrics = json.loads(metrics_path.read_text())
    newest = max((ws.runs / r / "export" / "run.json").stat().st_mtime for r in runs)
    return set(metrics["models"]) - {"popular", "knn"} == set(runs) and metrics_path.stat().st_mtime > newest


def backtest_name(run: str) -> str:
    """The run of the same config trained on the cut MIX_WINDOW earlier (named by its train fraction)."""
    return f"{run}-backtest{round(100 * (TRAIN_FRACTION - MIX_WINDOW))}"


def mix_command(vlmrec: list[str], workdir: str, default: str) -> list[str]:
    """`vlmrec tune-mix --test` for the default student, validated on the window before the cut."""
    run = MODELS[default][0]
    return [*vlmrec, "tune-mix", "--workdir", workdir, "--student-run", run, "--sasrec-run", "sasrec",
            "--backtest-student-run", backtest_name(run), "--backtest-sasrec-run", backtest_name("sasrec"),
            "--test"]  # fmt: skip


def tune_mix(ws: Workspace, vlmrec: list[str], workdir: str, default: str, budget: list, log: Path) -> dict:
    """Train the backtest runs that are missing (the default's config and sasrec's, cut MIX_WINDOW earlier),
    then `vlmrec tune-mix --test` unless mix.json is newer than every export it reads. -> seconds spent."""
    seconds = {}
    run = MODELS[default][0]
    backtest = ["--train-fraction", f"{TRAIN_FRACTION - MIX_WINDOW:g}"]
    for source in (run, "sasrec"):
        name = backtest_name(source)
        if not (ws.runs / name / "export" / "run.json").exists():
            cmd = [*vlmrec, "train", "--workdir", workdir, "--name", name, *COMMON, *budget, *TRAINED[source],
                   *backtest]  # fmt: skip
            seconds[f"train {name}"] = sh(cmd, log)
    mix = ws.root / "mix.json"
    reads = [
        ws.runs / r / "export" / "run.json"
        for r in (run, "sasrec", backtest_name(run), backtest_name("sasrec"))
    ]
    cmd = mix_command(vlmrec, workdir, default)
    done = json.loads(mix.read_text()) if mix.exists() else {}
    same = done.get("config", {}).get("backtest_student_run") == backtest_name(run) and "test" in done
    if (
        not same
        or done["config"]["student_run"] != run
        or mix.stat().st_mtime < max(p.stat().st_mtime for p in reads)
    ):
        seconds["tune-mix"] = sh(cmd, log)
    return seconds


def mixer_figures(ws: Workspace, workdir: str, default: str | None) -> dict:
    """The producers and the validated Mixer on test, from `vlmrec tune-mix --test` (<workdir>/mix.json)
    when it was tuned with the default student; {} otherwise."""
    path = ws.root / "mix.json"
    mix = json.loads(path.read_text()) if path.exists() else {}
    if "test" not in mix or mix["config"]["student_run"] != default or mix["config"]["cold"] != "natural":
        return {}
    keys = ("recall100_all", "recall100_cold")
    test = mix["test"]
    validation = mix["validation"]
    return {
        "producers": {p: {k: test[p][k] for k in keys} for p in ("student", "sasrec", "similar", "popular")},
        "mixer_validated": {k: test["mixer_validated"][k] for k in keys},
        "mixer": {
            "weights": mix["weights"],
            "quotas": mix["quotas"],
            "validation": {
                **validation["chosen"],
                "kind": validation.get("kind", "last-event"),
                "n_queries": validation["n_queries"],
                "n_cold": validation["n_cold"],
                "best_blend": validation["best_blend"],
                "producers": validation["producers"],
            },
            "command": " ".join(mix_command(["vlmrec"], workdir, default)),
            "test_launch_recall100": {
                p: test[p]["recall100_launch"] for p in test if isinstance(test[p], dict)
            },
        },
    }


def job_args(flags: list[str]) -> argparse.Namespace:
    """The arguments `vlmrec train` resolves these flags to (STUDENT_DEFAULTS filled in)."""
    from training.train import add_arguments, resolve_defaults

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_defaults(parser.parse_args(flags))


def job_configs(flags: list[str]) -> tuple:
    """The (model, loss, train) configs `vlmrec train` makes of these flags (vocabulary sizes aside)."""
    from training.config import LossConfig, ModelConfig
    from training.train import TrainConfig

    args = job_args(["--name", "x", *flags])
    n = {"n_items": 1, "teacher_dim": 0 if args.item_space == "id" else 1}
    return ModelConfig.from_args(args, **n), LossConfig.from_args(args), TrainConfig.from_args(args)


def validation_ndcg_per_query(ws: Workspace, name: str, flags: list[str]) -> np.ndarray:
    """(V,) NDCG@10 of each validation query by an export as it serves (its fusion), the job's own data."""
    from training.metrics import ndcg_at
    from training.model import SeqRec
    from training.train import JobConfig, validation_arrays
    from training.validation import validation_ranks

    job = JobConfig.from_args(job_args(["--workdir", str(ws.root), "--name", name, *flags]))
    model = SeqRec.from_pretrained(ws.runs / name / "export" / "model")
    a = validation_arrays(ws, job, model.cfg)
    ranks = validation_ranks(model, a["valid_inputs"], a["valid_targets"], a["valid_days"], a["added_days"])
    return ndcg_at(ranks, 10)


def default_choice(incumbent: str, per_query: dict[str, np.ndarray], alpha: float = 0.05) -> tuple[str, dict]:
    """The incumbent unless a challenger's validation NDCG@10 is significantly higher on the same queries
    (one-sided paired t-test, p < alpha); among those, the best. The Mixer's rule for a blend: a figure that
    differs by noise does not move what is shipped. -> (default, {challenger: {diff, p}})"""
    from scipy.stats import ttest_rel

    tests = {}
    for name, values in per_query.items():
        if name != incumbent:
            p = float(ttest_rel(values, per_query[incumbent], alternative="greater").pvalue)
            tests[name] = {"diff": float(values.mean() - per_query[incumbent].mean()), "p": p}
    better = [n for n, t in tests.items() if t["p"] < alpha]
    return max(better, key=lambda n: per_query[n].mean()) if better else incumbent, tests


def run_name(model: str, world: str) -> str:
    return model if world == "natural" else f"{model}-launch"


def hr10(metrics: dict, model: str, slice_: str) -> float | None:
    r = metrics["results"][model]["full"].get(slice_)
    return r["micro"]["HR@10"] if r else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the movielens-small folder")
    p.add_argument("--workdir", default=".vlmrec/ml")
    p.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--worlds", nargs="+", default=["natural", "launch"], choices=["natural", "launch"])
    p.add_argument(
        "--launch-only",
        nargs="*",
        default=None,
        choices=list(MODELS),
        help="models of the launch world (default: --only)",
    )
    p.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping ends runs")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--out", default="benchmarks/results/cold.json")
    args = p.parse_args()

    ws = Workspace(args.workdir)
    vlmrec = [str(Path(sys.executable).with_name("vlmrec"))]
    log = Path(args.out).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    seconds = prepare_workspace(vlmrec, args.data, args.workdir, log)

    budget = ["--epochs", str(args.epochs), "--patience", str(args.patience)]
    launch_only = args.only if args.launch_only is None else args.launch_only
    models_of = {w: (args.only if w == "natural" else launch_only) for w in args.worlds}
    for world, models_here in models_of.items():
        for run in dict.fromkeys(MODELS[m][0] for m in models_here):
            name = run_name(run, world)
            if args.retrain or not (ws.runs / name / "export" / "run.json").exists():
                flags = [*COMMON, *budget, *TRAINED[run], *(LAUNCH if world == "launch" else [])]
                cmd = [*vlmrec, "train", "--workdir", args.workdir, "--name", name, *flags]
                seconds[f"train {name}"] = sh(cmd, log)
                print(f"{name}: trained in {seconds[f'train {name}']:.0f} s", flush=True)
            info = json.loads((ws.runs / name / "export" / "run.json").read_text())
            grid = {fusion_key(*pair) for pair in FUSION_GRID}
            if "--tune-fusion" in TRAINED[run] and set(info.get("fusion_val_ndcg10") or {}) != grid:
                # a run made before the fusion grid of this commit: choose its fusion with this one
                cmd = [*vlmrec, "train", "--workdir", args.workdir, "--name", name, "--fusion-only", *COMMON,
                       *TRAINED[run], *(LAUNCH if world == "launch" else [])]  # fmt: skip
                seconds[f"fusion {name}"] = sh(cmd, log)
        for model in models_here:
            run, fused = MODELS[model]
            if model != run:
                without_fusion(ws, run_name(run, world), run_name(model, world))

    metrics = {}
    for world, models_here in models_of.items():
        runs = [run_name(m, world) for m in models_here]
        done = ws.root / "eval" / f"cold-{world}" / "metrics.json"
        if done.exists() and not args.retrain and _fresh(done, ws, runs):  # the same exports, evaluated
            metrics[world] = json.loads(done.read_text())
            continue
        cmd = [*vlmrec, "evaluate", "--workdir", args.workdir, "--runs", *runs, "--protocols", "full",
               "--name", f"cold-{world}", *(LAUNCH if world == "launch" else [])]  # fmt: skip
        seconds[f"evaluate {world}"] = sh(cmd, log)
        metrics[world] = json.loads((ws.root / "eval" / f"cold-{world}" / "metrics.json").read_text())

    runs_info, models = {}, {}
    for model in ["knn", "popular", *args.only]:
        row = {"ndcg10_all": None, "hr10_cold": None, "hr10_launch": None, "cold_parity": None}
        if "natural" in metrics:
            nat = metrics["natural"]["results"][run_name(model, "natural") if model in MODELS else model]
            row["ndcg10_all"] = nat["full"]["all"]["micro"]["NDCG@10"]
            row["hr10_cold"] = nat["full"]["cold"]["micro"]["HR@10"]
        if "launch" in metrics:
            name = run_name(model, "launch") if model in MODELS else model
            row["hr10_launch"] = (
                hr10(metrics["launch"], name, "launch") if name in metrics["launch"]["results"] else None
            )
            if (
                model in MODELS and "natural" in metrics and row["hr10_launch"] is not None
            ):  # knn, popular: n/a
                warm = hr10(metrics["natural"], run_name(model, "natural"), "launch")
                row["cold_parity"] = row["hr10_launch"] / warm if warm else None
        models[model] = row
    for world, models_here in models_of.items():
        for model in models_here:
            name = run_name(model, world)
            info = json.loads((ws.runs / name / "export" / "run.json").read_text())
            runs_info[name] = {
                "flags": COMMON + TRAINED[MODELS[model][0]] + (LAUNCH if world == "launch" else []),
                "fusion_off_copy_of": None if MODELS[model][1] else run_name(MODELS[model][0], world),
                "best_epoch": info["best"]["epoch"],
                "best_val_ndcg10": info["best"]["val_ndcg10"],
                "epochs_run": info["last"]["epoch"],
                "fusion_weight": info["configs"]["model"].get("fusion_weight", 0.0),
                "fusion_last": info["configs"]["model"].get("fusion_last", 3),
                "fusion_val_ndcg10": info.get("fusion_val_ndcg10"),
                "timing_s": info["timing_s"],
            }
    # the default: the shipped config unless a natural-world student config beats it significantly on
    # validation; a fusion-off twin is a measurement (the job never turns its own choice off)
    candidates = [
        m for m in args.only if m in STUDENTS and MODELS[m][1] and run_name(m, "natural") in runs_info
    ]
    val = {
        m: (runs_info[m]["fusion_val_ndcg10"] or {}).get(
            fusion_key(runs_info[m]["fusion_weight"], runs_info[m]["fusion_last"]),
            runs_info[m]["best_val_ndcg10"],
        )
        for m in candidates
    }
    shipped = job_configs(COMMON)
    incumbent = next((m for m in candidates if job_configs(COMMON + TRAINED[m]) == shipped), None)
    default, vs_incumbent = None, {}
    if incumbent is not None:
        challengers = [m for m in candidates if m == incumbent or val[m] > val[incumbent]]
        per_query = {m: validation_ndcg_per_query(ws, m, COMMON + TRAINED[m]) for m in challengers}
        default, vs_incumbent = default_choice(incumbent, per_query)
    if default is not None and "natural" in args.worlds:
        seconds.update(tune_mix(ws, vlmrec, args.workdir, default, budget, log))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    result = {
        "command": " ".join(["python", "benchmarks/cold.py", *sys.argv[1:]]),
        "commit": commit.strip(),
        "default_model": default,
        "default_rule": "the shipped default (incumbent) unless a natural-world student config's validation "
        "NDCG@10 (each user's last training event, at the job's fusion choice) beats it significantly on the "
        "same queries (one-sided paired t-test, p < 0.05)",
        "incumbent": incumbent,
        "validation_ndcg10": val,
        "validation_vs_incumbent": vs_incumbent,
        "models": models,
        "runs": runs_info,
        "seconds": seconds,
        "load_average": list(__import__("os").getloadavg()),
        "evaluation": metrics,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    result.update(mixer_figures(ws, args.workdir, default))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    for world in args.worlds:
        print((ws.root / "eval" / f"cold-{world}" / "metrics.md").read_text())
    print(json.dumps(models, indent=2))
    print(f"default: {default}; wrote {args.out}")


if __name__ == "__main__":
    main()
