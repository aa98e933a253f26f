"""`vlmrec ingest`: read events + a catalogue, validate them, write the three Feast source tables.

    python -m vlmrec.ingest --format sample --workdir .vlmrec/sample
    python -m vlmrec.ingest --events events.csv --catalogue catalogue.parquet --workdir .vlmrec/mine
    python -m vlmrec.ingest --format movielens --data ../shared/data/movielens-small --workdir .vlmrec/ml
    python -m vlmrec.ingest --format sasrec --data ../shared/data/amazon-games/Video.txt --workdir .vlmrec/games

Writes `Workspace.events`, `.items` and `.sequences` with the schemas of `vlmrec.schema`. Everything is
validated before anything is written: a bad input raises `IngestError` (file, column, how many rows) and the
previous outputs stay as they were. Rows that cannot be used but need not stop the run (null ids, null
timestamps, events on items missing from the catalogue, unreadable images) are skipped and counted in
`IngestSummary`; nothing is dropped silently.
The formats are read by vlmrec/readers.py, the columns checked by vlmrec/validate.py.

Inputs. Events: user_id, item_id, event_timestamp (+ event_type, default "click"). Catalogue: item_id, title
(+ text, default the title; category, default "unknown"; image_uri, default null; created_at). Ids must be
integers; timestamps are ISO 8601 strings (naive = UTC), datetimes, or numbers meaning Unix seconds.
A missing created_at is the item's first event time, or the dataset start (first event) for an item
nobody touched: the only availability signal the data has, and what makes late items "cold". MovieLens
uses exactly this rule (created_at = the movie's first rating time, else the dataset start).

Order. Events are sorted stably by timestamp (ties keep input order). Within one user equal timestamps are
moved apart: each event gets max(its time, previous event's time + 1 us), so a user's times are unique and
the tie order is the input order (see `vlmrec.schema`).

The click-sequence table (`--sequences`, vlmrec/sequences.py): "latest" (default) keeps one row per user, their
last `max_len` = N clicks, what the online store is materialized from (rows = users); "snapshots" keeps one
row per event, for Feast's point-in-time join (rows = events, up to N x events ids). The summary reports
the rows, ids, an estimate of the raw bytes and the real file size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from vlmrec.readers import DEFAULT_CATEGORY, load_movielens, load_sasrec_text, read_table
from vlmrec.sample import SampleConfig, generate_sample
from vlmrec.schema import EVENTS, ITEMS, ts_array
from vlmrec.sequences import LAYOUTS, click_sequences
from vlmrec.validate import (
    IngestError,
    column_label,
    int_ids,
    parse_timestamps,
    require_columns,
    string_column,
)
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace, atomic_write_parquet

EVENT_COLUMNS = ("user_id", "item_id", "event_timestamp")
ITEM_COLUMNS = ("item_id", "title")
DEFAULT_EVENT_TYPE = "click"
IMAGE_THREADS = 4  # image decoding releases the GIL; a few threads hide file latency
_REMOTE = ("http://", "https://", "s3://", "gs://", "hf://")


@dataclass(frozen=True)
class IngestConfig:
    max_len: int = 50  # N: item ids kept per click sequence
    check_images: bool = True  # open every image; unreadable ones are nulled (text fallback) and counted
    sequences: str = "latest"  # the click-sequence layout: latest (a row per user) or snapshots (per event)

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.sequences not in LAYOUTS:
            raise ValueError(f"sequences must be one of {LAYOUTS}, got {self.sequences!r}")


@dataclass(frozen=True)
class IngestSummary:
    events_read: int
    events_kept: int
    users: int
    items_read: int
    items: int
    skipped: dict[str, int]  # reason -> rows skipped
    duplicates_collapsed: int  # identical duplicate catalogue rows merged into one
    defaults_filled: dict[str, int]  # column -> values filled with the default (missing column or null)
    images_ok: int
    images_unreadable: int  # could not be opened: image_uri nulled
    images_missing: int  # no image_uri
    images_unchecked: int  # not opened: check_images off, or a remote URI
    timestamp_ties_moved: int  # events moved by 1 us steps to make a user's times unique
    events_before_created_at: int  # kept; their item's metadata is not valid yet at that time
    max_len: int
    sequence_layout: str
    sequence_rows: int
    sequence_ids: int
    sequence_bytes_estimate: int  # 16 * ids + 24 * rows, before compression (ids and their click times)
    sequence_bytes_on_disk: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        skipped = ", ".join(f"{k} {v:,}" for k, v in self.skipped.items() if v) or "none"
        filled = ", ".join(f"{k} {v:,}" for k, v in self.defaults_filled.items() if v) or "none"
        return "\n".join(
            [
                f"events: {self.events_read:,} read, {self.events_kept:,} kept, {self.users:,} users",
                f"items: {self.items_read:,} catalogue rows read, {self.items:,} items kept, "
                f"{self.duplicates_collapsed:,} identical duplicates collapsed",
                f"skipped: {skipped}",
                f"defaults filled: {filled}",
                f"images: {self.images_ok:,} ok, {self.images_unreadable:,} unreadable (nulled), "
                f"{self.images_missing:,} missing, {self.images_unchecked:,} unchecked",
                f"timestamp ties moved: {self.timestamp_ties_moved:,}; "
                f"events before their item's created_at: {self.events_before_created_at:,}",
                f"click sequences ({self.sequence_layout}, max_len {self.max_len}): {self.sequence_rows:,} rows, "
                f"{self.sequence_ids:,} ids, ~{self.sequence_bytes_estimate / 1e6:.1f} MB raw, "
                f"{self.sequence_bytes_on_disk / 1e6:.1f} MB on disk",
                f"took {self.seconds:.2f} s",
            ]
        )


# ---------------------------------------------------------------------------------------------- ingest


def ingest(
    events: pd.DataFrame | str | Path,
    catalogue: pd.DataFrame | str | Path,
    workspace: Workspace | str | Path,
    config: IngestConfig = IngestConfig(),
) -> IngestSummary:
    """Validate events + catalogue, then write events, items and click sequences into `workspace`."""
    t0 = time.perf_counter()
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    ev_df = events if isinstance(events, pd.DataFrame) else read_table(events)
    cat_df = catalogue if isinstance(catalogue, pd.DataFrame) else read_table(catalogue)
    ev_src = str(ev_df.attrs.get("source", "events table"))
    cat_src = str(cat_df.attrs.get("source", "catalogue table"))
    for df, src in ((ev_df, ev_src), (cat_df, cat_src)):
        if len(df) == 0:
            raise IngestError(f"{src}: no data rows (0 rows)")
    require_columns(ev_df, EVENT_COLUMNS, ev_src)
    require_columns(cat_df, ITEM_COLUMNS, cat_src)
    skipped: dict[str, int] = dict(cat_df.attrs.get("skipped", {}))
    filled: dict[str, int] = {}

    # events: types, then rows skipped for a reason
    uid, uid_null = int_ids(ev_df["user_id"], ev_src, column_label(ev_df, "user_id"))
    iid, iid_null = int_ids(ev_df["item_id"], ev_src, column_label(ev_df, "item_id"))
    ts, ts_null = parse_timestamps(ev_df["event_timestamp"], ev_src, column_label(ev_df, "event_timestamp"))
    etype, filled["event_type"] = string_column(ev_df, "event_type")
    etype = etype.fillna(DEFAULT_EVENT_TYPE).to_numpy(dtype=object)

    items, cat_counts = _prepare_items(cat_df, cat_src, filled)
    skipped["items_null_id"] = cat_counts.pop("items_null_id")

    null_id = uid_null | iid_null
    null_ts = ~null_id & ts_null
    unknown = ~null_id & ~null_ts & ~np.isin(iid, items["item_id"].to_numpy())
    skipped["events_null_id"] = int(null_id.sum())
    skipped["events_null_timestamp"] = int(null_ts.sum())
    skipped["events_unknown_item"] = int(unknown.sum())
    keep = ~(null_id | null_ts | unknown)
    if not keep.any():
        raise IngestError(
            f"{ev_src}: 0 of {len(ev_df):,} events left after skipping "
            f"{skipped['events_null_id']:,} with null ids, {skipped['events_null_timestamp']:,} with null "
            f"timestamps, {skipped['events_unknown_item']:,} on items not in {cat_src}"
        )
    ordered, ties_moved = order_events(uid[keep], iid[keep], ts[keep], etype[keep])

    # items: created_at default = first event time, else the dataset start; then images
    first = ordered.groupby("item_id")["ts"].min()
    at = first.index.get_indexer(items["item_id"])
    default_created = np.where(at >= 0, first.to_numpy()[at], ordered["ts"].min())
    created = items["created_at"]
    items["created_at"] = np.where(
        created.isna(), default_created, created.fillna(0).to_numpy(dtype=np.int64)
    )
    created_of = pd.Series(items["created_at"].to_numpy(), index=items["item_id"].to_numpy())
    before_created = int((ordered["ts"].to_numpy() < created_of.loc[ordered["item_id"]].to_numpy()).sum())
    image_counts = _check_images(items, cat_df, config.check_images)

    # build every table, then write (nothing is written unless all of the above passed)
    ev_table = events_table(ordered)
    items = items.sort_values("item_id", kind="stable")
    created_us = items["created_at"].to_numpy()
    items_table = pa.Table.from_arrays(
        [
            pa.array(items["item_id"].to_numpy(), pa.int64()),
            pa.array(items["title"].to_numpy(dtype=object), pa.string()),
            pa.array(items["text"].to_numpy(dtype=object), pa.string()),
            pa.array(items["category"].to_numpy(dtype=object), pa.string()),
            pa.array(items["image_uri"].to_numpy(dtype=object), pa.string(), from_pandas=True),
            ts_array(created_us),
            ts_array(created_us),
        ],
        schema=ITEMS,
    )
    seq_table = click_sequences(
        ordered.rename(columns={"ts": "event_timestamp"}), config.max_len, config.sequences
    )
    ws.ensure()
    atomic_write_parquet(ev_table, ws.events)
    atomic_write_parquet(items_table, ws.items)
    atomic_write_parquet(seq_table, ws.sequences)

    n_ids = int(pc.sum(pc.list_value_length(seq_table["item_ids"])).as_py() or 0)
    return IngestSummary(
        events_read=len(ev_df),
        events_kept=len(ordered),
        users=int(ordered["user_id"].nunique()),
        items_read=len(cat_df),
        items=len(items),
        skipped=skipped,
        duplicates_collapsed=cat_counts["duplicates_collapsed"],
        defaults_filled=filled,
        images_ok=image_counts["ok"],
        images_unreadable=image_counts["unreadable"],
        images_missing=image_counts["missing"],
        images_unchecked=image_counts["unchecked"],
        timestamp_ties_moved=ties_moved,
        events_before_created_at=before_created,
        max_len=config.max_len,
        sequence_layout=config.sequences,
        sequence_rows=seq_table.num_rows,
        sequence_ids=n_ids,
        sequence_bytes_estimate=16 * n_ids + 24 * seq_table.num_rows,
        sequence_bytes_on_disk=ws.sequences.stat().st_size,
        seconds=round(time.perf_counter() - t0, 3),
    )


def _prepare_items(
    df: pd.DataFrame, source: str, filled: dict[str, int]
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Typed catalogue with defaults, identical duplicates collapsed; IngestError on conflicting duplicates."""
    iid, null = int_ids(df["item_id"], source, column_label(df, "item_id"))
    title, filled["title"] = string_column(df, "title")
    title = title.where(title.notna(), pd.Series([f"item {i}" for i in iid], index=df.index))
    text, filled["text"] = string_column(df, "text")
    category, filled["category"] = string_column(df, "category")
    image_uri, _ = string_column(df, "image_uri")  # a null image is counted as "missing" by _check_images
    if "created_at" in df.columns:
        created, created_null = parse_timestamps(df["created_at"], source, column_label(df, "created_at"))
        created = pd.array(created, dtype="Int64")
        created[created_null] = pd.NA
        filled["created_at"] = int(created_null.sum())
    else:
        created = pd.array([pd.NA] * len(df), dtype="Int64")
        filled["created_at"] = len(df)
    items = pd.DataFrame(
        {
            "item_id": iid,
            "title": title,
            "text": text.where(text.notna(), title),
            "category": category.fillna(DEFAULT_CATEGORY),
            "image_uri": image_uri,
            "created_at": created,
        },
        index=df.index,
    )[~null]
    before = len(items)
    items = items.drop_duplicates(ignore_index=True)
    dup = items["item_id"].duplicated(keep=False)
    if dup.any():
        conflicting = items[dup]
        per_column = {
            c: int((conflicting.groupby("item_id")[c].nunique(dropna=False) > 1).sum())
            for c in ("title", "text", "category", "image_uri", "created_at")
        }
        detail = ", ".join(f"column '{c}': {n:,}" for c, n in per_column.items() if n)
        example = int(conflicting["item_id"].iloc[0])
        raise IngestError(
            f"{source}: {conflicting['item_id'].nunique():,} item ids appear more than once with conflicting "
            f"metadata ({detail}; e.g. item {example}); identical duplicates are fine"
        )
    return items, {"items_null_id": int(null.sum()), "duplicates_collapsed": before - len(items)}


def order_events(
    uid: np.ndarray, iid: np.ndarray, ts: np.ndarray, etype: np.ndarray
) -> tuple[pd.DataFrame, int]:
    """Events sorted stably by time with each user's times made unique (+1 us per tie), and how many moved."""
    by_time = np.argsort(ts, kind="stable")
    by_user = by_time[np.argsort(uid[by_time], kind="stable")]  # user, then time, then input order
    u, t = uid[by_user], ts[by_user]
    n = len(u)
    new_user = np.r_[True, u[1:] != u[:-1]]
    group = np.cumsum(new_user) - 1
    pos = np.arange(n) - np.flatnonzero(new_user)[group]  # index within the user's events
    # fixed[k] = max(t[k], fixed[k-1] + 1)  <=>  fixed[k] - k = cummax(t - k) within the user
    fixed = pd.Series(t - pos).groupby(group).cummax().to_numpy() + pos
    moved = int((fixed != t).sum())
    ordered = pd.DataFrame({"user_id": u, "item_id": iid[by_user], "ts": fixed, "event_type": etype[by_user]})
    ordered = ordered.iloc[np.argsort(fixed, kind="stable")]  # global time order; a user's order is kept
    return ordered.reset_index(drop=True), moved


def events_table(ordered: pd.DataFrame) -> pa.Table:
    """order_events' frame (user_id, item_id, ts in UTC microseconds, event_type) as EVENTS."""
    return pa.Table.from_arrays(
        [
            pa.array(ordered["user_id"].to_numpy(), pa.int64()),
            pa.array(ordered["item_id"].to_numpy(), pa.int64()),
            ts_array(ordered["ts"].to_numpy()),
            pa.array(ordered["event_type"].to_numpy(dtype=object), pa.string()),
        ],
        schema=EVENTS,
    )


def _check_images(items: pd.DataFrame, cat_df: pd.DataFrame, check: bool) -> dict[str, int]:
    """Resolve image_uri to absolute paths (relative = to the catalogue's folder); null unreadable ones."""
    base = Path(cat_df.attrs.get("base_dir", "."))
    uris = items["image_uri"].to_numpy(
        dtype=object, copy=True
    )  # written below (read-only under copy-on-write)
    absent = pd.isna(uris)
    uris[absent] = None
    local = ~absent & ~np.array([str(u).startswith(_REMOTE) for u in uris], dtype=bool)
    paths = {
        i: str((base / Path(str(uris[i]).removeprefix("file://"))).absolute()) for i in np.flatnonzero(local)
    }
    counts = {"ok": 0, "unreadable": 0, "missing": int(absent.sum()), "unchecked": 0}
    counts["unchecked"] = int(len(uris) - counts["missing"] - (len(paths) if check else 0))
    for i, p in paths.items():
        uris[i] = p
    if check and paths:
        # items sharing a file (a product's variants) open it once
        files = list(dict.fromkeys(paths.values()))
        with ThreadPoolExecutor(IMAGE_THREADS) as pool:
            by_file = dict(zip(files, pool.map(_readable, files), strict=True))
        readable = [by_file[p] for p in paths.values()]
        for i, ok in zip(paths, readable, strict=True):
            if not ok:
                uris[i] = None
        counts["ok"] = int(sum(readable))
        counts["unreadable"] = len(readable) - counts["ok"]
    items["image_uri"] = uris
    return counts


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft(im.mode, (1, 1))  # a JPEG decodes at its smallest DCT scale (other formats ignore this)
            im.load()  # still reads the whole file: catches truncated files that a header check would pass
        return True
    except Exception:  # missing file, not an image, truncated: all mean "no usable image"
        return False


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `vlmrec ingest` flags (shared with `python -m vlmrec.ingest`)."""
    defaults = IngestConfig()
    parser.add_argument(
        "--format",
        choices=["table", "movielens", "sasrec", "sample"],
        default="table",
        help="table: --events + --catalogue files; movielens: --data folder; sasrec: --data text file; "
        "sample: generate the built-in sample into <workdir>/raw",
    )
    parser.add_argument("--events", type=Path, help="events table (.csv/.tsv/.parquet), --format table")
    parser.add_argument("--catalogue", type=Path, help="catalogue table (.csv/.tsv/.parquet), --format table")
    parser.add_argument("--data", type=Path, help="MovieLens folder or SASRec text file")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="the workspace folder")
    parser.add_argument(
        "--max-len", type=int, default=defaults.max_len, help="item ids kept per click sequence"
    )
    parser.add_argument(
        "--sequences",
        choices=LAYOUTS,
        default=defaults.sequences,
        help="latest: one click sequence per user (what the online store needs); snapshots: one per event "
        "(Feast's point-in-time join: training's in-memory prepare_data), N x events ids",
    )
    parser.add_argument(
        "--no-check-images",
        dest="check_images",
        action="store_false",
        help="do not open the images (faster; a broken image is then only found by embed)",
    )
    parser.add_argument("--seed", type=int, default=SampleConfig.seed, help="sample seed (--format sample)")
    parser.add_argument(
        "--logged",
        action="store_true",
        help="fold the Producer's event log (<workdir>/data/events_log) into the workspace's events instead",
    )
    return parser


def run(args: argparse.Namespace) -> IngestSummary | dict:
    """Load the inputs the flags name, ingest them, print the summary. Raises IngestError on bad input."""
    ws = Workspace(args.workdir)
    config = IngestConfig(max_len=args.max_len, check_images=args.check_images, sequences=args.sequences)
    if getattr(args, "logged", False):
        if not ws.events.exists():
            raise IngestError(f"no events at {ws.events}: ingest a dataset first")
        from vlmrec.fold import fold_logged  # it builds on this module's event parsing and ordering

        folded = fold_logged(ws)
        print(f"ingest --logged -> {ws.events}: {folded}; run `vlmrec features --workdir {ws.root}` next")
        return folded
    if args.format == "table":
        if args.events is None or args.catalogue is None:
            raise IngestError("--format table needs --events and --catalogue")
        events, catalogue = args.events, args.catalogue
    elif args.data is None and args.format != "sample":
        raise IngestError(f"--format {args.format} needs --data")
    elif args.format == "movielens":
        events, catalogue = load_movielens(args.data)
    elif args.format == "sasrec":
        events, catalogue = load_sasrec_text(args.data)
    else:
        paths = generate_sample(ws.root / "raw", SampleConfig(seed=args.seed))
        events, catalogue = paths.events, paths.catalogue
    summary = ingest(events, catalogue, ws, config)
    print(f"ingest -> {ws.data}\n{summary}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(
        argparse.ArgumentParser(prog="python -m vlmrec.ingest", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    try:
        run(args)
    except IngestError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
