"""SeqRec, its input building and its losses on tiny synthetic data (seconds, no shared data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

from training.config import LossConfig, ModelConfig, TrainConfig
from training.data import ItemTable, build_input, build_inputs, iterate_batches, make_examples, target_counts
from training.losses import SeqRecLoss, distillation_loss, full_softmax_ce, sampled_softmax_loss
from training.model import SeqRec, fit_whitening

N, D = 24, 12  # items, teacher dim
SPACES = [("frozen", False), ("whitened", False), ("adapter", False), ("adapter", True), ("id", False)]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def teacher_matrix(seed: int = 0) -> np.ndarray:
    t = np.random.default_rng(seed).normal(size=(N, D)).astype(np.float32)
    return ItemTable(np.arange(100, 100 + N), t / np.linalg.norm(t, axis=1, keepdims=True)).teacher_matrix()


def make_model(space: str, hybrid: bool = False, **kw) -> SeqRec:
    cfg = ModelConfig(
        n_items=N, teacher_dim=0 if space == "id" else D, item_space=space, use_id_embedding=hybrid,
        d_model=16, n_heads=2, max_len=8, **kw,
    )  # fmt: skip
    return SeqRec(cfg, None if space == "id" else teacher_matrix())


@pytest.mark.parametrize("space,hybrid", SPACES)
def test_causal_and_padding_invariant(space, hybrid):
    model = make_model(space, hybrid).eval()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = seq.clone()
    changed[0, -1] = 11
    a, b = model.encode(seq), model.encode(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # a later click does not change earlier outputs
    assert not torch.allclose(a[:, -1], b[:, -1])
    assert torch.all(a[0, :2] == 0)  # padding outputs are zero
    trimmed = model.encode(seq[:, 2:])  # less left padding, same clicks
    torch.testing.assert_close(trimmed, a[:, 2:], rtol=1e-5, atol=1e-5)
    batch = torch.tensor(
        [[0, 0, 0, 0, 0, 0, 9, 4], [0, 0, 3, 7, 1, 9, 4, 2]]
    )  # different padding in one batch
    torch.testing.assert_close(model.user_vector(batch)[1], a[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        model.user_vector(batch)[0], model.user_vector(torch.tensor([[9, 4]]))[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("space,hybrid", SPACES)
@pytest.mark.parametrize("norm_first", [True, False])
def test_the_serving_forward_is_the_training_forward(space, hybrid, norm_first):
    """user_vector's shortcuts (the last block computes the last query only; serving() looks every item's
    content input up instead of recomputing it) give the full encoder's last position, and train() drops
    the looked-up table so that a model that trains again never reads stale inputs."""
    model = make_model(space, hybrid, norm_first=norm_first, n_blocks=3).eval()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2], [0, 0, 0, 0, 0, 0, 0, 5], [0] * 8])
    full = model.encode(seq)[:, -1]
    torch.testing.assert_close(model.encode(seq, last_only=True)[:, -1], full, rtol=1e-5, atol=1e-6)
    plain = model.user_vector(seq)
    torch.testing.assert_close(model.serving().user_vector(seq), plain, rtol=1e-5, atol=1e-6)
    assert not model.training
    model.train()
    with torch.no_grad():  # a training step moves the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    moved = model.encode(seq)[:, -1]
    torch.testing.assert_close(model.encode(seq, last_only=True)[:, -1], moved, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(moved, full)


def test_serving_groups_rows_by_length_and_answers_as_one_batch():
    from serving.sources import length_groups

    lengths = np.array([200, 3, 17, 16, 40, 0, 26, 60, 199, 1])
    groups = length_groups(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))  # every row once
    for g in groups:
        span = lengths[g]
        assert span.max() <= max(1.5 * span.min(), 16)
    assert [lengths[g].tolist() for g in groups] == [[0, 1, 3, 16], [17], [26], [40, 60], [199, 200]]
    # the grouped forward (each group as wide as its longest) answers what one padded batch answers
    from types import SimpleNamespace

    from serving.sources import ModelSource

    model = make_model("adapter", True).serving()
    rng = np.random.default_rng(0)
    ids = np.zeros((6, 8), np.int64)
    for row, n in enumerate([8, 1, 0, 3, 7, 2]):
        ids[row, 8 - n :] = rng.integers(1, N + 1, n)
    grouped = ModelSource.forward(SimpleNamespace(model=model), ids)
    with torch.inference_mode():
        np.testing.assert_allclose(grouped, model.user_vector(torch.as_tensor(ids)).numpy(), atol=1e-5)


@pytest.mark.parametrize("space,hybrid", SPACES)
def test_save_load_identical(space, hybrid, tmp_path):
    model = make_model(space, hybrid)
    with torch.no_grad():  # move every parameter off its initial value, zero-initialised ones included
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = SeqRec.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    assert json.loads((tmp_path / "config.json").read_text())["model"]["item_space"] == space
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2], [0, 0, 0, 0, 0, 0, 0, 5]])
    torch.testing.assert_close(loaded.encode(seq), model.encode(seq), rtol=0, atol=0)
    torch.testing.assert_close(loaded.item_vectors(), model.item_vectors(), rtol=0, atol=0)
    assert torch.equal(loaded.item_ids, model.item_ids)


def test_configs_round_trip_json():
    for cfg in (ModelConfig(n_items=5, teacher_dim=3, item_space="whitened"), LossConfig(), TrainConfig()):
        assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig(n_items=5, teacher_dim=3).out_dim == 3
    assert ModelConfig(n_items=5, item_space="id", d_model=8).out_dim == 8
    with pytest.raises(ValueError):
        ModelConfig(n_items=5, item_space="adapter")  # a content space needs teacher_dim
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"n_items": 5, "item_space": "id", "colour": 1})


def successor_examples():
    """A learnable task: the next item is always the current one + 1 (mod N)."""
    seqs = [np.array([(s + k) % N + 1 for k in range(10)]) for s in range(N)]
    return make_examples(seqs, max_len=8)


@pytest.mark.parametrize(
    "space,hybrid,loss_cfg",
    [(s, h, LossConfig(n_sampled_negatives=8)) for s, h in SPACES]
    + [
        ("id", False, LossConfig(id_loss="bce")),
        ("id", False, LossConfig(id_loss="sampled", n_sampled_negatives=8)),
    ]
    + [("whitened", False, LossConfig(distill_weight=0.0, logq_correction=False, n_sampled_negatives=-1))],
)
def test_every_space_learns(space, hybrid, loss_cfg):
    examples = successor_examples()
    model = make_model(space, hybrid, dropout=0.0)
    criterion = SeqRecLoss(loss_cfg, model.cfg, target_counts(examples, N))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(15):
        for x, y in iterate_batches(examples, 8, rng):
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            cand = criterion.sample_candidates(y)
            loss, parts = criterion(model(x, y, cand), y, cand)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


def test_new_items_get_vectors_from_teacher_alone():
    model = make_model("adapter", hybrid=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    new = F.normalize(torch.randn(5, D), dim=-1)  # items that are not in the vocabulary
    v = model.item_vectors_for(new)
    assert v.shape == (5, D)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(v, F.normalize(new + model.adapter(new), dim=-1))  # no id part for new items
    known = model.item_vectors()[3]
    torch.testing.assert_close(model.item_vectors_for(model.teacher[3:4], torch.tensor([3]))[0], known)
    assert not torch.allclose(model.item_vectors_for(model.teacher[3:4])[0], known)  # the id part matters
    with pytest.raises(ValueError):
        make_model("id").item_vectors_for(new)


def test_whitening_gives_identity_covariance():
    x = torch.randn(500, 6) @ torch.randn(6, 6) + 3.0
    mean, w = fit_whitening(x, eps=0.0)
    z = (F.normalize(x, dim=-1) - mean) @ w
    torch.testing.assert_close(torch.cov(z.T), torch.eye(6), atol=1e-3, rtol=0)


def test_build_input_maps_truncates_pads():
    table = ItemTable(np.array([10, 20, 30, 40]))  # indices 1..4
    out = build_input([20, 99, 30], table, max_len=4)
    assert out.ids.tolist() == [0, 0, 2, 3] and out.unknown.tolist() == [99]
    out = build_input([10, 20, 30, 77, 40, 10], table, max_len=3)  # unknowns dropped first, then the last 3
    assert out.ids.tolist() == [3, 4, 1] and out.unknown.tolist() == [77]
    assert build_input([], table, 3).ids.tolist() == [0, 0, 0]
    seqs = [[20, 99, 30], [10, 20, 30, 77, 40, 10], [], [55]]
    batch = build_inputs(seqs, table, 3)
    assert batch.ids.tolist() == [[0, 2, 3], [3, 4, 1], [0, 0, 0], [0, 0, 0]]
    assert batch.n_unknown.tolist() == [1, 1, 0, 1]
    as_dict = {10: 1, 20: 2, 30: 3, 40: 4}
    dense = np.zeros(50, np.int64)
    dense[[10, 20, 30, 40]] = [1, 2, 3, 4]
    for id_map in (as_dict, dense):
        assert np.array_equal(build_inputs(seqs, id_map, 3).ids, batch.ids)
    for s, row in zip(seqs, batch.ids, strict=True):  # one function: the single and batch paths agree
        assert np.array_equal(build_input(s, table, 3).ids, row)


def test_make_examples_windows():
    s = np.arange(1, 8)  # 7 clicks -> 6 targets
    last = make_examples([s], max_len=4)
    assert last.inputs.tolist() == [[3, 4, 5, 6]] and last.targets.tolist() == [[4, 5, 6, 7]]
    every = make_examples([s, np.array([5])], max_len=4, windows="all")
    assert every.inputs.tolist() == [[3, 4, 5, 6], [0, 0, 1, 2]]
    assert every.targets.tolist() == [[4, 5, 6, 7], [0, 0, 2, 3]]
    assert target_counts(every, 7).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_distillation_zero_at_target():
    x = torch.randn(4, 6)
    assert distillation_loss(x, x).abs() < 1e-6
    assert distillation_loss(x, -x).item() == pytest.approx(2.0)


def test_full_softmax_ce_matches_cross_entropy():
    users = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    table = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # row 0 = padding, never a class
    targets = torch.tensor([1, 3])
    expected = F.cross_entropy(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 2.0]]), targets - 1)
    torch.testing.assert_close(full_softmax_ce(users, table, targets), expected)
    by_hand = -(np.log(np.e / (2 * np.e + 1)) + np.log(np.e**2 / (2 * np.e**2 + 1))) / 2
    assert full_softmax_ce(users, table, targets).item() == pytest.approx(by_hand, rel=1e-6)


def test_sampled_softmax_is_pml_ntxent_without_logq():
    users, items = torch.randn(6, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    ours = sampled_softmax_loss(users, items[labels], labels, items, torch.arange(4), temperature=0.1)
    pml = NTXentLoss(temperature=0.1)(users, labels, ref_emb=items, ref_labels=torch.arange(4))
    torch.testing.assert_close(ours, pml)


def test_logq_correction_direction():
    users = F.normalize(torch.randn(3, 4), dim=-1)
    pos, neg = users.clone(), F.normalize(torch.randn(5, 4), dim=-1)
    pos_items, neg_items = torch.tensor([1, 2, 3]), torch.tensor([10, 11, 12, 13, 14])

    def loss(pos_q, neg_q):
        return sampled_softmax_loss(
            users, pos, pos_items, neg, neg_items, 0.5, torch.full((3,), pos_q), torch.full((5,), neg_q)
        )

    plain = sampled_softmax_loss(users, pos, pos_items, neg, neg_items, 0.5)
    assert loss(-1.0, -1.0).item() == pytest.approx(plain.item(), rel=1e-6)  # a shared offset changes nothing
    # popular negatives are over-sampled: correcting for them makes them count less, the loss falls ...
    assert loss(np.log(0.001), np.log(0.5)) < plain
    # ... and a popular positive gets less credit, the loss rises
    assert loss(np.log(0.5), np.log(0.001)) > plain
    counts = np.array([0, 100, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    cfg = ModelConfig(n_items=14, teacher_dim=4)
    criterion = SeqRecLoss(LossConfig(n_sampled_negatives=4), cfg, counts)
    q = criterion.log_q(torch.tensor([1, 2]), n_positions=10)
    assert q[0] > q[1]  # the popular item is expected more often among the negatives


def test_trained_negative_pool_never_samples_unclicked_items():
    counts = np.array([0, 5, 0, 3, 0, 0, 2, 0, 0, 0, 0])  # items 1, 3, 6 are training targets
    cfg = ModelConfig(n_items=10, teacher_dim=4)
    targets = torch.tensor([[0, 1, 3], [0, 0, 6]])
    trained = SeqRecLoss(LossConfig(n_sampled_negatives=200, negative_pool="trained"), cfg, counts)
    drawn = trained.sample_candidates(targets, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3, 6}
    catalogue = SeqRecLoss(LossConfig(n_sampled_negatives=200), cfg, counts)
    assert set(catalogue.sample_candidates(targets, torch.Generator().manual_seed(0)).tolist()) == set(
        range(1, 11)
    )
    # the uniform share of the expected count is spread over the pool: 3 items, not 10
    no_batch = LossConfig(n_sampled_negatives=30, in_batch_negatives=False, negative_pool="trained")
    q = SeqRecLoss(no_batch, cfg, counts).log_q(torch.tensor([1, 6]), n_positions=4)
    torch.testing.assert_close(q, torch.full((2,), float(np.log(10.0))))
    with pytest.raises(ValueError, match="negative_pool"):
        LossConfig(negative_pool="popular")


def test_in_batch_negatives_are_capped_with_their_log_q_scaled():
    n = 50
    cfg = ModelConfig(n_items=n, teacher_dim=4)
    targets = torch.arange(1, 41).reshape(4, 10)  # 40 distinct targets
    capped = SeqRecLoss(LossConfig(max_in_batch_negatives=8, n_sampled_negatives=5), cfg)
    cand = capped.sample_candidates(targets, torch.Generator().manual_seed(0))
    in_batch, uniform = cand[:8], cand[8:]
    assert len(cand) == 13 and len(uniform) == 5
    assert len(set(in_batch.tolist())) == 8 and set(in_batch.tolist()) <= set(range(1, 41))
    # under the cap nothing changes: the same candidates as no cap, from the same draws
    few = torch.tensor([[0, 3, 7, 3], [0, 0, 9, 12]])
    for cap in (4, -1):
        loss = SeqRecLoss(LossConfig(max_in_batch_negatives=cap, n_sampled_negatives=5), cfg)
        torch.testing.assert_close(
            loss.sample_candidates(few, torch.Generator().manual_seed(1)),
            torch.tensor(
                [
                    3,
                    7,
                    9,
                    12,
                    *torch.randint(0, n, (5,), generator=torch.Generator().manual_seed(1)).add(1).tolist(),
                ]
            ),
        )
    # an in-batch target is kept with probability cap / distinct: its expected count scales by it
    full = SeqRecLoss(LossConfig(max_in_batch_negatives=-1, n_sampled_negatives=0), cfg)
    part = SeqRecLoss(LossConfig(max_in_batch_negatives=10, n_sampled_negatives=0), cfg)
    items = torch.tensor([1, 2])
    torch.testing.assert_close(
        part.log_q(items, 40, n_distinct=40), full.log_q(items, 40, n_distinct=40) + float(np.log(10 / 40))
    )
    torch.testing.assert_close(part.log_q(items, 40, n_distinct=8), full.log_q(items, 40))
    with pytest.raises(ValueError, match="max_in_batch_negatives"):
        LossConfig(max_in_batch_negatives=0)


def test_age_scores_equal_indexing_the_bias_forward_and_backward():
    """age_bias_of has a histogram for its backward (CUDA serialises the backward of indexing over the positions
    of one bucket): the same scores and the same gradient as self.age_bias[buckets]."""
    from training.item_age import N_AGE_BUCKETS

    model = make_model("adapter", item_age=True)
    with torch.no_grad():
        model.age_bias.copy_(torch.randn(N_AGE_BUCKETS))
    buckets = torch.randint(0, N_AGE_BUCKETS, (6, 40))
    weights = torch.randn(6, 40)
    got = model.age_bias_of(buckets)
    (grad,) = torch.autograd.grad((got * weights).sum(), model.age_bias)
    want = model.age_bias[buckets]
    (want_grad,) = torch.autograd.grad((want * weights).sum(), model.age_bias)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    assert model.age_bias_of(buckets[0, 0]).shape == ()
