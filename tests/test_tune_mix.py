"""The Mixer's default weights: chosen on validation by `vlmrec tune-mix`, read by the Producer (pure parts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.config import ProducerConfig
from serving.mixer import read_mix_weights, resolve_quotas
from serving.tune_mix import MixTuneConfig, mixed, recall, search_weights


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
    floored = search_weights(lists, targets, cold, MixTuneConfig(k=2, cold_floor=0.5))
    assert free["chosen"]["quotas"] == {"student": 2} and free["chosen"]["recall_all"] == pytest.approx(5 / 7)
    assert free["chosen"]["recall_cold"] == 0.0
    assert floored["chosen"]["quotas"] == {"student": 1, "similar": 1}  # the floor costs warm recall
    assert floored["chosen"]["recall_all"] == pytest.approx(4 / 7) and floored["chosen"]["recall_cold"] == 1.0
    assert floored["cold_floor_recall"] == 0.5 and floored["producers"]["similar"]["recall_cold"] == 1.0
    assert recall(mixed(lists, floored["chosen"]["quotas"], 2), targets).tolist() == [1, 1, 0, 0, 0, 1, 1]
