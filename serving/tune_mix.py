"""`vlmrec tune-mix` (also `python -m serving.tune_mix`): the Mixer's default weights, chosen on validation.

    vlmrec tune-mix --workdir .vlmrec/ml --student-run student --sasrec-run sasrec     # writes <workdir>/mix.json
    vlmrec tune-mix --workdir .vlmrec/ml ... --test        # also scores producers and the chosen mix on test
    vlmrec tune-mix --workdir .vlmrec/ml ... --backtest-student-run student-bt --backtest-sasrec-run sasrec-bt

Offline and deterministic: every producer's top-k list is computed the way the Producer ranks it (student and
sasrec: the export's own scores, history excluded; similar: each item's best cosine to one of the last N
distinct clicks, as the recommend query; popular: the recency-weighted ranking of the events a model may learn
from) and blended by the Mixer's own interleave (`placements`). Validation queries are either
  last-event  each user's last learnable event before the cut (the training job's validation), cold = a
              target no training example holds; a launch split (`--cold launch`) removes the launched
              items' pre-cut events here too; or
  window      (with --backtest-student-run / --backtest-sasrec-run: runs of the same configs trained on an
              earlier temporal cut) every event between that cut and this split's, asked as the test period
              is asked (history = all the user's earlier events, cold = a target with no event before the
              earlier cut), ranked by the backtest runs: the producers meet the drift the test period holds
              (items launched since training, a staler behavioural model), which a user's last pre-cut event
              does not show. The grid search keeps
the weights with the best validation Recall@k whose cold Recall@k is not *significantly* below `cold_floor` x
similar's alone (one-sided binomial test at `cold_alpha`: a validation set with a handful of cold targets
cannot tell 1 hit from 2, and a floor read to the hit chose `similar` alone); a blend is kept over the best
single producer only if it beats it significantly on the same queries (exact McNemar at `blend_alpha`: a
few queries' gain on 522 did not hold on test). It writes them to <workdir>/mix.json: the Producer's
`/v1/mix` default (serving/config.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from engine.config import at_least
from serving.config import PRODUCERS
from serving.mixer import apportion, placements
from serving.sources import last_distinct
from training.data import ItemTable
from training.evaluate import EvalData, check_split, export_scorer, load_eval_data
from training.examples import load_items
from training.item_age import added_days, to_days
from training.popular import popular_items
from vlmrec.split import SplitConfig, held_out_items, learnable_events
from vlmrec.workspace import Workspace, check_name

MIX_FILE = "mix.json"
WEIGHT_GRID = (0.0, 1.0, 2.0, 4.0)  # per producer; every combination but all-zero is tried


@dataclass(frozen=True)
class MixTuneConfig(SplitConfig):
    workdir: str = ".vlmrec/sample"
    student_run: str = "student"
    sasrec_run: str = "sasrec"
    k: int = 100  # the Mixer's list length that Recall@k is measured at
    cold_floor: float = 0.5  # the mix's cold Recall@k must reach this share of similar's alone ...
    cold_alpha: float = (
        0.05  # ... or not be below it with one-sided binomial p < cold_alpha (1.0: read exactly)
    )
    blend_alpha: float = (
        0.05  # a blend replaces the best single producer only if it beats it at p < this (1.0: any)
    )
    similar_last_n: int = 3  # ProducerConfig.similar_last_n
    popular_half_life_days: float = 7.0  # ProducerConfig.popular_half_life_days
    # window validation: the student / sasrec configs trained on an earlier temporal cut (both or neither)
    backtest_student_run: str | None = None
    backtest_sasrec_run: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, 1, "k", "similar_last_n")
        at_least(self, 0, "popular_half_life_days", strictly=True)
        if not 0 <= self.cold_floor <= 1:
            raise ValueError(f"cold_floor must be in [0, 1], got {self.cold_floor}")
        for name in ("cold_alpha", "blend_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for field in ("student_run", "sasrec_run", "backtest_student_run", "backtest_sasrec_run"):
            if getattr(self, field) is not None:
                check_name(getattr(self, field), field)
        if (self.backtest_student_run is None) != (self.backtest_sasrec_run is None):
            raise ValueError("backtest_student_run and backtest_sasrec_run go together (window validation)")
        if self.backtest_student_run is not None and (self.split != "temporal" or self.cold != "natural"):
            raise ValueError("backtest runs (window validation) need split='temporal' and cold='natural'")

    @property
    def validation(self) -> str:
        return "last-event" if self.backtest_student_run is None else "window"


@dataclass(frozen=True, eq=False)
class MixQueries:
    """Queries in one model-index space: history (indices, oldest first), target, request time, cold."""

    users: np.ndarray  # (Q,)
    histories: list[np.ndarray]
    targets: np.ndarray  # (Q,) model indices
    days: np.ndarray  # (Q,) request times (training.item_age days)
    cold: np.ndarray  # (Q,) bool


def validation_queries(
    events: pd.DataFrame, items: ItemTable, split: SplitConfig
) -> tuple[MixQueries, pd.DataFrame]:
    """Each user's last learnable event (users with two or more: the training job's validation), its
    history the user's earlier learnable events. -> (queries, the learnable events less the validation
    ones: what popularity and first events are computed from); cold = a target with no such event."""
    learn = learnable_events(events, split).sort_values(["user_id", "event_timestamp"], kind="stable")
    n = learn.groupby("user_id")["item_id"].transform("size").to_numpy()
    last = (learn.groupby("user_id").cumcount().to_numpy() == n - 1) & (n >= 2)
    valid, before = learn[last], learn[~last]
    by_user = {u: g["item_id"].to_numpy() for u, g in before.groupby("user_id")}
    histories = [items.index_of(by_user[u]) for u in valid["user_id"]]
    targets = items.index_of(valid["item_id"].to_numpy())
    keep = targets > 0
    q = MixQueries(
        valid["user_id"].to_numpy()[keep],
        [h[h > 0] for h, k in zip(histories, keep, strict=True) if k],
        targets[keep],
        to_days(valid["event_timestamp"].to_numpy())[keep],
        ~valid["item_id"].isin(before["item_id"]).to_numpy()[keep],
    )
    return q, before.sort_values("event_timestamp", kind="stable").reset_index(drop=True)


def window_queries(ws: Workspace, cfg: MixTuneConfig) -> tuple[MixQueries, EvalData]:
    """The events between the backtest runs' cut and this split's, as test queries of the backtest split
    (training.evaluate.load_eval_data: history = all the user's earlier events; cold = no event before the
    backtest cut). Refuses backtest runs of different splits, or whose cut is not before this one's."""
    splits = {run: run_split(ws, run) for run in (cfg.backtest_student_run, cfg.backtest_sasrec_run)}
    backtest = next(iter(splits.values()))
    if (
        any(s != backtest for s in splits.values())
        or backtest.split != "temporal"
        or backtest.cold != "natural"
    ):
        found = "; ".join(f"{r}: {s.describe()}" for r, s in splits.items())
        raise ValueError(
            f"backtest_student_run / backtest_sasrec_run: need one temporal natural split ({found})"
        )
    stamps = pq.read_table(ws.events, columns=["event_timestamp"]).to_pandas()["event_timestamp"]
    times = np.sort(stamps.to_numpy(), kind="stable")  # as load_eval_data sorts them
    end, start = cfg.split_config().cut_count(times), backtest.cut_count(times)
    if not start < end:
        raise ValueError(
            f"backtest runs: their cut ({backtest.describe()}, {start} train events) must come before this "
            f"split's ({cfg.split_config().describe()}, {end}): pass runs trained with a smaller --train-fraction"
        )
    data = load_eval_data(ws, backtest)
    inside = data.queries.times < times[end] if end < len(times) else np.ones(len(data.targets), bool)
    keep = inside & (data.targets > 0)
    q = MixQueries(
        data.queries.user_ids[keep],
        [h for h, k in zip(data.histories, keep, strict=True) if k],
        data.targets[keep],
        data.days[keep],
        data.queries.cold[keep],
    )
    return q, data


def run_split(ws: Workspace, run: str) -> SplitConfig:
    """The split a run was trained on (its export's run.json); a missing run is named."""
    return SplitConfig.of_run(json.loads((ws.export(run) / "run.json").read_text()))


def model_lists(export: Path, items: ItemTable, q: MixQueries, added_days: np.ndarray, k: int) -> list[list]:
    """An export's top-k (raw id, score) per query, the history excluded, as the Producer ranks it (the
    scores evaluate uses: training.evaluate.export_scorer)."""
    score = export_scorer(export, items, added_days)
    out = []
    for a in range(0, len(q.targets), 512):
        hist = q.histories[a : a + 512]
        out += _top(score(hist, q.days[a : a + 512]), hist, items, k)
    return out


def similar_lists(items: ItemTable, q: MixQueries, last_n: int, k: int) -> list[list]:
    """Teacher neighbours of each query's last `last_n` distinct clicks, merged per query by best score."""
    teacher = torch.as_tensor(items.teacher_matrix())  # (n + 1, D)
    teacher = teacher / teacher.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = []
    for hist in q.histories:
        clicks = last_distinct(hist.tolist(), last_n)
        s = (teacher[torch.as_tensor(clicks)] @ teacher.T).max(0, keepdim=True).values  # (1, n + 1) best
        out += _top(s, [hist], items, k)
    return out


def popular_lists(train: pd.DataFrame, items: ItemTable, q: MixQueries, half_life: float, k: int) -> list:
    ranking = [
        (int(p["item_id"]), p["score"]) for p in popular_items(train, train["item_id"].nunique(), half_life)
    ]
    out = []
    for hist in q.histories:
        seen = set(items.raw_of(hist).tolist())
        out.append([h for h in ranking if h[0] not in seen][:k])
    return out


def _top(scores: torch.Tensor, histories: Sequence[np.ndarray], items: ItemTable, k: int) -> list[list]:
    s = scores.clone().float()
    s[:, 0] = -torch.inf
    for row, hist in enumerate(histories):
        s[row, torch.as_tensor(hist, dtype=torch.long)] = -torch.inf
    vals, idx = s.topk(k, dim=1)
    return [
        [(int(i), float(v)) for i, v in zip(items.raw_of(r), vs, strict=True) if np.isfinite(v)]
        for r, vs in zip(idx.numpy(), vals.numpy(), strict=True)
    ]


def recall(lists: Sequence[Sequence], targets_raw: np.ndarray) -> np.ndarray:
    """(Q,) 1.0 where the target is among the list's items."""
    return np.array([t in {h[0] for h in lst} for lst, t in zip(lists, targets_raw, strict=True)], np.float64)


def mixed(lists: dict[str, list], quotas: dict[str, int], k: int) -> list[list]:
    """The Mixer's blend per query (serving.mixer.placements: interleave's slots), as (item, rank) lists."""
    n = len(next(iter(lists.values())))
    return [
        [
            (item, rank)
            for rank, (item, _) in enumerate(placements({p: lists[p][i] for p in quotas}, quotas, k)[0], 1)
        ]
        for i in range(n)
    ]


def producer_lists(
    ws: Workspace,
    cfg: MixTuneConfig,
    q: MixQueries,
    train: pd.DataFrame,
    first: np.ndarray,
    runs: tuple[str, str] | None = None,
) -> dict[str, list]:
    """The four producers' top-k lists for the queries: student and sasrec from `runs` (default: the
    config's), popularity from `train`, item age from `first`."""
    items, _ = load_items(ws)
    student, sasrec = runs or (cfg.student_run, cfg.sasrec_run)
    return {
        "student": model_lists(ws.export(student), items, q, first, cfg.k),
        "sasrec": model_lists(ws.export(sasrec), items, q, first, cfg.k),
        "similar": similar_lists(items, q, cfg.similar_last_n, cfg.k),
        "popular": popular_lists(train, items, q, cfg.popular_half_life_days, cfg.k),
    }


def search_weights(lists: dict[str, list], targets: np.ndarray, cold: np.ndarray, cfg: MixTuneConfig) -> dict:
    """Every WEIGHT_GRID combination (distinct quotas once): Recall@k on all and cold targets. Among those whose
    cold recall meets the floor (`meets_floor`): the best all-target recall (ties: the earlier one), unless it
    is a blend that does not beat the best single producer significantly (`beats`): then that producer."""
    alone = {p: recall(lists[p], targets) for p in PRODUCERS}
    floor = cfg.cold_floor * alone["similar"][cold].mean() if cold.any() else 0.0
    n_cold = int(cold.sum())
    tried: dict[tuple, dict] = {}
    hits: dict[tuple, np.ndarray] = {}
    for combo in itertools.product(WEIGHT_GRID, repeat=len(PRODUCERS)):
        if not any(combo):
            continue
        weights = dict(zip(PRODUCERS, combo, strict=True))
        quotas = {p: n for p, n in apportion(cfg.k, weights).items() if n > 0}
        key = tuple(sorted(quotas.items()))
        if key in tried:
            continue
        hit = hits[key] = recall(mixed(lists, quotas, cfg.k), targets)
        tried[key] = {
            "weights": weights,
            "quotas": quotas,
            "recall_all": float(hit.mean()),
            "recall_cold": float(hit[cold].mean()) if cold.any() else None,
            "meets_floor": meets_floor(int(hit[cold].sum()), n_cold, floor, cfg.cold_alpha),
        }
    ok = [key for key, t in tried.items() if t["meets_floor"]] or list(tried)
    best = max(ok, key=lambda key: tried[key]["recall_all"])
    singles = [key for key in ok if len(key) == 1]
    single = max(singles, key=lambda key: tried[key]["recall_all"]) if singles else best
    blend_p = mcnemar_p(hits[best], hits[single])
    return {
        "chosen": tried[best] if blend_p < cfg.blend_alpha else tried[single],
        "best_blend": {**tried[best], "p_vs_best_single": blend_p},
        "cold_floor_recall": floor,
        "cold_alpha": cfg.cold_alpha,
        "n_meeting_floor": len(ok),
        "producers": {
            p: {"recall_all": float(v.mean()), "recall_cold": float(v[cold].mean()) if cold.any() else None}
            for p, v in alone.items()
        },
        "n_tried": len(tried),
    }


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided exact McNemar p-value that hits `a` beat hits `b` on the same queries (1.0 when equal)."""
    wins, losses = int((a > b).sum()), int((a < b).sum())
    return 1.0 if wins <= losses else 1.0 - binomial_cdf(wins - 1, wins + losses, 0.5)


def meets_floor(hits: int, n: int, floor: float, alpha: float) -> bool:
    """hits of n cold targets reach `floor`, or are not significantly below it: P(X <= hits) >= alpha for
    X ~ Binomial(n, floor). alpha 1.0 reads the floor exactly."""
    if n == 0 or hits >= floor * n:
        return True
    return alpha < 1.0 and binomial_cdf(hits, n, floor) >= alpha


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 < p < 1 (log space: n may be thousands)."""
    log_pmf = (
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    )
    return min(1.0, sum(math.exp(x) for x in log_pmf))


def held_out_figures(ws: Workspace, cfg: MixTuneConfig, quotas: dict[str, int]) -> dict:
    """The producers alone and the chosen mix on the split's test queries (ML-time-split style), Recall@k."""
    for run in (cfg.student_run, cfg.sasrec_run):
        check_split(json.loads((ws.export(run) / "run.json").read_text()), cfg.split_config(), ws.runs / run)
    data = load_eval_data(ws, cfg.split_config())
    q = MixQueries(data.queries.user_ids, data.histories, data.targets, data.days, data.queries.cold)
    lists = producer_lists(ws, cfg, q, data.train, data.added_days)
    items = data.items
    targets = items.raw_of(q.targets)
    out = {}
    for name, lst in {**lists, "mixer_validated": mixed(lists, quotas, cfg.k)}.items():
        hit = recall(lst, targets)
        out[name] = {
            f"recall{cfg.k}_all": float(hit.mean()),
            f"recall{cfg.k}_cold": float(hit[q.cold].mean()) if q.cold.any() else None,
            f"recall{cfg.k}_launch": float(hit[data.launch].mean()) if data.launch.any() else None,
        }
    out["n_queries"], out["n_cold"], out["n_launch"] = len(targets), int(q.cold.sum()), int(data.launch.sum())
    return out


def tune(cfg: MixTuneConfig, with_test: bool = False) -> tuple[Path, dict]:
    ws = Workspace(cfg.workdir)
    t0 = time.perf_counter()
    items, _ = load_items(ws)
    if cfg.validation == "window":
        q, data = window_queries(ws, cfg)
        runs = (cfg.backtest_student_run, cfg.backtest_sasrec_run)
        lists = producer_lists(ws, cfg, q, data.train, data.added_days, runs)
        where = {"backtest_split": data.split.to_dict(), "first_query_time": str(np.min(data.queries.times))}
    else:
        events = pq.read_table(ws.events).to_pandas()
        split = cfg.split_config()
        q, before_valid = validation_queries(events, items, split)
        catalogue = pq.read_table(ws.items).to_pandas()
        anchors = added_days(catalogue, items, before_valid, held_out_items(events, split))
        lists = producer_lists(ws, cfg, q, before_valid, anchors)
        where = {}
    result = search_weights(lists, items.raw_of(q.targets), q.cold, cfg)
    report = {
        "weights": result["chosen"]["weights"],
        "quotas": result["chosen"]["quotas"],
        "k": cfg.k,
        "validation": {
            **result,
            "kind": cfg.validation,
            **where,
            "n_queries": len(q.targets),
            "n_cold": int(q.cold.sum()),
        },
        "config": cfg.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if with_test:
        report["test"] = held_out_figures(ws, cfg, result["chosen"]["quotas"])
    path = ws.root / MIX_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return path, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MixTuneConfig.add_arguments(parser)
    parser.add_argument("--test", action="store_true", help="also report producers and the mix on test")


def run(args: argparse.Namespace) -> tuple[Path, dict]:
    path, report = tune(MixTuneConfig.from_args(args), args.test)
    v = report["validation"]
    print(f"tune-mix: weights {report['weights']} (quotas {report['quotas']}); {v['kind']} validation Recall@{report['k']} "
          f"{v['chosen']['recall_all']:.4f}, cold {v['chosen']['recall_cold']}; floor {v['cold_floor_recall']:.4f}")  # fmt: skip
    if "test" in report:
        print(json.dumps(report["test"], indent=2))
    print(f"tune-mix: wrote {path}")
    return path, report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.tune_mix", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
