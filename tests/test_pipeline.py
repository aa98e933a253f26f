"""The foundation end to end through the real entry points: sample -> ingest -> embed (Ray Data) -> features.

Also the skew test on ingested data: for the same user and time, the offline (point-in-time) sequence and
the online one are identical.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlmrec import schema
from vlmrec.cli import main as cli
from vlmrec.embed import EmbedConfig, embed_catalogue
from vlmrec.features import historical_sequences, online_sequences, open_store
from vlmrec.ingest import IngestConfig, ingest
from vlmrec.sample import SampleConfig, generate_sample
from vlmrec.workspace import Workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("pipeline")
    paths = generate_sample(root / "raw", SampleConfig(seed=3, n_users=40, n_items=60, mean_events=12))
    ws = Workspace(root / "ws")
    ingest(paths.events, paths.catalogue, ws, IngestConfig(max_len=8))
    return ws


def test_embed_writes_normalised_vectors_with_teacher_id(workspace):
    report = embed_catalogue(workspace, EmbedConfig(batch_size=16, num_actors=1))
    table = pq.read_table(workspace.embeddings)
    assert table.schema.equals(schema.ITEM_EMBEDDINGS)
    items = pq.read_table(workspace.items).to_pandas()
    assert table.column("item_id").to_pylist() == items["item_id"].tolist()
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    assert vectors.shape == (len(items), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert set(table.column("teacher_id").to_pylist()) == {report["teacher_id"]}
    assert report["teacher_id"].startswith("minilm:")
    assert report["text_fallback"] == len(items)  # minilm is text-only: every item is embedded from text


def test_features_cli_then_offline_equals_online(workspace):
    if not workspace.embeddings.exists():
        embed_catalogue(workspace, EmbedConfig(batch_size=16))
    assert cli(["features", "--workdir", str(workspace.root)]) == 0
    store = open_store(workspace)
    events = pq.read_table(workspace.events).to_pandas()
    users = sorted(events["user_id"].unique())[:15]
    last = events[events.user_id.isin(users)].groupby("user_id")["event_timestamp"].max().reset_index()
    last["event_timestamp"] += pd.Timedelta(microseconds=1)  # just after the last click: "now"
    offline = historical_sequences(store, last)
    online = online_sequences(store, users)
    for u, seq in zip(offline["user_id"], offline["item_ids"], strict=True):
        assert seq == online[u] and len(seq) > 0
        expected = events[events.user_id == u]["item_id"].tolist()[-8:]
        assert seq == expected


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id\n1,2\n")
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("item_id,title\n2,shoe\n")
    code = cli(
        ["ingest", "--events", str(bad), "--catalogue", str(catalogue), "--workdir", str(tmp_path / "w")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "events.csv" in err and "event_timestamp" in err
    assert "Traceback" not in err
