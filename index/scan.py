"""Exact search of a small index version in numpy: what an Edge replica searches while its version holds at
most IndexConfig.scan_max_points points.

    scan = Scan.of(shard, "cosine")           # every point of an open EdgeShard, read once
    scan.search(x, 100, queries)              # (B, D) -> B hit lists: the exact top k under each query's filters
    scan.search(groups, 100, queries, recommend=True)   # each item's best similarity to any of a row's vectors

Below some tens of thousands of items one matrix product over every vector costs less than walking the graph
(docs/BENCHMARKS.md, search), finds the exact top k, and runs with the interpreter released (BLAS), where a
Qdrant Edge search holds it for its whole length, so the replica's event loop and its other threads stall
behind it. The shard stays the store of record: the scan is read from it whenever what it holds changes (a new
version, replayed upserts), and a filter means what it means to Qdrant: a point without the field never
matches a condition on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index.store import VECTOR

Hit = tuple[int, float]  # (item_id, score: cosine, or dot product for a dot-product version)
_OPS = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}


@dataclass(frozen=True, eq=False)
class Scan:
    """Every point of one version as arrays, ordered by id: vectors as stored (unit length in a cosine
    version) and the fields filters read."""

    ids: np.ndarray  # (N,) int64, sorted
    vectors: np.ndarray  # (N, D) float32
    categories: np.ndarray  # (C,) str: the distinct categories
    category: np.ndarray  # (N,) int32 index into categories, -1 = none
    available: np.ndarray  # (N,) int8: 1 / 0, -1 = none
    created_at: np.ndarray  # (N,) float64 epoch seconds, NaN = none
    cosine: bool  # queries are normalised (Qdrant's cosine), else raw dot products

    @classmethod
    def of(cls, shard, distance: str, page: int = 5_000) -> Scan:
        """Read every point of an open EdgeShard (vectors and payloads), a page at a time (each page's
        vectors become one array before the next is read)."""
        from qdrant_edge import ScrollRequest

        ids, vectors, cats, avail, created, offset = [], [], [], [], [], None
        while True:
            got, offset = shard.scroll(
                ScrollRequest(offset=offset, limit=page, with_payload=True, with_vector=[VECTOR])
            )
            if got:
                ids.append(np.fromiter((int(p.id) for p in got), np.int64, len(got)))
                vectors.append(np.asarray([p.vector[VECTOR] for p in got], np.float32))
                payloads = [p.payload or {} for p in got]
                cats += [p.get("category") for p in payloads]
                avail += [p.get("available") for p in payloads]
                created += [p.get("created_at") for p in payloads]
            if offset is None:
                break
        if not ids:
            raise ValueError("an empty version has nothing to scan")
        order = np.argsort(np.concatenate(ids), kind="stable")
        names = sorted({c for c in cats if c is not None})
        code = {c: i for i, c in enumerate(names)}
        return cls(
            ids=np.concatenate(ids)[order],
            vectors=np.ascontiguousarray(np.concatenate(vectors)[order]),
            categories=np.asarray(names, dtype=object),
            category=np.asarray([-1 if c is None else code[c] for c in cats], np.int32)[order],
            available=np.asarray([-1 if a is None else int(bool(a)) for a in avail], np.int8)[order],
            created_at=np.asarray([np.nan if c is None else float(c) for c in created], np.float64)[order],
            cosine=distance == "cosine",
        )

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, item_ids: Sequence[int]) -> np.ndarray:
        """Row positions of the ids held (unknown ids left out)."""
        ids = np.asarray(item_ids, np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids).clip(0, max(len(self.ids) - 1, 0))
        return pos[self.ids[pos] == ids] if len(self.ids) else pos[:0]

    def get_vectors(self, item_ids: Sequence[int]) -> dict[int, np.ndarray]:
        return {int(self.ids[r]): self.vectors[r].copy() for r in self.rows_of(item_ids)}

    def filtered(self, query) -> np.ndarray | None:
        """(N,) bool: the points a query's filters let through (exclusions aside); None: no filter."""
        keep = None

        def both(mask: np.ndarray) -> np.ndarray:
            return mask if keep is None else keep & mask

        if query.categories is not None:
            wanted = np.flatnonzero(np.isin(self.categories, list(query.categories)))
            keep = both(np.isin(self.category, wanted))
        if query.available is not None:
            keep = both(self.available == int(query.available))
        for op, value in query.created_at:
            keep = both(_OPS[op](self.created_at, value))  # NaN (no field) compares False
        return keep

    def search(self, x, k: int, queries: Sequence, recommend: bool = False) -> list[list[Hit]]:
        """x: (B, D) query vectors, or (recommend) B arrays of example vectors (m_i, D): each item scored by
        its best similarity to one of them. -> B lists of (item_id, score), best first, at most k each."""
        if recommend:
            scores = np.stack([self._scores(np.asarray(g, np.float32)).max(0) for g in x])
        else:
            scores = self._scores(np.asarray(x, np.float32))  # (B, N)
        for row, q in zip(scores, queries, strict=True):  # what a query may not return scores -inf
            keep = self.filtered(q)
            if keep is not None:
                row[~keep] = -np.inf
            if q.exclude:
                row[self.rows_of(q.exclude)] = -np.inf
        n = min(k, len(self))
        if n <= 0:
            return [[] for _ in queries]
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n] if n < len(self) else None
        out = []
        for r, row in enumerate(scores):
            best = np.arange(len(self)) if top is None else top[r]
            best = best[np.lexsort((self.ids[best], -row[best]))]  # best first, ties by id
            best = best[np.isfinite(row[best])]
            out.append(list(zip(self.ids[best].tolist(), row[best].astype(float).tolist(), strict=True)))
        return out

    def _scores(self, q: np.ndarray) -> np.ndarray:
        """(m, D) -> (m, N) similarities."""
        if self.cosine:
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q @ self.vectors.T
