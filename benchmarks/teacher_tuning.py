"""Teacher adaptation on MovieLens-small (issue 8): does tuning the teacher help, and what does it cost?

    nice -n 10 .venv/bin/python benchmarks/teacher_tuning.py --data ../shared/data/movielens-small \
        --workdir .vlmrec/bench-tune --out benchmarks/results/teacher_tuning.json

Every stage is a real `vlmrec` command in a child process (`python -m vlmrec <stage> ...`, the CLI's own
parser); its wall time is the command's. `--skip-existing` reuses a stage whose output is already there.

1. <workdir>/frozen: vlmrec ingest --format movielens, vlmrec embed (minilm), vlmrec features
2. vlmrec tune in the frozen workspace (pairs from events before the temporal 0.8 cut only: the cut the
   student is evaluated at), one run per row: lora-sigmoid (co-engagement, SigLIP's sigmoid loss, the
   default recipe), lora-infonce (the same pairs and negatives, InfoNCE), two recipe ablations of the
   sigmoid run (in-batch negatives only; and also the paper's init at the model's lr), lit (a ViT image
   tower on the posters, minilm locked)
3. <workdir>/<run>: data/ copied from frozen, vlmrec embed --teacher <the run's export>, vlmrec features
4. the Mercari-style item-to-item protocol, per workspace: every test event of the temporal split is a query,
   the user's previous click its query item, the clicked item the target; the full catalogue ranked by
   teacher cosine, the user's history excluded (training/evaluate.py's `knn` scorer, the same code as the
   `knn` row of `vlmrec evaluate`). nDCG@5, nDCG@10, Recall@10 on all and on cold targets. Fused LiT
   vectors at a second image weight are computed in process with teacher.encoders.fuse.
5. the student: vlmrec train + vlmrec evaluate, one config, in the frozen and the lora-sigmoid workspace
6. LiT: poster -> text retrieval among held-out movies (first rated after the cut: never a training pair),
   Recall@1 / @10 against chance (1/N, 10/N); also on as many training movies, to show what was fitted
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
COPIED = ("events.parquet", "items.parquet", "click_sequences.parquet")  # what a re-embedded workspace shares


def vlmrec(argv: list[str], log: Path) -> float:
    """Run `python -m vlmrec <argv>`; its output goes to `log`. -> wall seconds. Raises on failure."""
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ vlmrec {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(
            [sys.executable, "-m", "vlmrec", *argv],
            cwd=ROOT,
            env={**os.environ, **ENV},
            stdout=out,
            stderr=out,
        )
    if done.returncode:
        raise RuntimeError(f"vlmrec {' '.join(argv)} failed ({done.returncode}); see {log}")
    return round(time.perf_counter() - t0, 1)


def eval_data(workdir: Path):
    """The protocol's queries and the workspace's item vectors (training.evaluate's temporal 0.8 split)."""
    from training.evaluate import load_eval_data
    from vlmrec.split import SplitConfig
    from vlmrec.workspace import Workspace

    return load_eval_data(Workspace(workdir), SplitConfig())


def mercari(data) -> tuple[dict, np.ndarray]:
    """Item-to-item from the previous click: nDCG@5 / @10, Recall@10 (all, cold), bootstrap CI of nDCG@10.
    -> (summary, every query's rank: for paired comparisons)"""
    from training.evaluate import knn_scorer, scorer_ranks

    return summarise_ranks(scorer_ranks(knn_scorer(data), data, "full"), data)


def summarise_ranks(ranks: np.ndarray, data) -> tuple[dict, np.ndarray]:
    from training.metrics import KS, metrics_from_ranks

    users, cold = data.queries.user_ids, data.queries.cold
    result = {
        "all": metrics_from_ranks(ranks, KS, users=users),
        "cold": metrics_from_ranks(ranks[cold], KS, users=users[cold]) if cold.any() else None,
    }
    return summarise(result, data), ranks


def paired_delta(
    ranks: np.ndarray, base: np.ndarray, users: np.ndarray, n: int = 2000, seed: int = 0
) -> dict:
    """nDCG@10 of `ranks` minus `base` on the same queries: the mean, its 95% interval over resamples of
    users (with all their queries), and the share of resamples where it is below zero."""
    gain = lambda r: np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0)  # noqa: E731
    _, u = np.unique(users, return_inverse=True)
    count = np.bincount(u).astype(np.float64)
    sums = np.bincount(u, weights=gain(ranks) - gain(base))
    w = np.random.default_rng(seed).multinomial(len(count), np.full(len(count), 1.0 / len(count)), size=n)
    boots = (w @ sums) / (w @ count)
    return {
        "nDCG@10_delta": float(sums.sum() / count.sum()),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "p_below_zero": float((boots < 0).mean()),
    }


def neighbour_popularity(data, queries: int = 3000, seed: int = 0) -> dict:
    """How popular (training-period clicks) are the top-10 items the protocol retrieves, against the targets?
    A space whose neighbours drift toward the head retrieves hubs rather than what a user clicks next."""
    import torch

    from training.evaluate import knn_scorer

    counts = np.bincount(
        data.items.index_of(data.train["item_id"].to_numpy()), minlength=data.items.n_items + 1
    )
    pick = np.random.default_rng(seed).permutation(len(data.targets))[:queries]
    scores = knn_scorer(data)([data.histories[i] for i in pick], data.days[pick])
    scores[:, 0] = -torch.inf
    for row, i in enumerate(pick):  # the protocol's mask: the user's history is never retrieved
        scores[row, torch.as_tensor(data.histories[i], dtype=torch.long)] = -torch.inf
    top = scores.topk(10, dim=1).indices.numpy()
    return {
        "top10_median_train_clicks": float(np.median(counts[top])),
        "top10_mean_train_clicks": float(counts[top].mean()),
        "target_median_train_clicks": float(np.median(counts[data.targets[pick]])),
    }


def mercari_vectors(data, vectors: np.ndarray) -> tuple[dict, np.ndarray]:
    """The same protocol on other vectors in the same item order (fused variants made here)."""
    import dataclasses

    from training.data import ItemTable

    return mercari(dataclasses.replace(data, items=ItemTable(data.items.item_ids, vectors)))


def summarise(result: dict, data) -> dict:
    a, c = result["all"], result["cold"]
    return {
        **neighbour_popularity(data),
        "teacher_id": data.teacher_id,
        "queries": a["n_queries"],
        "cold_queries": c["n_queries"] if c else 0,
        "nDCG@5": a["micro"]["NDCG@5"],
        "nDCG@10": a["micro"]["NDCG@10"],
        "nDCG@10_ci95": a["micro_ci95"]["NDCG@10"],
        "Recall@10": a["micro"]["HR@10"],
        "macro_nDCG@10": a["macro"]["NDCG@10"],
        "cold_nDCG@10": c["micro"]["NDCG@10"] if c else None,
        "cold_Recall@10": c["micro"]["HR@10"] if c else None,
    }


def lit_fused(frozen: Path, weights: tuple[float, ...]) -> dict[float, np.ndarray]:
    """Item vectors normalise(w * LiT image + (1 - w) * minilm text) for each w, in the workspace's item
    order (items without a poster keep their text vector), with teacher.encoders.fuse as `vlmrec embed` does."""
    import torch
    from PIL import Image

    from teacher.encoders import TeacherConfig, fuse, load_teacher

    lit = load_teacher(TeacherConfig(name="lit", path=str(frozen / "runs" / "lit" / "export" / "model")))
    items = pq.read_table(frozen / "data" / "items.parquet").to_pandas()
    table = pq.read_table(frozen / "data" / "item_embeddings.parquet").to_pandas()
    if not np.array_equal(table["item_id"].to_numpy(), items["item_id"].to_numpy()):
        raise ValueError("item_embeddings and items are in different orders")
    text = np.stack(table["vector"].to_numpy()).astype(np.float32)
    has = items["image_uri"].notna().to_numpy()
    images = []
    for uri in items.loc[has, "image_uri"]:
        with Image.open(uri) as im:
            images.append(im.convert("RGB"))
    image = torch.from_numpy(lit.embed_images(images))
    out = {}
    for w in weights:
        fused = text.copy()
        fused[has] = fuse(torch.from_numpy(text[has]), image, w).numpy()
        out[w] = fused
    return out


def lit_retrieval(frozen: Path, export: Path, seed: int = 0) -> dict:
    """Poster -> text of the same movie among N movies: held-out (created after the cut) vs training ones."""
    from PIL import Image

    from teacher.encoders import TeacherConfig, item_text, load_teacher
    from training.metrics import temporal_split

    run = json.loads((export / "run.json").read_text())
    field = run["configs"]["tune"]["text_field"]
    teacher = load_teacher(TeacherConfig(name="lit", path=str(export / "model")))
    items = pq.read_table(frozen / "data" / "items.parquet").to_pandas()
    events = pq.read_table(frozen / "data" / "events.parquet").to_pandas()
    cut = pd.to_datetime(temporal_split(events, 0.8).train["event_timestamp"], utc=True).max()
    with_poster = items[items["image_uri"].notna()]
    held = with_poster[pd.to_datetime(with_poster["created_at"], utc=True) > cut]
    seen = with_poster[pd.to_datetime(with_poster["created_at"], utc=True) <= cut].sample(
        len(held), random_state=seed
    )

    def recall(group: pd.DataFrame, text: str) -> dict:
        texts = (
            [item_text(t, x) for t, x in zip(group["title"], group["text"], strict=True)]
            if text == "item"
            else group["title"].tolist()
        )
        images = []
        for uri in group["image_uri"]:
            with Image.open(uri) as im:
                images.append(im.convert("RGB"))
        sim = teacher.embed_images(images) @ teacher.embed_texts(texts).T  # (N, N)
        rank = (sim > np.diag(sim)[:, None]).sum(1)  # others scoring strictly above the right text
        n = len(group)
        return {
            "n": n,
            "R@1": float((rank < 1).mean()),
            "R@10": float((rank < 10).mean()),
            "chance_R@1": 1 / n,
            "chance_R@10": 10 / n,
        }

    return {
        "trained_on_text": field,
        "held_out": {"item_text": recall(held, "item"), "title": recall(held, "title")},
        "training_movies": {"item_text": recall(seen, "item"), "title": recall(seen, "title")},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the movielens-small folder")
    p.add_argument("--workdir", type=Path, default=Path(".vlmrec/bench-tune"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_tuning.json"))
    p.add_argument("--skip-existing", action="store_true", help="reuse stages whose output exists")
    p.add_argument("--max-pairs", type=int, default=6000, help="co-engagement pairs (subsample)")
    p.add_argument("--epochs", type=int, default=1, help="LoRA epochs")
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    p.add_argument("--lit-epochs", type=int, default=8)
    p.add_argument("--student-epochs", type=int, default=30)
    args = p.parse_args(argv)

    load_start = os.getloadavg()
    wd = args.workdir.absolute()
    frozen = wd / "frozen"
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "commands.log"
    skip = args.skip_existing
    walls: dict[str, float | None] = {}
    earlier = json.loads(args.out.read_text()).get("walls_s", {}) if skip and args.out.exists() else {}

    def stage(key: str, done: Path, argv: list[str]) -> None:
        if skip and done.exists():
            walls[key] = earlier.get(key)  # reused: the earlier run's wall time (None: not recorded)
            return
        walls[key] = vlmrec(argv, log)
        print(f"{key}: {walls[key]} s", flush=True)

    stage(
        "ingest",
        frozen / "data" / "items.parquet",
        ["ingest", "--format", "movielens", "--data", str(args.data), "--workdir", str(frozen)],
    )
    stage("embed frozen", frozen / "data" / "item_embeddings.parquet", ["embed", "--workdir", str(frozen)])
    stage("features frozen", frozen / "registry.db", ["features", "--workdir", str(frozen)])

    common = ["--workdir", str(frozen), "--pairs", "co-engagement", "--max-pairs", str(args.max_pairs)]
    common += ["--epochs", str(args.epochs), "--batch-size", "64", "--max-length", "32", "--lr", str(args.lr)]
    runs = {
        "lora-sigmoid": [*common, "--loss", "sigmoid"],  # the recipe: defaults logit_lr 0.05, random negatives 32
        "lora-infonce": [*common, "--loss", "infonce"],  # the same pairs and negatives, InfoNCE
        "lora-sigmoid-logit-lr": [*common, "--loss", "sigmoid", "--random-negatives", "0"],  # in-batch only
        "lora-sigmoid-paper": [*common, "--loss", "sigmoid", "--random-negatives", "0", "--logit-lr", "0"],
        "lora-sigmoid-lr1e-4": [*common, "--loss", "sigmoid", "--lr", "1e-4"],  # a gentler move of the space
        "lora-sigmoid-logit-lr0.5": [*common, "--loss", "sigmoid", "--logit-lr", "0.5"],  # t, b calibrate fast
        "lit": [
            "--workdir", str(frozen), "--method", "lit", "--pairs", "image-title", "--epochs", str(args.lit_epochs),
            "--batch-size", "128", "--lr", "1e-3", "--max-pairs", "0", "--weight-decay", "0.05",
        ],
    }  # fmt: skip
    report: dict = {"runs": {}, "mercari": {}, "student": {}}
    for name, flags in runs.items():
        export = frozen / "runs" / name / "export"
        stage(f"tune {name}", export / "run.json", ["tune", "--name", name, *flags])
        info = json.loads((export / "run.json").read_text())
        report["runs"][name] = {
            "command": f"vlmrec tune --name {name} {' '.join(flags)}",
            "teacher_id": info["teacher_id"],
            "pairs": info["pairs"],
            "best": info["best"],
            "history": info["kept_checkpoints"],
            "cost": info["cost"],
            "wall_s": walls[f"tune {name}"],
        }
        ws = wd / name
        (ws / "data").mkdir(parents=True, exist_ok=True)
        for f in COPIED:
            if not (ws / "data" / f).exists():
                shutil.copy2(frozen / "data" / f, ws / "data" / f)
        stage(
            f"embed {name}",
            ws / "data" / "item_embeddings.parquet",
            ["embed", "--workdir", str(ws), "--teacher", str(export)],
        )
        if name == "lora-sigmoid":
            stage(f"features {name}", ws / "registry.db", ["features", "--workdir", str(ws)])

    frozen_data = eval_data(frozen)  # its queries are every workspace's: the events are the same files
    report["mercari"]["frozen minilm"], base = mercari(frozen_data)
    ranks = {}
    for name in runs:
        report["mercari"][name], ranks[name] = mercari(eval_data(wd / name))
    for w, vectors in lit_fused(frozen, (0.2, 0.5)).items():
        key = f"lit fused w={w} (in process)"
        report["mercari"][key], ranks[key] = mercari_vectors(frozen_data, vectors)
    users = frozen_data.queries.user_ids
    report["mercari_vs_frozen"] = {k: paired_delta(r, base, users) for k, r in ranks.items()}
    report["lit_retrieval"] = lit_retrieval(frozen, frozen / "runs" / "lit" / "export")

    student = ["--item-space", "adapter", "--epochs", str(args.student_epochs), "--patience", "3"]
    for name, ws in (("frozen minilm", frozen), ("lora-sigmoid", wd / "lora-sigmoid")):
        stage(
            f"train {name}",
            ws / "runs" / "student" / "export" / "run.json",
            ["train", "--workdir", str(ws), "--name", "student", *student],
        )
        stage(
            f"evaluate {name}",
            ws / "eval" / "student" / "metrics.json",
            [
                "evaluate",
                "--workdir",
                str(ws),
                "--runs",
                "student",
                "--protocols",
                "full",
                "--name",
                "student",
            ],
        )
        m = json.loads((ws / "eval" / "student" / "metrics.json").read_text())
        r = m["results"]["student"]["full"]
        run = json.loads((ws / "runs" / "student" / "export" / "run.json").read_text())
        report["student"][name] = {
            "teacher_id": m["teacher_id"],
            "NDCG@10": r["all"]["micro"]["NDCG@10"],
            "NDCG@10_ci95": r["all"]["micro_ci95"]["NDCG@10"],
            "HR@10": r["all"]["micro"]["HR@10"],
            "cold_HR@10": r["cold"]["micro"]["HR@10"],
            "cold_NDCG@10": r["cold"]["micro"]["NDCG@10"],
            "knn_NDCG@10": m["results"]["knn"]["full"]["all"]["micro"]["NDCG@10"],
            "best_epoch": run["best"]["epoch"],
            "fit_s": run["timing_s"]["fit"],
        }
    report["student_command"] = (
        f"vlmrec train --name student {' '.join(student)}; vlmrec evaluate --runs student --protocols full"
    )
    report["walls_s"] = walls
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report["machine"] = {
        "commit": commit.stdout.strip(),
        "load_avg_start": load_start,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: report[k] for k in ("mercari", "student", "lit_retrieval")}, indent=2, default=str))


if __name__ == "__main__":
    main()
