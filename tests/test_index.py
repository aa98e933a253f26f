"""index/: build, verify, switch, search, upsert on Qdrant Edge and on qdrant-client's local mode.

Random unit vectors (2,000 x 32) and a tiny catalogue made here. Below the full-scan threshold both
backends search exactly, so results are compared with numpy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import index.build as build_mod
import index.writers as writers_mod
from index.build import build_index, load_vector_table, upsert_items
from index.cli import add_arguments, run
from index.config import IndexConfig
from index.search import open_index
from index.store import Layout, read_current

pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]

N, D, TEACHER = 2000, 32, "minilm-test"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def vector_table(x: np.ndarray, ids=None, teacher=TEACHER, available=None) -> pd.DataFrame:
    ids = np.arange(len(x)) if ids is None else np.asarray(ids)
    df = pd.DataFrame({"item_id": ids, "vector": list(x), "teacher_id": teacher})
    if available is not None:
        df["available"] = available
    return df


def catalogue(ids) -> pd.DataFrame:
    ids = np.asarray(ids)
    return pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"item {i}" for i in ids],
            "text": "",
            "category": [f"c{i % 5}" for i in ids],
            "image_uri": None,
            "created_at": pd.to_datetime(1_700_000_000 + ids * 60, unit="s", utc=True),
        }
    )


@pytest.fixture(scope="module")
def data():
    x = unit(np.random.default_rng(0).normal(size=(N, D)))
    available = np.arange(N) % 7 != 0
    items = catalogue(np.arange(N + 100))  # the catalogue also holds 100 items not yet indexed
    return x, vector_table(x, available=available), items, available


class Env:
    """One backend: Edge in a tmp folder, searched through the shard ("edge") or, as a version this small is
    by default, exactly in numpy ("scan", index/scan.py); or the server code path on an in-memory
    qdrant-client."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        self.backend = "server" if kind == "server" else "edge"
        self.dir = tmp_path / "index"
        self.client = None
        if kind == "server":
            from qdrant_client import QdrantClient

            self.client = QdrantClient(":memory:")

    def config(self, **kw) -> IndexConfig:
        if self.kind == "edge":
            kw.setdefault("scan_max_points", 0)
        return IndexConfig(backend=self.backend, **kw)

    def build(self, vectors, items, **kw):
        return build_index(vectors, items, self.dir, self.config(**kw), client=self.client)

    def upsert(self, vectors, items, **kw):
        return upsert_items(vectors, items, self.dir, self.config(**kw), client=self.client)

    def open(self):
        return open_index(self.dir, self.config(), client=self.client)

    def current(self) -> str:
        if self.backend == "edge":
            return read_current(self.dir).version
        from index.store import current_collection

        return current_collection(self.client, "items").removeprefix("items_")

    def versions(self) -> list[str]:
        if self.backend == "edge":
            return Layout(self.dir).version_names()
        return sorted(c.name.removeprefix("items_") for c in self.client.get_collections().collections)


@pytest.fixture(params=["edge", "scan", "server"])
def env(request, tmp_path):
    return Env(request.param, tmp_path)


def exact_top(x, q, k, mask=None):
    s = x @ q
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    top = np.argsort(-s, kind="stable")[:k]
    return top.tolist(), s[top]


def user_queries(x, n, seed=1):
    rng = np.random.default_rng(seed)
    return unit(x[rng.integers(0, len(x), (n, 5))].mean(1))  # (n, D): user-like, the mean of 5 items


def test_build_and_search_exact(env, data):
    x, vecs, items, _ = data
    v = env.build(vecs, items)
    assert (v.count, v.dim, v.teacher_id) == (N, D, TEACHER) and "probes" in v.verify
    with env.open() as idx:
        if env.backend == "edge":  # the search path this kind names
            assert (idx._replica.peek().scan is not None) == (env.kind == "scan")
        assert (idx.version, idx.teacher_id, idx.dim, idx.count()) == (v.name, TEACHER, D, N)
        qs = user_queries(x, 8)
        batch = idx.search_batch(qs, 20)
        for q, hits in zip(qs, batch, strict=True):
            ids, scores = exact_top(x, q, 20)
            assert [i for i, _ in hits] == ids
            np.testing.assert_allclose([s for _, s in hits], scores, atol=1e-5)  # cosine
            single = idx.search(q, 20)
            assert [i for i, _ in single] == ids
            np.testing.assert_allclose([s for _, s in single], scores, atol=1e-5)
        got = idx.get_vectors([3, 5, 10**9])
        assert sorted(got) == [3, 5]
        np.testing.assert_allclose(got[5], x[5], atol=1e-6)
        with pytest.raises(ValueError, match="shape"):
            idx.search(np.ones(D + 1), 5)


def test_exclusion_and_filters(env, data):
    x, vecs, items, available = data
    env.build(vecs, items)
    category = np.array([f"c{i % 5}" for i in range(N)])
    q = user_queries(x, 1, seed=7)[0]
    with env.open() as idx:
        top, _ = exact_top(x, q, 13)
        assert [i for i, _ in idx.search(q, 10, exclude_ids=top[:3])] == top[3:13]

        hits = idx.search(q, 10, filters={"category": "c1"})
        assert [i for i, _ in hits] == exact_top(x, q, 10, category == "c1")[0]

        mask = np.isin(category, ["c2", "c4"]) & available
        hits = idx.search(q, 10, exclude_ids=top[:5], filters={"category": ["c2", "c4"], "available": True})
        mask[top[:5]] = False
        assert [i for i, _ in hits] == exact_top(x, q, 10, mask)[0]

        hits = idx.search(q, 10, filters={"available": False})
        assert [i for i, _ in hits] == exact_top(x, q, 10, ~available)[0]

        per_query = idx.search_batch(
            np.stack([q, q]), 5, exclude_ids=[[], top[:1]], filters=[{"category": "c0"}, None]
        )
        assert [i for i, _ in per_query[0]] == exact_top(x, q, 5, category == "c0")[0]
        assert [i for i, _ in per_query[1]] == top[1:6]
        with pytest.raises(ValueError, match="unknown filter"):
            idx.search(q, 5, filters={"colour": "red"})


@pytest.mark.parametrize("fail_at", ["upsert", "verify"])
def test_failed_rebuild_keeps_current(env, data, monkeypatch, fail_at):
    x, vecs, items, _ = data
    old = env.build(vecs, items)
    x2 = unit(np.random.default_rng(5).normal(size=(N, D)))
    if fail_at == "upsert":
        writer = writers_mod.EdgeWriter if env.backend == "edge" else writers_mod.ServerWriter
        real, calls = writer.upsert, []

        def flaky(self, batch):
            calls.append(1)
            if len(calls) > 2:
                raise OSError("disk full (simulated) after 2 batches")
            real(self, batch)

        monkeypatch.setattr(writer, "upsert", flaky)
    else:
        monkeypatch.setattr(
            build_mod, "verify", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("verify failed"))
        )
    with pytest.raises((OSError, RuntimeError)):
        env.build(vector_table(x2), items)
    assert env.current() == old.name and env.versions() == [old.name]  # the partial version is gone
    if env.backend == "edge":
        assert not [p for p in (env.dir / "versions").iterdir() if p.name.startswith(".")]
    with env.open() as idx:
        assert idx.version == old.name
        assert idx.search(x[42], 1)[0][0] == 42  # still answers from the old vectors


def test_keep_versions_and_pointer(env, data):
    _, vecs, items, _ = data
    built = [env.build(vecs, items, keep_versions=2) for _ in range(3)]
    assert env.versions() == [built[1].name, built[2].name]
    assert built[2].dropped == (built[0].name,)
    assert env.current() == built[2].name
    if env.backend == "edge":
        pointer = json.loads((env.dir / "CURRENT").read_text())
        assert pointer == {
            "version": built[2].name,
            "teacher_id": TEACHER,
            "dim": D,
            "count": N,
            "created": built[2].created,
            "distance": "cosine",
        }
        meta = json.loads((env.dir / "versions" / built[2].name / "meta.json").read_text())
        assert IndexConfig.from_dict(meta["config"]).keep_versions == 2


def test_upsert_new_item_reaches_open_replicas(env, data):
    x, vecs, items, _ = data
    env.build(vecs, items)
    new_ids = [N + 1, N + 2]
    new_x = unit(np.random.default_rng(9).normal(size=(2, D)))
    with env.open() as running:
        assert env.upsert(vector_table(new_x, new_ids), items) == 2
        near = unit(new_x[0] + 0.05 * np.random.default_rng(3).normal(size=D))
        with env.open() as fresh:
            assert fresh.search(near, 3)[0][0] == N + 1
            assert fresh.count() == N + 2
        if env.backend == "edge":
            assert running.search(near, 3)[0][0] != N + 1  # its copy predates the upsert ...
            assert running.refresh() is True  # ... until it replays the log
            assert running.refresh() is False
        assert running.search(near, 3)[0][0] == N + 1
        assert running.search(near, 3, filters={"category": f"c{(N + 1) % 5}"})[0][0] == N + 1
        np.testing.assert_allclose(running.get_vectors([N + 2])[N + 2], new_x[1], atol=1e-6)
    # a later replica copies the version (upserted in place) and replays the log: no duplicates
    with env.open() as later:
        assert later.count() == N + 2


def test_upsert_refuses_other_teacher_dim_nan(env, data):
    x, vecs, items, _ = data
    env.build(vecs, items)
    one = unit(np.ones((1, D)))
    with pytest.raises(ValueError, match=r"teacher_id.*'other'.*build a new version"):
        env.upsert(vector_table(one, [N + 1], teacher="other"), items)
    with pytest.raises(ValueError, match=r"dim 16 .* dim 32"):
        env.upsert(vector_table(unit(np.ones((1, 16))), [N + 1]), items)
    bad = one.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match=r"column vector: 1 rows hold NaN"):
        env.upsert(vector_table(bad, [N + 1]), items)
    with pytest.raises(ValueError, match=r"no catalogue row"):
        env.upsert(vector_table(one, [10**7]), items)
    with env.open() as idx:
        assert idx.count() == N


def test_vector_table_validation(data):
    x, vecs, _, _ = data
    mixed = vecs.assign(teacher_id=["a"] * 1990 + ["b"] * 10)
    with pytest.raises(ValueError, match=r"column teacher_id: 2 distinct values \{'a': 1990, 'b': 10\}"):
        load_vector_table(mixed)
    ragged = vecs.copy()
    ragged.loc[:2, "vector"] = pd.Series([x[0][:31]] * 3)
    with pytest.raises(
        ValueError, match=r"column vector: rows of different or zero length \{32: 1997, 31: 3\}"
    ):
        load_vector_table(ragged)
    with pytest.raises(ValueError, match=r"column vector: 2 rows are all zeros"):
        load_vector_table(vector_table(np.zeros((2, D), np.float32)))
    with pytest.raises(ValueError, match=r"column item_id: 1 duplicated"):
        load_vector_table(vector_table(x[:3], [1, 2, 2]))
    with pytest.raises(ValueError, match=r"missing columns \['teacher_id'\]"):
        load_vector_table(vecs.drop(columns="teacher_id"))


def test_two_replicas_in_one_process_and_refresh_to_new_version(tmp_path, data):
    x, vecs, items, _ = data
    env = Env("edge", tmp_path)
    first = env.build(vecs, items)
    a, b = env.open(), env.open()
    assert a._replica.peek().folder != b._replica.peek().folder
    q = user_queries(x, 1)[0]
    assert a.search(q, 10) == b.search(q, 10)

    x2 = unit(np.random.default_rng(11).normal(size=(N, D)))
    second = env.build(vector_table(x2), items)
    old_folder = a._replica.peek().folder
    assert a.refresh() is True and a.version == second.name and b.version == first.name
    assert not old_folder.exists()  # the old copy is closed and removed after the swap
    assert [i for i, _ in a.search(q, 10)] == exact_top(x2, q, 10)[0]
    assert [i for i, _ in b.search(q, 10)] == exact_top(x, q, 10)[0]
    b_folder = b._replica.peek().folder
    b.close()
    assert not b_folder.exists()
    assert a.search(q, 1)  # the other replica is unaffected
    a.close()
    with pytest.raises(RuntimeError, match="closed"):
        a.search(q, 1)


def test_stale_replicas_of_dead_pids_are_removed(tmp_path, data):
    _, vecs, items, _ = data
    env = Env("edge", tmp_path)
    env.build(vecs, items)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = env.dir / "replicas" / f"{socket.gethostname()}-{int(dead.stdout)}-deadbeef"
    (stale / "shard").mkdir(parents=True)
    foreign = env.dir / "replicas" / f"another-host-{os.getpid()}-cafe"  # another host's pid: left alone
    foreign.mkdir()
    with env.open() as idx:
        assert not stale.exists() and foreign.exists()
        assert idx._replica.peek().folder.exists()


def test_cli_build_then_upsert(tmp_path, data, capsys):
    import argparse

    x, vecs, items, _ = data
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    items.to_parquet(ws / "data" / "items.parquet")
    export = ws / "runs" / "r1" / "export" / "item_vectors.parquet"
    export.parent.mkdir(parents=True)
    vecs.to_parquet(export)
    vector_table(unit(np.ones((1, D))), [N + 5]).to_parquet(tmp_path / "new.parquet")

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run(parser.parse_args(["build", "--workdir", str(ws), "--keep-versions", "1", "--no-quantization"]))
    out = capsys.readouterr().out
    current = read_current(ws / "index")
    assert current.version in out and "verify: count 2000 == rows" in out
    run(parser.parse_args(["upsert", "--workdir", str(ws), "--vectors", str(tmp_path / "new.parquet")]))
    assert "1 items" in capsys.readouterr().out
    with open_index(ws / "index") as idx:
        assert idx.search(unit(np.ones(D)), 1)[0][0] == N + 5


def test_dot_product_version_ranks_by_dot_product(env, data):
    """An id-space export's vectors are not unit vectors and are scored by the dot product: a dot
    version returns numpy's exact top-k by x @ q, which a cosine version would not."""
    rng = np.random.default_rng(5)
    x = (unit(rng.normal(size=(N, D))) * rng.uniform(0.2, 3.0, (N, 1))).astype(np.float32)  # varied norms
    _, _, items, _ = data
    v = env.build(vector_table(x), items, distance="dot", quantization=False)
    assert "exact best dot product" in v.verify
    with env.open() as idx:
        assert idx.distance == "dot"
        q = rng.normal(size=(4, D)).astype(np.float32)  # unnormalised, like a SASRec user vector
        for qi, hits in zip(q, idx.search_batch(q, 10), strict=True):
            ids, scores = exact_top(x, qi, 10)
            assert [i for i, _ in hits] == ids
            np.testing.assert_allclose([s for _, s in hits], scores, rtol=1e-4)
            assert ids != exact_top(unit(x), qi, 10)[0], "cosine would rank these items differently"


def test_cli_run_and_teacher_indexes(tmp_path, data, capsys):
    """`--run NAME` builds indexes/NAME from that run's export (dot when run.json says id space);
    `--teacher` builds indexes/teacher from the raw teacher vectors."""
    import argparse

    x, vecs, items, _ = data
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    items.to_parquet(ws / "data" / "items.parquet")
    vecs.assign(event_timestamp=pd.Timestamp("2024-01-01", tz="UTC")).to_parquet(
        ws / "data" / "item_embeddings.parquet"
    )
    export = ws / "runs" / "sasrec" / "export"
    export.mkdir(parents=True)
    vector_table(x * 2.0).to_parquet(export / "item_vectors.parquet")
    (export / "run.json").write_text(json.dumps({"configs": {"model": {"item_space": "id"}}}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run(parser.parse_args(["build", "--workdir", str(ws), "--run", "sasrec", "--no-quantization"]))
    assert "dot" in capsys.readouterr().out
    assert read_current(ws / "indexes" / "sasrec").distance == "dot"
    run(parser.parse_args(["build", "--workdir", str(ws), "--teacher", "--no-quantization"]))
    assert read_current(ws / "indexes" / "teacher").distance == "cosine"
    assert not (ws / "index").exists(), "the student's default index is untouched"
    with pytest.raises(FileNotFoundError, match="vlmrec train"):
        run(parser.parse_args(["build", "--workdir", str(ws), "--run", "nope"]))
    with pytest.raises(SystemExit):  # --run and --teacher name different indexes
        parser.parse_args(["build", "--workdir", str(ws), "--run", "sasrec", "--teacher"])


def test_config_round_trip_keeps_secrets_out():
    c = IndexConfig(backend="server", url="http://q:6333", api_key="secret", hnsw_ef=256)
    d = c.to_dict()
    assert "api_key" not in d and IndexConfig.from_dict(d) == IndexConfig(**{**d})
    with pytest.raises(ValueError, match="unknown IndexConfig keys"):
        IndexConfig.from_dict({"hnsw_eff": 1})
    with pytest.raises(ValueError, match="backend"):
        IndexConfig(backend="faiss")


def test_hnsw_settings_follow_the_collection_size_unless_set():
    from index.config import HNSW_BY_SIZE, hnsw_for

    sizes = [1_000, 150_000, 150_001, 300_000, 300_001, 10_000_000]
    settings = [hnsw_for(n) for n in sizes]
    assert settings[0] == settings[1] != settings[2] != settings[4] and settings[-1] == HNSW_BY_SIZE[-1][1:]
    for small, large in zip(settings, settings[1:], strict=False):  # never cheaper as the catalogue grows
        assert all(a <= b for a, b in zip(small, large, strict=True))
    assert all(ef >= 128 for *_, ef in settings)
    chosen = IndexConfig().for_size(1_000_000)
    assert (chosen.hnsw_m, chosen.hnsw_ef_construct, chosen.hnsw_ef) == hnsw_for(1_000_000)
    pinned = IndexConfig(hnsw_ef=77).for_size(1_000_000)
    assert pinned.hnsw_ef == 77 and pinned.hnsw_m == hnsw_for(1_000_000)[0]  # what is set stays set
    with pytest.raises(ValueError, match="hnsw_m"):
        IndexConfig(hnsw_m=1)


def test_a_version_is_built_and_searched_with_the_settings_of_its_size(env, data):
    from index.config import hnsw_for

    x, vecs, items, _ = data
    v = env.build(vecs, items)
    m, ef_construct, ef = hnsw_for(v.count)
    if env.backend == "edge":
        written = json.loads((env.dir / "versions" / v.name / "meta.json").read_text())["config"]
        with env.open() as idx:
            assert idx._replica.peek().params.hnsw_ef == ef
    else:
        written = env.client.get_collection(f"items_{v.name}").config.metadata["config"]
        with env.open() as idx:
            assert idx._target[2].hnsw_ef == ef
    assert (written["hnsw_m"], written["hnsw_ef_construct"], written["hnsw_ef"]) == (m, ef_construct, ef)


def test_recommend_scores_each_item_by_its_best_cosine_to_any_example(env, data):
    """One recommend query per row (best-score strategy) == numpy's max over the row's examples, scores
    the cosines themselves, with exclusions and filters applied inside the engine."""
    x, vecs, items, available = data
    env.build(vecs, items)
    rows = [[3, 7, 11], [5], [20, 21]]
    with env.open() as idx:
        got = idx.recommend_batch(
            [x[r] for r in rows],
            10,
            exclude_ids=[[3, 7, 11], [], [20, 21]],
            filters=[None, {"available": True}, None],
        )
    cases = zip(rows, got, [{3, 7, 11}, set(), {20, 21}], [False, True, False], strict=True)
    for r, hits, excl, only_available in cases:
        best = (x[r] @ x.T).max(0)
        best[list(excl)] = -np.inf
        if only_available:
            best[~available] = -np.inf
        want = np.argsort(-best, kind="stable")[:10]
        assert [i for i, _ in hits] == want.tolist()
        np.testing.assert_allclose([s for _, s in hits], best[want], atol=2e-3)  # int8, rescored


@pytest.mark.parametrize("distance", ["cosine", "dot"])
def test_the_scan_answers_as_the_shard_does(tmp_path, data, distance):
    """One version searched both ways: the numpy scan (index/scan.py) against the shard's own exact search
    (a full scan at this size): filters on a field some points lack (a category never matches them),
    created_at ranges, exclusions, one vector asked under several filters, recommend; best first, ties by
    id, the same scores."""
    x, _, items, _ = data
    if distance == "dot":
        x = (x * np.random.default_rng(8).uniform(0.2, 3.0, (N, 1))).astype(np.float32)
    items = items.assign(category=[None if i % 11 == 0 else f"c{i % 5}" for i in items["item_id"]])
    kw = {"distance": distance, "quantization": distance == "cosine"}
    build_index(vector_table(x), items, tmp_path, IndexConfig(**kw))
    t0 = 1_700_000_000  # the catalogue's created_at: t0 + item_id minutes
    filters = [
        None,
        {"category": "c1"},
        {"category": ["c2", "c3"], "available": True},
        {"created_at": {"gte": t0 + 300 * 60, "lt": t0 + 900 * 60}},
        {"created_at": {"gt": t0 + 1990 * 60}, "category": "c0"},
        {"available": False},  # nothing: every point is available
    ]
    excludes = [[], [1, 2, 3], [], list(range(0, 2000, 3)), [], []]
    qs = np.random.default_rng(2).normal(size=(len(filters), D)).astype(np.float32)
    # the first query again under three more filters, as an item-age model asks once per age bucket
    filters += [{"created_at": {"lt": t0 + 600 * 60}}, {"created_at": {"gte": t0 + 600 * 60}}, None]
    excludes += [[0, 1], [], list(range(50))]
    qs = np.concatenate([qs, np.repeat(qs[:1], 3, axis=0)])
    groups = [x[[3, 7, 11]], x[[5]], x[[20, 21]]]
    with (
        open_index(tmp_path, IndexConfig(**kw, scan_max_points=0)) as shard,
        open_index(tmp_path, IndexConfig(**kw)) as scan,
    ):
        assert scan._replica.peek().scan is not None and shard._replica.peek().scan is None
        answers = [
            (
                i.search_batch(qs, 25, excludes, filters),
                i.recommend_batch(groups, 25, [[3, 7, 11], [5], [20, 21]], filters[:3]),
            )
            for i in (shard, scan)
        ]
        assert shard.get_vectors([3, 10**9]).keys() == scan.get_vectors([3, 10**9]).keys() == {3}
        np.testing.assert_allclose(scan.get_vectors([3])[3], shard.get_vectors([3])[3], atol=1e-6)
    for want, got in zip(*(a + b for a, b in answers), strict=True):
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4, atol=2e-3)
    assert answers[1][0][5] == [] and all(len(h) == 25 for h in answers[1][0][:4])


def test_graph_and_quantisation_path(env, data):
    """Thresholds set tiny so even 2,000 points get an HNSW graph and int8 vectors: recall stays high and
    scores stay exact cosines (rescored)."""
    x, vecs, items, _ = data
    v = env.build(vecs, items, full_scan_threshold_kb=1, indexing_threshold_kb=1)
    if env.backend == "edge":
        assert v.indexed == N  # local mode has no graph (it is exact brute force)
    qs = user_queries(x, 20, seed=4)
    with env.open() as idx:
        recall = []
        for q, hits in zip(qs, idx.search_batch(qs, 20), strict=True):
            ids, _ = exact_top(x, q, 20)
            recall.append(len({i for i, _ in hits} & set(ids)) / 20)
            np.testing.assert_allclose([s for _, s in hits], x[[i for i, _ in hits]] @ q, atol=1e-5)
        assert np.mean(recall) >= 0.9
    # quantization off at search time: the float vectors, not the int8 ones unrescored (Edge's default when a
    # search names no quantization params)
    with open_index(env.dir, env.config(quantization=False), client=env.client) as idx:
        for q, hits in zip(qs, idx.search_batch(qs, 20), strict=True):
            np.testing.assert_allclose([s for _, s in hits], x[[i for i, _ in hits]] @ q, atol=1e-5)


@pytest.mark.parametrize("kind", ["edge", "scan"])
def test_searches_keep_answering_while_refresh_swaps_versions(tmp_path, data, kind):
    import threading

    x, vecs, items, _ = data
    env = Env(kind, tmp_path)
    env.build(vecs, items)
    errors, stop = [], threading.Event()
    q = user_queries(x, 4)
    with env.open() as idx:

        def hammer():
            while not stop.is_set():
                try:
                    assert len(idx.search_batch(q, 10)) == 4
                    stop.wait(0.002)
                except Exception as err:  # the test reports any failure
                    errors.append(err)
                    return

        t = threading.Thread(target=hammer)
        t.start()
        for seed in (21, 22):
            env.build(vector_table(unit(np.random.default_rng(seed).normal(size=(N, D)))), items)
            assert idx.refresh() is True
        stop.set()
        t.join()
    assert errors == []
    assert not list((env.dir / "replicas").iterdir())  # every copy was closed and removed


def test_the_default_vectors_are_the_newest_finished_export(tmp_path):
    """A `.export-*` folder being built beside an export (staged_dir) is never taken for one."""
    from index.cli import latest_export
    from vlmrec.workspace import Workspace

    ws = Workspace(tmp_path)
    done = ws.runs / "a" / "export" / "item_vectors.parquet"
    building = ws.runs / "b" / ".export-x1y2" / "item_vectors.parquet"
    for path, mtime in ((done, 1_000), (building, 2_000)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
    assert latest_export(ws) == done


def test_snapshots_of_every_aliased_collection_keep_the_newest_ones():
    """Issue 19: `vlmrec index snapshot` asks the server for one snapshot per aliased collection, then deletes
    all but the newest --keep of each (qdrant-client's own models; the server's snapshot API is not in local
    mode, so a recording client stands in for it)."""
    from qdrant_client.http import models

    from index.snapshot import snapshot_aliases

    class Server:
        def __init__(self):
            self.snapshots = {"items-student_v2": ["s-01", "s-02", "s-03"], "items_teacher_v1": []}
            self.deleted, self.clock = [], 10

        def get_aliases(self):
            pairs = [("items_teacher", "items_teacher_v1"), ("items-student", "items-student_v2")]
            return models.CollectionsAliasesResponse(
                aliases=[models.AliasDescription(alias_name=a, collection_name=c) for a, c in pairs]
            )

        def create_snapshot(self, collection_name, wait=True):
            self.clock += 1
            name = f"s-{self.clock:02d}"
            self.snapshots[collection_name].append(name)
            return models.SnapshotDescription(
                name=name, creation_time=f"2026-11-30T00:00:{self.clock:02d}", size=1
            )

        def list_snapshots(self, collection_name):
            return [
                models.SnapshotDescription(name=n, creation_time=f"2026-11-30T00:00:{n[2:]}", size=1)
                for n in self.snapshots[collection_name]
            ]

        def delete_snapshot(self, collection_name, snapshot_name, wait=True):
            self.snapshots[collection_name].remove(snapshot_name)
            self.deleted.append((collection_name, snapshot_name))

    server = Server()
    reports = snapshot_aliases(server, keep=2)
    assert [(r.alias, r.collection) for r in reports] == [
        ("items-student", "items-student_v2"),
        ("items_teacher", "items_teacher_v1"),
    ]
    assert server.snapshots == {"items-student_v2": ["s-03", "s-11"], "items_teacher_v1": ["s-12"]}
    assert reports[0].deleted == ("s-02", "s-01") and reports[1].deleted == ()
    with pytest.raises(ValueError, match="keep"):
        snapshot_aliases(server, keep=0)
