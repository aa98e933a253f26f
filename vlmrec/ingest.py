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

from vlmrec.sample import SampleConfig, generate_sample
from vlmrec.schema import EVENTS, ITEMS, ts_array
from vlmrec.sequences import LAYOUTS, click_sequences
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace, atomic_write_parquet

EVENT_COLUMNS = ("user_id", "item_id", "event_timestamp")
ITEM_COLUMNS = ("item_id", "title")
DEFAULT_EVENT_TYPE = "click"
DEFAULT_CATEGORY = "unknown"
MAX_TAGS = 10  # MovieLens tags kept per movie in its text, most frequent first
SASREC_BASE_TIME = pd.Timestamp("2000-01-01", tz="UTC")  # line k of a SASRec file happens at base + k s
IMAGE_THREADS = 4  # image decoding releases the GIL; a few threads hide file latency
_REMOTE = ("http://", "https://", "s3://", "gs://", "hf://")
_TZ_SUFFIX = (
    r"\d:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$"  # a time with its UTC offset
)


class IngestError(ValueError):
    """A bad input: the message names the file, the column and how many rows."""


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


# ---------------------------------------------------------------------------------------------- reading


def read_table(path: str | Path, *, allow_empty: bool = False) -> pd.DataFrame:
    """A parquet (.parquet, .pq) or CSV (.csv, .tsv, optionally .gz) file as a DataFrame.

    CSV cells are null only when empty (a title "NA" stays "NA"). Raises IngestError for a missing,
    empty (0 bytes, or no data rows unless `allow_empty`), unreadable or unknown-suffix file.
    """
    p = Path(path)
    if not p.is_file():
        raise IngestError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise IngestError(f"{p}: empty file (0 bytes)")
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        kind, reader = "parquet", pd.read_parquet
    elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        sep = "\t" if ".tsv" in name else ","
        kind = "CSV"

        def reader(f):
            return pd.read_csv(f, sep=sep, keep_default_na=False, na_values=[""])
    else:
        raise IngestError(f"{p}: unknown table format {p.suffix!r}: use .parquet, .pq, .csv or .tsv")
    try:
        df = reader(p)
    except Exception as err:  # any parser error becomes a clear input error naming the file
        raise IngestError(f"{p}: cannot read as {kind}: {err}") from err
    if len(df) == 0 and not allow_empty:
        raise IngestError(f"{p}: no data rows (0 rows)")
    df.attrs["source"] = str(p)
    df.attrs["base_dir"] = str(p.absolute().parent)
    return df


def load_movielens(data_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, catalogue) from a MovieLens folder: ratings.csv, movies.csv, tags.csv, posters/<id>.jpg.

    Every rating is an event ("rating"; `ingest` orders them by time, ties in file order). Catalogue:
    title from movies.csv, category = first genre ("unknown" for "(no genres listed)"), text =
    "Genres: a, b. Tags: x, y" (tags lowercased, deduplicated, the MAX_TAGS most frequent), image_uri =
    the poster's absolute path when the file exists, else null. created_at is left to `ingest`'s default:
    the movie's first rating time, or the dataset start for a movie nobody rated.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise IngestError(f"{d}: not a MovieLens folder (no such directory)")
    ratings = read_table(d / "ratings.csv")
    _require(ratings, ("userId", "movieId", "timestamp"), str(d / "ratings.csv"))
    movies = read_table(d / "movies.csv")
    _require(movies, ("movieId", "title"), str(d / "movies.csv"))

    events = pd.DataFrame(
        {
            "user_id": ratings["userId"],
            "item_id": ratings["movieId"],
            "event_timestamp": ratings["timestamp"],
            "event_type": "rating",
        }
    )
    events.attrs = {
        "source": str(d / "ratings.csv"),
        "columns": {"user_id": "userId", "item_id": "movieId", "event_timestamp": "timestamp"},
    }

    genres = movies["genres"] if "genres" in movies else pd.Series("", index=movies.index)
    genre_lists = (
        genres.fillna("")
        .astype(str)
        .map(lambda g: [x for x in g.split("|") if x and x != "(no genres listed)"])
    )
    category = genre_lists.map(lambda gs: gs[0] if gs else DEFAULT_CATEGORY)
    movie_key = _int_keys(movies["movieId"])
    skipped_tags = 0
    tag_text = pd.Series("", index=movies.index)
    if (d / "tags.csv").is_file():
        tags = read_table(d / "tags.csv", allow_empty=True)
        _require(tags, ("movieId", "tag"), str(d / "tags.csv"))
        tag_key = _int_keys(tags["movieId"])
        tag = tags["tag"].astype("string").str.strip().str.lower()
        ok = (tag_key.notna() & tag.notna() & (tag != "")).fillna(False).astype(bool)
        skipped_tags = int((~ok).sum())
        t = pd.DataFrame(
            {"movie": tag_key[ok], "tag": tag[ok], "pos": np.arange(len(tags))[ok.to_numpy(bool)]}
        )
        t = t.groupby(["movie", "tag"], sort=False).agg(n=("pos", "size"), first=("pos", "min")).reset_index()
        t = t.sort_values(["movie", "n", "first"], ascending=[True, False, True], kind="stable")
        t = t.groupby("movie", sort=False).head(MAX_TAGS)
        joined = t.groupby("movie", sort=False)["tag"].agg(", ".join)
        tag_text = movie_key.map(joined).fillna("")
    text = [
        f"Genres: {', '.join(gs) if gs else 'none'}." + (f" Tags: {tt}" if tt else "")
        for gs, tt in zip(genre_lists, tag_text, strict=True)
    ]
    poster_dir = (d / "posters").absolute()
    posters = {p.stem for p in poster_dir.glob("*.jpg")} if poster_dir.is_dir() else set()
    image_uri = [
        str(poster_dir / f"{k}.jpg") if pd.notna(k) and str(k) in posters else None for k in movie_key
    ]
    catalogue = pd.DataFrame(
        {"item_id": movies["movieId"], "title": movies["title"], "text": text, "category": category}
    )
    catalogue["image_uri"] = pd.Series(image_uri, index=movies.index, dtype=object)
    catalogue.attrs = {
        "source": str(d / "movies.csv"),
        "columns": {"item_id": "movieId"},
        "skipped": {"tags_without_movie_or_text": skipped_tags},
    }
    return events, catalogue


def load_sasrec_text(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, catalogue) from a SASRec text file: one "user item" pair per line, each user's lines in time order.

    There are no timestamps: line k (0-based, blank lines skipped) happens at SASREC_BASE_TIME + k seconds,
    so the order is the file's. The catalogue is synthesised: title "item <id>", category "unknown", no
    image, created_at = SASREC_BASE_TIME (no availability signal: every item exists from the start).
    """
    p = Path(path)
    if not p.is_file():
        raise IngestError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise IngestError(f"{p}: empty file (0 bytes)")
    try:
        raw = pd.read_csv(p, sep=r"\s+", header=None, dtype=str, skip_blank_lines=True)
    except pd.errors.EmptyDataError as err:
        raise IngestError(f"{p}: no data rows (0 rows)") from err
    except Exception as err:
        raise IngestError(f"{p}: not 'user item' pairs: {err}") from err
    bad = len(raw) if raw.shape[1] < 2 else int((raw[1].isna() | raw.iloc[:, 2:].notna().any(axis=1)).sum())
    if bad:
        raise IngestError(
            f"{p}: column 'item' (field 2): {bad} of {len(raw)} lines are not 'user item' pairs"
        )
    users, _ = _ids(raw[0], str(p), "'user' (field 1)")
    items, _ = _ids(raw[1], str(p), "'item' (field 2)")
    events = pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "event_timestamp": SASREC_BASE_TIME + pd.to_timedelta(np.arange(len(raw)), unit="s"),
        }
    )
    events.attrs = {"source": str(p)}
    ids = np.unique(items)
    catalogue = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"item {i}" for i in ids],
            "category": DEFAULT_CATEGORY,
            "image_uri": None,
            "created_at": SASREC_BASE_TIME,
        }
    )
    catalogue.attrs = {"source": f"{p} (synthesised catalogue)"}
    return events, catalogue


# ------------------------------------------------------------------------------------------- validation


def _require(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IngestError(
            f"{source}: missing {len(missing)} required column(s): {', '.join(missing)} "
            f"(columns found: {', '.join(map(str, df.columns)) or 'none'})"
        )


def _label(df: pd.DataFrame, column: str) -> str:
    original = df.attrs.get("columns", {}).get(column)
    return f"'{column}'" + (f" (from '{original}')" if original else "")


def _int_keys(s: pd.Series) -> pd.Series:
    """Integer-valued entries as nullable Int64, anything else null (for lookups, not validation)."""
    num = pd.to_numeric(s, errors="coerce")
    if pd.api.types.is_bool_dtype(num):
        return pd.Series(pd.NA, index=s.index, dtype="Int64")
    return num.where(num.notna() & (num % 1 == 0)).astype("Int64")


def _ids(s: pd.Series, source: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids with 0 where null, null mask); IngestError naming how many non-null rows are not integers."""
    null = s.isna().to_numpy()
    vals = s[~null]
    out = np.zeros(len(s), dtype=np.int64)
    kind = vals.dtype
    if pd.api.types.is_bool_dtype(kind) or kind.kind in "mM":  # booleans and times are not ids
        bad = np.ones(len(vals), dtype=bool)
    elif pd.api.types.is_integer_dtype(kind):
        out[~null] = vals.to_numpy(dtype=np.int64)
        return out, null
    else:
        if not pd.api.types.is_numeric_dtype(kind):  # text: "12" is an id, "12a" is not
            vals_text = pd.Series(np.asarray(vals.astype(str), dtype=object), index=vals.index).str.strip()
            num = pd.to_numeric(vals_text, errors="coerce")
        else:
            num = vals
        if pd.api.types.is_integer_dtype(num.dtype) and not num.isna().any():
            out[~null] = num.to_numpy(dtype=np.int64)
            return out, null
        f = num.to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isfinite(f) | (f != np.floor(f)) | (np.abs(f) >= 2.0**63)
        if not bad.any():
            out[~null] = f.astype(np.int64)
            return out, null
    example = vals.iloc[int(np.argmax(bad))]
    raise IngestError(
        f"{source}: column {label}: {int(bad.sum()):,} of {len(s):,} rows are not integer ids (e.g. {example!r})"
    )


def parse_timestamps(s: pd.Series, source: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(UTC microseconds since epoch as int64, null mask); IngestError naming how many rows do not parse."""
    null = s.isna().to_numpy()
    vals = s[~null]
    if pd.api.types.is_datetime64_any_dtype(vals):
        ts = pd.to_datetime(vals, utc=True)
    elif pd.api.types.is_bool_dtype(vals):
        ts = pd.Series(pd.NaT, index=vals.index)
    elif pd.api.types.is_numeric_dtype(vals):
        ts = pd.to_datetime(vals, unit="s", utc=True, errors="coerce")
    else:
        text = vals.astype(str).str.strip()
        num = pd.to_numeric(text, errors="coerce")  # row by row: numbers are Unix seconds, the rest ISO 8601
        is_num = num.notna()
        ts = pd.Series(pd.NaT, index=vals.index, dtype="datetime64[ns, UTC]")
        ts[is_num] = pd.to_datetime(num[is_num], unit="s", utc=True, errors="coerce")
        # naive and offset strings apart: pandas would give a naive string the offset of an earlier row
        aware = text.str.contains(_TZ_SUFFIX, regex=True) & ~is_num
        for part in (aware, ~aware & ~is_num):
            ts[part] = pd.to_datetime(text[part], utc=True, format="ISO8601", errors="coerce")
    bad = ts.isna().to_numpy()
    if bad.any():
        example = vals.iloc[int(np.argmax(bad))]
        raise IngestError(
            f"{source}: column {label}: {int(bad.sum()):,} of {len(s):,} rows are not timestamps "
            f"(ISO 8601 or Unix seconds; e.g. {example!r})"
        )
    out = np.zeros(len(s), dtype=np.int64)
    out[~null] = ts.to_numpy(dtype="datetime64[ns]").astype("datetime64[us]").astype(np.int64)
    return out, null


def _strings(df: pd.DataFrame, column: str) -> tuple[pd.Series, int]:
    """The column as object strings with None for null (an absent column is all null), and the null count."""
    if column not in df.columns:
        return pd.Series(None, index=df.index, dtype=object), len(df)
    s = df[column]
    null = s.isna()
    out = s.astype(object).where(null, s.astype(str)).where(~null, None)
    return out, int(null.sum())


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
    _require(ev_df, EVENT_COLUMNS, ev_src)
    _require(cat_df, ITEM_COLUMNS, cat_src)
    skipped: dict[str, int] = dict(cat_df.attrs.get("skipped", {}))
    filled: dict[str, int] = {}

    # events: types, then rows skipped for a reason
    uid, uid_null = _ids(ev_df["user_id"], ev_src, _label(ev_df, "user_id"))
    iid, iid_null = _ids(ev_df["item_id"], ev_src, _label(ev_df, "item_id"))
    ts, ts_null = parse_timestamps(ev_df["event_timestamp"], ev_src, _label(ev_df, "event_timestamp"))
    etype, filled["event_type"] = _strings(ev_df, "event_type")
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
    iid, null = _ids(df["item_id"], source, _label(df, "item_id"))
    title, filled["title"] = _strings(df, "title")
    title = title.where(title.notna(), pd.Series([f"item {i}" for i in iid], index=df.index))
    text, filled["text"] = _strings(df, "text")
    category, filled["category"] = _strings(df, "category")
    image_uri, _ = _strings(df, "image_uri")  # a null image is counted as "missing" by _check_images
    if "created_at" in df.columns:
        created, created_null = parse_timestamps(df["created_at"], source, _label(df, "created_at"))
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
        with ThreadPoolExecutor(IMAGE_THREADS) as pool:
            readable = list(pool.map(_readable, paths.values()))
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
            im.load()  # decode fully: catches truncated files that a header check would pass
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
