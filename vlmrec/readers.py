"""The input formats `vlmrec ingest` reads: a parquet / CSV table, a MovieLens folder, a SASRec text file.
Each returns DataFrames with the ingest column names (attrs carry the source file and original columns),
and raises IngestError on a file it cannot use.

    events, catalogue = load_movielens("../shared/data/movielens-small")
    events, catalogue = load_sasrec_text("Video.txt")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vlmrec.validate import IngestError, int_ids, int_keys, require_columns

DEFAULT_CATEGORY = "unknown"
MAX_TAGS = 10  # MovieLens tags kept per movie in its text, most frequent first
SASREC_BASE_TIME = pd.Timestamp("2000-01-01", tz="UTC")  # line k of a SASRec file happens at base + k s


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
    require_columns(ratings, ("userId", "movieId", "timestamp"), str(d / "ratings.csv"))
    movies = read_table(d / "movies.csv")
    require_columns(movies, ("movieId", "title"), str(d / "movies.csv"))

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
    movie_key = int_keys(movies["movieId"])
    skipped_tags = 0
    tag_text = pd.Series("", index=movies.index)
    if (d / "tags.csv").is_file():
        tags = read_table(d / "tags.csv", allow_empty=True)
        require_columns(tags, ("movieId", "tag"), str(d / "tags.csv"))
        tag_key = int_keys(tags["movieId"])
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
    users, _ = int_ids(raw[0], str(p), "'user' (field 1)")
    items, _ = int_ids(raw[1], str(p), "'item' (field 2)")
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
