"""A tiny world with every producer, shared by test_serving.py and test_ui.py.

A Feast sqlite store, events, a random student SeqRec export (adapter space) with its cosine index, a random
id-space sibling (`sasrec`) with its dot-product index, the raw teacher vectors' index (`similar`) and a
small PNG per item. No training job: exports are laid out the way training/train.py writes them. Numpy
references (`exact_top`, `sasrec_top`, `similar_top`, `popular_top`) say what each producer must return.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image

from index.build import build_index
from index.config import IndexConfig
from serving.config import ProducerConfig
from training.config import ModelConfig
from training.data import ItemTable, build_inputs
from training.model import SeqRec
from vlmrec import schema
from vlmrec.features import apply_and_materialize
from vlmrec.sequences import click_sequences
from vlmrec.workspace import TEACHER_INDEX, Workspace, atomic_write_parquet

D, N_ITEMS, FIRST_ID = 8, 40, 1000  # vocabulary: item ids 1000..1039
COLD_ID = FIRST_ID + N_ITEMS  # 1040: in the catalogue, not in the vocabulary or the index (yet)
SNAP_LEN, MAX_LEN = 8, 24  # ingest snapshot length; the model's max_len (= N of /v1/events)
TEACHER = "test:teacher"
T0 = pd.Timestamp("2024-03-01", tz="UTC")
USERS = range(1, 7)
UNKNOWN_USER = 424242


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def category(i: int) -> str:
    return "a" if i % 2 == 0 else "b"


def available(i: int) -> bool:
    return i % 5 != 0


@dataclass(frozen=True)
class World:
    ws: Workspace
    export: Path
    model: SeqRec
    vocab: ItemTable
    item_vectors: np.ndarray  # (N_ITEMS, D) what the index holds, row k = vocab.item_ids[k]
    events: pd.DataFrame
    popular: list[int]  # item ids, most popular first
    config: ProducerConfig
    sasrec: SeqRec  # the id-space sibling (runs/sasrec/export, indexes/sasrec: dot product)
    sasrec_vectors: np.ndarray  # (N_ITEMS, 16) its id embeddings, row k = vocab.item_ids[k]
    teacher: np.ndarray  # (N_ITEMS, D) unit teacher vectors (indexes/teacher), row k = vocab.item_ids[k]

    def sasrec_top(self, seq, k, exclude=()) -> list[int]:
        """numpy's exact top-k by the dot product of the id model's user vector and id embeddings."""
        ids = torch.as_tensor(build_inputs([seq], self.vocab, MAX_LEN).ids)
        with torch.no_grad():
            user = self.sasrec.user_vector(ids)[0].numpy()
        scores = np.where(np.isin(self.vocab.item_ids, list(exclude)), -np.inf, self.sasrec_vectors @ user)
        return self.vocab.item_ids[np.argsort(-scores, kind="stable")[:k]].tolist()

    def similar_top(self, seq, k, last_n, exclude=()) -> list[int]:
        """Each item's best cosine to any of the last `last_n` distinct clicks, best first."""
        last = list(dict.fromkeys(reversed(seq)))[:last_n]
        rows = self.vocab.index_of(last) - 1
        best = (self.teacher[rows] @ self.teacher.T).max(0)  # (N_ITEMS,)
        best = np.where(np.isin(self.vocab.item_ids, list(exclude)), -np.inf, best)
        return self.vocab.item_ids[np.argsort(-best, kind="stable")[:k]].tolist()

    def popular_top(self, k, exclude=(), half_life_days=7.0) -> list[int]:
        """Recency-weighted counts of the events table (weight halves every half_life_days)."""
        age = (self.events.event_timestamp.max() - self.events.event_timestamp).dt.total_seconds() / 86400
        score = (0.5 ** (age / half_life_days)).groupby(self.events.item_id).sum()
        ranked = sorted(score.index, key=lambda i: (-score[i], i))
        return [int(i) for i in ranked if i not in set(exclude)][:k]

    def history(self, user: int) -> list[int]:
        e = self.events[self.events.user_id == user].sort_values("event_timestamp")
        return e["item_id"].tolist()[-SNAP_LEN:]

    def exact_top(self, seq, k, exclude=(), mask=None) -> tuple[list[int], np.ndarray]:
        """numpy's exact top-k of the user vector against every item vector."""
        ids = torch.as_tensor(build_inputs([seq], self.vocab, MAX_LEN).ids)
        with torch.no_grad():
            user = self.model.user_vector(ids)[0].numpy()  # (D,)
        scores = self.item_vectors @ user  # (N_ITEMS,) both unit norm: cosine
        keep = ~np.isin(self.vocab.item_ids, list(exclude))
        if mask is not None:
            keep &= mask
        scores = np.where(keep, scores, -np.inf)
        top = np.argsort(-scores, kind="stable")[:k]
        top = top[np.isfinite(scores[top])]
        return self.vocab.item_ids[top].tolist(), scores[top]


def write_world(root: Path) -> World:
    ws = Workspace(root / "ws").ensure()
    rows = [
        (u, FIRST_ID + (u * 7 + k * 3) % N_ITEMS, T0 + pd.Timedelta(minutes=10 * k + u))
        for u in USERS
        for k in range(7)
    ]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp"])
    events["event_type"] = "click"
    atomic_write_parquet(pa.Table.from_pandas(events, schema=schema.EVENTS, preserve_index=False), ws.events)
    atomic_write_parquet(click_sequences(events, SNAP_LEN, "snapshots"), ws.sequences)  # Feast's joins too
    ids = np.arange(FIRST_ID, COLD_ID + 1)  # the catalogue holds the cold item too
    images = root / "images"  # one small PNG per item, as the sample data draws them
    images.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (24, 24), (40 + 5 * (i % 40), 90, 160 if category(i) == "a" else 60)).save(
            images / f"{i}.png"
        )
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"item {i}" for i in ids],
            "text": "",
            "category": [category(i) for i in ids],
            "image_uri": [str(images / f"{i}.png") for i in ids],
            "created_at": T0 - pd.Timedelta(days=1),
            "event_timestamp": T0 - pd.Timedelta(days=1),
        }
    )
    atomic_write_parquet(pa.Table.from_pandas(items, schema=schema.ITEMS, preserve_index=False), ws.items)
    vocab_ids = ids[:N_ITEMS]
    teacher = np.random.default_rng(0).normal(size=(N_ITEMS, D)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    emb = pd.DataFrame(
        {
            "item_id": vocab_ids,
            "event_timestamp": T0 - pd.Timedelta(days=1),
            "vector": list(teacher),
            "teacher_id": TEACHER,
        }
    )
    atomic_write_parquet(
        pa.Table.from_pandas(emb, schema=schema.ITEM_EMBEDDINGS, preserve_index=False), ws.embeddings
    )
    apply_and_materialize(ws)

    # the export, laid out as training/train.py writes it
    torch.manual_seed(0)
    vocab = ItemTable(vocab_ids, teacher)
    cfg = ModelConfig(
        n_items=N_ITEMS,
        teacher_dim=D,
        item_space="adapter",
        d_model=16,
        n_blocks=1,
        max_len=MAX_LEN,
        dropout=0.0,
    )
    model = SeqRec(cfg, teacher=vocab.teacher_matrix(), item_ids=np.concatenate([[-1], vocab_ids]))
    torch.nn.init.normal_(model.adapter[-1].weight, std=0.3)  # a non-identity item space
    export = ws.runs / "student" / "export"
    model.save_pretrained(export / "model")
    model = SeqRec.from_pretrained(export / "model")
    with torch.no_grad():
        vectors = model.item_vectors()[1:].numpy()  # (N_ITEMS, D)
    pd.DataFrame(
        {
            "item_id": vocab_ids,
            "vector": list(vectors),
            "teacher_id": TEACHER,
            "available": [available(i) for i in vocab_ids],
        }
    ).to_parquet(export / "item_vectors.parquet")
    counts = events["item_id"].value_counts()
    popular = sorted(counts.index.tolist(), key=lambda i: (-counts[i], i))
    (export / "popular.json").write_text(
        json.dumps([{"item_id": int(i), "score": float(counts[i])} for i in popular])
    )
    (export / "run.json").write_text(json.dumps({"name": "student", "teacher_id": TEACHER, "configs": {}}))
    build_index(export / "item_vectors.parquet", ws.items, ws, IndexConfig(quantization=False))

    # the behavioural sibling: an id-space SeqRec (dot product) with its own index, as `index build --run`
    torch.manual_seed(1)
    sasrec_cfg = ModelConfig(n_items=N_ITEMS, item_space="id", d_model=16, n_blocks=1, max_len=MAX_LEN)
    sasrec = SeqRec(sasrec_cfg, item_ids=np.concatenate([[-1], vocab_ids]))
    sasrec_export = ws.runs / "sasrec" / "export"
    sasrec.save_pretrained(sasrec_export / "model")
    sasrec = SeqRec.from_pretrained(sasrec_export / "model")
    with torch.no_grad():
        sasrec_vectors = sasrec.item_vectors()[1:].numpy()  # (N_ITEMS, 16) unnormalised id embeddings
    pd.DataFrame({"item_id": vocab_ids, "vector": list(sasrec_vectors), "teacher_id": TEACHER}).to_parquet(
        sasrec_export / "item_vectors.parquet"
    )
    (sasrec_export / "popular.json").write_text((export / "popular.json").read_text())
    (sasrec_export / "run.json").write_text(
        json.dumps({"name": "sasrec", "teacher_id": TEACHER, "configs": {"model": sasrec_cfg.to_dict()}})
    )
    build_index(
        sasrec_export / "item_vectors.parquet",
        ws.items,
        ws.named_index("sasrec"),
        IndexConfig(quantization=False, distance="dot"),
    )
    # the raw teacher vectors for `similar`, as `index build --teacher`
    build_index(ws.embeddings, ws.items, ws.named_index(TEACHER_INDEX), IndexConfig(quantization=False))
    config = ProducerConfig(
        workdir=str(ws.root), feature_timeout_s=5.0, search_timeout_s=5.0, refresh_interval_s=0.5
    )  # generous: this box is busy; the failure tests below use their own short timeouts
    return World(ws, export, model, vocab, vectors, events, popular, config, sasrec, sasrec_vectors, teacher)
