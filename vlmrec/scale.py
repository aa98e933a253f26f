"""Grow a real dataset to a target size with its own skew: more users, more events, more items (issue 20's
cost curves at 100k, 1M and 10M events).

    python -m vlmrec.scale --events ../shared/data/movielens-small/ratings.csv --catalogue items.parquet \
        --n-events 1000000 --n-items 1000000 --seed 0 --out .vlmrec/scale-1m/raw
    vlmrec ingest --events .vlmrec/scale-1m/raw/events.parquet --catalogue .vlmrec/scale-1m/raw/catalogue.parquet ...

Items: every base item gets clones (ids above the base's) until there are n_items; a clone copies its
item's catalogue row (the title marked with the clone's number, so its text differs).
Users: synthetic users each replay one base user's sequence, drawn uniformly so the mix of light and
heavy users stays the base's, every click mapped to one clone of its item (clone 0 = the item itself)
drawn with falling weight (clone 0 the most), so item popularity keeps a head spread over the clones; the
whole sequence is shifted in time to a random place inside the base timeline (its order and gaps kept). An
item's creation time becomes its first click when a shifted click comes earlier (a clone's: its first click). Users are added until
the events reach n_events (the last one cut to fit). Same inputs and seed -> the same output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ScaleConfig:
    n_events: int
    n_items: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_events < 1 or self.n_items < 1:
            raise ValueError(f"n_events and n_items must be >= 1, got {self.n_events}, {self.n_items}")


def scale(
    events: pd.DataFrame, catalogue: pd.DataFrame, cfg: ScaleConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, catalogue) grown to cfg.n_events events and at least the base's items (cfg.n_items when
    larger): user_id, item_id, event_timestamp (UTC) and the catalogue's own columns."""
    for column in ("user_id", "item_id", "event_timestamp"):
        if column not in events:
            raise ValueError(f"events: column {column!r} is missing")
    if "item_id" not in catalogue:
        raise ValueError("catalogue: column 'item_id' is missing")
    rng = np.random.default_rng(cfg.seed)
    base_items = np.sort(catalogue["item_id"].to_numpy(np.int64))
    clones = max(1, -(-cfg.n_items // len(base_items)))  # copies per item, the item itself included
    stride = int(base_items.max()) + 1  # clone c of item i has id c * stride + i
    items = _clone_catalogue(catalogue, clones, stride, cfg.n_items)

    ev = events[["user_id", "item_id", "event_timestamp"]].copy()
    ev["event_timestamp"] = pd.to_datetime(ev["event_timestamp"], utc=True, format="ISO8601")
    ev = ev.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
    if not ev["item_id"].isin(base_items).all():
        raise ValueError("events: item ids that the catalogue does not hold")
    # one base user per run of rows: start offset and length
    starts = np.flatnonzero(np.r_[True, ev["user_id"].to_numpy()[1:] != ev["user_id"].to_numpy()[:-1]])
    sizes = np.diff(np.r_[starts, len(ev)])
    ns = ev["event_timestamp"].to_numpy("datetime64[ns]").astype(np.int64)
    t0, span = ns.min(), ns.max() - ns.min()
    rank = np.searchsorted(base_items, ev["item_id"].to_numpy(np.int64))  # row -> the item's rank in base
    # clone c of the item of rank r exists when c * len(base) + r < n_items (the catalogue is clone-major)
    valid = np.clip(-(-(max(cfg.n_items, len(base_items)) - rank) // len(base_items)), 1, clones)

    extra = cfg.n_events - len(ev)
    picks = np.zeros(0, np.int64)
    while extra > 0 and sizes[picks].sum() < extra:  # template users, uniformly: the base's activity mix
        more = max(16, int(1.2 * (extra - sizes[picks].sum()) / sizes.mean()))
        picks = np.r_[picks, rng.integers(0, len(sizes), size=more)]
    if extra > 0:
        picks = picks[: int(np.searchsorted(np.cumsum(sizes[picks]), extra)) + 1]
    rows = np.concatenate([np.arange(starts[k], starts[k] + sizes[k]) for k in picks]) if len(picks) else []
    rows = np.asarray(rows, np.int64)[: max(extra, 0)]
    user_of = np.repeat(np.arange(len(picks)), sizes[picks])[: len(rows)]
    # clone c of an item drawn with weight falling in c (u ** 2: clone 0 keeps about a third of its clicks),
    # so the copies of a popular item are not all equally popular: the head stays a head
    copy = (rng.random(len(rows)) ** 2 * valid[rows]).astype(np.int64)
    first, last = ns[starts[picks]], ns[starts[picks] + sizes[picks] - 1]
    room = np.maximum(span - (last - first), 0)  # each synthetic user's clicks fit inside the base timeline
    shift = (rng.random(len(picks)) * room).astype(np.int64) + t0 - first
    synthetic = pd.DataFrame(
        {
            "user_id": int(ev["user_id"].max()) + 1 + user_of,
            "item_id": copy * stride + ev["item_id"].to_numpy(np.int64)[rows],
            "event_timestamp": pd.to_datetime(ns[rows] + shift[user_of], utc=True),
        }
    )
    out = pd.concat([ev, synthetic], ignore_index=True).head(cfg.n_events)  # the base first, unchanged
    if "created_at" in items:  # a shifted click may come before its item's creation: the item is that old
        first = out.groupby("item_id")["event_timestamp"].min()
        created = pd.to_datetime(items["created_at"], utc=True, format="ISO8601")
        earlier = items["item_id"].map(first)
        items["created_at"] = created.where(created.notna() & ~(earlier < created), earlier)
    return out.reset_index(drop=True), items


def _clone_catalogue(catalogue: pd.DataFrame, clones: int, stride: int, n_items: int) -> pd.DataFrame:
    base = catalogue.sort_values("item_id", kind="stable").reset_index(drop=True)
    copies = []
    for c in range(clones):
        copy = base.copy()
        copy["item_id"] = c * stride + base["item_id"].to_numpy(np.int64)
        if (
            c and "created_at" in copy
        ):  # a clone appears with its first click (ingest's rule for a missing one)
            copy["created_at"] = copy["created_at"].where(np.zeros(len(copy), bool))  # all missing, same type
        if c and "title" in copy:
            copy["title"] = copy["title"].astype(str) + f" (edition {c + 1})"
            if "text" in copy:
                copy["text"] = copy["text"].astype(str) + f" Edition {c + 1}."
        copies.append(copy)
    out = pd.concat(copies, ignore_index=True)
    return out.head(max(n_items, len(base))).reset_index(drop=True)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmrec.scale", description=__doc__.splitlines()[0])
    p.add_argument(
        "--events", type=Path, required=True, help="user_id, item_id, event_timestamp (csv/parquet)"
    )
    p.add_argument("--catalogue", type=Path, required=True, help="item_id, title, ... (csv/parquet)")
    p.add_argument("--n-events", type=int, required=True)
    p.add_argument("--n-items", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder: events.parquet, catalogue.parquet")
    args = p.parse_args(argv)
    try:
        events, items = scale(
            _read(args.events), _read(args.catalogue), ScaleConfig(args.n_events, args.n_items, args.seed)
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"scale: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    events.to_parquet(args.out / "events.parquet", index=False)
    items.to_parquet(args.out / "catalogue.parquet", index=False)
    print(
        f"scale: {len(events):,} events, {events['user_id'].nunique():,} users, {len(items):,} items -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
