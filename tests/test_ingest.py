"""`vlmrec ingest` on tiny inputs written here: schemas, sequences, validation, skips, atomicity, loaders.

pytest -q tests/test_ingest.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmrec import ingest as ing
from vlmrec import readers
from vlmrec.fold import fold_logged
from vlmrec.ingest import IngestConfig, IngestError, ingest
from vlmrec.readers import load_movielens, load_sasrec_text
from vlmrec.schema import CLICK_SEQUENCES, EVENTS, ITEMS
from vlmrec.sequences import click_sequences, sequence_layout
from vlmrec.workspace import Workspace

T0 = "2024-03-01T10:00:00Z"


def _events(**extra) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 1, 2, 1],
            "item_id": [10, 11, 10, 12, 13, 10],
            "event_timestamp": [
                T0,
                T0,
                T0,
                "2024-03-01T10:00:05Z",
                "2024-03-01T11:00:00Z",
                "2024-03-02T00:00:00Z",
            ],
            "event_type": ["click"] * 6,
        }
    )
    return df.assign(**extra)


def _catalogue(**extra) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "item_id": [10, 11, 12, 13],
            "title": ["Red hat", "Blue bag", "Green mug", "Teal lamp"],
            "text": ["a red hat", "a blue bag", "a green mug", "a teal lamp"],
            "category": ["hats", "bags", "mugs", "lamps"],
            "image_uri": [None] * 4,
            "created_at": ["2024-01-01T00:00:00Z"] * 4,
        }
    )
    return df.assign(**extra)


def _write(tmp_path, events: pd.DataFrame, catalogue: pd.DataFrame, fmt: str = "csv"):
    ev, cat = tmp_path / f"events.{fmt}", tmp_path / f"catalogue.{fmt}"
    for df, path in ((events, ev), (catalogue, cat)):
        df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    return ev, cat


def _read(path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def test_schemas_and_tables(tmp_path):
    ev, cat = _write(tmp_path, _events(), _catalogue())
    ws = Workspace(tmp_path / "ws")
    summary = ingest(ev, cat, ws, IngestConfig(max_len=3, sequences="snapshots"))
    assert pq.read_schema(ws.events).equals(EVENTS)
    assert pq.read_schema(ws.items).equals(ITEMS)
    assert pq.read_schema(ws.sequences).equals(CLICK_SEQUENCES)
    assert sequence_layout(ws.sequences) == ("snapshots", 3)
    items = _read(ws.items)
    assert items["item_id"].tolist() == [10, 11, 12, 13]
    assert (items["event_timestamp"] == items["created_at"]).all()
    assert items["created_at"].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")
    assert summary.events_kept == 6 and summary.users == 2 and summary.items == 4
    assert summary.sequence_rows == 6 and summary.sequence_ids == 1 + 2 + 3 + 3 + 1 + 2
    assert summary.sequence_bytes_estimate == 16 * summary.sequence_ids + 24 * 6
    assert summary.sequence_bytes_on_disk == ws.sequences.stat().st_size
    text = str(summary)
    assert "6 kept" in text and "snapshots, max_len 3" in text and summary.to_dict()["users"] == 2
    latest = ingest(ev, cat, ws, IngestConfig(max_len=3))  # the default: a row per user
    assert latest.sequence_rows == 2 and latest.sequence_ids == 3 + 2 and latest.sequence_layout == "latest"
    assert sequence_layout(ws.sequences) == ("latest", 3) and "latest, max_len 3" in str(latest)


def test_event_order_ties_and_sequences(tmp_path):
    ws = Workspace(tmp_path / "ws")
    summary = ingest(_events(), _catalogue(), ws, IngestConfig(max_len=3, sequences="snapshots"))
    events = _read(ws.events)
    t0 = pd.Timestamp(T0)
    us = pd.Timedelta(microseconds=1)
    # global time order, ties in input order; user 1's second event at T0 moved by 1 us
    assert list(zip(events.user_id, events.item_id, events.event_timestamp, strict=True))[:3] == [
        (1, 10, t0),
        (2, 10, t0),
        (1, 11, t0 + us),
    ]
    assert summary.timestamp_ties_moved == 1
    seq = _read(ws.sequences)
    user1 = seq[seq.user_id == 1]
    assert [list(x) for x in user1.item_ids] == [[10], [10, 11], [10, 11, 12], [11, 12, 10]]
    assert user1.event_timestamp.tolist() == events[events.user_id == 1].event_timestamp.tolist()
    assert [list(x) for x in seq[seq.user_id == 2].item_ids] == [[10], [10, 13]]


def test_tie_cascade_keeps_order_and_makes_times_unique(tmp_path):
    t = pd.Timestamp(T0)
    us = pd.Timedelta(microseconds=1)
    events = pd.DataFrame(
        {"user_id": [5, 5, 5, 5], "item_id": [13, 12, 11, 10], "event_timestamp": [t, t, t + us, t + 5 * us]}
    )
    ws = Workspace(tmp_path / "ws")
    summary = ingest(events, _catalogue(), ws, IngestConfig(max_len=2, sequences="snapshots"))
    got = _read(ws.events)
    assert got.item_id.tolist() == [13, 12, 11, 10]
    assert ((got.event_timestamp - t) // us).tolist() == [0, 1, 2, 5] and summary.timestamp_ties_moved == 2
    seq = _read(ws.sequences)
    assert seq.event_timestamp.tolist() == got.event_timestamp.tolist()
    assert [list(x) for x in seq.item_ids] == [[13], [13, 12], [12, 11], [11, 10]]


def test_click_sequences_match_brute_force():
    rng = np.random.default_rng(0)
    n = 300
    events = pd.DataFrame(
        {
            "user_id": rng.integers(1, 8, n),
            "item_id": rng.integers(1, 50, n),
            "event_timestamp": rng.permutation(n).astype(np.int64) * 1000,  # unique times, shuffled rows
        }
    )
    table = click_sequences(events, max_len=4, layout="snapshots").to_pandas()
    expected = []
    for user, g in events.sort_values("event_timestamp").groupby("user_id", sort=True):
        items = g.item_id.tolist()
        times = g.event_timestamp.tolist()
        expected += [
            (user, items[max(0, k - 3) : k + 1], times[max(0, k - 3) : k + 1]) for k in range(len(items))
        ]
    got = zip(table.user_id, table.item_ids, table.click_times, strict=True)
    assert [(u, list(x), list(t)) for u, x, t in got] == expected, "ids and their click times, aligned"
    # latest: each user's last snapshot; as of a time: their last snapshot at or before it
    snapshots = table.assign(t=[int(x[-1]) for x in table.click_times])  # a row is at its own click
    for until in (None, 150_000, 5_000, 0, -1):
        latest = click_sequences(events, max_len=4, until=until).to_pandas()
        rows = snapshots if until is None else snapshots[snapshots.t <= until]
        want = rows.groupby("user_id").tail(1)
        assert latest.user_id.tolist() == want.user_id.tolist()
        assert latest.event_timestamp.tolist() == want.event_timestamp.tolist()
        assert [list(x) for x in latest.item_ids] == [list(x) for x in want.item_ids]
        assert [list(x) for x in latest.click_times] == [list(x) for x in want.click_times]
    assert 0 < len(click_sequences(events, 4, until=5_000)) < len(click_sequences(events, 4)) == 7
    with pytest.raises(ValueError, match="layout"):
        click_sequences(events, 4, layout="daily")
    with pytest.raises(ValueError, match="until"):
        click_sequences(events, 4, layout="snapshots", until=5)
    with pytest.raises(ValueError, match="sequences"):
        IngestConfig(sequences="daily")


def test_timestamp_formats_and_parquet_input(tmp_path):
    events = _events(
        event_timestamp=[
            "2024-03-01T11:00:00+01:00",  # = T0
            "2024-03-01 10:00:00",  # naive = UTC = T0
            1709287200,  # Unix seconds = T0
            "2024-03-01T10:00:05Z",
            "2024-03-01T11:00:00Z",
            "2024-03-02T00:00:00Z",
        ]
    ).astype({"event_timestamp": str})
    ev, cat = _write(tmp_path, events, _catalogue(), fmt="parquet")
    ws = Workspace(tmp_path / "ws")
    ingest(ev, cat, ws)
    got = _read(ws.events)
    assert got.event_timestamp.iloc[0] == pd.Timestamp(T0) and got.event_timestamp.iloc[1] == pd.Timestamp(T0)
    numeric = _events(
        event_timestamp=[1709287200, 1709287200, 1709287200, 1709287205, 1709290800, 1709337600]
    )
    ingest(numeric, _catalogue(), ws)
    assert _read(ws.events).event_timestamp.iloc[0] == pd.Timestamp(T0)


def test_skipped_and_counted(tmp_path):
    events = pd.concat(
        [
            _events(),
            pd.DataFrame(
                {
                    "user_id": [None, 3, 3, 4],
                    "item_id": [10, None, 99, 10],
                    "event_timestamp": [T0, T0, T0, None],
                    "event_type": ["click"] * 4,
                }
            ),
        ],
        ignore_index=True,
    )
    catalogue = pd.concat(
        [_catalogue(), _catalogue().iloc[[0]], _catalogue(item_id=[None, 1, 2, 3]).iloc[[0]]]
    )
    ev, cat = _write(tmp_path, events, catalogue)
    summary = ingest(ev, cat, Workspace(tmp_path / "ws"))
    assert summary.events_read == 10 and summary.events_kept == 6
    assert summary.skipped == {
        "items_null_id": 1,
        "events_null_id": 2,
        "events_null_timestamp": 1,
        "events_unknown_item": 1,
    }
    assert summary.items_read == 6 and summary.items == 4 and summary.duplicates_collapsed == 1
    assert "events_unknown_item 1" in str(summary)


def test_optional_columns_get_defaults(tmp_path):
    events = _events().drop(columns=["event_type"])
    events.loc[5, "item_id"] = 11  # item 11: first event T0 + 1 us (a moved tie); item 13 has none below
    events = events[events.item_id != 13]
    catalogue = _catalogue()[["item_id", "title"]]
    ws = Workspace(tmp_path / "ws")
    summary = ingest(events, catalogue, ws)
    items = _read(ws.items).set_index("item_id")
    assert set(_read(ws.events).event_type) == {"click"}
    assert items.loc[10, "text"] == "Red hat" and items.loc[10, "category"] == "unknown"
    assert items["image_uri"].isna().all() and summary.images_missing == 4
    t0 = pd.Timestamp(T0)
    assert items.loc[10, "created_at"] == t0
    assert items.loc[11, "created_at"] == t0 + pd.Timedelta(microseconds=1)
    assert items.loc[13, "created_at"] == t0  # never touched: the dataset start
    assert summary.defaults_filled == {"event_type": 5, "title": 0, "text": 4, "category": 4, "created_at": 4}
    assert summary.events_before_created_at == 0


def test_events_before_created_at_are_counted(tmp_path):
    catalogue = _catalogue(created_at=["2024-03-01T10:00:01Z"] * 4)
    summary = ingest(_events(), catalogue, Workspace(tmp_path / "ws"))
    assert summary.events_before_created_at == 3


BAD_CASES = {
    "missing event column": (
        lambda e, c: (e.drop(columns=["event_timestamp"]), c),
        "events.csv",
        "event_timestamp",
        "1",
    ),
    "missing catalogue column": (lambda e, c: (e, c.drop(columns=["title"])), "catalogue.csv", "title", "1"),
    "non-integer user_id": (
        lambda e, c: (e.assign(user_id=["1", "x", "2", "1.5", "2", "1"]), c),
        "events.csv",
        "user_id",
        "2 of 6 rows",
    ),
    "non-integer catalogue item_id": (
        lambda e, c: (e, c.assign(item_id=["10", "11", "12", "thirteen"])),
        "catalogue.csv",
        "item_id",
        "1 of 4 rows",
    ),
    "unparseable timestamps": (
        lambda e, c: (e.assign(event_timestamp=[T0, "yesterday", T0, "2024-13-45", T0, T0]), c),
        "events.csv",
        "event_timestamp",
        "2 of 6 rows",
    ),
    "unparseable created_at": (
        lambda e, c: (e, c.assign(created_at=["soon", T0, T0, T0])),
        "catalogue.csv",
        "created_at",
        "1 of 4 rows",
    ),
    "conflicting duplicate items": (
        lambda e, c: (e, pd.concat([c, c.iloc[[1, 2]].assign(title=["Other", "Else"])])),
        "catalogue.csv",
        "title",
        "2 item ids",
    ),
    "header only": (lambda e, c: (e.iloc[:0], c), "events.csv", "", "0 rows"),
    "every event skipped": (lambda e, c: (e.assign(item_id=99), c), "events.csv", "catalogue.csv", "0 of 6"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_and_writes_nothing(tmp_path, case):
    make, file, column, count = BAD_CASES[case]
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "good").mkdir()
    ingest(*_write(tmp_path / "good", _events(), _catalogue()), ws)
    before = {p: p.read_bytes() for p in (ws.events, ws.items, ws.sequences)}
    bad = tmp_path / "bad"
    bad.mkdir()
    ev, cat = _write(bad, *make(_events(), _catalogue()))
    with pytest.raises(IngestError) as err:
        ingest(ev, cat, ws)
    message = str(err.value)
    assert file in message and column in message and count in message, message
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in ws.data.iterdir()) == sorted(p.name for p in before)  # no temp files left


def test_read_table_errors(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "broken.parquet").write_text("not parquet")
    for name, needle in [
        ("empty.csv", "empty file"),
        ("x.json", "unknown table format"),
        ("missing.csv", "no such file"),
        ("broken.parquet", "cannot read as parquet"),
    ]:
        with pytest.raises(IngestError, match=needle) as err:
            readers.read_table(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "na.csv").write_text("item_id,title\n1,NA\n2,\n")
    df = readers.read_table(tmp_path / "na.csv")
    assert df.title.iloc[0] == "NA" and pd.isna(df.title.iloc[1])


def test_images_checked_nulled_and_counted(tmp_path, monkeypatch):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(img_dir / "ok.png")
    (img_dir / "garbage.png").write_bytes(b"\x89PNG not really")
    full = img_dir / "cut.png"
    Image.new("RGB", (64, 64), (0, 0, 200)).save(full)
    (img_dir / "truncated.png").write_bytes(full.read_bytes()[:60])
    photo = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(photo).save(img_dir / "whole.jpg", quality=90)
    # a JPEG cut short of its end still opens: only its decode fails
    jpeg = (img_dir / "whole.jpg").read_bytes()
    (img_dir / "truncated.jpg").write_bytes(jpeg[: len(jpeg) - 200])
    catalogue = pd.concat(
        [
            _catalogue(image_uri=[str(img_dir / "ok.png"), "img/garbage.png", "img/none.png", None]),
            _catalogue(
                item_id=[14, 15, 16, 17], image_uri=["img/cut.png", "img/truncated.png", None, "img/ok.png"]
            ),
            _catalogue(
                item_id=[18, 19, 20, 21], image_uri=["img/whole.jpg", "img/truncated.jpg", None, None]
            ),
        ]
    )
    ev, cat = _write(tmp_path, _events(), catalogue)
    ws = Workspace(tmp_path / "ws")
    opened = []
    monkeypatch.setattr(
        ing, "_readable", lambda path, check=ing._readable: opened.append(path) or check(path)
    )
    summary = ingest(ev, cat, ws)
    assert (summary.images_ok, summary.images_unreadable, summary.images_missing) == (4, 4, 4)
    # items 10 and 17 share ok.png: one read
    assert sorted(opened) == sorted(set(opened)) and len(opened) == 7
    uris = _read(ws.items).set_index("item_id")["image_uri"]
    # absolute
    assert uris[10] == uris[17] == str(img_dir / "ok.png") and uris[14] == str(img_dir / "cut.png")
    assert uris[18] == str(img_dir / "whole.jpg")
    assert uris[[11, 12, 15, 19]].isna().all()
    unchecked = ingest(ev, cat, ws, IngestConfig(check_images=False))
    assert unchecked.images_unchecked == 8 and unchecked.images_ok == 0


def _movielens(root):
    root.mkdir()
    pd.DataFrame(
        {
            "userId": [1, 1, 2, 2, 1],
            "movieId": [2, 1, 1, 3, 3],
            "rating": [4.0, 3.5, 5.0, 2.0, 1.0],
            "timestamp": [100, 50, 50, 200, 300],
        }
    ).to_csv(root / "ratings.csv", index=False)
    pd.DataFrame(
        {
            "movieId": [1, 2, 3, 4],
            "title": ["Toy Story (1995)", "Jumanji (1995)", "NA", "Heat (1995)"],
            "genres": ["Adventure|Animation", "Adventure|Children", "(no genres listed)", "Action|Crime"],
        }
    ).to_csv(root / "movies.csv", index=False)
    pd.DataFrame(
        {
            "userId": [1, 2, 1, 2, 1],
            "movieId": [1, 1, 1, 2, None],
            "tag": ["Pixar", "fun", "pixar ", "Board Game", "orphan"],
            "timestamp": [1, 2, 3, 4, 5],
        }
    ).to_csv(root / "tags.csv", index=False)
    (root / "posters").mkdir()
    Image.new("RGB", (6, 9), (0, 0, 0)).save(root / "posters" / "1.jpg")
    (root / "posters" / "2.jpg").write_bytes(b"broken jpeg")


def test_movielens_folder(tmp_path):
    _movielens(tmp_path / "ml")
    events, catalogue = load_movielens(tmp_path / "ml")
    ws = Workspace(tmp_path / "ws")
    summary = ingest(events, catalogue, ws)
    ev = _read(ws.events)
    # by timestamp, ties in file order (user 1's movie 1 before user 2's movie 1)
    assert list(zip(ev.user_id, ev.item_id, strict=True)) == [(1, 1), (2, 1), (1, 2), (2, 3), (1, 3)]
    assert set(ev.event_type) == {"rating"}
    items = _read(ws.items).set_index("item_id")
    assert items.loc[1, "text"] == "Genres: Adventure, Animation. Tags: pixar, fun"
    assert items.loc[2, "text"] == "Genres: Adventure, Children. Tags: board game"
    assert items.loc[3, ["title", "category", "text"]].tolist() == ["NA", "unknown", "Genres: none."]
    assert items.loc[1, "category"] == "Adventure"
    assert items.loc[1, "image_uri"] == str((tmp_path / "ml" / "posters" / "1.jpg").absolute())
    assert items[["image_uri"]].loc[[2, 3, 4]].isna().all().all()  # 2 unreadable, 3 and 4 without a poster
    assert (summary.images_ok, summary.images_unreadable, summary.images_missing) == (1, 1, 2)
    epoch = pd.Timestamp(0, tz="UTC")
    created = ((items["created_at"] - epoch).dt.total_seconds()).round().astype(int).to_dict()
    assert created == {1: 50, 2: 100, 3: 200, 4: 50}  # first rating, or the dataset start
    assert summary.skipped["tags_without_movie_or_text"] == 1


def test_movielens_bad_column_names_the_file(tmp_path):
    _movielens(tmp_path / "ml")
    ratings = pd.read_csv(tmp_path / "ml" / "ratings.csv")
    ratings.assign(movieId=["1", "2", "x", "3", "3"]).to_csv(tmp_path / "ml" / "ratings.csv", index=False)
    events, catalogue = load_movielens(tmp_path / "ml")
    with pytest.raises(IngestError, match=r"ratings\.csv: column 'item_id' \(from 'movieId'\): 1 of 5 rows"):
        ingest(events, catalogue, Workspace(tmp_path / "ws"))
    (tmp_path / "ml" / "movies.csv").write_text("movieId,name\n1,x\n")
    with pytest.raises(IngestError, match=r"movies\.csv: missing 1 required column\(s\): title"):
        load_movielens(tmp_path / "ml")


def test_sasrec_text(tmp_path):
    path = tmp_path / "Games.txt"
    path.write_text("1 5\n1 3\n1 5\n2 3\n\n2 7\n")
    events, catalogue = load_sasrec_text(path)
    ws = Workspace(tmp_path / "ws")
    summary = ingest(events, catalogue, ws, IngestConfig(max_len=2, sequences="snapshots"))
    ev = _read(ws.events)
    assert list(zip(ev.user_id, ev.item_id, strict=True)) == [(1, 5), (1, 3), (1, 5), (2, 3), (2, 7)]
    base = readers.SASREC_BASE_TIME
    assert ev.event_timestamp.tolist() == [base + pd.Timedelta(seconds=k) for k in range(5)]
    items = _read(ws.items)
    assert items.item_id.tolist() == [3, 5, 7] and items.title.tolist() == ["item 3", "item 5", "item 7"]
    assert set(items.category) == {"unknown"} and items.image_uri.isna().all()
    assert (items.created_at == base).all() and summary.users == 2
    seq = _read(ws.sequences)
    assert [list(x) for x in seq.item_ids] == [[5], [5, 3], [3, 5], [3], [3, 7]]
    path.write_text("1 5\n1 x\n2\n")
    with pytest.raises(IngestError, match=r"Games\.txt: column 'item' \(field 2\): 1 of 3 lines"):
        load_sasrec_text(path)
    path.write_text("1 5\n1 x\n")
    with pytest.raises(
        IngestError, match=r"Games\.txt: column 'item' \(field 2\): 1 of 2 rows are not integer"
    ):
        load_sasrec_text(path)


def test_cli_main_and_help(tmp_path, capsys):
    ev, cat = _write(tmp_path, _events(), _catalogue())
    assert ing.main(["--events", str(ev), "--catalogue", str(cat), "--workdir", str(tmp_path / "ws")]) == 0
    assert "6 kept" in capsys.readouterr().out
    assert Workspace(tmp_path / "ws").sequences.is_file()
    with pytest.raises(SystemExit) as done:
        ing.main(["--help"])
    assert done.value.code == 0 and "--max-len" in capsys.readouterr().out
    with pytest.raises(SystemExit) as failed:
        ing.main(["--format", "movielens", "--workdir", str(tmp_path / "ws")])
    assert failed.value.code == 2 and "needs --data" in capsys.readouterr().err


def test_logged_events_fold_into_events_and_sequences_once(tmp_path):
    """Issue 18: what /v1/events accepted (the event log, serving/events.py) joins the offline events the
    next training reads, each log file once; events on items the catalogue lacks are left out and counted;
    a partial (hidden) file is skipped."""
    from datetime import UTC, datetime

    from serving.events import LoggedEvent, event_log

    ws = Workspace(tmp_path / "ws")
    ingest(_events(), _catalogue(), ws, IngestConfig(max_len=3))
    before = _read(ws.events)
    log = event_log(str(ws.events_log), flush_s=0.01)
    t = datetime(2024, 3, 3, 9, tzinfo=UTC)
    log.record(LoggedEvent(2, 12, t, "purchase", "req-1", 3))
    log.record(LoggedEvent(2, 11, t.replace(hour=10), "click", "req-2", 1))
    log.record(LoggedEvent(1, 99, t, "click", None, None))  # not in the catalogue (yet)
    log.close()
    hour = next(ws.events_log.glob("hour=*"))
    (hour / ".part-crashed-000001.parquet.tmp").write_bytes(b"PAR1 half")
    out = fold_logged(ws)
    assert out["events_added"] == 2 and out["unknown_items_left_out"] == 1 and out["log_files"] == 2
    events = _read(ws.events)
    assert len(events) == len(before) + 2 and events.event_timestamp.is_monotonic_increasing
    assert events.iloc[-2:][["user_id", "item_id", "event_type"]].values.tolist() == [
        [2, 12, "purchase"],
        [2, 11, "click"],
    ]
    seq = _read(ws.sequences)
    assert list(seq[seq.user_id == 2].item_ids.iloc[-1]) == [13, 12, 11]  # the online sequence's source
    assert len(seq) == 2 and sequence_layout(ws.sequences) == ("latest", 3)  # the layout and N are kept
    again = fold_logged(ws)
    assert again["events_added"] == 0 and again["log_files"] == 0 and len(_read(ws.events)) == len(events)
    # the CLI: `vlmrec ingest --logged`
    later = event_log(str(ws.events_log), flush_s=0.01)
    later.record(LoggedEvent(1, 13, t.replace(hour=11), "add_to_cart", "req-3", 2))
    later.close()
    assert ing.main(["--logged", "--workdir", str(ws.root), "--max-len", "3"]) == 0
    assert len(_read(ws.events)) == len(events) + 1
