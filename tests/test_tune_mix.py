"""The Mixer's default weights: chosen on validation by `vlmrec tune-mix`, read by the Producer (pure parts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.config import ProducerConfig
from serving.loading import read_mix_weights
from serving.mixer import resolve_quotas
from serving.tune_mix import (
    MixTuneConfig,
    binomial_cdf,
    mcnemar_p,
    meets_floor,
    mixed,
    recall,
    search_weights,
)


def test_the_validated_weights_are_the_default_blend_and_requests_still_override_them(tmp_path):
    path = tmp_path / "mix.json"
    assert read_mix_weights(path) is None
    path.write_text(json.dumps({"weights": {"student": 2, "similar": 1, "popular": 0}}))
    weights = read_mix_weights(path)
    assert weights == {"student": 2.0, "similar": 1.0, "popular": 0.0}
    assert resolve_quotas(9, None, None, 100, 1000, weights) == (9, {"student": 6, "similar": 3})
    assert resolve_quotas(4, None, {"popular": 1.0}, 100, 1000, weights) == (4, {"popular": 4})
    assert resolve_quotas(None, {"sasrec": 2}, None, 100, 1000, weights) == (2, {"sasrec": 2})
    assert ProducerConfig(workdir=str(tmp_path)).mix_path == path
    for bad in ({"weights": {"nobody": 1}}, {"weights": {"student": -1}}, {"weights": {"student": 0}}, {}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="mix"):
            read_mix_weights(path)


def test_search_keeps_the_best_recall_that_reaches_the_cold_floor():
    # k = 2; five warm targets (student: two at rank 1, three at rank 2), two cold ones (similar: rank 1)
    targets = np.array([10, 11, 12, 13, 14, 20, 21])
    cold = np.array([False] * 5 + [True] * 2)
    student = [[(10, 1.0), (1, 0.9)], [(11, 1.0), (1, 0.9)]] + [[(1, 1.0), (t, 0.9)] for t in (12, 13, 14)]
    lists = {
        "student": student + [[(1, 1.0), (2, 0.9)]] * 2,
        "sasrec": [[(3, 1.0), (4, 0.9)]] * 7,
        "similar": [[(5, 1.0), (6, 0.9)]] * 5 + [[(20, 1.0), (6, 0.9)], [(21, 1.0), (6, 0.9)]],
        "popular": [[(7, 1.0), (8, 0.9)]] * 7,
    }
    assert recall(lists["similar"], targets).tolist() == [0] * 5 + [1, 1]
    free = search_weights(lists, targets, cold, MixTuneConfig(k=2, cold_floor=0.0))
    floored = search_weights(
        lists, targets, cold, MixTuneConfig(k=2, cold_floor=0.5, cold_alpha=1.0, blend_alpha=1.0)
    )
    assert free["chosen"]["quotas"] == {"student": 2} and free["chosen"]["recall_all"] == pytest.approx(5 / 7)
    assert free["chosen"]["recall_cold"] == 0.0
    assert floored["chosen"]["quotas"] == {"student": 1, "similar": 1}  # the floor costs warm recall
    assert floored["chosen"]["recall_all"] == pytest.approx(4 / 7) and floored["chosen"]["recall_cold"] == 1.0
    assert floored["cold_floor_recall"] == 0.5 and floored["producers"]["similar"]["recall_cold"] == 1.0
    assert recall(mixed(lists, floored["chosen"]["quotas"], 2), targets).tolist() == [1, 1, 0, 0, 0, 1, 1]


def test_the_cold_floor_binds_only_where_the_validation_can_tell():
    # two cold targets: 0 hits against a floor of half is p = 0.25, no evidence; the floor read exactly binds
    assert meets_floor(0, 2, 0.5, 0.05) and not meets_floor(0, 2, 0.5, 1.0)
    assert meets_floor(1, 16, 0.125, 0.05) and not meets_floor(1, 16, 0.125, 1.0)  # 1 of 16 vs 2 of 16
    assert not meets_floor(0, 100, 0.125, 0.05)  # 0 of 100 vs 12.5 of 100: p = 1.6e-6
    assert meets_floor(13, 100, 0.125, 0.05) and meets_floor(0, 0, 0.5, 0.05)  # at the floor; nothing to test
    assert binomial_cdf(1, 16, 0.125) == pytest.approx(0.387934714498)  # scipy.stats.binom.cdf(1, 16, 0.125)
    assert binomial_cdf(100, 3042, 0.05) == pytest.approx(2.68149518228e-06)
    assert binomial_cdf(16, 16, 0.5) == pytest.approx(1.0)


def test_a_blend_replaces_the_best_single_producer_only_when_it_beats_it_significantly():
    a, b = np.zeros(40), np.zeros(40)
    a[:3] = 1  # the blend finds 3 targets the single producer misses, and loses none
    assert mcnemar_p(a, b) == pytest.approx(0.125) and mcnemar_p(b, a) == 1.0 and mcnemar_p(a, a) == 1.0
    a[:12] = 1
    assert mcnemar_p(a, b) == pytest.approx(0.5**12)
    # student 1 : similar 1 beats similar alone (the only single producer at the floor) on 2 of 4: p = 0.25
    targets = np.array([10, 11, 20, 21])
    cold = np.array([False, False, True, True])
    lists = {
        "student": [[(10, 1.0), (1, 0.9)], [(11, 1.0), (1, 0.9)], [(1, 1.0), (2, 0.9)], [(1, 1.0), (2, 0.9)]],
        "sasrec": [[(3, 1.0), (4, 0.9)]] * 4,
        "similar": [[(5, 1.0), (6, 0.9)]] * 2 + [[(20, 1.0), (6, 0.9)], [(21, 1.0), (6, 0.9)]],
        "popular": [[(7, 1.0), (8, 0.9)]] * 4,
    }
    strict = MixTuneConfig(k=2, cold_floor=0.5, cold_alpha=1.0)
    out = search_weights(lists, targets, cold, strict)
    assert out["best_blend"]["quotas"] == {"student": 1, "similar": 1} and out["best_blend"][
        "p_vs_best_single"
    ] == pytest.approx(0.25)
    assert out["chosen"]["quotas"] == {"similar": 2}
    assert search_weights(
        lists, targets, cold, MixTuneConfig(k=2, cold_floor=0.5, cold_alpha=1.0, blend_alpha=1.0)
    )["chosen"]["quotas"] == {"student": 1, "similar": 1}
