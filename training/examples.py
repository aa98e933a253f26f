"""The training set as files: next-item examples built from the event log by Ray tasks, written as parquet
shards the workers stream, so no part of it passes through the job's driver.

    shards = build_examples(ws, job.split_config(), 50, need_teacher=True, out=ws.runs / "student" / "examples")
    arrays = ray.get(shards.arrays)       # vocabulary, teacher matrix, counts, validation: the object store
    # the workers read shards.train themselves: training/example_files.py (worker_rows, stream_batches)

    python -m training.examples --workdir W --max-len 50 --out W/examples   # the build alone: counts, costs

The point-in-time join, done on the events themselves: a query's history is its user's clicks before it
(launched items and items without a vector left out, the last max_len kept), so nothing at or after the
target can leak and no per-event snapshot table is read. Four steps, each Ray work:
  facts      one task over three event columns: the split's cut and the launched items
  partition  a task per row group of the event log -> one file per user bucket (a shuffle by user)
  shard      a task per bucket -> train/part-<b>.parquet, valid/part-<b>.parquet and its counts
  arrays     one task: vocabulary, teacher matrix, target counts, item ages, validation rows and the
             popular list, returned into the object store (the driver holds only the reference)
Each task reports its own peak RSS; above one shard each runs in a fresh worker process. Where the per-event
sequence snapshots hold every click, these are exactly `prepare_data`'s examples from Feast's join
(tests/test_train.py).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from engine import peak_rss_mb, reset_peak_rss
from training.data import ItemTable, build_inputs
from training.example_files import read_examples, write_examples
from training.item_age import added_days, to_days
from training.popular import popularity, top_popular
from vlmrec.schema import teacher_of
from vlmrec.split import SplitConfig, held_out_items, learnable_events, split_validation, train_events
from vlmrec.workspace import Workspace, staged_dir

EVENT_COLUMNS = ["user_id", "item_id", "event_timestamp"]
EVENTS_PER_SHARD = 500_000  # events per user bucket: a shard task's memory, whatever the log's size


def load_items(
    ws: Workspace, need_teacher: bool = True, vectors: bool = True
) -> tuple[ItemTable, str | None]:
    """The vocabulary: every catalogue item with a teacher vector (the item_embedding source, in its row
    order) and the teacher id. need_teacher=False (the id baseline) takes the catalogue's ids when nothing is
    embedded: (table, None). vectors=False: the ids alone, teacher id unread (what a shard needs)."""
    if not ws.embeddings.exists():
        if not need_teacher and ws.items.exists():
            ids = pq.read_table(ws.items, columns=["item_id"]).column("item_id").to_numpy()
            return ItemTable(np.sort(ids)), None
        ws.need(ws.embeddings, "embed")
    if not vectors:
        return ItemTable.from_parquet(ws.embeddings, vectors=False), None
    return ItemTable.from_parquet(ws.embeddings), teacher_of(ws.embeddings)


# ------------------------------------------------------------------------- examples from histories


def example_queries(
    train: pd.DataFrame, max_len: int, validation: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training queries, validation queries): each a frame of (user_id, event_timestamp, item_id) target events.

    Validation: `validation` when the split holds its own validation events (loo: each user's second-last
    event, the SASRec protocol), else each user's last training event (users with >= 2), then not trained
    on. Training: windows of max_len targets from the end of the rest, so every other event is a target
    exactly once (all-position training).
    """
    cols = ["user_id", "event_timestamp", "item_id"]
    ordered = train.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
    pos = ordered.groupby("user_id").cumcount().to_numpy()
    n = ordered.groupby("user_id")["item_id"].transform("size").to_numpy()
    if validation is None:
        valid_rows = ordered.loc[(pos == n - 1) & (n >= 2), cols]
        last_train = np.where(n >= 2, n - 2, n - 1)  # index of each user's last training target
    else:
        valid_rows = validation.sort_values(["user_id", "event_timestamp"], kind="stable")[cols]
        last_train = n - 1
    is_end = (pos >= 1) & (pos <= last_train) & ((last_train - pos) % max_len == 0)
    return ordered.loc[is_end, cols].reset_index(drop=True), valid_rows.reset_index(drop=True)


@dataclass(frozen=True)
class Windows:
    """Next-item examples and validation rows (model indices; days as training.item_age days)."""

    inputs: np.ndarray  # (N, T) the sequence before each window's targets
    targets: np.ndarray  # (N, T) next items, 0 = none
    target_days: np.ndarray  # (N, T) float64 time of each target, 0 = none
    valid_inputs: np.ndarray  # (V, T)
    valid_targets: np.ndarray  # (V,)
    valid_days: np.ndarray  # (V,) float64


def windows(
    histories: list,
    queries: pd.DataFrame,
    valid: pd.DataFrame,
    learnable: pd.DataFrame,
    items: ItemTable,
    max_len: int,
) -> Windows:
    """Examples from each query's history (raw ids oldest first, training queries then validation ones):
    inputs = the history, targets = the same shifted by one and ending with the query's item."""
    hist_train, hist_valid = histories[: len(queries)], histories[len(queries) :]
    full = [[*h, t] for h, t in zip(hist_train, queries["item_id"], strict=True)]
    inputs = build_inputs([f[:-1] for f in full], items, max_len).ids
    targets = build_inputs([f[1:] for f in full], items, max_len).ids
    target_days = _target_days(learnable, queries, targets, items)
    keep = targets[:, -1] > 0
    inputs, targets, target_days = inputs[keep], targets[keep], target_days[keep]
    targets = np.where(inputs > 0, targets, 0)  # a target only where there is an input before it
    target_days = np.where(targets > 0, target_days, 0.0)
    v_inputs = build_inputs(hist_valid, items, max_len).ids
    v_targets = items.index_of(valid["item_id"].to_numpy())
    v_keep = (v_targets > 0) & (v_inputs[:, -1] > 0)
    return Windows(
        inputs,
        targets,
        target_days,
        v_inputs[v_keep],
        v_targets[v_keep],
        to_days(valid["event_timestamp"].to_numpy())[v_keep],
    )


def _target_days(
    train: pd.DataFrame, queries: pd.DataFrame, targets: np.ndarray, items: ItemTable
) -> np.ndarray:
    """(N, T) the time of every target in `targets` (0 where none): a window's targets are the user's
    learnable events ending at its query event, so position T - 1 - j is the j-th event before it. Checked
    against the targets' ids (a mismatch means the sequences and the events disagree)."""
    ordered = train.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
    ordered["row"] = np.arange(len(ordered))
    first = ordered.groupby("user_id")["row"].transform("min").to_numpy()
    rows = queries.merge(ordered, on=["user_id", "event_timestamp", "item_id"], how="left")["row"]
    if rows.isna().any():
        raise ValueError(f"{int(rows.isna().sum())} training queries are not among the learnable events")
    rows = rows.to_numpy(np.int64)
    T = targets.shape[1]
    back = rows[:, None] - np.arange(T)[None, ::-1]  # (N, T) event row of each position, last = the query
    ok = (back >= first[rows][:, None]) & (targets > 0)
    back = back.clip(min=0)
    days = to_days(ordered["event_timestamp"].to_numpy())[back]
    ids = items.index_of(ordered["item_id"].to_numpy(np.int64))[back]
    wrong = ok & (ids != targets)
    if wrong.any():
        raise ValueError(f"{int(wrong.sum())} training targets do not match the events' order in time")
    return np.where(ok, days, 0.0)


def event_histories(
    events: pd.DataFrame, queries: pd.DataFrame, items: ItemTable, drop: np.ndarray, max_len: int
) -> list[np.ndarray]:
    """Point-in-time from the events: for each query row (user_id, event_timestamp), the raw ids of its
    user's events strictly before it, oldest first, without `drop` ids or ids outside the vocabulary, the
    last max_len kept. `events` holds every event of the queries' users."""
    keep = ~events["item_id"].isin(drop).to_numpy() & (items.index_of(events["item_id"].to_numpy()) > 0)
    kept = events.loc[keep, EVENT_COLUMNS].sort_values(["user_id", "event_timestamp"], kind="stable")
    kept = kept.reset_index(drop=True)
    kept["row"] = np.arange(len(kept))
    first = kept.groupby("user_id")["row"].transform("min")
    kept["first"] = first.to_numpy()
    asked = queries[["user_id", "event_timestamp"]].reset_index(drop=True)
    asked["query"] = np.arange(len(asked))
    found = pd.merge_asof(
        asked.sort_values("event_timestamp", kind="stable"),
        kept[["user_id", "event_timestamp", "row", "first"]].sort_values("event_timestamp", kind="stable"),
        on="event_timestamp",
        by="user_id",
        allow_exact_matches=False,  # strictly before: never the query's own event
    ).sort_values("query")
    last = found["row"].to_numpy(np.float64)  # NaN: no event before the query
    start = found["first"].to_numpy(np.float64)
    ids = kept["item_id"].to_numpy(np.int64)
    out = []
    for end, lo in zip(last, start, strict=True):
        if np.isnan(end):
            out.append(ids[:0])
        else:
            out.append(ids[max(int(lo), int(end) - max_len + 1) : int(end) + 1])
    return out


# ------------------------------------------------------------------------------------ the Ray steps


@dataclass(frozen=True)
class Facts:
    """What every shard must know of the whole event log."""

    split: SplitConfig
    last_train: Any  # temporal: the newest train event's time (pd.Timestamp); None for loo
    tied: frozenset  # temporal: (user_id, item_id) of the train events AT last_train (ties at the cut)
    held_out: np.ndarray  # raw ids of the launched items (launch split)
    trained_until: Any  # the newest learnable event's time (pd.Timestamp), None without any

    def learnable(self, events: pd.DataFrame) -> pd.DataFrame:
        """The learnable events among `events` (whole users' events): as vlmrec.split's on the whole log."""
        if self.split.split == "loo":
            train = train_events(events, self.split)  # each user's own cut
        elif self.last_train is None:
            train = events.iloc[:0]
        else:
            ts = events["event_timestamp"]
            at_cut = (ts == self.last_train).to_numpy()
            tied = np.fromiter(
                (
                    (u, i) in self.tied
                    for u, i in zip(events["user_id"][at_cut], events["item_id"][at_cut], strict=True)
                ),
                bool,
                count=int(at_cut.sum()),
            )
            keep = (ts < self.last_train).to_numpy()
            keep[np.flatnonzero(at_cut)[tied]] = True
            train = events[keep].sort_values("event_timestamp", kind="stable")
        return train[~train["item_id"].isin(self.held_out).to_numpy()].reset_index(drop=True)


def split_facts(events_path: Path, split: SplitConfig) -> tuple[Facts, dict]:
    """-> (the Facts every shard needs, a small summary for the driver)."""
    reset_peak_rss()
    events = pq.read_table(events_path, columns=EVENT_COLUMNS).to_pandas()
    held_out = held_out_items(events, split)
    train = train_events(events, split)
    learnable = learnable_events(events, split, train)
    until = learnable["event_timestamp"].max() if len(learnable) else None
    last, tied = None, frozenset()
    train = train if split.split != "loo" else events.iloc[:0]
    if len(train):
        last = train["event_timestamp"].max()
        at = train[train["event_timestamp"] == last]
        tied = frozenset(zip(at["user_id"].tolist(), at["item_id"].tolist(), strict=True))
    summary = {"trained_until": until, "held_out_items": len(held_out), "peak_rss_mb": peak_rss_mb()}
    return Facts(split, last, tied, held_out, until), summary


def partition(events_path: Path, row_groups: list[int], n_buckets: int, out: Path, piece: int) -> float:
    """Row groups of the event log -> out/bucket=<b>/piece-<piece>.parquet, user_id mod n_buckets = b."""
    reset_peak_rss()
    table = pq.ParquetFile(events_path).read_row_groups(row_groups, columns=EVENT_COLUMNS)
    bucket = np.mod(table.column("user_id").to_numpy(), n_buckets)
    order = np.argsort(bucket, kind="stable")
    table, bounds = table.take(order), np.searchsorted(bucket[order], np.arange(n_buckets + 1))
    for b in range(n_buckets):
        part = table.slice(bounds[b], bounds[b + 1] - bounds[b])
        if part.num_rows:
            (out / f"bucket={b}").mkdir(parents=True, exist_ok=True)
            pq.write_table(part, out / f"bucket={b}" / f"piece-{piece:05d}.parquet")
    return peak_rss_mb()


def shard(
    ws_root: str,
    bucket_dir: Path,
    facts: Facts,
    need_teacher: bool,
    max_len: int,
    half_life: float,
    out: Path,
    b: int,
    seed: int,
) -> dict:
    """One user bucket -> out/train/part-<b>.parquet and out/valid/part-<b>.parquet (rows in a seeded random
    order); -> (its counts for the driver, its sparse target counts and item popularity for `arrays`)."""
    reset_peak_rss()
    items, _ = load_items(Workspace(ws_root), need_teacher, vectors=False)
    events = pq.read_table(bucket_dir).to_pandas() if bucket_dir.exists() else _empty_events()
    learnable = facts.learnable(events)
    queries, valid = example_queries(learnable, max_len, split_validation(events, facts.split))
    asked = pd.concat([queries, valid], ignore_index=True)
    w = windows(
        event_histories(events, asked, items, facts.held_out, max_len),
        queries,
        valid,
        learnable,
        items,
        max_len,
    )
    rng = np.random.default_rng([seed, b])
    order, v_order = rng.permutation(len(w.inputs)), rng.permutation(len(w.valid_inputs))
    write_examples(
        out / "train" / f"part-{b:05d}.parquet",
        {
            "inputs": w.inputs[order].astype(np.int32),
            "targets": w.targets[order].astype(np.int32),
            "target_days": w.target_days[order],
        },
    )
    write_examples(
        out / "valid" / f"part-{b:05d}.parquet",
        {
            "inputs": w.valid_inputs[v_order].astype(np.int32),
            "targets": w.valid_targets[v_order].astype(np.int32),
            "days": w.valid_days[v_order],
        },
    )
    targets, counts = np.unique(w.targets[w.targets > 0], return_counts=True)
    summary = {
        "train": len(w.inputs),
        "valid": len(w.valid_inputs),
        "learnable": len(learnable),
        "peak_rss_mb": peak_rss_mb(),
    }
    parts = {
        "target_counts": (targets, counts),
        "popularity": popularity(learnable, facts.trained_until, half_life) if len(learnable) else None,
    }
    return summary, parts


def arrays(
    ws_root: str,
    need_teacher: bool,
    facts: Facts,
    parts: list,
    valid_dir: Path,
    popular_k: int,
    max_valid: int = 0,
) -> tuple[dict, dict]:
    """The arrays every worker needs beside its examples, and a summary for the driver. `parts`: the
    shards' references (read here, never by the driver); at most max_valid validation rows (0: all)."""
    reset_peak_rss()
    import ray

    shards = ray.get(parts)
    ws = Workspace(ws_root)
    items, teacher_id = load_items(ws, need_teacher)
    counts = np.zeros(items.n_items + 1, np.int64)
    for s in shards:
        np.add.at(counts, *s["target_counts"])
    valid = read_examples(valid_dir)
    inputs, targets, days = valid["inputs"], valid["targets"], valid["days"]
    keep = validation_sample(inputs, targets, days, max_valid)
    scores = [s["popularity"] for s in shards if s["popularity"] is not None]
    merged = pd.concat(scores).groupby(level=0).sum() if scores else pd.Series(dtype=np.float64)
    out = {
        # the id baseline (need_teacher False) learns its own item table: no teacher in its model
        "teacher": items.teacher_matrix() if need_teacher else None,
        "item_ids": np.concatenate([[-1], items.item_ids]),
        "target_counts": counts,
        "held_out": items.index_of(facts.held_out),
        # the learnable events hold no launched item's event: launched items are anchored at +inf
        "added_days": added_days(pq.read_table(ws.items).to_pandas(), items, None, facts.held_out),
        "valid_inputs": inputs[keep].astype(np.int64),
        "valid_targets": targets[keep].astype(np.int64),
        "valid_days": days[keep],
        "popular": top_popular(merged, popular_k),
    }
    summary = {
        "teacher_id": teacher_id,
        "n_items": items.n_items,
        "teacher_dim": int(items.teacher.shape[1]) if need_teacher else 0,
        "valid_used": len(keep),
        "peak_rss_mb": peak_rss_mb(),
    }
    return out, summary


def validation_sample(inputs: np.ndarray, targets: np.ndarray, days: np.ndarray, max_rows: int) -> np.ndarray:
    """Indices of at most max_rows validation rows (0: all), ascending: a seeded draw over the rows in the
    order of their content, not of the files (which the training seed shuffles), so every run on the same
    examples validates on the same queries."""
    n = len(targets)
    if not max_rows or n <= max_rows:
        return np.arange(n)
    by_content = np.lexsort((*inputs.T, targets, days))
    return np.sort(by_content[np.random.default_rng(0).choice(n, max_rows, replace=False)])


@dataclass(frozen=True)
class Shards:
    """What build_examples wrote and counted; `arrays` is an object-store reference."""

    train: str  # the folder of training example files
    valid: str
    arrays: Any  # ray.ObjectRef of `arrays()`'s dict
    n_train: int
    n_valid: int
    n_valid_used: int  # the validation rows in `arrays` (at most max_valid)
    learnable_events: int
    trained_until: Any
    teacher_id: str | None
    n_items: int
    teacher_dim: int
    held_out_items: int
    stages: dict  # {step: {"wall_s", "worker_peak_rss_mb"}}


def build_examples(
    ws: Workspace,
    split: SplitConfig,
    max_len: int,
    need_teacher: bool,
    out: Path,
    *,
    popular_k: int = 1000,
    half_life_days: float = 7.0,
    seed: int = 0,
    events_per_shard: int = EVENTS_PER_SHARD,
    max_valid: int = 0,
) -> Shards:
    """Build the training set under `out` (written aside, then swapped in) as Ray work; see the module."""
    import ray

    from vlmrec.raycluster import init_ray

    init_ray()
    meta = pq.ParquetFile(ws.events).metadata
    n_buckets = max(1, math.ceil(meta.num_rows / events_per_shard))
    # what grows with the data stays in the object store and goes from task to task: the driver gets counts
    # and references. Above one shard each task runs in a fresh process, so that what its allocator kept does
    # not follow it into the next stage or stay beside the training; one shard's tasks share processes.
    task = ray.remote(num_cpus=1, max_calls=1 if n_buckets > 1 else 0)
    stages: dict[str, dict] = {}
    with staged_dir(out) as tmp:
        t0 = time.perf_counter()
        facts, facts_summary = task(split_facts).options(num_returns=2).remote(ws.events, split)
        pieces = ray.get(
            [
                task(partition).remote(ws.events, groups, n_buckets, tmp / "buckets", p)
                for p, groups in enumerate(_row_group_pieces(meta, events_per_shard))
            ]
        )
        summary = ray.get(facts_summary)
        stages["partition"] = _stage(t0, [summary["peak_rss_mb"], *pieces])
        t0 = time.perf_counter()
        refs = [
            task(shard)
            .options(num_returns=2)
            .remote(
                str(ws.root),
                tmp / "buckets" / f"bucket={b}",
                facts,
                need_teacher,
                max_len,
                half_life_days,
                tmp,
                b,
                seed,
            )
            for b in range(n_buckets)
        ]
        counts = ray.get([r[0] for r in refs])
        stages["windows"] = _stage(t0, [c["peak_rss_mb"] for c in counts])
        shutil.rmtree(tmp / "buckets", ignore_errors=True)
        t0 = time.perf_counter()
        arrays_ref, vocabulary = (
            task(arrays)
            .options(num_returns=2)
            .remote(
                str(ws.root), need_teacher, facts, [r[1] for r in refs], tmp / "valid", popular_k, max_valid
            )
        )
        vocabulary = ray.get(vocabulary)
        stages["arrays"] = _stage(t0, [vocabulary["peak_rss_mb"]])
    return Shards(
        train=str(out / "train"),
        valid=str(out / "valid"),
        arrays=arrays_ref,
        n_train=sum(c["train"] for c in counts),
        n_valid=sum(c["valid"] for c in counts),
        n_valid_used=vocabulary["valid_used"],
        learnable_events=sum(c["learnable"] for c in counts),
        trained_until=summary["trained_until"],
        teacher_id=vocabulary["teacher_id"],
        n_items=vocabulary["n_items"],
        teacher_dim=vocabulary["teacher_dim"],
        held_out_items=summary["held_out_items"],
        stages=stages,
    )


def _empty_events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series(dtype=np.int64),
            "item_id": pd.Series(dtype=np.int64),
            "event_timestamp": pd.Series(dtype="datetime64[us, UTC]"),
        }
    )


def _row_group_pieces(meta, events_per_piece: int) -> list[list[int]]:
    """Consecutive row groups, about events_per_piece rows each (one piece at least)."""
    pieces: list[list[int]] = [[]]
    rows = 0
    for g in range(meta.num_row_groups):
        if pieces[-1] and rows + meta.row_group(g).num_rows > events_per_piece:
            pieces.append([])
            rows = 0
        pieces[-1].append(g)
        rows += meta.row_group(g).num_rows
    return pieces


def _stage(t0: float, rss: list[float]) -> dict:
    return {
        "wall_s": round(time.perf_counter() - t0, 3),
        "worker_peak_rss_mb": round(max(rss, default=0.0), 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Build a workspace's training set alone (what `vlmrec train` trains on) and print its counts and each
    step's cost as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m training.examples", description=main.__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", type=Path, required=True, help="the workspace folder")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write train/ and valid/ into")
    parser.add_argument("--max-len", type=int, default=50, help="history length of an example")
    parser.add_argument("--no-teacher", dest="teacher", action="store_false", help="the id baseline's set")
    SplitConfig.add_arguments(parser)
    args = parser.parse_args(argv)
    shards = build_examples(
        Workspace(args.workdir), SplitConfig.from_args(args), args.max_len, args.teacher, args.out
    )
    fields = ("n_train", "n_valid", "learnable_events", "n_items", "teacher_dim", "held_out_items", "stages")
    print(json.dumps({f: getattr(shards, f) for f in fields}, indent=2))


if __name__ == "__main__":
    main()
