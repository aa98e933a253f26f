"""training/new_items.py: cold-start vectors for catalogue items a trained export never saw, and the chain the
catalogue CronJob runs after `vlmrec embed` (new item vectors -> `vlmrec index upsert` into the served alias).

A tiny SeqRec with random weights is saved as an export here; the index is qdrant-client's local mode (the
server code path the Kubernetes deployment uses).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from index.build import build_index, upsert_items
from index.config import IndexConfig
from index.search import open_index
from training.config import ModelConfig
from training.data import ItemTable
from training.model import SeqRec
from training.new_items import NewItemsConfig, main, new_item_vectors, run
from vlmrec.workspace import Workspace

pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]

D, TEACHER = 16, "minilm:test"
KNOWN, NEW = np.arange(10, 40), np.arange(40, 45)  # the vocabulary, and 5 items added after training


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_embeddings(ws: Workspace, ids: np.ndarray, teacher: np.ndarray, teacher_id: str = TEACHER) -> None:
    ws.ensure()
    table = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "vector": pa.array(list(teacher), pa.list_(pa.float32())),
            "teacher_id": pa.array([teacher_id] * len(ids)),
        }
    )
    pq.write_table(table, ws.embeddings)


def export(ws: Workspace, teacher: np.ndarray, item_space: str = "adapter", run_name: str = "student"):
    """A trained-looking export of a random SeqRec over KNOWN (its vocabulary)."""
    torch.manual_seed(0)
    items = ItemTable(KNOWN, teacher[: len(KNOWN)])
    cfg = ModelConfig(
        n_items=len(KNOWN),
        teacher_dim=0 if item_space == "id" else D,
        item_space=item_space,
        d_model=8,
        max_len=4,
        adapter_hidden=8,
    )
    model = SeqRec(
        cfg,
        teacher=None if item_space == "id" else items.teacher_matrix(),
        item_ids=np.concatenate([[-1], KNOWN]),
    )
    out = ws.runs / run_name / "export"
    model.save_pretrained(out / "model")
    (out / "run.json").write_text(json.dumps({"teacher_id": TEACHER}))
    with torch.no_grad():
        vectors = model.item_vectors()[1:].numpy()
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(KNOWN, pa.int64()),
                "vector": pa.array(list(vectors), pa.list_(pa.float32())),
                "teacher_id": pa.array([TEACHER] * len(KNOWN)),
            }
        ),
        out / "item_vectors.parquet",
    )
    return model.eval(), out


@pytest.fixture
def world(tmp_path):
    ws = Workspace(tmp_path / "ws")
    teacher = unit(np.random.default_rng(0).normal(size=(len(KNOWN) + len(NEW), D)))
    write_embeddings(ws, np.concatenate([KNOWN, NEW]), teacher)
    model, out = export(ws, teacher)
    return ws, teacher, model, out


def test_new_items_get_the_models_content_vectors(world):
    ws, teacher, model, out = world
    table = new_item_vectors(out, ws.embeddings)
    assert table.column("item_id").to_pylist() == NEW.tolist()
    assert set(table.column("teacher_id").to_pylist()) == {TEACHER}
    got = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    with torch.no_grad():
        want = model.item_vectors_for(torch.from_numpy(teacher[len(KNOWN) :])).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_cronjob_chain_upserts_new_items_into_the_served_alias(world):
    """The catalogue CronJob: new item vectors -> index upsert; a user near a new item now finds it."""
    from qdrant_client import QdrantClient

    ws, _, _, out = world
    client = QdrantClient(":memory:")
    config = IndexConfig(backend="server", alias="items-student", url="http://unused")
    catalogue = pd.DataFrame(
        {
            "item_id": np.concatenate([KNOWN, NEW]),
            "title": "t",
            "category": "c",
            "created_at": pd.Timestamp("2026-01-01", tz="UTC"),
        }
    )
    build_index(out / "item_vectors.parquet", catalogue, None, config, client=client)
    path, n = run(NewItemsConfig(workdir=str(ws.root), run="student"))
    assert n == len(NEW) and path == ws.runs / "student" / "new_item_vectors.parquet"
    assert upsert_items(path, catalogue, None, config, client=client) == len(NEW)
    index = open_index(None, config, client=client)
    new_vectors = np.stack(pq.read_table(path).column("vector").to_numpy(zero_copy_only=False))
    (hits,) = index.search_batch(new_vectors[:1], 1)
    assert hits[0][0] == NEW[0] and index.count() == len(KNOWN) + len(NEW)

    # nothing new since: an empty table, and the upsert is a no-op rather than a failing CronJob
    write_embeddings(ws, KNOWN, unit(np.random.default_rng(1).normal(size=(len(KNOWN), D))))
    path, n = run(NewItemsConfig(workdir=str(ws.root), run="student"))
    assert n == 0 and pq.read_metadata(path).num_rows == 0
    assert upsert_items(path, catalogue, None, config, client=client) == 0
    assert index.count() == len(KNOWN) + len(NEW)


def test_bad_inputs_exit_2_naming_the_problem(world, tmp_path, capsys):
    ws, teacher, _, _ = world
    args = ["--workdir", str(ws.root), "--run", "student"]
    write_embeddings(ws, np.concatenate([KNOWN, NEW]), teacher, teacher_id="siglip:other")
    assert main(args) == 2
    assert "column teacher_id" in capsys.readouterr().err
    assert main(["--workdir", str(ws.root), "--run", "nope"]) == 2
    assert "no export" in capsys.readouterr().err
    id_ws = Workspace(tmp_path / "id")
    write_embeddings(id_ws, np.concatenate([KNOWN, NEW]), teacher)
    export(id_ws, teacher, item_space="id")
    assert main(["--workdir", str(id_ws.root)]) == 2
    assert "item_space 'id'" in capsys.readouterr().err
