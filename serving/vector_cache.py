"""User vectors kept by their exact model input: a user who asks again with no new click skips the forward.

    cache = VectorCache(100_000)
    vectors = cache.vectors(ids, compute)   # ids (B, max_len) model input; compute(rows of ids) -> (n, D)

A user vector is a function of the model's weights and its input row alone (serving/sources.py
`ModelSource.user_vectors`), so a row seen before gets the vector computed then: exact, not approximate.
A new click, a recent_item_ids entry or a new model (a new source, a new cache) changes the key or the
cache; nothing is ever invalidated by time. Rows are keyed by a 16-byte BLAKE2b digest of their bytes;
least recently used rows leave first beyond `size` (0 = off: every row computed).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class VectorCache:
    """A bounded LRU map from model input rows to user vectors; safe to share between threads."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0 (0 = off), got {size}")
        self.size = size
        self.hits = self.misses = 0
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def vectors(self, ids: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """(B, T) input rows -> (B, D): cached rows looked up, the others computed in one call of `compute`
        (the rows that miss, in order) and kept. Equal rows in one call are computed once."""
        if self.size == 0 or len(ids) == 0:
            with self._lock:
                self.misses += len(ids)
            return compute(ids)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in ids]
        with self._lock:
            found = {k: v for k in keys if (v := self._rows.get(k)) is not None}
            for k in found:
                self._rows.move_to_end(k)
            n_hit = sum(k in found for k in keys)
            self.hits += n_hit
            self.misses += len(keys) - n_hit
        first: dict[bytes, int] = {}  # each missing key's first row
        for i, k in enumerate(keys):
            if k not in found:
                first.setdefault(k, i)
        if first:
            computed = compute(ids[list(first.values())])
            # copies: a cached row must not keep the whole batch's array alive
            new = {k: np.array(v) for k, v in zip(first, computed, strict=True)}
            with self._lock:
                self._rows.update(new)
                while len(self._rows) > self.size:
                    self._rows.popitem(last=False)
            found |= new
        return np.stack([found[k] for k in keys])
