"""The Feast repo: apply + materialize on sqlite and on a real Redis; offline and online paths agree."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pyarrow as pa
import pytest

from vlmrec import schema
from vlmrec.features import (
    STUDENT_SERVICE,
    FeaturesConfig,
    apply_and_materialize,
    historical_sequences,
    on_ray,
    online_sequences,
    open_store,
    per_store,
    sequence_reader,
    write_store_config,
)
from vlmrec.sequences import click_sequences, sequence_layout
from vlmrec.workspace import Workspace, atomic_write_parquet

T0 = pd.Timestamp("2024-03-01", tz="UTC")


def write_tables(
    ws: Workspace,
    n_users: int = 6,
    n_events: int = 7,
    max_len: int = 4,
    step: pd.Timedelta = pd.Timedelta(minutes=10),
    layout: str = "snapshots",
) -> pd.DataFrame:
    """Tiny events with their click sequences in `layout` (as ingest writes them), items and embeddings; a
    user's k-th click at T0 + k * step + u minutes."""
    rows = [
        (u, 100 + (u * 7 + k * 3) % 11, T0 + k * step + pd.Timedelta(minutes=u))
        for u in range(1, n_users + 1)
        for k in range(n_events)
    ]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp"])
    ordered = events.sort_values("event_timestamp", kind="stable").assign(event_type="click")
    atomic_write_parquet(pa.Table.from_pandas(ordered, schema=schema.EVENTS, preserve_index=False), ws.events)
    atomic_write_parquet(click_sequences(events, max_len, layout), ws.sequences)
    ids = list(range(100, 111))
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"item {i}" for i in ids],
            "text": [""] * len(ids),
            "category": ["a", "b"] * 5 + ["a"],
            "image_uri": [None] * len(ids),
            "created_at": [T0 - pd.Timedelta(days=1)] * len(ids),
            "event_timestamp": [T0 - pd.Timedelta(days=1)] * len(ids),
        }
    )
    atomic_write_parquet(pa.Table.from_pandas(items, schema=schema.ITEMS, preserve_index=False), ws.items)
    emb = pd.DataFrame(
        {
            "item_id": ids,
            "event_timestamp": items["event_timestamp"],
            "vector": [[float(i % 3), 1.0] for i in ids],
            "teacher_id": ["test:teacher"] * len(ids),
        }
    )
    atomic_write_parquet(
        pa.Table.from_pandas(emb, schema=schema.ITEM_EMBEDDINGS, preserve_index=False), ws.embeddings
    )
    return events


def check_store(ws: Workspace, events: pd.DataFrame, max_len: int = 4) -> None:
    store = open_store(ws)
    users = sorted(events["user_id"].unique())
    online = online_sequences(store, [*users, 999])
    assert online[999] == [], "an unknown user has an empty sequence"
    # the direct online_read is Feast's own online path: the same sequences as get_online_features
    resp = store.get_online_features(
        features=store.get_feature_service(STUDENT_SERVICE),
        entity_rows=[{"user_id": int(u)} for u in [*users, 999]],
    ).to_dict()
    assert online == {int(u): list(v or []) for u, v in zip(resp["user_id"], resp["item_ids"], strict=True)}
    assert sequence_reader(store) is sequence_reader(store), "one reader per store, its view resolved once"
    for u in users:  # each user's last max_len clicks
        assert (
            online[u]
            == events[events.user_id == u].sort_values("event_timestamp")["item_id"].tolist()[-max_len:]
        )
    if sequence_layout(ws.sequences)[0] == "latest":  # a point-in-time join needs the per-event snapshots
        with pytest.raises(ValueError, match="--sequences snapshots"):
            historical_sequences(store, events)
        return
    # The skew test: for the same user and time ("now", after their last click) offline == online.
    last = events.groupby("user_id")["event_timestamp"].max().reset_index()
    last["event_timestamp"] += pd.Timedelta(seconds=1)
    offline = historical_sequences(store, last)
    for u, seq in zip(offline["user_id"], offline["item_ids"], strict=True):
        assert seq == online[u]
        expected = events[events.user_id == u].sort_values("event_timestamp")["item_id"].tolist()[-max_len:]
        assert seq == expected
    # No leakage: the sequence fetched for an event holds only strictly earlier clicks, never the event itself.
    got = historical_sequences(store, events)
    for row in got.itertuples():
        earlier = events[(events.user_id == row.user_id) & (events.event_timestamp < row.event_timestamp)]
        assert row.item_ids == earlier.sort_values("event_timestamp")["item_id"].tolist()[-max_len:]


def test_per_store_makes_one_object_per_store_and_drops_it_with_the_store():
    class Store:  # a FeatureStore stands for any weak-referenceable object here
        pass

    made = []
    of = per_store(lambda store: made.append(object()) or made[-1])
    a, b = Store(), Store()
    assert of(a) is of(a) and of(b) is not of(a) and len(made) == 2
    with ThreadPoolExecutor(8) as pool:  # concurrent first uses make it once
        c = Store()
        assert len({id(x) for x in pool.map(lambda _: of(c), range(64))}) == 1 and len(made) == 3
    gone = weakref.ref(a)
    del a
    gc.collect()
    assert gone() is None, "the cache does not keep a store alive"


def test_a_stores_sequence_reader_does_not_keep_it_alive(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    write_tables(ws)
    apply_and_materialize(ws)
    store = open_store(ws)
    assert online_sequences(store, [1])[1]
    gone = weakref.ref(store)
    del store
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("layout", ["latest", "snapshots"])
def test_sqlite_apply_materialize_and_offline_online_agree(tmp_path, layout):
    ws = Workspace(tmp_path / "ws").ensure()
    events = write_tables(ws, layout=layout)
    report = apply_and_materialize(ws)
    assert set(report["views"]) == {"user_click_sequence", "item_metadata", "item_embedding"}
    check_store(ws, events)
    store = open_store(ws)
    meta = store.get_online_features(
        features=store.get_feature_service("item_catalog_v1"), entity_rows=[{"item_id": 101}]
    ).to_dict()
    assert meta["title"] == ["item 101"]
    vec = store.get_online_features(
        features=store.get_feature_service("item_vectors_v1"), entity_rows=[{"item_id": 101}]
    ).to_dict()
    assert vec["teacher_id"] == ["test:teacher"] and vec["vector"][0] == pytest.approx([2.0, 1.0])


def test_redis_online_store_agrees(tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv("REDIS_CONNECTION_STRING", redis_url)
    ws = Workspace(tmp_path / "ws").ensure()
    events = write_tables(ws)
    report = apply_and_materialize(ws, FeaturesConfig(online_store="redis"))
    assert report["online_store"] == "redis"
    assert "redis" in ws.feature_store_yaml.read_text()
    check_store(ws, events)


def test_ray_offline_store_and_engine_agree(tmp_path, ray_local):
    """Issue 20: with Feast's Ray offline store and compute engine, the point-in-time join and the
    materialization are Ray Data work, and give what the file store gives (every check of check_store)."""
    from ray.data.context import DataContext

    ws = Workspace(tmp_path / "ws").ensure()
    events = write_tables(ws)
    settings = ("enable_tensor_extension_casting", "shuffle_strategy", "target_max_block_size")
    before = [getattr(DataContext.get_current(), name) for name in settings]
    report = apply_and_materialize(ws, FeaturesConfig(offline_store="ray"))
    assert report["offline_store"] == "ray"
    text = ws.feature_store_yaml.read_text()
    assert "type: ray\n" in text and "type: ray.engine" in text and "--offline-store ray" in text
    assert on_ray(open_store(ws))
    check_store(ws, events)
    # Feast rewrites Ray Data's process-wide settings; they are put back (a later embed broke on them)
    assert [getattr(DataContext.get_current(), name) for name in settings] == before


def test_ray_offline_store_never_leaks_a_click_from_the_same_second(tmp_path, ray_local):
    """Feast's Ray store compares times in whole seconds (0.67): with every click of a user in one second
    (ingest separates same-second clicks by microseconds) `vlmrec features` refuses it, and where a store is
    configured so anyway, historical_sequences keeps only the clicks before each event: never the event
    itself or a later one."""
    ws = Workspace(tmp_path / "ws").ensure()
    events = write_tables(ws, step=pd.Timedelta(microseconds=1))
    with pytest.raises(ValueError, match="click more than once in one second"):  # it would serve stale ones
        apply_and_materialize(ws, FeaturesConfig(offline_store="ray"))
    apply_and_materialize(ws)  # the file store; then its joins on Ray (a feature_store.yaml written by hand)
    write_store_config(ws, FeaturesConfig(offline_store="ray"))
    got = historical_sequences(open_store(ws), events)
    shortened = 0
    for row in got.itertuples():
        earlier = events[(events.user_id == row.user_id) & (events.event_timestamp < row.event_timestamp)]
        history = earlier.sort_values("event_timestamp")["item_id"].tolist()[-4:]
        assert (
            len(row.item_ids) <= len(history) and row.item_ids == history[len(history) - len(row.item_ids) :]
        )
        shortened += len(row.item_ids) < len(history)
    assert shortened > 0  # the burst does cost history (reported in docs/BENCHMARKS.md), never a leak


def test_unknown_stores_are_refused():
    with pytest.raises(ValueError, match="online_store"):
        FeaturesConfig(online_store="cassandra")
    with pytest.raises(ValueError, match="offline_store"):
        FeaturesConfig(offline_store="spark")


def test_missing_sources_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlmrec ingest"):
        apply_and_materialize(Workspace(tmp_path / "empty").ensure())


@pytest.mark.parametrize("layout", ["latest", "snapshots"])
def test_until_materializes_the_online_store_as_of_a_time(tmp_path, layout):
    """`vlmrec features --until T` (a replay's starting point): each user's online sequence is the one
    they had at T (snapshots: the same as the offline point-in-time read at T; latest: built from the
    events and pushed), and a later `vlmrec features` brings every user up to their last click."""
    ws = Workspace(tmp_path / "ws").ensure()
    events = write_tables(ws, layout=layout)
    cut = T0 + pd.Timedelta(minutes=35)  # mid-history: users have 3 or 4 of their 7 clicks
    apply_and_materialize(ws, FeaturesConfig(until=cut.isoformat()))
    users = sorted(events["user_id"].unique())
    online = online_sequences(open_store(ws), users)
    for u in users:
        before = events[(events.user_id == u) & (events.event_timestamp <= cut)]["item_id"].tolist()[-4:]
        assert online[u] == before and 0 < len(before) < 7
    if layout == "snapshots":
        at_cut = pd.DataFrame({"user_id": users, "event_timestamp": cut + pd.Timedelta(microseconds=1)})
        offline = historical_sequences(open_store(ws), at_cut)
        assert dict(zip(offline["user_id"], offline["item_ids"], strict=True)) == online
    apply_and_materialize(ws)
    check_store(ws, events)
    with pytest.raises(ValueError, match="until"):
        FeaturesConfig(until="yesterday")


def test_small_write_batches_materialize_and_push_every_row(tmp_path):
    """`--write-batch`: Feast converts and writes a view a bounded number of rows at a time (a million items'
    vectors do not fit one batch), and a replay's push goes in the same batches; every row still arrives."""
    ws = Workspace(tmp_path / "ws").ensure()
    events = write_tables(ws, layout="latest")
    config = FeaturesConfig(write_batch=2)  # 6 users and 11 items: 3 and 6 batches
    apply_and_materialize(ws, config)
    store = open_store(ws)
    assert store.config.materialization_config.online_write_batch_size == 2
    check_store(ws, events)
    ids = list(range(100, 111))
    vec = store.get_online_features(
        features=store.get_feature_service("item_vectors_v1"), entity_rows=[{"item_id": i} for i in ids]
    ).to_dict()
    assert vec["vector"] == [pytest.approx([float(i % 3), 1.0]) for i in ids]
    cut = T0 + pd.Timedelta(minutes=35)
    apply_and_materialize(ws, FeaturesConfig(until=cut.isoformat(), write_batch=2))
    online = online_sequences(open_store(ws), sorted(events["user_id"].unique()))
    for u, seq in online.items():
        assert seq == events[(events.user_id == u) & (events.event_timestamp <= cut)]["item_id"].tolist()[-4:]
    with pytest.raises(ValueError, match="write_batch"):
        FeaturesConfig(write_batch=0)


def test_a_fresh_process_opens_and_reads_the_store_with_feasts_argument_checks_off(tmp_path):
    """open_store imports Feast as `python -O` would for typeguard (vlmrec.features.feast_unchecked): its
    @typechecked classes are left as written, not re-compiled with checks, and the store still reads."""
    import subprocess
    import sys

    ws = Workspace(tmp_path / "ws").ensure()
    write_tables(ws)
    apply_and_materialize(ws)
    probe = (
        "import sys\n"
        "from vlmrec.features import online_sequences, open_store\n"
        "from vlmrec.workspace import Workspace\n"
        "store = open_store(Workspace(sys.argv[1]))\n"
        "import feast\n"
        "names = feast.FeatureView.__init__.__code__.co_names + feast.Entity.__init__.__code__.co_names\n"
        "print(sorted(n for n in names if 'check' in n.lower()), online_sequences(store, [1])[1])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(ws.root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    checks, clicks = done.stdout.strip().split(" ", 1)
    assert checks == "[]", done.stdout  # instrumented code calls typeguard's check_argument_types_internal
    assert clicks == str(online_sequences(open_store(ws), [1])[1])
