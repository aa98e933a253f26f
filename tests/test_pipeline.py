"""The foundation end to end through the real entry points: sample -> ingest -> embed (Ray Data) -> features.

Also the skew test on ingested data: for the same user and time, the offline (point-in-time) sequence and
the online one are identical.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlmrec import schema
from vlmrec.cli import main as cli
from vlmrec.features import historical_sequences, online_sequences, open_store


def test_embed_writes_normalised_vectors_with_teacher_id(sample_workspace):
    ws = sample_workspace
    table = pq.read_table(ws.embeddings)
    assert table.schema.equals(schema.ITEM_EMBEDDINGS)
    items = pq.read_table(ws.items).to_pandas()
    assert table.column("item_id").to_pylist() == items["item_id"].tolist()
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    assert vectors.shape == (len(items), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    teacher_ids = set(table.column("teacher_id").to_pylist())
    assert len(teacher_ids) == 1 and next(iter(teacher_ids)).startswith("minilm:")


def test_features_cli_materializes_each_users_latest_sequence(sample_workspace):
    """`vlmrec features` on the default layout (a row per user): online, each user's last N clicks, the
    source table's row; a point-in-time read is refused (it needs per-event snapshots), not answered empty."""
    ws = sample_workspace
    assert cli(["features", "--workdir", str(ws.root)]) == 0
    store = open_store(ws)
    events = pq.read_table(ws.events).to_pandas()
    table = pq.read_table(ws.sequences).to_pandas()
    assert len(table) == events["user_id"].nunique()  # one row per user, not per event
    users = sorted(events["user_id"].unique())[:15]
    online = online_sequences(store, users)
    for u in users:
        expected = events[events.user_id == u]["item_id"].tolist()[-8:]
        assert online[u] == expected == list(table[table.user_id == u]["item_ids"].iloc[0]) and expected
    with pytest.raises(ValueError, match="--sequences snapshots"):
        historical_sequences(store, events.head(3))


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
