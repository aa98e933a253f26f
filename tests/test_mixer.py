"""serving/mixer.py: quotas from weights and the de-duplicating quota interleave (pure functions, no Ray).

The route around them (parallel calls, the time budget, dropped producers) is tested in test_serving.py.
"""

from __future__ import annotations

import itertools

import pytest

from serving.mixer import MixError, apportion, interleave, resolve_quotas


def ranked(ids) -> list[tuple[int, float]]:
    return [(i, 1.0 - r / 100) for r, i in enumerate(ids)]


LISTS = {
    "student": ranked([1, 2, 3, 4, 5, 6, 7, 8]),
    "sasrec": ranked([2, 9, 1, 10, 11, 12]),
    "similar": ranked([3, 13, 14, 2]),
    "popular": ranked([1, 15, 16, 17, 18]),
}


def test_apportion_sums_to_k_in_proportion():
    assert apportion(10, {"student": 3, "similar": 1}) == {"student": 8, "similar": 2}  # 7.5 / 2.5: tie
    assert apportion(3, dict.fromkeys("abcd", 1.0)) == {"a": 1, "b": 1, "c": 1, "d": 0}
    for k, w in itertools.product((1, 7, 100), ({"a": 1, "b": 2, "c": 3}, {"a": 0.1, "b": 0})):
        q = apportion(k, w)
        assert sum(q.values()) == k and all(abs(q[p] - k * w[p] / sum(w.values())) < 1 for p in w)


def test_resolve_quotas_and_its_errors():
    assert resolve_quotas(None, {"student": 3, "popular": 0, "similar": 1}, None, 100, 1000) == (
        4,
        {"student": 3, "similar": 1},
    )
    assert resolve_quotas(8, None, None, 100, 1000) == (
        8,
        {"student": 2, "sasrec": 2, "similar": 2, "popular": 2},
    )
    bad = [
        ((None, {"student": 1}, {"student": 1.0}), "quotas"),
        ((5, {"student": 3}, None), "k"),
        ((None, {"student": 0}, None), "quotas"),
        ((None, {"student": 1001}, None), "quotas"),
        ((None, None, {"student": 0.0}), "weights"),
    ]
    for (k, quotas, weights), field in bad:
        with pytest.raises(MixError) as err:
            resolve_quotas(k, quotas, weights, 100, 1000)
        assert err.value.field == field


def test_quotas_honoured_without_duplicates_and_sources_named():
    quotas = {"student": 3, "sasrec": 2, "similar": 2, "popular": 1}
    items, taken = interleave(LISTS, quotas, 8)
    ids = [c["item_id"] for c in items]
    assert len(ids) == len(set(ids)) == 8
    assert taken == quotas
    assert [c["producer"] for c in items] == [
        "student",
        "sasrec",
        "similar",
        "popular",
        "student",
        "sasrec",
        "similar",
        "student",
    ]
    assert ids == [1, 2, 3, 15, 4, 9, 13, 5]  # sasrec's 2 and popular's 1 were taken: next ones instead
    first = items[0]
    assert first["sources"] == ["student", "sasrec", "popular"]
    assert first["ranks"] == {"student": 1, "sasrec": 3, "popular": 1}
    assert first["scores"]["sasrec"] == pytest.approx(0.98)
    assert [c["rank"] for c in items] == list(range(1, 9))
    again, _ = interleave(LISTS, quotas, 8)
    assert again == items, "the same answers always blend to the same list"


def test_a_dropped_or_short_producer_leaves_its_slots_to_the_others():
    quotas = {"student": 2, "sasrec": 2, "similar": 2}
    lists = {p: LISTS[p] for p in ("student", "similar")}  # sasrec dropped (timed out)
    items, taken = interleave(lists, quotas, 6)
    assert len(items) == 6 and taken == {"student": 3, "sasrec": 0, "similar": 3}
    items, taken = interleave({"similar": ranked([3, 13])}, {"student": 1, "similar": 5}, 6)
    assert [c["item_id"] for c in items] == [3, 13] and taken == {"student": 0, "similar": 2}
    assert interleave({}, {"student": 2}, 2) == ([], {"student": 0})
    # similar's candidates all placed before its quota is met: student takes the remaining slots
    items, taken = interleave(
        {"student": ranked([1, 2, 3, 4]), "similar": ranked([1, 2])}, {"student": 1, "similar": 3}, 4
    )
    assert [(c["item_id"], c["producer"]) for c in items] == [
        (1, "student"),
        (2, "similar"),
        (3, "student"),
        (4, "student"),
    ]
    assert taken == {"student": 3, "similar": 1}


def test_huge_and_tiny_weights_give_the_ratios_quotas():
    """Issue 16: {"weights": {"popular": 1e308}} was a 500 (the sum overflowed to inf, then floor(inf))."""
    assert apportion(10, {"popular": 1e308}) == {"popular": 10}
    assert apportion(10, {"student": 1.5e308, "popular": 0.5e308}) == {"student": 8, "popular": 2}
    assert apportion(10, {"student": 3e-320, "popular": 1e-320}) == {"student": 8, "popular": 2}
    assert resolve_quotas(4, None, {"student": 1e308, "similar": 1e308}, 100, 1000) == (
        4,
        {"student": 2, "similar": 2},
    )
    for weights in ({"student": float("inf")}, {"student": float("nan")}, {"student": 0.0}):
        with pytest.raises(MixError) as err:
            apportion(5, weights)
        assert err.value.field == "weights"
