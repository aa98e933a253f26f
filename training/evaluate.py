"""`vlmrec evaluate` (also `python -m training.evaluate`): every model on the same queries, two protocols.

    vlmrec evaluate --workdir .vlmrec/sample --runs sasrec student --split temporal

Models: `popular` (training counts), `knn` (teacher item-kNN from the last clicked item: the "similar item"
producer), and every named training run's export (behavioural SASRec and students alike: the export
rebuilds itself from its own config). Splits: `temporal` (global time cut; every later event is a query
whose history is all the user's earlier events) and `loo` (each user's last event). Protocols, always
labelled: `full` (rank among the whole catalogue, the history excluded: what a Producer does) and `sampled`
(the SASRec paper's: the target among 100 items the user never touched). Slices: all targets and cold
targets (items with no training event). Writes <workdir>/eval/<name>/ metrics.json, metrics.md, ndcg.png.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from training.data import ItemTable, build_inputs
from training.examples import load_items
from training.item_age import added_days, to_days
from training.metrics import (
    KS,
    Queries,
    leave_one_out,
    metrics_from_ranks,
    rank_of_target,
    sample_negatives,
    temporal_split,
)
from training.model import SeqRec
from vlmrec.split import SplitConfig, after_cut, held_out_items, launched_items, learnable_events
from vlmrec.workspace import Workspace, check_name

# (histories (model indices), request times in days (Q,)) -> scores (Q, n + 1)
Scorer = Callable[[list[np.ndarray], np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class EvalData:
    items: ItemTable
    teacher_id: str | None  # None: nothing embedded (id runs and popular only; no knn)
    split: SplitConfig
    train: pd.DataFrame  # what the split lets a model learn from (popular's counts)
    queries: Queries
    histories: list[np.ndarray]  # model indices of each query's history (unknown items dropped)
    targets: np.ndarray  # (Q,) model indices
    touched: list[np.ndarray]  # every item index the user ever touched (sampled protocol)
    n_skipped: int
    launch: np.ndarray  # (Q,) bool: the target is a launched item (the launch slice; both cold modes)
    days: np.ndarray  # (Q,) request time of each query (training.item_age days)
    added_days: np.ndarray  # (n + 1,) item-age anchors in the split's world (training.item_age.added_days)


def load_eval_data(ws: Workspace, split: SplitConfig) -> EvalData:
    items, teacher_id = load_items(ws, need_teacher=False)
    events = pq.read_table(ws.events).to_pandas()
    if split.split == "temporal":
        cut = split.cut_count(np.sort(events["event_timestamp"].to_numpy(), kind="stable"))
        s = temporal_split(events, cut=cut)
    else:
        s = leave_one_out(events)
    q = s.test
    targets = items.index_of(q.targets)
    histories = [h[h > 0] for h in (items.index_of(x) for x in q.histories)]
    by_user = events.groupby("user_id")["item_id"].apply(lambda x: items.index_of(x.to_numpy()))
    touched = [by_user[u] for u in q.user_ids]
    learnable = learnable_events(events, split)
    train = (
        learnable
        if split.split == "temporal"
        else events.merge(s.train[["user_id", "item_id"]].drop_duplicates())
    )
    held_out = held_out_items(events, split)  # launched: anchored at their first event after the cut
    return EvalData(
        items,
        teacher_id,
        split,
        train,
        q,
        histories,
        targets,
        touched,
        s.n_skipped_empty_history,
        launch=np.isin(q.targets, launched_items(events, split)),
        days=to_days(q.times),
        added_days=added_days(pq.read_table(ws.items).to_pandas(), items, after_cut(events, split), held_out),
    )


def popular_scorer(data: EvalData) -> Scorer:
    counts = np.bincount(
        data.items.index_of(data.train["item_id"].to_numpy()), minlength=data.items.n_items + 1
    )
    scores = torch.as_tensor(counts, dtype=torch.float32)
    scores[0] = 0
    return lambda hist, days: scores.expand(len(hist), -1)


def knn_scorer(data: EvalData) -> Scorer:
    teacher = torch.as_tensor(data.items.teacher_matrix())  # (n + 1, D), row 0 zero
    last = lambda hist: torch.as_tensor(np.array([h[-1] if len(h) else 0 for h in hist]))  # noqa: E731
    return lambda hist, days: teacher[last(hist)] @ teacher.T


def check_split(run: dict, split: SplitConfig, where: Path) -> None:
    """Refuse a run trained on another split: its figures would not be comparable (or would leak)."""
    trained = SplitConfig.of_run(run)
    if trained != split:
        raise ValueError(
            f"{where}: trained on split [{trained.describe()}], evaluating [{split.describe()}]: "
            "evaluate runs of one split together (pass the run's --split/--cold/--launch-fraction/--launch-seed)"
        )


def model_scorer(export_dir: Path, data: EvalData) -> tuple[Scorer, dict]:
    """A trained export: its own config rebuilds it; inputs go through the shared build_inputs; item age
    (when the model has it) at each query's time from the split world's first events."""
    run = json.loads((export_dir / "run.json").read_text())
    check_split(run, data.split, export_dir)
    if run["teacher_id"] != data.teacher_id and run["configs"]["model"]["item_space"] != "id":
        raise ValueError(
            f"{export_dir}: trained on teacher {run['teacher_id']}, but the workspace holds {data.teacher_id}"
        )
    return export_scorer(export_dir, data.items, data.added_days), run


def export_scorer(
    export_dir: Path, items: ItemTable, added_days: np.ndarray, foreign_vocabulary: bool = False
) -> Scorer:
    """An export's scores of every catalogue item for histories (catalogue indices) at request times (days):
    its own config rebuilds the model, inputs go through the shared build_inputs, item age (when the model
    has it) from added_days. Refuses an export of another item vocabulary (evaluate; tune-mix) unless
    foreign_vocabulary: then it scores the items it knows and -inf the rest, clicks on items it does not
    know are dropped from its inputs, as while it served (`vlmrec refresh`: the serving run vs the new one)."""
    model = SeqRec.from_pretrained(export_dir / "model").serving()
    vocab = ItemTable(model.item_ids[1:].numpy())
    same = np.array_equal(vocab.item_ids, items.item_ids)
    if not same and not foreign_vocabulary:
        raise ValueError(f"{export_dir}: item vocabulary differs from the workspace catalogue; retrain")
    columns = np.concatenate([[0], items.index_of(vocab.item_ids)])  # (m + 1,) catalogue index per row
    first = torch.as_tensor(added_days if same else added_days[columns])
    with torch.no_grad():
        vectors = model.item_vectors()  # once for every batch the scorer is asked

    def score(hist: list[np.ndarray], days: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(build_inputs([items.raw_of(h) for h in hist], vocab, model.cfg.max_len).ids)
        with torch.no_grad():
            s = model.scores(x, torch.as_tensor(days), first, vectors)  # (B, m + 1)
        if same:
            return s
        out = torch.full((len(hist), items.n_items + 1), -torch.inf)
        out[:, torch.as_tensor(columns[1:])] = s[:, 1:]  # items gone from the catalogue land on 0 (masked)
        return out

    return score


def evaluate_scorer(
    score: Scorer, data: EvalData, protocol: str, n_negatives: int = 100, seed: int = 0, chunk: int = 512
) -> dict:
    """Ranks of every query under one protocol, then metrics on all targets, on cold targets (no event
    before the cut) and on the launch slice (launched targets)."""
    ranks = scorer_ranks(score, data, protocol, n_negatives, seed, chunk)
    users = data.queries.user_ids
    slices = {"cold": data.queries.cold, "launch": data.launch}
    out = {"all": metrics_from_ranks(ranks, KS, users=users)}
    for name, rows in slices.items():
        out[name] = metrics_from_ranks(ranks[rows], KS, users=users[rows]) if rows.any() else None
    return out


def scorer_ranks(
    score: Scorer, data: EvalData, protocol: str, n_negatives: int = 100, seed: int = 0, chunk: int = 512
) -> np.ndarray:
    """(Q,) 0-based rank of each query's target: among the whole catalogue less the user's history (full),
    or among n_negatives items the user never touched (sampled)."""
    n = data.items.n_items
    ranks = np.zeros(len(data.targets), np.int64)
    rng = np.random.default_rng(seed)
    steps = range(0, len(ranks), chunk)
    for a in tqdm(steps, desc=f"rank ({protocol})", unit="chunk", mininterval=2.0, leave=False, disable=None):
        hist = data.histories[a : a + chunk]
        s = score(hist, data.days[a : a + chunk])  # (q, n + 1)
        t = data.targets[a : a + chunk]
        if protocol == "full":
            mask = torch.zeros(s.shape, dtype=torch.bool)
            rows = np.repeat(np.arange(len(hist)), [len(h) for h in hist])
            if len(rows):
                mask[torch.as_tensor(rows), torch.as_tensor(np.concatenate(hist))] = True
            mask[:, 0] = True
            ranks[a : a + chunk] = rank_of_target(s, t, mask)
        else:
            negs = sample_negatives(data.touched[a : a + chunk], n, n_negatives, rng)  # (q, n_negatives)
            cand = np.concatenate([t[:, None], negs], axis=1)  # target in column 0
            sub = torch.gather(s, 1, torch.as_tensor(cand))
            ranks[a : a + chunk] = rank_of_target(sub, np.zeros(len(t), np.int64))
    return ranks


def evaluate(
    workdir: str,
    runs: Sequence[str],
    split: SplitConfig = SplitConfig(),
    protocols: Sequence[str] = ("full", "sampled"),
    name: str | None = None,
    n_negatives: int = 100,
) -> tuple[Path, dict]:
    ws = Workspace(workdir)
    if name is not None:
        check_name(name, "name")
    if "sampled" in protocols and n_negatives < 1:
        raise ValueError(f"sampled_negatives must be >= 1, got {n_negatives}")
    exports = {run: ws.export(run) for run in runs}  # a missing run is named before the data loads
    data = load_eval_data(ws, split)
    known = data.targets > 0
    if not known.all():  # a target outside the catalogue cannot be ranked: say so instead of guessing
        raise ValueError(f"{ws.events}: {int((~known).sum())} test targets are not in the item table")
    scorers: dict[str, Scorer] = {"popular": popular_scorer(data)}
    meta: dict[str, dict] = {"popular": {}}
    if data.items.teacher is not None:
        scorers["knn"], meta["knn"] = knn_scorer(data), {"teacher_id": data.teacher_id}
    for run in runs:
        scorers[run], info = model_scorer(exports[run], data)
        meta[run] = {"item_space": info["configs"]["model"]["item_space"], "best": info["best"]}
    results: dict = {}
    for model, score in scorers.items():
        t0 = time.perf_counter()
        results[model] = {p: evaluate_scorer(score, data, p, n_negatives) for p in protocols}
        results[model]["seconds"] = round(time.perf_counter() - t0, 2)
    report = {
        "split": split.split,
        "train_fraction": split.train_fraction if split.split == "temporal" else None,
        "split_config": split.to_dict(),
        "n_queries": len(data.targets),
        "n_cold_queries": int(data.queries.cold.sum()),
        "n_launch_queries": int(data.launch.sum()),
        "n_skipped_empty_history": data.n_skipped,
        "n_items": data.items.n_items,
        "sampled_negatives": n_negatives,
        "teacher_id": data.teacher_id,
        "ties": "pessimistic: every other candidate scoring >= the target ranks ahead of it",
        "models": meta,
        "results": results,
    }
    out = ws.root / "eval" / (name or f"{split.split}-{'-'.join(runs) or 'baselines'}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "metrics.md").write_text(markdown_table(report))
    plot(report, out / "ndcg.png")
    return out, report


def markdown_table(report: dict) -> str:
    lines = [
        f"Split: {SplitConfig.from_dict(report['split_config']).describe()}; queries {report['n_queries']} "
        f"(cold {report['n_cold_queries']}, launch {report['n_launch_queries']}, skipped empty history "
        f"{report['n_skipped_empty_history']}); items {report['n_items']}; teacher {report['teacher_id']}. "
        "Per-event (micro) averages; [95% bootstrap over users]; cold = no event before the cut; "
        "launch = a launched item.",
        "",
    ]
    for protocol in ("full", "sampled"):
        rows = [(m, r[protocol]) for m, r in report["results"].items() if protocol in r]
        if not rows:
            continue
        label = (
            "full-catalogue ranking"
            if protocol == "full"
            else f"{report['sampled_negatives']} sampled negatives (the SASRec paper's protocol with 100)"
        )
        lines += [f"### Protocol: {label}", ""]
        lines.append(
            "| model | HR@10 | NDCG@10 [95% CI] | HR@50 | Recall@100 | MRR | macro NDCG@10 "
            "| cold HR@10 | cold NDCG@10 | cold Recall@100 | launch HR@10 | launch NDCG@10 | launch Recall@100 |"
        )
        lines.append("| --- " * 13 + "|")
        for model, r in rows:
            a = r["all"]
            ci = a.get("micro_ci95", {}).get("NDCG@10", [float("nan")] * 2)
            slices = " | ".join(
                f"{r[s]['micro']['HR@10']:.4f} | {r[s]['micro']['NDCG@10']:.4f} | {r[s]['micro']['HR@100']:.4f}"
                if r.get(s)
                else "- | - | -"
                for s in ("cold", "launch")
            )
            lines.append(
                f"| {model} | {a['micro']['HR@10']:.4f} | {a['micro']['NDCG@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] "
                f"| {a['micro']['HR@50']:.4f} | {a['micro']['HR@100']:.4f} | {a['micro']['MRR']:.4f} "
                f"| {a['macro']['NDCG@10']:.4f} | {slices} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, slice_ in zip(axes, ("all", "cold"), strict=True):
        vals = [
            (report["results"][m]["full"][slice_] or {"micro": {"NDCG@10": 0.0}})["micro"]["NDCG@10"]
            for m in models
        ]
        ax.bar(models, vals, color="#4c72b0")
        ax.set_title(f"NDCG@10, full ranking, {slice_} targets ({report['split']})")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=".vlmrec/sample")
    parser.add_argument(
        "--runs", nargs="*", default=[], help="training run names (their exports) to evaluate"
    )
    SplitConfig.add_arguments(parser)
    parser.add_argument("--protocols", nargs="+", choices=["full", "sampled"], default=["full", "sampled"])
    parser.add_argument("--name", default=None, help="output folder name under <workdir>/eval/")
    parser.add_argument("--sampled-negatives", type=int, default=100, help="negatives per query (sampled)")


def run(args: argparse.Namespace) -> tuple[Path, dict]:
    out, report = evaluate(
        args.workdir,
        args.runs,
        SplitConfig.from_args(args),
        args.protocols,
        args.name,
        args.sampled_negatives,
    )
    print(markdown_table(report))
    print(f"evaluate: wrote {out}")
    return out, report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
