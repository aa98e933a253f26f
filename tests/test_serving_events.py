"""serving/events.py: clicks merged into the online sequence by time and confirmed, on sqlite and on a real
redis-server (whose Feast store skips a write not newer than the row it holds).

No Ray here: the write path is called as the /v1/events route calls it (ClickWriter.append in threads).
The world is tests/producer_world.py's (its users 1..6 have materialized sequences with click times).
"""

from __future__ import annotations

import random
import shutil
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pandas as pd
import pytest

from serving.events import (
    Clicks,
    ClickWriter,
    Refused,
    append_click,
    check_event_time,
    click_rows,
    from_us,
    merge,
    read_clicks,
    to_us,
    transient,
)
from tests.producer_world import FIRST_ID, N_ITEMS, SNAP_LEN, T0, World, write_world
from vlmrec.features import (
    PUSH_SOURCE,
    SEQUENCE_VIEW,
    FeaturesConfig,
    apply_and_materialize,
    online_sequences,
    open_store,
)

N = 24  # the sequence length the pushes keep
NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def item(k: int) -> int:
    return FIRST_ID + k % N_ITEMS


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return write_world(tmp_path_factory.mktemp("events"))


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store(request, world, tmp_path_factory):
    """The world's feature store on sqlite, or on a real redis-server (its own db number)."""
    if request.param == "sqlite":
        yield open_store(world.ws)
        return
    redis_url = request.getfixturevalue("redis_url")
    mp = pytest.MonkeyPatch()
    mp.setenv("REDIS_CONNECTION_STRING", f"{redis_url},db=7")
    ws = replace(world.ws, root=tmp_path_factory.mktemp("events-redis") / "ws")
    shutil.copytree(world.ws.root, ws.root)
    apply_and_materialize(ws, FeaturesConfig(online_store="redis"))
    yield open_store(ws)
    mp.undo()


# -------------------------------------------------------------------------------------- pure parts


def test_merge_places_a_click_by_time_and_always_writes_a_newer_row():
    t = [to_us(NOW + timedelta(minutes=m)) for m in (0, 10, 20)]
    stored = Clicks([1, 2, 3], t, from_us(t[-1]))
    late = merge(stored, 9, NOW + timedelta(minutes=5), 10)
    assert late.item_ids == [1, 9, 2, 3] and late.times == sorted(late.times)
    assert late.row_ts == stored.row_ts + timedelta(microseconds=1), "newer than the stored row"
    same = merge(stored, 9, NOW + timedelta(minutes=10), 10)
    assert same.item_ids == [1, 2, 9, 3], "an equal time goes after the stored click"
    new = merge(stored, 9, NOW + timedelta(minutes=30), 10)
    assert new.item_ids == [1, 2, 3, 9] and new.row_ts == NOW + timedelta(minutes=30)
    assert merge(stored, 9, NOW + timedelta(minutes=1), 3).item_ids == [9, 2, 3], "the oldest falls off"
    with pytest.raises(Refused, match="older than all of the user's last 3 clicks"):
        merge(stored, 9, NOW - timedelta(minutes=1), 3)
    first = merge(Clicks([], [], None), 9, NOW, 3)
    assert first == Clicks([9], [to_us(NOW)], NOW)


def test_event_time_bounds():
    earliest = datetime(2000, 1, 1, tzinfo=UTC)
    assert check_event_time(datetime(2026, 1, 15, 12, 0), earliest, 300, NOW) == NOW, "naive is UTC"
    for bad, why in (
        (datetime(1, 1, 1, tzinfo=UTC), "before the earliest"),
        (datetime(9999, 12, 31, tzinfo=UTC), "in the future"),
        (NOW + timedelta(seconds=301), "in the future"),
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))), "out of the range of times in UTC"),
        (datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))), "out of the range of times"),
    ):
        with pytest.raises(ValueError, match=why):
            check_event_time(bad, earliest, 300, NOW)
    assert check_event_time(NOW + timedelta(seconds=299), earliest, 300, NOW)


def test_only_transient_push_errors_are_retryable():
    import sqlite3

    assert transient(TimeoutError()) and transient(ConnectionError()) and transient(OSError())
    assert transient(sqlite3.OperationalError("database is locked"))
    assert not transient(ValueError("out of bounds")) and not transient(OverflowError())
    assert not transient(Refused("too old"))


# ------------------------------------------------------------------------------ sqlite and real Redis


def stored_times(store, user: int) -> list[datetime]:
    return [from_us(t) for t in read_clicks(store, user).times]


def test_a_late_click_is_merged_by_time_not_lost(world, store):
    """Issue 16: on Redis a click stamped 10 minutes before the user's last was answered 200 and never
    stored. Now it lands where it happened, and the read-back proves it."""
    u = 1
    history = world.history(u)
    last = world.events[world.events.user_id == u].event_timestamp.max()
    late_ts = (last - pd.Timedelta(minutes=10)).to_pydatetime()
    seq = append_click(store, u, item(33), late_ts, N)
    assert seq == [*history[:-1], item(33), history[-1]]
    assert online_sequences(store, [u])[u] == seq, "what the producers read"
    assert stored_times(store, u) == sorted(stored_times(store, u))


def test_a_far_future_click_does_not_swallow_later_ones(world, store):
    """Issue 16: after one click stamped in year 9999, every later click of the user was answered 200 and
    dropped on Redis (the route now refuses such a time: test_serving; the store path keeps order anyway)."""
    u = 2
    future = datetime(2090, 1, 1, tzinfo=UTC)
    append_click(store, u, item(1), future, N)
    seq = append_click(store, u, item(2), NOW, N)
    assert seq[-2:] == [item(2), item(1)] and online_sequences(store, [u])[u] == seq


def test_a_burst_of_out_of_order_clicks_ends_in_time_order(store):
    u = 10_001  # no stored row yet
    times = [NOW + timedelta(seconds=s) for s in range(40)]
    order = list(range(40))
    random.Random(0).shuffle(order)
    refused = 0
    for k in order:
        try:
            append_click(store, u, item(k), times[k], N)
        except Refused:  # older than all of the newest N already stored: said so, not lost silently
            refused += 1
    final = read_clicks(store, u)
    assert final.times == sorted(final.times) and len(final.item_ids) == N
    assert final.item_ids == [item(k) for k in range(40 - N, 40)], "the N newest, in time order"
    accepted = 40 - refused
    assert accepted >= N and refused == sum(
        1 for j, k in enumerate(order) if sum(1 for x in order[:j] if x > k) >= N
    ), "refused exactly the clicks older than N already stored"


def test_concurrent_writers_lose_nothing(store):
    u, writer = 10_002, ClickWriter()
    clicks = list(range(20))
    times = {k: NOW + timedelta(milliseconds=137 * k) for k in clicks}
    random.Random(1).shuffle(clicks)
    errors: list[BaseException] = []

    def click(k):
        try:
            writer.append(store, u, item(k), times[k], N)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(k,)) for k in clicks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = read_clicks(store, u)
    assert final.item_ids == [item(k) for k in range(20)], "every click, in time order"


def test_same_instant_clicks_are_both_kept(store):
    """Redis skips a write at the same instant as the row it holds: the second row is written 1 us later
    (the sqlite store keeps row times to the second only, and overwrites anyway)."""
    u = 10_003
    append_click(store, u, item(5), NOW, N)
    assert append_click(store, u, item(6), NOW, N) == [item(5), item(6)]
    if store.config.online_store.type == "redis":
        assert read_clicks(store, u).row_ts == NOW + timedelta(microseconds=1)


def test_the_direct_write_stores_the_row_feasts_push_stores(store):
    """ClickRows.write (the online store's own write on the view click_push feeds) against Feast's push of
    the same clicks: the same stored values and row timestamp, through Feast's own read too."""
    from feast.data_source import PushMode

    clicks = Clicks([item(1), item(2)], [to_us(NOW), to_us(NOW) + 7], NOW + timedelta(microseconds=7))
    pushed, written = 10_004, 10_005
    frame = pd.DataFrame(
        {
            "user_id": [pushed],
            "event_timestamp": [pd.Timestamp(clicks.row_ts)],
            "item_ids": [clicks.item_ids],
            "click_times": [clicks.times],
        }
    )
    store.push(PUSH_SOURCE, frame, to=PushMode.ONLINE)
    click_rows(store).write(written, clicks)
    assert read_clicks(store, pushed) == read_clicks(store, written)
    assert read_clicks(store, written).item_ids == clicks.item_ids
    features = [f"{SEQUENCE_VIEW}:item_ids", f"{SEQUENCE_VIEW}:click_times"]
    both = store.get_online_features(features, [{"user_id": pushed}, {"user_id": written}]).to_dict()
    assert both["item_ids"][0] == both["item_ids"][1] == clicks.item_ids
    assert both["click_times"][0] == both["click_times"][1] == clicks.times


def test_materialized_rows_carry_click_times(world, store):
    u = 3
    e = world.events[world.events.user_id == u].sort_values("event_timestamp").tail(SNAP_LEN)
    clicks = read_clicks(store, u)
    assert clicks.item_ids == e.item_id.tolist()
    assert clicks.times == [t.value // 1000 for t in e.event_timestamp]
    assert clicks.row_ts == e.event_timestamp.max().to_pydatetime() and T0 < clicks.row_ts


def test_a_workspace_ingested_without_click_times_is_refused_saying_what_to_run(world, tmp_path):
    """Click times come from ingest: an older workspace gets one clear message, not a Feast error."""
    import pyarrow.parquet as pq

    from vlmrec.workspace import Workspace

    ws = Workspace(tmp_path / "old")
    shutil.copytree(world.ws.root, ws.root)
    pq.write_table(pq.read_table(ws.sequences).drop_columns(["click_times"]), ws.sequences)
    with pytest.raises(FileNotFoundError, match="no click_times column.*vlmrec ingest"):
        apply_and_materialize(ws)


def test_the_producers_sqlite_store_commits_without_an_fsync_each(world):
    """serving.online.open_online: WAL (kept in the file) and synchronous=NORMAL on the connection Feast uses,
    and a click still goes in and reads back through it."""
    from serving.online import open_online

    store = open_online(world.ws)
    conn = store._get_provider().online_store._get_conn(store.config)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    user = 3
    before = read_clicks(store, user).item_ids
    seq = append_click(store, user, item(5), NOW, N)
    assert seq == (before + [item(5)])[-N:]  # the newest click, at the end
    assert read_clicks(open_store(world.ws), user).item_ids == seq  # another connection reads it
