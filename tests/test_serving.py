"""serving/: the Producer on a tiny world (Feast sqlite store, a random SeqRec export, an Edge index).

No training job: a randomly initialised SeqRec is exported the way training/train.py lays out an export.
Ray Serve runs twice in this module, both module-scoped: a real `serve.run` over HTTP on 127.0.0.1 (a free
port), and local testing mode (in-process, so dependencies can be broken with monkeypatch).

Order matters, once: in Ray 2.60 a local-mode replica leaves a reference to itself (a BackPressureError
handler closure) on the ingress class's FastAPI app, and the class no longer pickles for a real deploy.
So every bind of the Producer (the `http` fixture, the CLI test) comes before the first local-mode test
in this file, and the `local` fixture depends on `http`.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from feast import FeatureStore

import index.search
import serving.producer as producer_mod
from index.build import build_index, upsert_items
from index.config import IndexConfig
from serving.config import ProducerConfig
from serving.producer import CandidatesRequest, EventRequest, producer_app, producer_input
from training.config import ModelConfig
from training.data import ItemTable, build_inputs
from training.model import SeqRec
from vlmrec import schema
from vlmrec.features import apply_and_materialize, historical_sequences, online_sequences, open_store
from vlmrec.workspace import TEACHER_INDEX, Workspace, atomic_write_parquet

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

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
    rows, seqs = [], []
    for u in USERS:
        history: list[int] = []
        for k in range(7):
            item = FIRST_ID + (u * 7 + k * 3) % N_ITEMS
            ts = T0 + pd.Timedelta(minutes=10 * k + u)
            history.append(item)
            rows.append((u, item, ts))
            seqs.append((u, ts, history[-SNAP_LEN:]))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp"])
    events["event_type"] = "click"
    atomic_write_parquet(pa.Table.from_pandas(events, schema=schema.EVENTS, preserve_index=False), ws.events)
    seq = pd.DataFrame(seqs, columns=["user_id", "event_timestamp", "item_ids"])
    atomic_write_parquet(
        pa.Table.from_pandas(seq, schema=schema.CLICK_SEQUENCES, preserve_index=False), ws.sequences
    )
    ids = np.arange(FIRST_ID, COLD_ID + 1)  # the catalogue holds the cold item too
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"item {i}" for i in ids],
            "text": "",
            "category": [category(i) for i in ids],
            "image_uri": None,
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


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return write_world(tmp_path_factory.mktemp("serving"))


def local_config(world: World) -> ProducerConfig:
    return replace(world.config, feature_timeout_s=1.0, search_timeout_s=1.0)


@pytest.fixture(scope="module")
def local(world, http):
    """The Producer in Serve's local testing mode: in-process, 1 s timeouts for the failure tests."""
    from ray import serve

    handle = serve.run(producer_app(local_config(world)), name="local", _local_testing_mode=True)
    deadline = time.monotonic() + 30  # local mode does not wait for reconfigure(): wait as a probe would
    while handle.readyz.remote().result().status_code != 200:
        assert time.monotonic() < deadline, "the local Producer never became ready"
        time.sleep(0.1)
    return handle


@pytest.fixture(scope="module")
def http(world, ray_local):
    """A real Serve deployment behind the HTTP proxy on 127.0.0.1:<free port>; an httpx client to it."""
    from serving.cli import start, stop

    url = start(world.config, port=free_port())
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client
    stop()


def call(handle, method: str, body) -> tuple[int, dict]:
    """A local-mode call of a route method -> (status, JSON body)."""
    resp = getattr(handle, method).remote(body).result()
    return resp.status_code, json.loads(resp.body)


def ids_of(body: dict) -> list[int]:
    return [c["item_id"] for c in body["candidates"]]


def scores_of(body: dict) -> np.ndarray:
    return np.array([c["score"] for c in body["candidates"]])


# ------------------------------------------------------------------------------------- correctness


def test_http_candidates_exact_with_filters_and_seen(world, http):
    u = 2
    seen = world.history(u)
    r = http.post("/v1/candidates", json={"user_id": u, "k": 5})
    assert r.status_code == 200, r.text
    assert ids_of(r.json()) == world.exact_top(seen, 5, exclude=seen)[0]

    r = http.post(
        "/v1/candidates", json={"user_id": u, "k": 50, "filters": {"category": "a", "available": True}}
    )
    mask = np.array([category(i) == "a" and available(i) for i in world.vocab.item_ids])
    assert ids_of(r.json()) == world.exact_top(seen, 50, exclude=seen, mask=mask)[0]
    assert any("only" in w for w in r.json()["warnings"]), "fewer than k qualify: said so"

    r = http.post(
        "/v1/candidates",
        json={"user_id": u, "k": 5, "exclude_seen": False, "filters": {"category": ["a", "b"]}},
    )
    assert ids_of(r.json()) == world.exact_top(seen, 5)[0]

    recent = [FIRST_ID + 33, FIRST_ID + 34]  # appended after the stored sequence, and excluded
    r = http.post("/v1/candidates", json={"user_id": u, "k": 5, "recent_item_ids": recent})
    assert ids_of(r.json()) == world.exact_top(seen + recent, 5, exclude=seen + recent)[0]


def test_skew_online_input_equals_offline_input(world):
    """The Producer's model input (online store) == training's (point-in-time historical read)."""
    store = open_store(world.ws)
    last = world.events.groupby("user_id")["event_timestamp"].max().reset_index()
    last["event_timestamp"] += pd.Timedelta(seconds=1)
    offline = historical_sequences(store, last)
    recent = [FIRST_ID + 5, COLD_ID]  # the cold id is dropped on both paths
    for u, seq in zip(offline["user_id"], offline["item_ids"], strict=True):
        if u in (5, 6):  # the event tests push to these users' online sequences
            continue
        for extra in ([], recent):
            want = build_inputs([[*seq, *extra]], world.vocab, MAX_LEN).ids[0]
            np.testing.assert_array_equal(producer_input(store, u, extra, world.vocab, MAX_LEN), want)
            assert (want > 0).any()


def test_batch_equals_single_calls_in_order(world, http):
    reqs = [
        {"user_id": 1, "k": 7},
        {"user_id": UNKNOWN_USER, "k": 3},
        {"user_id": 3, "k": 4, "filters": {"category": "b"}},
        {"user_id": 1, "k": 5, "recent_item_ids": [FIRST_ID + 1], "exclude_seen": False},
    ]
    r = http.post("/v1/candidates:batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    batch = r.json()["responses"]
    assert len(batch) == len(reqs)
    for req, got in zip(reqs, batch, strict=True):
        single = http.post("/v1/candidates", json=req).json()
        assert ids_of(got) == ids_of(single) and got["fallback"] == single["fallback"]
        np.testing.assert_allclose(scores_of(got), scores_of(single), atol=1e-5)
    assert http.post("/v1/candidates:batch", json={"requests": []}).json() == {"responses": []}


# ---------------------------------------------------------------------------------- bad input, fallbacks

BAD = [
    ("/v1/candidates", {"user_id": 1, "k": 0}, "k"),
    ("/v1/candidates", {"user_id": 1, "k": 1001}, "k"),
    ("/v1/candidates", {"user_id": "abc"}, "user_id"),
    ("/v1/candidates", {"k": 5}, "user_id"),
    ("/v1/candidates", {"user_id": -1}, "user_id"),
    ("/v1/candidates", {"user_id": 1, "filters": {"category": 5}}, "filters.category"),
    ("/v1/candidates", {"user_id": 1, "filters": {"available": "maybe"}}, "filters.available"),
    ("/v1/candidates", {"user_id": 1, "filters": "a"}, "filters"),
    ("/v1/candidates", {"user_id": 1, "filters": {"colour": "red"}}, "filters.colour"),
    ("/v1/candidates", {"user_id": 1, "filters": {"category": []}}, "filters.category"),
    ("/v1/candidates", {"user_id": 1, "recent_item_ids": [1, "x"]}, "recent_item_ids.1"),
    ("/v1/candidates", {"user_id": 1, "kk": 5}, "kk"),
    ("/v1/candidates:batch", {"requests": [{"user_id": 1}, {"user_id": 1, "k": 0}]}, "requests.1.k"),
    ("/v1/candidates:batch", {"requests": {"user_id": 1}}, "requests"),
    ("/v1/events", {"user_id": 1, "item_id": "x"}, "item_id"),
    ("/v1/events", {"user_id": 1, "item_id": 99999}, "item_id"),  # well-typed but unknown
    ("/v1/events", {"item_id": FIRST_ID}, "user_id"),
    ("/v1/candidates", {"user_id": 1, "producer": "nope"}, "producer"),
    ("/v1/mix", {"user_id": 1, "quotas": {"nope": 1}}, "quotas.nope.[key]"),
    ("/v1/mix", {"user_id": 1, "quotas": {"student": 1}, "weights": {"student": 1}}, "quotas"),
    ("/v1/mix", {"user_id": 1, "k": 3, "quotas": {"student": 2}}, "k"),
    ("/v1/mix", {"user_id": 1, "quotas": {"student": -1}}, "quotas.student"),
    ("/v1/mix", {"user_id": 1, "weights": {"student": 0}}, "weights"),
    ("/v1/mix", {"user_id": 1, "budget_ms": 0}, "budget_ms"),
    ("/v1/mix", {"user_id": 1, "k": 1001}, "k"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD, ids=[f"{p}-{f}" for p, _, f in BAD])
def test_bad_input_is_422_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"] == "invalid_request" and f"{field}:" in err["message"], err
    assert "Traceback" not in r.text


def test_malformed_json_is_422(http):
    r = http.post("/v1/candidates", content=b'{"user_id": 1,', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_unknown_recent_ids_are_a_warning(world, http):
    r = http.post("/v1/candidates", json={"user_id": 1, "k": 5, "recent_item_ids": [COLD_ID, 999999]})
    assert r.status_code == 200 and r.json()["fallback"] is None
    (warning,) = [w for w in r.json()["warnings"] if w.startswith("recent_item_ids")]
    assert str(COLD_ID) in warning and "999999" in warning
    assert ids_of(r.json()) == world.exact_top(world.history(1), 5, exclude=world.history(1))[0]


def test_unknown_user_gets_popular_items(world, http):
    r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 5})
    assert r.status_code == 200 and r.json()["fallback"] == "unknown_user"
    assert ids_of(r.json()) == world.popular[:5]
    body = {
        "user_id": UNKNOWN_USER,
        "k": 4,
        "recent_item_ids": [COLD_ID, 999999],
        "filters": {"category": "b"},
    }
    r = http.post("/v1/candidates", json=body).json()  # recent ids unknown to the model: still no user vector
    assert r["fallback"] == "unknown_user"
    assert ids_of(r) == [i for i in world.popular if category(i) == "b"][:4]
    recent = world.popular[:2]  # known recent clicks are enough for a user vector
    r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 4, "recent_item_ids": recent}).json()
    assert r["fallback"] is None and ids_of(r) == world.exact_top(recent, 4, exclude=recent)[0]


# ------------------------------------------------------------------------------- sibling producers


def test_http_every_producer_answers_the_same_contract_exactly(world, http):
    """student (default), sasrec (dot product of id embeddings), similar (teacher neighbours of the last 3
    clicks) and popular (recency-weighted counts), each against numpy on the same user."""
    u, k = 2, 6
    seen = world.history(u)
    want = {
        "student": world.exact_top(seen, k, exclude=seen)[0],
        "sasrec": world.sasrec_top(seen, k, exclude=seen),
        "similar": world.similar_top(seen, k, last_n=3, exclude=seen),
        "popular": world.popular_top(k, exclude=seen),
    }
    for name, ids in want.items():
        r = http.post("/v1/candidates", json={"user_id": u, "k": k, "producer": name})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["producer"] == name and body["fallback"] is None and ids_of(body) == ids, name
        assert [c["rank"] for c in body["candidates"]] == list(range(1, k + 1))
        assert (body["index_version"] is None) == (name == "popular")
        assert set(body["timings_ms"]) == {"feature", "model", "search", "total"}
    assert http.post("/v1/candidates", json={"user_id": u, "k": k}).json()["producer"] == "student"
    r = http.post("/v1/candidates", json={"user_id": u, "k": 3, "producer": "sasrec"}).json()
    user = world.sasrec.user_vector(torch.as_tensor(build_inputs([seen], world.vocab, MAX_LEN).ids))[0]
    dots = world.sasrec_vectors[world.vocab.index_of(ids_of(r)) - 1] @ user.detach().numpy()
    np.testing.assert_allclose(scores_of(r), dots, rtol=1e-4)  # dot products, not cosines
    assert r["model_version"].startswith("sasrec@")
    r = http.post(
        "/v1/candidates", json={"user_id": u, "k": 4, "producer": "popular", "filters": {"category": "b"}}
    ).json()
    assert ids_of(r) == [i for i in world.popular_top(N_ITEMS, exclude=seen) if category(i) == "b"][:4]


def test_http_fallbacks_are_the_same_for_every_producer(world, http):
    for name, popular in (("sasrec", world.popular), ("similar", world.popular_top(N_ITEMS))):
        r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 4, "producer": name}).json()
        assert r["fallback"] == "unknown_user" and ids_of(r) == popular[:4], name
        recent = [FIRST_ID + 7, FIRST_ID + 9]  # known clicks are enough to personalise
        r = http.post(
            "/v1/candidates",
            json={"user_id": UNKNOWN_USER, "k": 4, "producer": name, "recent_item_ids": recent},
        ).json()
        assert r["fallback"] is None, name
    r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 4, "producer": "popular"}).json()
    assert r["fallback"] is None and ids_of(r) == world.popular_top(4)
    r = http.post(
        "/v1/candidates",
        json={"user_id": UNKNOWN_USER, "k": 3, "producer": "similar", "recent_item_ids": [COLD_ID]},
    ).json()  # a click the teacher index does not hold: named, then the same fallback
    assert r["fallback"] == "unknown_user" and any(str(COLD_ID) in w for w in r["warnings"])


def test_http_batch_mixes_producers_in_order(http):
    reqs = [{"user_id": 1, "k": 4, "producer": p} for p in ("similar", "student", "popular", "sasrec")]
    reqs.append({"user_id": 3, "k": 2, "producer": "similar", "filters": {"category": "a"}})
    batch = http.post("/v1/candidates:batch", json={"requests": reqs}).json()["responses"]
    for req, got in zip(reqs, batch, strict=True):
        single = http.post("/v1/candidates", json=req).json()
        assert got["producer"] == req["producer"] and ids_of(got) == ids_of(single)


def test_http_mix_honours_quotas_without_duplicates(world, http):
    u = 3
    seen = world.history(u)
    quotas = {"student": 4, "similar": 3, "sasrec": 2, "popular": 1}
    r = http.post("/v1/mix", json={"user_id": u, "quotas": quotas})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [c["item_id"] for c in body["candidates"]]
    assert body["k"] == 10 and len(ids) == len(set(ids)) == 10 and not set(ids) & set(seen)
    assert {p: rep["taken"] for p, rep in body["producers"].items()} == quotas
    assert all(rep["status"] == "ok" for rep in body["producers"].values()) and body["warnings"] == []
    lists = {
        p: ids_of(http.post("/v1/candidates", json={"user_id": u, "k": 10, "producer": p}).json())
        for p in quotas
    }
    for c in body["candidates"]:
        assert c["sources"] == [p for p in quotas if c["item_id"] in lists[p]]
        assert c["ranks"] == {p: lists[p].index(c["item_id"]) + 1 for p in c["sources"]}
        assert c["producer"] in c["sources"]
    from serving.mixer import interleave

    expect, _ = interleave({p: [(i, 0.0) for i in lists[p]] for p in quotas}, quotas, 10)
    assert ids == [c["item_id"] for c in expect], "the HTTP Mixer blends exactly as serving/mixer.py"
    assert (
        http.post("/v1/mix", json={"user_id": u, "quotas": quotas}).json()["candidates"] == body["candidates"]
    )

    weighted = http.post(
        "/v1/mix", json={"user_id": u, "k": 8, "weights": {"student": 3, "popular": 1}}
    ).json()
    assert {p: rep["taken"] for p, rep in weighted["producers"].items()} == {"student": 6, "popular": 2}
    default = http.post("/v1/mix", json={"user_id": u, "k": 8}).json()
    assert set(default["producers"]) == {"student", "sasrec", "similar", "popular"}


def test_http_clicks_of_a_user(world, http):
    assert http.get("/v1/users/1/clicks").json() == {"user_id": 1, "item_ids": world.history(1)}
    assert http.get(f"/v1/users/{UNKNOWN_USER}/clicks").json()["item_ids"] == []
    r = http.get("/v1/users/-3/clicks")
    assert r.status_code == 422 and r.json()["message"].startswith("user_id:")


# ------------------------------------------------------------------------------------------- events


def test_event_is_seen_by_the_next_request(world, http):
    u = 5
    before = http.post("/v1/candidates", json={"user_id": u, "k": 10}).json()
    clicked = ids_of(before)[0]
    r = http.post("/v1/events", json={"user_id": u, "item_id": clicked, "event_type": "click"})
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": u, "item_id": clicked, "sequence_length": 8, "sequence_len_max": MAX_LEN}
    assert online_sequences(open_store(world.ws), [u])[u] == [*world.history(u), clicked]
    after = http.post("/v1/candidates", json={"user_id": u, "k": 10}).json()
    assert clicked not in ids_of(after), "the clicked item is now seen"
    seq = [*world.history(u), clicked]
    assert ids_of(after) == world.exact_top(seq, 10, exclude=seq)[0], "the user vector moved with the click"
    for name, want in (
        ("sasrec", world.sasrec_top(seq, 10, exclude=seq)),
        ("similar", world.similar_top(seq, 10, last_n=3, exclude=seq)),
        ("popular", world.popular_top(10, exclude=seq)),
    ):
        got = http.post("/v1/candidates", json={"user_id": u, "k": 10, "producer": name}).json()
        assert ids_of(got) == want, f"{name} reflects the click"
    # a cold item (in the catalogue, not in the index) is a known item: accepted
    assert http.post("/v1/events", json={"user_id": u, "item_id": COLD_ID}).status_code == 200


def test_concurrent_clicks_of_one_user_are_not_lost(world, http):
    u, clicks = 6, list(range(FIRST_ID, FIRST_ID + 20))
    stored = world.history(u)
    statuses, lengths = [], []

    def click(item):
        r = http.post("/v1/events", json={"user_id": u, "item_id": item})
        statuses.append(r.status_code)
        lengths.append(r.json().get("sequence_length"))

    threads = [threading.Thread(target=click, args=(i,)) for i in clicks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 20
    final = online_sequences(open_store(world.ws), [u])[u]
    assert len(final) == MAX_LEN, "bounded by N"
    assert sorted(final[-20:]) == clicks, "every concurrent click is in the sequence"
    assert final[:4] == stored[-4:]
    assert sorted(lengths) == [min(len(stored) + i, MAX_LEN) for i in range(1, 21)], "one append at a time"


# ------------------------------------------------------------------------------------------- probes


def test_probes(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["reasons"] == []
    producers = r.json()["producers"]
    assert sorted(producers) == ["popular", "sasrec", "similar", "student"]
    assert all(p["ready"] and p["reason"] is None for p in producers.values())
    assert producers["popular"]["index_version"] is None and producers["similar"]["index_version"]


# ------------------------------------------------------------------------------------- config and CLI


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_k"):
        ProducerConfig(max_k=1001)
    with pytest.raises(ValueError, match="index_url"):
        ProducerConfig(index_backend="server")
    with pytest.raises(ValueError, match="unknown keys"):
        ProducerConfig.from_dict({"workdir": "w", "tiemout": 1})
    assert ProducerConfig.from_dict(None) == ProducerConfig()
    assert ProducerConfig(workdir="w").export_dir == Path("w").absolute() / "runs/student/export"


def test_cli_defaults_and_the_edge_environment(monkeypatch):
    from ray.serve import Application

    from serving.cli import config_from_args
    from serving.producer import build_app
    from vlmrec.cli import build_parser

    args = build_parser("serve").parse_args(["serve"])
    assert (args.host, args.port, args.replicas) == ("127.0.0.1", 8000, 1)
    assert config_from_args(args) == ProducerConfig(workdir=".vlmrec/sample")
    monkeypatch.setenv("QDRANT_URL", "http://qdrant:6333")
    args = build_parser("serve").parse_args(["serve", "--index-backend", "server", "--run", "r2"])
    assert config_from_args(args) == ProducerConfig(
        workdir=".vlmrec/sample", run="r2", index_backend="server", index_url="http://qdrant:6333"
    )
    assert isinstance(build_app({"workdir": "w", "default_k": "7", "search_timeout_s": "0.3"}), Application)


def test_server_backend_searches_the_configured_alias(monkeypatch):
    """One alias per served model (k8s: user_config index_alias), the api key from the environment only."""
    from index.config import IndexConfig
    from serving.producer import index_config

    monkeypatch.setenv("QDRANT_API_KEY", "k")
    cfg = ProducerConfig(index_backend="server", index_url="http://q:6333", index_alias="items-student-2")
    assert index_config(cfg) == IndexConfig(
        backend="server", url="http://q:6333", api_key="k", alias="items-student-2"
    )
    assert "k" not in cfg.to_dict().values()
    with pytest.raises(ValueError, match="index_alias"):
        ProducerConfig(index_alias="")


# ---------------------------------------------------------- local testing mode (after every bind: see the top)


def test_local_mode_candidates_are_the_exact_top_k(world, local):
    for u in (1, 2, 3):
        status, body = call(local, "candidates", CandidatesRequest(user_id=u, k=10))
        assert status == 200 and body["fallback"] is None, body
        want, scores = world.exact_top(world.history(u), 10, exclude=world.history(u))
        assert ids_of(body) == want
        np.testing.assert_allclose(scores_of(body), scores, atol=1e-4)
        assert [c["rank"] for c in body["candidates"]] == list(range(1, 11))
        assert not set(ids_of(body)) & set(world.history(u)), "seen items are excluded"
    assert body["producer"] == "student" and body["model_version"].startswith("student@")
    assert body["index_version"].startswith("v") and set(body["timings_ms"]) == {
        "feature",
        "model",
        "search",
        "total",
    }


def test_feature_store_slow_falls_back_within_the_timeout(world, local, monkeypatch):
    def stuck(self, *args, **kwargs):
        time.sleep(4)

    monkeypatch.setattr(FeatureStore, "get_online_features", stuck)
    t0 = time.perf_counter()
    status, body = call(
        local, "candidates", CandidatesRequest(user_id=1, k=5, recent_item_ids=[world.popular[0]])
    )
    assert time.perf_counter() - t0 < 3.0
    assert status == 200 and body["fallback"] == "feature_store_unavailable"
    assert ids_of(body) == world.popular[1:6], "popular items, the recent click excluded"
    assert any("timed out" in w for w in body["warnings"])


def test_feature_store_error_falls_back_and_readyz_says_why(world, local, monkeypatch):
    def down(self, *args, **kwargs):
        raise ConnectionError("redis://10.0.0.1:6379 refused")

    monkeypatch.setattr(FeatureStore, "get_online_features", down)
    status, body = call(local, "candidates", CandidatesRequest(user_id=1, k=3))
    assert (
        status == 200
        and body["fallback"] == "feature_store_unavailable"
        and ids_of(body) == world.popular[:3]
    )
    resp = local.readyz.remote().result()
    assert resp.status_code == 503 and json.loads(resp.body)["reasons"] == ["feature store: ConnectionError"]


def test_index_down_is_a_json_503(world, local, monkeypatch):
    def broken(self, x, k, queries):
        raise RuntimeError("secret /internal/path")

    monkeypatch.setattr(index.search.EdgeIndex, "_search", broken)
    status, body = call(local, "candidates", CandidatesRequest(user_id=1, k=5))
    assert status == 503 and body["error"] == "index_unavailable"
    assert "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    status, body = call(local, "candidates", CandidatesRequest(user_id=UNKNOWN_USER, k=5))
    assert status == 200 and body["fallback"] == "unknown_user", "popular items need no index"
    resp = local.readyz.remote().result()
    assert resp.status_code == 503 and json.loads(resp.body)["reasons"] == ["index: RuntimeError"]

    def slow(self, x, k, queries):
        time.sleep(4)

    monkeypatch.setattr(index.search.EdgeIndex, "_search", slow)
    t0 = time.perf_counter()
    status, body = call(
        local, "candidates_batch", producer_mod.BatchRequest(requests=[CandidatesRequest(user_id=2)])
    )
    assert status == 503 and "timed out" in body["message"] and time.perf_counter() - t0 < 3.0


def test_internal_error_is_a_json_500_without_internals(local, monkeypatch):
    def boom(self, ids):
        raise RuntimeError("secret /internal/path")

    monkeypatch.setattr(producer_mod.ModelSource, "user_vectors", boom)
    status, body = call(local, "candidates", CandidatesRequest(user_id=1))
    assert status == 500 and body == {
        "error": "internal_error",
        "message": "internal error; the replica log has the details",
    }


def test_mix_drops_a_slow_and_a_failing_producer_but_answers(world, local, monkeypatch):
    """sasrec stuck past the budget, similar's index down: both dropped and named, their slots refilled
    by the others, within the budget."""
    real = producer_mod.ModelSource.user_vectors

    def slow_sasrec(self, ids):
        if self.name == "sasrec":
            time.sleep(2)
        return real(self, ids)

    def broken(*args):
        raise ConnectionError("qdrant at 10.0.0.9 refused")

    monkeypatch.setattr(producer_mod.ModelSource, "user_vectors", slow_sasrec)
    monkeypatch.setattr(producer_mod.SimilarSource, "merge", broken)
    quotas = {"student": 3, "sasrec": 3, "similar": 2, "popular": 2}
    t0 = time.perf_counter()
    status, body = call(local, "mix", producer_mod.MixRequest(user_id=1, quotas=quotas, budget_ms=400))
    assert time.perf_counter() - t0 < 1.5, "the budget bounds the call"
    assert status == 200 and body["k"] == 10
    reports = body["producers"]
    assert reports["sasrec"]["status"] == "timeout" and reports["similar"]["status"] == "error"
    assert any(w.startswith("sasrec: no answer within the 400 ms budget") for w in body["warnings"])
    assert any(w.startswith("similar: failed (ConnectionError)") for w in body["warnings"])
    assert "10.0.0.9" not in json.dumps(body)
    ids = [c["item_id"] for c in body["candidates"]]
    assert len(ids) == len(set(ids)) == 10 and {c["producer"] for c in body["candidates"]} == {
        "student",
        "popular",
    }
    assert reports["student"]["taken"] + reports["popular"]["taken"] == 10


def test_local_event_on_unknown_item_is_refused(local):
    from fastapi.exceptions import RequestValidationError

    with pytest.raises(RequestValidationError, match="unknown item_id"):
        local.events.remote(EventRequest(user_id=1, item_id=99999)).result()


def test_reconfigure_hot_swaps_in_place_and_refuses_a_bad_config(world, local, tmp_path):
    """reconfigure() on the running replica (what a user_config-only update of a declarative config or a
    RayService does): a new state is built, then swapped in; a bad config leaves the old one serving."""
    new = replace(local_config(world), producer="popular", default_k=3)
    local.reconfigure.remote(new.to_dict()).result()
    status, body = call(local, "candidates", CandidatesRequest(user_id=1))
    assert status == 200 and body["producer"] == "popular" and len(body["candidates"]) == 3

    export = tmp_path / "export"
    shutil.copytree(world.export, export)
    (export / "run.json").write_text(json.dumps({"teacher_id": "another:teacher"}))
    with pytest.raises(Exception, match="teacher mismatch"):  # the default producer must load
        local.reconfigure.remote(replace(local_config(world), model_path=str(export)).to_dict()).result()
    assert call(local, "candidates", CandidatesRequest(user_id=1))[1]["producer"] == "popular"

    # the same bad export beside a default that loads: the replica serves, the student is named missing
    local.reconfigure.remote(replace(new, model_path=str(export)).to_dict()).result()
    status, body = call(local, "candidates", CandidatesRequest(user_id=1, producer="student"))
    assert status == 503 and body["error"] == "producer_unavailable" and "teacher mismatch" in body["message"]
    ready = local.readyz.remote().result()
    assert ready.status_code == 200
    assert json.loads(ready.body)["producers"]["student"]["ready"] is False
    local.reconfigure.remote(local_config(world).to_dict()).result()


# ------------------------------------------------------------------------------ index refresh (HTTP)


def test_upserted_item_reaches_the_replica(world, http):
    """An incremental upsert into the current index version is searched within refresh_interval_s."""
    u = 4
    target = world.exact_top(world.history(u), 1, exclude=world.history(u))[0][0]
    vector = world.item_vectors[world.vocab.index_of([target])[0] - 1]
    new = pd.DataFrame(
        {"item_id": [COLD_ID], "vector": [vector], "teacher_id": TEACHER}
    )  # a twin of the top item
    upsert_items(new, world.ws.items, world.ws, IndexConfig(quantization=False))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = ids_of(http.post("/v1/candidates", json={"user_id": u, "k": 2}).json())
        if COLD_ID in got:
            break
        time.sleep(0.2)
    assert sorted(got) == sorted([target, COLD_ID])
