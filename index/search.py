"""Search the current index version: one small interface for Qdrant Edge and a Qdrant server.

    from index.search import open_index
    with open_index(ws, IndexConfig()) as idx:                        # Edge: a private copy of CURRENT
        idx.search(user_vec, 100, exclude_ids=seen, filters={"category": "Drama", "available": True})
        idx.search_batch(user_vecs, 100, exclude_ids=[seen_a, seen_b])   # (B, D) -> B lists
        idx.refresh()                                                 # pick up a new version / upserts
    open_index(None, IndexConfig(backend="server", url="http://qdrant:6333"))

Results are [(item_id, score)], best first: the cosine, or the dot product for a `distance="dot"` version.
Exclusion and filters run inside the search (Qdrant's must_not HasId and must category / available /
created_at; the same conditions in a scanned copy's numpy, index/scan.py), so k results come back whenever
k items qualify.

Edge: Qdrant Edge lets one process open a shard folder, so each Index (each Producer replica) copies the
current version into `<index_dir>/replicas/<host>-<pid>-<uuid>/` and loads the copy; it replays the
version's upsert log on open and on refresh(). refresh() swaps to a fresh copy when CURRENT moved: it
builds the new copy, swaps the reference, then closes the old one once in-flight searches finish. A copy of
at most `scan_max_points` points is searched exactly by a matrix product (index/scan.py), read from the shard again
after every replay; a larger one through the shard's graph.
Server: searches go to the collection the alias named when opened (or last refreshed), so version,
teacher_id and dim always describe the vectors searched.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from index.config import IndexConfig
from index.scan import Hit, Scan
from index.store import (
    VECTOR,
    Layout,
    VersionInfo,
    clean_stale,
    collection_info,
    copy_shard,
    current_collection,
    edge_upsert,
    locked,
    make_client,
    owner_tag,
    read_current,
    read_log,
    search_params,
    upsert_logs,
)
from vlmrec.lease import Current
from vlmrec.workspace import Workspace


@dataclass(frozen=True)
class _Query:
    """One query's constraints, validated: categories (any of), available, excluded item ids, a range on
    created_at (epoch seconds: the item-age buckets of serving, training.item_age.bucket_ranges)."""

    categories: tuple[str, ...] | None = None
    available: bool | None = None
    exclude: tuple[int, ...] = ()
    created_at: tuple[tuple[str, float], ...] = ()  # (op, value), op in gt / gte / lt / lte


def _parse(filters: dict | None, exclude: Sequence[int]) -> _Query:
    filters = dict(filters or {})
    unknown = sorted(set(filters) - {"category", "available", "created_at"})
    if unknown:
        raise ValueError(
            f"unknown filter keys {unknown}: use 'category' (str or list), 'available' (bool) and "
            "'created_at' ({gt, gte, lt, lte: epoch seconds})"
        )
    created = dict(filters.get("created_at") or {})
    if set(created) - {"gt", "gte", "lt", "lte"} or not all(
        isinstance(v, (int, float)) and np.isfinite(v) for v in created.values()
    ):
        raise ValueError(
            f"filter 'created_at' must map gt/gte/lt/lte to finite epoch seconds, got {created!r}"
        )
    cat = filters.get("category")
    cats = None if cat is None else ((cat,) if isinstance(cat, str) else tuple(str(c) for c in cat))
    avail = filters.get("available")
    if avail is not None and not isinstance(avail, (bool, np.bool_)):
        raise ValueError(f"filter 'available' must be a bool, got {avail!r}")
    return _Query(
        cats,
        None if avail is None else bool(avail),
        tuple(int(i) for i in exclude),
        tuple(sorted((op, float(v)) for op, v in created.items())),
    )


def _queries(
    b: int, exclude_ids: Sequence[Sequence[int]] | None, filters: dict | Sequence[dict | None] | None
) -> list[_Query]:
    """One parsed query per row: exclude_ids one sequence per row; filters one dict for all or one per row."""
    exclude_ids = [()] * b if exclude_ids is None else list(exclude_ids)
    per_query = filters if isinstance(filters, (list, tuple)) else [filters] * b
    if len(exclude_ids) != b or len(per_query) != b:
        raise ValueError(f"exclude_ids / filters: need one per query ({b})")
    return [_parse(f, e) for f, e in zip(per_query, exclude_ids, strict=True)]


def _score(score: float, recommend: bool) -> float:
    """A Qdrant hit's score as a similarity: Qdrant scores a best-score recommendation as
    scaled_fast_sigmoid(best similarity), 0.5 * (x / (1 + |x|) + 1), undone here (the ranking is the same)."""
    if not recommend:
        return float(score)
    s = 2.0 * float(score) - 1.0
    return s / max(1.0 - abs(s), 1e-12)


class Index(ABC):
    """The interface both backends share. Thread-safe for searches; call close() (or use `with`)."""

    config: IndexConfig
    info: VersionInfo

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def teacher_id(self) -> str:
        return self.info.teacher_id

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def distance(self) -> str:
        return self.info.distance

    def search(
        self, vector: np.ndarray, k: int, exclude_ids: Sequence[int] = (), filters: dict | None = None
    ) -> list[Hit]:
        """vector (D,) -> the k nearest items."""
        return self.search_batch(np.asarray(vector)[None], k, [exclude_ids], filters)[0]

    def search_batch(
        self,
        vectors: np.ndarray,
        k: int,
        exclude_ids: Sequence[Sequence[int]] | None = None,
        filters: dict | Sequence[dict | None] | None = None,
    ) -> list[list[Hit]]:
        """vectors (B, D) -> B lists of hits, planned as one batch. exclude_ids: one sequence per query;
        filters: one dict for all queries or one per query."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors: expected shape (B, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("vectors: NaN or inf in the query")
        queries = _queries(len(x), exclude_ids, filters)
        return self._search(x, int(k), queries) if queries else []

    def recommend_batch(
        self,
        examples: Sequence[np.ndarray],
        k: int,
        exclude_ids: Sequence[Sequence[int]] | None = None,
        filters: dict | Sequence[dict | None] | None = None,
    ) -> list[list[Hit]]:
        """One query per row of examples ((m_i, D) vectors each): the items nearest to ANY of them, scored by
        their best similarity to one of them (Qdrant's recommend query, best-score strategy), in one batch.
        exclude_ids and filters as in search_batch."""
        groups = [np.asarray(g, dtype=np.float32).reshape(-1, self.dim) for g in examples]
        if any(len(g) == 0 for g in groups):
            raise ValueError("examples: every row needs at least one vector")
        if not all(np.isfinite(g).all() for g in groups):
            raise ValueError("examples: NaN or inf in a vector")
        queries = _queries(len(groups), exclude_ids, filters)
        if not queries:
            return []
        return self._search(groups, int(k), queries, recommend=True)

    @abstractmethod
    def _search(self, x, k: int, queries: list[_Query], recommend: bool = False) -> list[list[Hit]]:
        """x: (B, D) query vectors, or (recommend) B arrays of example vectors; scores are similarities."""

    @abstractmethod
    def count(self, filters: dict | None = None) -> int:
        """Points in the version searched (upserts included), those matching `filters` when given (the
        keys of search_batch's filters)."""

    @property
    def changes(self) -> object | None:
        """A value that differs whenever the points searched may have changed (a new version, applied
        upserts), for callers that cache what they counted; None when this process cannot tell (a server's
        collection takes upserts from elsewhere)."""
        return None

    @abstractmethod
    def get_vectors(self, item_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """item_id -> its stored (D,) vector (unit norm); unknown ids are left out."""

    @abstractmethod
    def refresh(self) -> bool:
        """Follow CURRENT / the alias (and, on Edge, new upserts); True when anything changed."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_index(where=None, config: IndexConfig = IndexConfig(), *, client=None) -> Index:
    """Edge: `where` is the index folder or a Workspace. Server: `where` is a url string (anything else
    falls back to config.url / config.path), or pass a QdrantClient as `client` (e.g. local mode; the
    caller keeps owning it: close() leaves it open)."""
    if config.backend == "server":
        if client is not None:
            return ServerIndex(client, config, owns_client=False)
        url = where if isinstance(where, str) else config.url  # a Workspace / folder means nothing here
        return ServerIndex(make_client(replace(config, url=url)), config, owns_client=True)
    if where is None:
        raise ValueError("the Edge backend needs the index folder (or a Workspace)")
    return EdgeIndex(where.index if isinstance(where, Workspace) else Path(where), config)


# -- Edge ----------------------------------------------------------------------------------------------


def _edge_filter(q: _Query):
    from qdrant_edge import FieldCondition, Filter, HasIdCondition, MatchAny, MatchValue, RangeFloat

    must = []
    if q.categories is not None:
        cats = list(q.categories)
        must.append(
            FieldCondition("category", match=MatchValue(cats[0]) if len(cats) == 1 else MatchAny(cats))
        )
    if q.available is not None:
        # qdrant-edge-py 0.9.0 turns a Python bool into the integer 1/0 (bool subclasses int), which never
        # matches a bool payload; numpy's bool_ reaches the Bool variant.
        must.append(FieldCondition("available", match=MatchValue(np.bool_(q.available))))
    if q.created_at:
        must.append(FieldCondition("created_at", range=RangeFloat(**dict(q.created_at))))
    must_not = [HasIdCondition(set(q.exclude))] if q.exclude else []
    if not must and not must_not:
        return None
    return Filter(must=must or None, must_not=must_not or None)


class _Replica:
    """A private copy of one version: its shard, folder, and the upsert log files already applied; `scan`
    (index/scan.py) when it is small enough to search exactly, read again after each replay."""

    def __init__(self, shard, folder: Path, info: VersionInfo, applied: tuple[str, ...], params):
        self.shard, self.folder, self.info, self.applied = shard, folder, info, applied
        self.params = params  # search params for this version's size
        self.scan: Scan | None = None

    def close(self) -> None:
        try:
            self.shard.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class EdgeIndex(Index):
    def __init__(self, root: Path, config: IndexConfig):
        self.layout, self.config = Layout(root), config
        self._refresh_lock = threading.Lock()  # one refresh at a time
        clean_stale(self.layout)
        self._replica: Current[_Replica] = Current(self._open_replica(), _Replica.close, "index")

    @property
    def info(self) -> VersionInfo:
        return self._replica.peek().info

    def _open_replica(self) -> _Replica:
        from qdrant_edge import EdgeShard

        for _ in range(10):
            info = read_current(self.layout.root)
            if info is None:
                raise FileNotFoundError(
                    f"no index at {self.layout.root} (no CURRENT): run `vlmrec index build`"
                )
            folder = self.layout.replicas / f"{owner_tag()}-{uuid.uuid4().hex[:12]}"
            try:
                with locked(self.layout.lock(info.version), exclusive=False):  # no upsert / prune meanwhile
                    copy_shard(self.layout.shard(info.version), folder / "shard")
                    logs = upsert_logs(self.layout, info.version)
                    tables = [read_log(p) for p in logs]
            except FileNotFoundError:  # the version was pruned after we read CURRENT: read it again
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                shard = EdgeShard.load(str(folder / "shard"))
            except Exception as exc:  # a truncated or corrupt version: Edge raises a bare Exception
                shutil.rmtree(folder, ignore_errors=True)
                first = (str(exc).strip().splitlines() or [""])[0]
                raise ValueError(
                    f"the index version {info.version} at {self.layout.shard(info.version)} does not open "
                    f"({type(exc).__name__}: {first}): run `vlmrec index build` again"
                ) from exc
            try:
                for t in tables:
                    edge_upsert(shard, t, self.config.batch_size)
            except BaseException:
                shard.close()
                shutil.rmtree(folder, ignore_errors=True)
                raise
            params = search_params(self.config.for_size(info.count), "edge")
            replica = _Replica(shard, folder, info, tuple(p.name for p in logs), params)
            try:
                self._rescan(replica)
            except BaseException:
                replica.close()
                raise
            return replica
        raise RuntimeError(f"could not copy the current version of {self.layout.root}: it kept moving")

    def _search(self, x, k: int, queries: list[_Query], recommend: bool = False) -> list[list[Hit]]:
        from qdrant_edge import Query, QueryBatchRequest, QueryRequest, RecommendQuery

        def query(v):
            if recommend:
                return Query.RecommendBestScore(RecommendQuery([e.tolist() for e in v], []), using=VECTOR)
            return Query.Nearest(v.tolist(), using=VECTOR)

        with self._replica.use() as r:
            scan = r.scan
            if scan is not None:
                return scan.search(x, k, queries, recommend)
            requests = [
                QueryRequest(
                    limit=k,
                    query=query(v),
                    filter=_edge_filter(q),
                    params=r.params,
                    with_payload=False,
                )
                for v, q in zip(x, queries, strict=True)
            ]
            if len(requests) == 1:
                results = [r.shard.query(requests[0])]
            else:
                results = r.shard.query_batch(QueryBatchRequest(requests))
        return [[(int(p.id), _score(p.score, recommend)) for p in res] for res in results]

    def _rescan(self, r: _Replica) -> None:
        """Read the replica's points into a new Scan while it holds at most config.scan_max_points (else
        none), then swap it in: a search sees the old scan or the new one, whole."""
        from qdrant_edge import CountRequest

        small = 0 < r.shard.count(CountRequest(exact=True)) <= self.config.scan_max_points
        r.scan = Scan.of(r.shard, r.info.distance) if small else None

    def count(self, filters: dict | None = None) -> int:
        from qdrant_edge import CountRequest

        where = None if filters is None else _edge_filter(_parse(filters, ()))
        with self._replica.use() as r:
            return r.shard.count(CountRequest(exact=True, filter=where))

    @property
    def changes(self) -> object:
        r = self._replica.peek()
        return r.info.version, id(r), len(r.applied)  # a new copy, or upserts replayed onto this one

    def get_vectors(self, item_ids: Sequence[int]) -> dict[int, np.ndarray]:
        with self._replica.use() as r:
            scan = r.scan
            if scan is not None:
                return scan.get_vectors(item_ids)
            records = r.shard.retrieve([int(i) for i in item_ids], False, [VECTOR])
        return {int(rec.id): np.asarray(rec.vector[VECTOR], dtype=np.float32) for rec in records}

    def refresh(self) -> bool:
        with self._refresh_lock:
            r = self._replica.peek()
            current = read_current(self.layout.root)
            if current is not None and current.version != r.info.version:
                # build the new copy first, then swap; the old one closes once its searches are done
                self._replica.swap(self._open_replica())
                return True
            new = [p for p in upsert_logs(self.layout, r.info.version) if p.name not in set(r.applied)]
            for p in new:  # the replica owns its copy: replay onto it in place
                edge_upsert(r.shard, read_log(p), self.config.batch_size)
                r.applied = (*r.applied, p.name)
            if new:
                self._rescan(r)
            return bool(new)

    def close(self) -> None:
        with self._refresh_lock:
            self._replica.close()


# -- server --------------------------------------------------------------------------------------------


def _server_filter(q: _Query):
    from qdrant_client import models

    must = []
    if q.categories is not None:
        must.append(models.FieldCondition(key="category", match=models.MatchAny(any=list(q.categories))))
    if q.available is not None:
        must.append(models.FieldCondition(key="available", match=models.MatchValue(value=q.available)))
    if q.created_at:
        must.append(models.FieldCondition(key="created_at", range=models.Range(**dict(q.created_at))))
    must_not = [models.HasIdCondition(has_id=list(q.exclude))] if q.exclude else []
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


class ServerIndex(Index):
    def __init__(self, client, config: IndexConfig, owns_client: bool):
        self.client, self.config, self._owns = client, config, owns_client
        self._target: tuple[str, VersionInfo, object] = self._resolve()  # swapped as one reference

    @property
    def collection(self) -> str:
        return self._target[0]

    @property
    def info(self) -> VersionInfo:
        return self._target[1]

    def _resolve(self, name: str | None = None) -> tuple[str, VersionInfo, object]:
        """The collection the alias names now (or `name`, just read from it), its VersionInfo and the search
        params for its size. Searches go to that collection, not to the alias: a new version (another
        student's item space) must not be searched before this replica's model is swapped with it."""
        name = name or current_collection(self.client, self.config.alias)
        if name is None:
            raise FileNotFoundError(f"no alias {self.config.alias!r} on the server: run `vlmrec index build`")
        info = collection_info(self.client, name)
        return name, info, search_params(self.config.for_size(info.count), "server")

    def _search(self, x, k: int, queries: list[_Query], recommend: bool = False) -> list[list[Hit]]:
        from qdrant_client import models

        def query(v):
            if recommend:
                best = models.RecommendStrategy.BEST_SCORE
                return models.RecommendQuery(
                    recommend=models.RecommendInput(positive=[e.tolist() for e in v], strategy=best)
                )
            return v.tolist()

        collection, _, params = self._target
        if len(x) == 1:
            res = self.client.query_points(
                collection,
                query=query(x[0]),
                using=VECTOR,
                limit=k,
                query_filter=_server_filter(queries[0]),
                search_params=params,
            )
            responses = [res]
        else:
            requests = [
                models.QueryRequest(
                    query=query(v), using=VECTOR, limit=k, filter=_server_filter(q), params=params
                )
                for v, q in zip(x, queries, strict=True)
            ]
            responses = self.client.query_batch_points(collection, requests=requests)
        return [[(int(p.id), _score(p.score, recommend)) for p in r.points] for r in responses]

    def count(self, filters: dict | None = None) -> int:
        where = None if filters is None else _server_filter(_parse(filters, ()))
        return self.client.count(self.collection, count_filter=where, exact=True).count

    def get_vectors(self, item_ids: Sequence[int]) -> dict[int, np.ndarray]:
        records = self.client.retrieve(self.collection, [int(i) for i in item_ids], with_vectors=[VECTOR])
        return {int(r.id): np.asarray(r.vector[VECTOR], dtype=np.float32) for r in records}

    def refresh(self) -> bool:
        name = current_collection(self.client, self.config.alias)
        if name is None or name == self.collection:
            return False
        self._target = self._resolve(name)
        return True

    def close(self) -> None:
        if self._owns:
            self.client.close()
