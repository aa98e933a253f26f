"""Evaluation math on hand-made numbers: ranks, ties, exclusion, metrics, sampling, splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from training.metrics import (
    full_ranks,
    leave_one_out,
    metrics_from_ranks,
    rank_of_target,
    sample_negatives,
    sampled_candidates,
    temporal_split,
)


def test_hand_computed_metrics():
    m = metrics_from_ranks(np.array([0, 1, 4, 10]), ks=(1, 5, 10), n_bootstrap=0)["micro"]
    assert m["HR@1"] == pytest.approx(1 / 4)
    assert m["HR@5"] == pytest.approx(3 / 4)
    assert m["HR@10"] == pytest.approx(3 / 4)  # rank 10 is the 11th place
    assert m["NDCG@5"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11) / 4)


def test_micro_macro_and_bootstrap():
    ranks, users = np.array([0, 0, 0, 99]), np.array([7, 7, 7, 8])  # a heavy user and a light one
    r = metrics_from_ranks(ranks, ks=(10,), users=users, n_bootstrap=200)
    assert r["micro"]["HR@10"] == pytest.approx(3 / 4)
    assert r["macro"]["HR@10"] == pytest.approx((1 + 0) / 2)
    assert r["n_users"] == 2 and r["n_queries"] == 4
    lo, hi = r["micro_ci95"]["HR@10"]
    assert 0.0 <= lo <= 3 / 4 <= hi <= 1.0 and lo < hi
    assert metrics_from_ranks(np.zeros(5), ks=(10,), n_bootstrap=50)["micro_ci95"]["HR@10"] == [1.0, 1.0]


def test_rank_does_not_depend_on_target_position():
    """pmixer/SASRec.pytorch #43: with a double argsort the target had to sit at index 0."""
    scores = np.array([[0.5, 0.9, 0.1, 0.7]])
    assert rank_of_target(scores, [0]).tolist() == [2]
    moved = np.array([[0.9, 0.1, 0.7, 0.5]])
    assert rank_of_target(moved, [3]).tolist() == [2]
    assert rank_of_target(np.array([[0.9, 0.5, 0.1]]), [0]).tolist() == [0]


def test_ties_are_pessimistic():
    assert rank_of_target(np.zeros((1, 101)), [0]).tolist() == [100]  # a constant scorer is worst, not best
    assert rank_of_target(np.array([[1.0, 2.0, 2.0, 2.0, 3.0]]), [1]).tolist() == [3]  # 2 ties + 1 above
    assert rank_of_target(np.array([[np.nan, 0.1, 0.2]]), [0]).tolist() == [2]  # a NaN target is last
    assert rank_of_target(np.array([[0.5, np.nan, 0.2]]), [0]).tolist() == [1]  # a NaN competitor is ahead


def test_exclusion_never_removes_target():
    scores = np.array([[0.1, 0.9, 0.8, 0.7, 0.3], [0.1, 0.9, 0.8, 0.7, 0.3]])
    # row 0: exclude two items above the target (3); row 1: the exclusion list names the target itself
    ranks = rank_of_target(scores, [3, 3], [np.array([1, 2, 2]), np.array([3, 1])])
    assert ranks.tolist() == [0, 1]
    mask = np.zeros_like(scores, dtype=bool)
    mask[:, [1, 3]] = True
    assert rank_of_target(scores, [3, 3], mask).tolist() == [1, 1]


def test_full_ranks_excludes_history_and_padding():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[5.0, 5.0], [0.9, 0.0], [0.8, 0.1], [0.1, 0.8], [0.0, 0.9]])  # row 0 = padding
    ranks = full_ranks(users, items, np.array([2, 3]), [np.array([1]), np.array([], np.int64)], chunk=1)
    assert ranks.tolist() == [0, 1]


def test_sampled_protocol():
    rng = np.random.default_rng(0)
    touched = [np.array([1, 2, 3]), np.array([5])]
    neg = sample_negatives(touched, n_items=10, n=7, rng=rng)
    assert neg.shape == (2, 7)
    for row, seen in zip(neg, touched, strict=True):
        assert len(set(row)) == 7 and not set(row) & set(seen) and set(row) <= set(range(1, 11))
    cand = sampled_candidates(np.array([3, 5]), touched, n_items=10, n=7, rng=rng)
    assert cand[:, 0].tolist() == [3, 5] and cand.shape == (2, 8)
    with pytest.raises(ValueError):
        sample_negatives([np.arange(1, 9)], n_items=10, n=3)


def test_temporal_split_counts():
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 1, 2, 3, 1, 3, 4, 2],
            "item_id": [10, 11, 10, 12, 13, 10, 14, 15, 16, 11],
            "event_timestamp": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        }
    ).sample(frac=1.0, random_state=0)  # file order must not matter when times differ
    split = temporal_split(events, train_fraction=0.6)  # floor(6.0) = 6 train events: t <= 6
    assert len(split.train) == 6 and split.train["event_timestamp"].max() == 6
    # test events: (1,14,t7) (3,15,t8) (4,16,t9: no history -> skipped) (2,11,t10)
    assert split.n_skipped_empty_history == 1
    q = {
        int(u): (h.tolist(), int(t), bool(c))
        for u, h, t, c in zip(
            split.test.user_ids, split.test.histories, split.test.targets, split.test.cold, strict=True
        )
    }
    assert q == {1: ([10, 11, 12], 14, True), 3: ([10], 15, True), 2: ([10, 13], 11, False)}


def test_temporal_split_ties_keep_file_order_and_history_includes_earlier_test_events():
    events = pd.DataFrame({"user_id": [1, 1, 1, 1], "item_id": [5, 6, 7, 8], "event_timestamp": [1, 1, 2, 3]})
    split = temporal_split(events, train_fraction=0.5)
    assert split.train["item_id"].tolist() == [5, 6]
    assert [h.tolist() for h in split.test.histories] == [[5, 6], [5, 6, 7]]
    assert split.test.targets.tolist() == [7, 8]


def test_leave_one_out():
    events = pd.DataFrame(
        {"user_id": [1, 1, 1, 1, 2, 2], "item_id": [3, 4, 5, 6, 7, 8], "event_timestamp": [4, 1, 2, 3, 1, 2]}
    )
    split = leave_one_out(events)  # user 1 in time: 4, 5, 6, 3; user 2 has 2 events: all train
    assert split.test.targets.tolist() == [3] and split.test.histories[0].tolist() == [4, 5, 6]
    assert split.valid.targets.tolist() == [6] and split.valid.histories[0].tolist() == [4, 5]
    assert sorted(split.train["item_id"].tolist()) == [4, 5, 7, 8]
    assert split.test.cold.tolist() == [True] and split.valid.cold.tolist() == [True]
