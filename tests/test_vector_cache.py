"""serving/vector_cache.py: user vectors kept by their exact model input, least recently used out first."""

from __future__ import annotations

import numpy as np
import pytest

from serving.vector_cache import VectorCache


class Forward:
    """A stand-in model: each row's vector is a function of the row; records the rows it was given."""

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        self.calls.append(ids.tolist())
        return np.stack([ids.sum(1), ids[:, -1]], axis=1).astype(np.float32)


def rows(*seqs: list[int]) -> np.ndarray:
    return np.asarray([[0] * (4 - len(s)) + s for s in seqs], np.int64).reshape(-1, 4)  # left-padded


def test_a_row_seen_before_skips_the_forward_and_gets_the_same_vector():
    cache, forward = VectorCache(10), Forward()
    a = cache.vectors(rows([1, 2], [3], [1, 2]), forward)
    assert forward.calls == [rows([1, 2], [3]).tolist()]  # the repeated row computed once
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 2)
    b = cache.vectors(rows([3], [1, 2, 5], [1, 2]), forward)
    assert forward.calls[-1] == rows([1, 2, 5]).tolist()  # only the new sequence
    assert (cache.hits, cache.misses, len(cache)) == (2, 4, 3)
    np.testing.assert_array_equal(b, forward(rows([3], [1, 2, 5], [1, 2])))
    np.testing.assert_array_equal(a[0], b[2])


def test_least_recently_used_rows_leave_first():
    cache, forward = VectorCache(2), Forward()
    cache.vectors(rows([1]), forward)
    cache.vectors(rows([2]), forward)
    cache.vectors(rows([1]), forward)  # [1] used again: [2] is now the oldest
    cache.vectors(rows([3]), forward)  # beyond the size: [2] leaves
    assert len(cache) == 2
    n = len(forward.calls)
    cache.vectors(rows([1], [3]), forward)
    assert len(forward.calls) == n  # both kept
    cache.vectors(rows([2]), forward)
    assert forward.calls[-1] == rows([2]).tolist()  # recomputed


def test_size_zero_is_off_and_a_negative_size_is_refused():
    cache, forward = VectorCache(0), Forward()
    cache.vectors(rows([1]), forward)
    cache.vectors(rows([1]), forward)
    assert len(forward.calls) == 2 and len(cache) == 0 and cache.misses == 2
    assert cache.vectors(rows(), forward).shape == (0, 2)
    with pytest.raises(ValueError, match="size"):
        VectorCache(-1)


def test_cached_vectors_do_not_share_memory_with_the_batch_they_came_from():
    cache = VectorCache(10)
    out = np.ones((2, 3), np.float32)
    cache.vectors(rows([1], [2]), lambda ids: out)
    out[:] = 7  # the model's buffer reused by a later call
    np.testing.assert_array_equal(cache.vectors(rows([1], [2]), Forward()), np.ones((2, 3)))
