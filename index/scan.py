"""Exact search of a small index version by one matrix product: what an Edge replica searches while its
version holds at most IndexConfig.scan_max_points points.

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
        return _positions(self.ids, np.asarray(item_ids, np.int64).reshape(-1))

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
        by_filter: dict[tuple, list[int]] = {}  # the rows asking under the same filters: one mask for all
        for r, q in enumerate(queries):
            by_filter.setdefault((q.categories, q.available, q.created_at), []).append(r)
        out: list[list[Hit]] = [[] for _ in queries]
        for rows in by_filter.values():
            keep = self.filtered(queries[rows[0]])
            cols = np.arange(len(self)) if keep is None else np.flatnonzero(keep)  # the points let through
            if not len(cols):
                continue
            held = scores[np.ix_(rows, cols)]  # a copy: only what these rows may return
            for j, r in enumerate(rows):
                if queries[r].exclude:
                    held[j, _positions(cols, self.rows_of(queries[r].exclude))] = -np.inf
            for r, hits in zip(rows, self._best(held, cols, k), strict=True):
                out[r] = hits
        return out

    def _best(self, held: np.ndarray, cols: np.ndarray, k: int) -> list[list[Hit]]:
        """(R, C) scores of the points `cols` -> R lists of the best k finite ones, ties by id."""
        n = min(k, held.shape[1])
        cut = held.shape[1] - n
        top = np.argpartition(held, cut, axis=1)[:, cut:] if cut else np.tile(np.arange(n), (len(held), 1))
        best = np.take_along_axis(held, top, 1)
        ids = self.ids[cols[top]]
        order = np.lexsort((ids, -best), axis=-1)  # best first, ties by id
        ids, best = np.take_along_axis(ids, order, 1), np.take_along_axis(best, order, 1).astype(float)
        found = np.isfinite(best)  # an excluded point scores -inf
        return [
            list(zip(i[f].tolist(), b[f].tolist(), strict=True))
            for i, b, f in zip(ids, best, found, strict=True)
        ]

    def _scores(self, q: np.ndarray) -> np.ndarray:
        """(m, D) -> (m, N) similarities: one product per distinct row (an item-age model asks with each
        user's vector once per age bucket), through torch's BLAS, which multiplies a few rows at about the
        cost of one where numpy's takes several times longer (docs/BENCHMARKS.md, search)."""
        import torch

        if self.cosine:
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        q = np.require(q, np.float32, ["C", "W"])
        first: dict[bytes, int] = {}  # a row's bytes -> its first row
        inverse = np.fromiter((first.setdefault(r.tobytes(), i) for i, r in enumerate(q)), np.intp, len(q))
        distinct = np.fromiter(first.values(), np.intp, len(first))  # sorted: first rows come in order
        rows = q if len(distinct) == len(q) else q[distinct]
        scores = torch.nn.functional.linear(torch.from_numpy(rows), torch.from_numpy(self.vectors)).numpy()
        return scores if rows is q else scores[np.searchsorted(distinct, inverse)]


def _positions(held: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Positions in `held` (sorted, not empty) of those `values` it holds."""
    at = np.minimum(np.searchsorted(held, values), len(held) - 1)
    return at[held[at] == values]
