"""New products: the launch split (nothing learned from launched items' events), item age, id dropout and
query fusion, on small data made here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from serving.tune_mix import validation_queries
from teacher.pairs import PairConfig, mine_pairs
from training import train
from training.config import LossConfig, ModelConfig
from training.data import ItemTable
from training.evaluate import check_split
from training.item_age import AGE_EDGES_DAYS, UNSEEN, added_days, age_bucket, bucket_ranges, to_days
from training.losses import SeqRecLoss, sampled_softmax_loss
from training.model import SeqRec
from training.popular import popular_items
from vlmrec.split import SplitConfig, after_cut, launched_items, learnable_events, train_events

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def skewed_events(n_items: int = 200, n_events: int = 6000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1)
    items = rng.choice(np.arange(1000, 1000 + n_items), size=n_events, p=p / p.sum())
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, 300, n_events),
            "item_id": items,
            "event_timestamp": T0 + pd.to_timedelta(np.sort(rng.integers(0, 10**8, n_events)), unit="s"),
        }
    )


def test_launch_draw_is_stratified_by_popularity_deterministic_and_only_from_trained_items():
    events = skewed_events()
    cfg = SplitConfig(cold="launch", launch_fraction=0.1, launch_seed=3)
    launched = launched_items(events, cfg)
    counts = train_events(events, cfg)["item_id"].value_counts()
    assert set(launched) <= set(counts.index)  # only items that have train events can be "launched"
    before, after = train_events(events, cfg), after_cut(events, cfg)
    assert (
        len(before) + len(after) == len(events)
        and before["event_timestamp"].max() <= after["event_timestamp"].min()
    )
    assert abs(len(launched) - 0.1 * len(counts)) <= 10  # one rounding per stratum at most
    # every popularity decile gives its share: the launches look like the catalogue, head and tail alike
    ranked = counts.sort_values(kind="stable")
    for stratum in np.array_split(ranked.index.to_numpy(), 10):
        assert 0 < np.isin(stratum, launched).sum() <= int(np.ceil(0.1 * len(stratum))) + 1
    assert np.array_equal(launched, launched_items(events, cfg))
    assert not np.array_equal(launched, launched_items(events, SplitConfig(cold="launch", launch_seed=4)))
    # the natural mode reports the same slice but learns from everything before the cut
    natural = SplitConfig(launch_seed=3)
    assert np.array_equal(launched_items(events, natural), launched)
    assert len(learnable_events(events, natural)) == len(train_events(events, natural))
    learn = learnable_events(events, cfg)
    assert not learn["item_id"].isin(launched).any()
    assert (
        len(learn)
        == len(train_events(events, cfg)) - train_events(events, cfg)["item_id"].isin(launched).sum()
    )


def test_split_config_refuses_what_cannot_be_a_launch():
    with pytest.raises(ValueError, match="temporal"):
        SplitConfig(split="loo", cold="launch")
    with pytest.raises(ValueError, match="launch_fraction"):
        SplitConfig(cold="launch", launch_fraction=0.0)


def test_a_cut_time_splits_at_that_time_for_training_and_evaluation_alike():
    """`vlmrec refresh`'s window: events before cut_time are train, the rest test, in the job's split and in
    evaluation's queries."""
    from training.metrics import temporal_split

    times = pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"], utc=True)
    events = pd.DataFrame(
        {"user_id": [1, 2, 1, 2, 1], "item_id": [10, 11, 12, 13, 14], "event_timestamp": times}
    )
    cfg = SplitConfig(cut_time="2024-01-03T00:00:00Z")
    assert train_events(events, cfg)["item_id"].tolist() == [10, 11]
    assert after_cut(events, cfg)["item_id"].tolist() == [12, 13, 14]  # an event at the cut is after it
    ordered = np.sort(events["event_timestamp"].to_numpy())
    assert cfg.cut_count(ordered) == 2
    assert temporal_split(events, cut=cfg.cut_count(ordered)).test.targets.tolist() == [12, 14, 13]
    assert "before 2024-01-03" in cfg.describe()
    with pytest.raises(ValueError, match="cut_time"):
        SplitConfig(cut_time="yesterday")
    with pytest.raises(ValueError, match="temporal"):
        SplitConfig(split="loo", cut_time="2024-01-03")


def test_launch_split_leaks_no_event_of_a_launched_item_into_training(snapshot_workspace):
    """Training examples (inputs and targets), validation, popularity, logQ counts, the negative pool,
    first-event times and teacher-tuning pairs: none may hold a launched item's pre-cut event."""
    ws = snapshot_workspace
    events = pq.read_table(ws.events).to_pandas()
    items = pq.read_table(ws.items).to_pandas()
    launch = train.JobConfig(workdir=str(ws.root), cold="launch", launch_fraction=0.3, launch_seed=1)
    natural = train.JobConfig(workdir=str(ws.root), launch_fraction=0.3, launch_seed=1)
    data = train.prepare_data(ws, launch, max_len=8)
    control = train.prepare_data(ws, natural, max_len=8)
    raw = launched_items(events, launch.split_config())
    held = data.items.index_of(raw)
    assert len(held) >= 3 and np.array_equal(np.sort(data.held_out), np.sort(held))
    # the control: the same items ARE in the natural world's training data, so the checks below can fail
    assert np.isin(control.targets, held).any() and np.isin(control.inputs, held).any()
    for name in ("inputs", "targets", "valid_inputs", "valid_targets"):
        assert not np.isin(getattr(data, name), held).any(), f"a launched item in {name}"
    assert not data.train_events["item_id"].isin(raw).any()
    popular = {p["item_id"] for p in popular_items(data.train_events, 1000, 7.0)}
    assert popular and not popular & set(raw)
    assert np.isinf(data.added_days[held]).all()  # no first event learned either
    counts = np.bincount(data.targets[data.targets > 0], minlength=data.items.n_items + 1)
    for pool in ("catalogue", "trained"):
        loss = SeqRecLoss(LossConfig(negative_pool=pool), _cfg(data.items.n_items), counts, data.held_out)
        assert not np.isin(loss.pool.numpy(), held).any(), f"a launched item among {pool} negatives"
    pairs_cfg = PairConfig(
        pairs="both", cold="launch", launch_fraction=0.3, launch_seed=1, valid_fraction=0.1
    )
    tr, va, _ = mine_pairs(events, items, pairs_cfg)
    pairs = pd.concat([tr, va])
    assert not (pairs["a"].isin(raw) | pairs["b"].isin(raw)).any()
    natural_pairs = pd.concat(mine_pairs(events, items, PairConfig(pairs="both", valid_fraction=0.1))[:2])
    assert (natural_pairs["a"].isin(raw) | natural_pairs["b"].isin(raw)).any()
    # the Mixer's tuning: validation queries, their histories and the popularity they use
    q, before = validation_queries(events, data.items, launch.split_config())
    assert not np.isin(q.targets, held).any() and not any(np.isin(h, held).any() for h in q.histories)
    assert not before["item_id"].isin(raw).any()
    q_nat, _ = validation_queries(events, data.items, natural.split_config())
    assert np.isin(q_nat.targets, held).any() or any(np.isin(h, held).any() for h in q_nat.histories)


def test_every_target_carries_its_own_event_time(snapshot_workspace):
    ws = snapshot_workspace
    data = train.prepare_data(ws, train.JobConfig(workdir=str(ws.root)), max_len=8)
    events = pq.read_table(ws.events).to_pandas()
    queries, _ = train.example_queries(learnable_events(events, SplitConfig()), 8)
    assert len(queries) == len(data.targets)
    for row, q in enumerate(queries.itertuples()):
        y, d = data.targets[row], data.target_days[row]
        assert d[-1] == pytest.approx(to_days([q.event_timestamp])[0], abs=1e-9)
        assert (np.diff(d[y > 0]) > 0).all()  # earlier positions, earlier events
        assert (d[y == 0] == 0).all()


def test_age_bucket_edges_and_anchors():
    added = torch.tensor([np.inf, 100.0, 99.5, 93.0, 10.0, -1000.0, 100.0 + 1e-6])
    b = age_bucket(torch.tensor([100.0]), added)
    assert b.tolist() == [UNSEEN, UNSEEN, 1, 3, 5, len(AGE_EDGES_DAYS) + 1, UNSEEN]  # added >= now: unseen
    assert age_bucket(torch.tensor([100.0 + 1.0]), torch.tensor([100.0])).item() == 2  # exactly a day: 2nd
    # any age > 0 is bucket 1 (the smallest positive double); never added (+inf) is UNSEEN
    tiny = age_bucket(torch.tensor([5e-324], dtype=torch.float64), torch.tensor([0.0, np.inf]))
    assert tiny.tolist() == [1, UNSEEN]
    ages = np.random.default_rng(0).uniform(-10, 1500, (64, 50))  # broadcast (P, 1) x (P, C), as training
    want = np.where(ages > 0, np.searchsorted(AGE_EDGES_DAYS, ages, side="right") + 1, UNSEEN)
    got = age_bucket(torch.full((64, 1), 2000.0), torch.tensor(2000.0 - ages))
    assert np.array_equal(got.numpy(), want)
    catalogue = pd.DataFrame({"item_id": [5, 6, 7], "created_at": [T0, T0 + pd.Timedelta(days=2), T0]})
    events = pd.DataFrame(
        {"item_id": [7, 7], "event_timestamp": [T0 + pd.Timedelta(days=9), T0 + pd.Timedelta(days=5)]}
    )
    table = ItemTable(np.array([5, 6, 7, 8]))
    t0 = to_days([T0])[0]
    got = added_days(catalogue, table)
    assert got[0] == np.inf and got[4] == np.inf  # padding; 8 is not in the catalogue
    assert got[1] == pytest.approx(t0) and got[2] == pytest.approx(t0 + 2) and got[3] == pytest.approx(t0)
    relaunched = added_days(catalogue, table, events, np.array([7, 6]))  # a launch: first event after the cut
    assert relaunched[3] == pytest.approx(t0 + 5) and relaunched[2] == np.inf and relaunched[1] == got[1]


def test_times_are_days_whatever_the_column_unit():
    """parquet timestamps come back as us, pandas makes ns: both must give the same days (a us column once
    put every item 'over three years old')."""
    stamps = pd.Series(pd.to_datetime(["2016-03-22 10:00:00", "2018-09-24 14:27:30"], utc=True))
    want = [(pd.Timestamp(t) - pd.Timestamp(0, tz="UTC")).total_seconds() / 86400 for t in stamps]
    for unit in ("ns", "us", "ms", "s"):
        col = stamps.astype(f"datetime64[{unit}, UTC]")
        np.testing.assert_allclose(to_days(col.to_numpy()), want)
        catalogue = pd.DataFrame({"item_id": [1, 2], "created_at": col})
        np.testing.assert_allclose(added_days(catalogue, ItemTable(np.array([1, 2])))[1:], want)


def test_index_range_filters_put_every_anchor_in_the_bucket_training_computes():
    """The age input at serving (range filters on the index's created_at) equals training's age_bucket at
    the same time, boundaries included."""
    rng = np.random.default_rng(0)
    now = 20000.0
    edges = np.array([0.0, *AGE_EDGES_DAYS])
    anchors = np.concatenate([now - rng.uniform(-50, 3000, 5000), now - edges, now - edges + 1e-9, [now]])
    want = age_bucket(torch.tensor([now]), torch.tensor(anchors)).numpy()
    ranges = bucket_ranges(now)
    ops = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}
    inside = np.stack(
        [np.all([ops[o](anchors, v) for o, v in ranges[b].items()], axis=0) for b in sorted(ranges)]
    )
    assert (inside.sum(0) == 1).all()  # every anchor in exactly one bucket
    assert np.array_equal(inside.argmax(0), want)


N, D = 10, 6


def _cfg(n: int = N, **kw) -> ModelConfig:
    return ModelConfig(n_items=n, teacher_dim=D, d_model=8, max_len=6, **kw)


def _teacher(n: int = N) -> torch.Tensor:
    t = F.normalize(torch.randn(n + 1, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    t[0] = 0
    return t


def test_model_scores_add_the_age_score_of_the_shared_function():
    model = SeqRec(_cfg(item_age=True), _teacher()).eval()
    with torch.no_grad():
        model.age_bias.copy_(torch.arange(len(model.age_bias), dtype=torch.float32))
    seq = torch.tensor([[0, 0, 1, 2, 3, 4]])
    first = torch.tensor([np.inf, 1.0, 50.0, 99.9, np.inf, 5.0, 70.0, 90.0, 98.0, 99.99, 100.0])
    request = torch.tensor([100.0])
    with torch.no_grad():
        got = model.scores(seq, request, first) - model.user_vector(seq) @ model.item_vectors().T
    torch.testing.assert_close(got, age_bucket(request.unsqueeze(-1), first).float())
    with pytest.raises(ValueError, match="request time"):
        model.scores(seq)


_RANK_SHARE = """
import sys, numpy as np, torch
from tests.test_cold import _validation_world
from training.validation import validation_ndcg
rank, store = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
print(repr(validation_ndcg(*_validation_world(), rank=rank, world=2)), flush=True)
torch.distributed.destroy_process_group()  # left to exit, gloo's threads can abort the process (SIGABRT)
"""


def _validation_world():
    """A hybrid student with item age and 9 validation queries: (model, inputs, targets, days, first), the
    same in every process."""
    torch.manual_seed(1)
    model = SeqRec(_cfg(item_age=True, use_id_embedding=True), _teacher()).eval()
    with torch.no_grad():
        for p in (model.id_out.weight, model.age_bias):
            p.normal_(generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(0, N + 1, (9, 6)), rng.integers(1, N + 1, 9)
    return model, inputs, targets, rng.uniform(50, 100, 9), np.r_[np.inf, rng.uniform(0, 100, N)]


def test_item_vectors_and_validation_in_slices_equal_one_pass(monkeypatch):
    """A million items: item_vectors() goes ITEM_SLICE rows at a time and validation scores SCORE_CELLS
    (query, item) pairs at a time; both give what one pass gives."""
    from training import model as model_module
    from training import validation

    model, inputs, targets, days, first = _validation_world()
    whole_vectors = model.item_vectors()
    whole_ranks = validation.validation_ranks(model, inputs, targets, days, first)
    monkeypatch.setattr(model_module, "ITEM_SLICE", 3)
    monkeypatch.setattr(validation, "SCORE_CELLS", 2 * (N + 1))  # two queries a batch
    torch.testing.assert_close(model.item_vectors(), whole_vectors, rtol=0, atol=0)
    assert validation.validation_ranks(model, inputs, targets, days, first).tolist() == whole_ranks.tolist()


def test_validation_shared_by_two_ranks_is_the_one_process_figure(tmp_path):
    """Two processes in a gloo group each rank half the queries (every second one) and add their sums: both
    get the figure one process gets ranking all of them."""
    import subprocess
    import sys

    from training.validation import validation_ndcg

    want = validation_ndcg(*_validation_world())
    assert 0 < want < 1
    store = str(tmp_path / "group")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SHARE, str(r), store], stdout=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    got = [float(p.communicate(timeout=120)[0].split()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert got == pytest.approx([want, want], rel=1e-12)


def test_sampled_softmax_adds_biases_before_the_temperature():
    g = torch.Generator().manual_seed(1)
    u, p, n = (F.normalize(torch.randn(s, 4, generator=g), dim=-1) for s in (3, 3, 5))
    pb, nb = torch.randn(3, generator=g), torch.randn(3, 5, generator=g)
    got = sampled_softmax_loss(
        u, p, torch.arange(3), n, torch.arange(10, 15), 0.1, positive_bias=pb, negative_bias=nb
    )
    logits = torch.cat([((u * p).sum(-1) + pb).unsqueeze(1), u @ n.T + nb], 1) / 0.1
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)))


def test_id_dropout_hides_ids_in_training_and_id_less_items_are_content_only():
    model = SeqRec(_cfg(use_id_embedding=True, id_dropout=0.5), _teacher())
    with torch.no_grad():
        model.id_out.weight[1:6].normal_()  # items 1..5 "trained"; 6..10 never seen: zero id part
        model.id_in.weight[1:6].normal_()
    seq = torch.tensor([[0, 0, 1, 2, 3, 4]])
    targets, cand = torch.tensor([[0, 0, 2, 3, 4, 5]]), torch.arange(1, N + 1)
    model.train()
    torch.manual_seed(0)
    outs = [model(seq, targets, cand).candidate_vectors for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # a fresh id mask every batch
    content = model.item_vectors_for(model.teacher[1:])  # (N, d) no id part at all
    # in every draw each item is either its full vector or its content-only one
    full = model.item_vectors_at(cand)
    for o in outs:
        assert all(torch.allclose(o[i], full[i]) or torch.allclose(o[i], content[i]) for i in range(N))
    model.eval()
    a, b = model.user_vector(seq), model.user_vector(seq)
    assert torch.equal(a, b)  # no dropout at serving
    torch.testing.assert_close(model.item_vectors()[6:], content[5:])  # never-trained items: content only
    with pytest.raises(ValueError, match="use_id_embedding"):
        _cfg(id_dropout=0.5)


def test_fusion_adds_the_recent_clicks_mean_item_vector():
    base = SeqRec(_cfg(), _teacher()).eval()
    fused = SeqRec(_cfg(fusion_weight=0.5, fusion_last=2), _teacher()).eval()
    fused.load_state_dict(base.state_dict())
    seq = torch.tensor([[0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 0, 7]])
    with torch.no_grad():
        h = base.user_vector(seq)
        items = base.item_vectors()
        mean = torch.stack([(items[3] + items[4]) / 2, items[7]])
        torch.testing.assert_close(fused.user_vector(seq), F.normalize(h + 0.5 * mean, dim=-1))
        assert torch.equal(fused.user_vector(torch.zeros(1, 6, dtype=torch.long)), torch.zeros(1, D))


def test_evaluate_refuses_a_run_of_another_split(tmp_path):
    run = {"split": SplitConfig(cold="launch").to_dict(), "configs": {"job": {}}}
    check_split(run, SplitConfig(cold="launch"), tmp_path)
    with pytest.raises(ValueError, match="trained on split"):
        check_split(run, SplitConfig(), tmp_path)
    old = {"configs": {"job": {"split": "temporal", "train_fraction": 0.8}}}  # before splits were recorded
    check_split(old, SplitConfig(), tmp_path)
    with pytest.raises(ValueError, match="trained on split"):
        check_split(old, SplitConfig(launch_seed=0, cold="launch"), tmp_path)


@pytest.mark.parametrize("backend", ["edge", "server"])
def test_serving_ranks_by_the_models_own_scores_with_item_age(tmp_path, backend):
    """What the Producer calls for an item-age model (ModelSource.search: one filtered search per age bucket
    on the index's created_at, each hit plus its bucket's score, merged) is the exact top-k of
    SeqRec.scores, the ranking training validates and evaluate scores, at the same time."""
    from qdrant_client import QdrantClient

    from index.build import build_index
    from index.config import IndexConfig
    from index.search import open_index
    from serving.sources import ModelSource
    from training.data import build_inputs

    n, k = 60, 12
    rng = np.random.default_rng(0)
    ids = np.arange(500, 500 + n)
    now = pd.Timestamp("2025-06-01 12:00", tz="UTC")
    ages = np.concatenate(
        [[-3.0, 0.0, 0.5, 1.0, 7.0, 30.0], rng.uniform(-5, 2000, n - 6)]
    )  # days; < 0: future
    catalogue = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"t{i}" for i in ids],
            "category": "c",
            "created_at": (now - pd.to_timedelta(ages, unit="D")).floor("s"),
        }
    )
    table = ItemTable(ids, rng.normal(size=(n, D)).astype(np.float32))
    model = SeqRec(
        ModelConfig(n_items=n, teacher_dim=D, d_model=8, max_len=6, item_age=True), table.teacher_matrix()
    ).eval()
    with torch.no_grad():
        model.age_bias.copy_(torch.tensor([0.4, 0.6, 0.3, 0.2, 0.0, -0.1, -0.3, -0.5]))
        vectors = model.item_vectors()[1:].numpy()
    frame = pd.DataFrame({"item_id": ids, "vector": list(vectors), "teacher_id": "t"})
    config = IndexConfig(quantization=False, backend=backend)
    client = QdrantClient(":memory:") if backend == "server" else None
    build_index(frame, catalogue, None if client else tmp_path / "index", config, client=client)
    src = ModelSource("student", model, open_index(tmp_path / "index", config, client=client), "v", [])
    expected_scores = model.scores  # the offline path: evaluate and validation rank by this
    added = torch.as_tensor(added_days(catalogue, table))
    # now: every bucket holds items; +100 days: the five youngest are empty (skipped); +10 years: one
    # bucket holds every item (searched without a range)
    live = {0: set(range(8)), 100: {5, 6, 7}, 3650: {7}}
    for shift, buckets in live.items():
        request = to_days([now + pd.Timedelta(days=shift)])[0]
        if backend == "edge":
            assert src.live_buckets(request) == (buckets, buckets == {7})
        else:
            assert src.live_buckets(request) == (None, False)  # a server's points change elsewhere
        for seq in ([500, 501, 530], [510, 520, 503, 504, 505, 506], [559]):
            x = build_inputs([seq], table, 6).ids
            with torch.no_grad():
                s = expected_scores(torch.as_tensor(x), torch.tensor([request]), added)[0]
            s[0] = -torch.inf
            s[torch.as_tensor(table.index_of(seq))] = -torch.inf  # the history excluded, as serving does
            top = torch.topk(s, k)
            want = table.raw_of(top.indices.numpy()).tolist()
            (got,) = src.search(src.user_vectors(x), k, [seq], [None], request)  # what the Producer calls
            assert [i for i, _ in got] == want
            np.testing.assert_allclose([sc for _, sc in got], top.values.numpy(), atol=1e-4)
    src.close()


def test_an_upserted_item_revives_its_empty_age_bucket_at_once(tmp_path):
    """live_buckets caches its counts for a minute, but an upsert changes Index.changes: an item added a
    moment ago is served from its own (until then empty) bucket on the next search."""
    from index.build import build_index, upsert_items
    from index.config import IndexConfig
    from index.search import open_index
    from serving.sources import ModelSource

    n, d = 30, 8
    rng = np.random.default_rng(1)
    ids = np.arange(1, n + 1)
    now = pd.Timestamp("2025-06-01 12:00", tz="UTC")
    catalogue = pd.DataFrame(
        {"item_id": ids, "title": "t", "category": "c", "created_at": now - pd.Timedelta(days=4000)}
    )
    table = ItemTable(ids, rng.normal(size=(n, D)).astype(np.float32))
    model = SeqRec(
        ModelConfig(n_items=n, teacher_dim=D, d_model=d, max_len=4, item_age=True), table.teacher_matrix()
    )
    model.eval()
    vectors = model.item_vectors()[1:].detach().numpy()
    config = IndexConfig(quantization=False)
    frame = pd.DataFrame({"item_id": ids, "vector": list(vectors), "teacher_id": "t"})
    build_index(frame, catalogue, tmp_path / "index", config)
    src = ModelSource("student", model, open_index(tmp_path / "index", config), "v", [])
    request = to_days([now])[0]
    query = vectors[:1]
    assert src.live_buckets(request) == ({7}, True)
    new = pd.DataFrame(
        {"item_id": [999], "title": "new", "category": "c", "created_at": now - pd.Timedelta(hours=2)}
    )
    upsert_items(
        pd.DataFrame({"item_id": [999], "vector": [query[0]], "teacher_id": "t"}),
        new,
        tmp_path / "index",
        config,
    )
    assert src.index.refresh()
    assert src.live_buckets(request) == ({1, 7}, False)  # the same minute, counted again
    got = src.search(query, 3, [[]], [None], request)[0]
    assert 999 in [i for i, _ in got]
    src.close()


def _configs(argv: list[str] | None = None, args=None):
    import argparse

    if args is None:
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        args = parser.parse_args(argv)
    args = train.resolve_defaults(args)
    n = {"n_items": 1, "teacher_dim": 0 if args.item_space == "id" else 1}
    return ModelConfig.from_args(args, **n), LossConfig.from_args(args), train.TrainConfig.from_args(args)


SHAPE = ["--max-len", "200", "--d-model", "64", "--n-blocks", "2", "--dropout", "0.2", "--batch-size", "32"]


def test_the_default_student_is_the_validated_choice_and_the_demo_trains_it(monkeypatch):
    """`vlmrec train` with no model flags trains the config benchmarks/cold.py chose on validation (its
    committed JSON names it and its flags), and `make demo` trains exactly that."""
    import dataclasses
    import json
    from pathlib import Path

    from vlmrec import demo

    model, loss, cfg = _configs(["--name", "student"])
    assert (
        model.use_id_embedding,
        model.id_dropout,
        model.item_age,
        loss.negative_pool,
        cfg.tune_fusion,
    ) == (
        True,
        0.5,
        True,
        "trained",
        True,
    )
    baseline, _, base_cfg = _configs(["--name", "sasrec", "--item-space", "id"])
    assert (
        not baseline.use_id_embedding and not baseline.item_age and not base_cfg.tune_fusion
    )  # plain SASRec
    result = json.loads((Path(__file__).parents[1] / "benchmarks/results/cold.json").read_text())
    flags = result["runs"][result["default_model"]]["flags"]
    assert _configs(["--name", "x", *flags]) == _configs(["--name", "x", *SHAPE])  # the same config
    seen = []
    monkeypatch.setattr(train, "run", seen.append)
    demo._train(Path("w"), "student", 15, 50)
    d_model, d_loss, d_cfg = _configs(args=seen[0])
    assert dataclasses.replace(d_model, max_len=model.max_len) == model and d_loss == loss
    assert dataclasses.replace(d_cfg, epochs=cfg.epochs) == cfg
