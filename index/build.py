"""Build a new index version from an item vector table, verify it, then switch to it in one atomic step.

    from index.build import build_index, upsert_items
    v = build_index("runs/x/export/item_vectors.parquet", ws.items, ws, IndexConfig())   # Edge
    v = build_index(vecs, ws.items, None, IndexConfig(backend="server", url="http://qdrant:6333"))
    upsert_items(new_vecs, new_items, ws, IndexConfig())    # cold-start items into the current version

or `vlmrec index build|upsert --workdir W` (index/cli.py). Steps: validate the table (one teacher id, one
dim, finite non-zero vectors, unique ids, every id in the catalogue) -> create version `v<UTC>-<digest>`
-> upsert in batches -> payload indexes (category, available, created_at, item_id) -> optimise (HNSW) ->
verify (count, probes) -> switch (Edge: os.replace of CURRENT; server: one update_collection_aliases
call) -> drop versions beyond keep_versions. Any failure before the switch removes the new version, and
the current one never changes; a crash leaves at most an unpointed folder/collection that later builds
remove.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from index.config import IndexConfig
from index.store import (
    POINTS,
    Layout,
    VersionInfo,
    collection_info,
    current_collection,
    edge_upsert,
    locked,
    read_current,
    upsert_logs,
    vectors_of,
)
from index.writers import ServerWriter, index_root, writer_for
from vlmrec.workspace import Workspace, atomic_write_parquet

# the IndexConfig fields that shape what is built (the rest are where / how to search)
BUILD_FIELDS = (
    "hnsw_m",
    "hnsw_ef_construct",
    "full_scan_threshold_kb",
    "indexing_threshold_kb",
    "quantization",
    "quantization_quantile",
    "distance",
)


@dataclass(frozen=True)
class IndexVersion:
    """What build_index made."""

    name: str
    backend: str
    location: str  # Edge: the version folder; server: the collection
    teacher_id: str
    dim: int
    count: int
    created: str
    seconds: float
    verify: str  # what the verification checked
    indexed: int  # vectors in the HNSW graph (0: small enough to be scanned exactly)
    dropped: tuple[str, ...]  # versions removed by keep_versions


# -- input tables --------------------------------------------------------------------------------------

ROWS_AT_A_TIME = 65_536  # vectors checked per block


def load_vector_table(src) -> pa.Table:
    """Read and validate an item vector table (path, DataFrame or Table) -> item_id, vector, teacher_id,
    available. Raises ValueError naming the column and how many rows are wrong."""
    if isinstance(src, (str, Path)):
        table = pq.read_table(src)
    elif isinstance(src, pd.DataFrame):
        table = pa.Table.from_pandas(src, preserve_index=False)
    else:
        table = src
    missing = [c for c in ("item_id", "vector", "teacher_id") if c not in table.column_names]
    if missing:
        raise ValueError(f"vector table: missing columns {missing} (needs item_id, vector, teacher_id)")
    n = table.num_rows
    if n == 0:
        raise ValueError("vector table: no rows")

    ids = table.column("item_id")
    if ids.null_count:
        raise ValueError(f"column item_id: {ids.null_count} null ids")
    ids = ids.cast(pa.int64()).to_numpy()
    if (ids < 0).any():
        raise ValueError(f"column item_id: {(ids < 0).sum()} negative ids (Qdrant point ids are unsigned)")
    dup = pd.Series(ids).duplicated()
    if dup.any():
        raise ValueError(
            f"column item_id: {dup.sum()} duplicated ids, e.g. {ids[dup.to_numpy()][:5].tolist()}"
        )

    teachers = table.column("teacher_id").cast(pa.string())
    if teachers.null_count:
        raise ValueError(f"column teacher_id: {teachers.null_count} null values")
    counts = pd.Series(teachers.to_numpy(zero_copy_only=False)).value_counts()
    if len(counts) > 1:
        raise ValueError(
            f"column teacher_id: {len(counts)} distinct values {counts.to_dict()}; "
            "an index holds one teacher's vectors"
        )

    vec = table.column("vector")
    if vec.null_count:
        raise ValueError(f"column vector: {vec.null_count} null vectors")
    vec = vec.cast(pa.list_(pa.float32()))
    lengths = pd.Series(pc.list_value_length(vec).to_numpy(zero_copy_only=False)).value_counts()
    if len(lengths) > 1 or lengths.index[0] == 0:
        raise ValueError(
            f"column vector: rows of different or zero length {lengths.to_dict()} (length: rows)"
        )

    available = (
        table.column("available").cast(pa.bool_()).fill_null(True)
        if "available" in table.column_names
        else pa.array(np.ones(n, bool))
    )
    out = pa.table(
        {"item_id": pa.array(ids), "vector": vec, "teacher_id": teachers, "available": available}
    ).combine_chunks()
    x = vectors_of(out)  # (N, D)
    bad, zero = np.zeros(n, bool), np.zeros(n, bool)
    for a in range(0, n, ROWS_AT_A_TIME):  # a block at a time: no (N, D) temporaries beside the vectors
        block = x[a : a + ROWS_AT_A_TIME]
        bad[a : a + len(block)] = ~np.isfinite(block).all(axis=1)
        zero[a : a + len(block)] = np.linalg.norm(block, axis=1) == 0
    if bad.any():
        raise ValueError(
            f"column vector: {bad.sum()} rows hold NaN or inf, e.g. item_id {ids[bad][:5].tolist()}"
        )
    if zero.any():
        raise ValueError(
            f"column vector: {zero.sum()} rows are all zeros, e.g. item_id {ids[zero][:5].tolist()}"
        )
    return out


def read_items(items) -> pd.DataFrame:
    """The catalogue (path or DataFrame, schema ITEMS) -> item_id, title, category, created_at (epoch s)."""
    df = pd.read_parquet(items) if isinstance(items, (str, Path)) else items
    missing = [c for c in ("item_id", "title", "category", "created_at") if c not in df.columns]
    if missing:
        raise ValueError(f"items table: missing columns {missing}")
    created = pd.to_datetime(df["created_at"], utc=True)
    seconds = (created - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return pd.DataFrame(
        {
            "item_id": df["item_id"].astype("int64"),
            "title": df["title"].astype("string"),
            "category": df["category"].astype("string"),
            "created_at": seconds.astype("Int64"),
        }
    ).drop_duplicates("item_id", keep="last")


def points_table(vectors: pa.Table, items: pd.DataFrame) -> pa.Table:
    """Validated vectors + catalogue rows -> POINTS (the payload joined on item_id, vector order kept)."""
    ids = vectors.column("item_id").to_numpy()
    pos = pd.Index(items["item_id"]).get_indexer(ids)
    if (pos < 0).any():
        raise ValueError(
            f"column item_id: {(pos < 0).sum()} vector rows have no catalogue row, "
            f"e.g. {ids[pos < 0][:5].tolist()}"
        )
    rows = items.iloc[pos]
    return pa.table(
        {
            "item_id": vectors.column("item_id"),
            "vector": vectors.column("vector"),
            "title": pa.array(rows["title"], pa.string(), from_pandas=True),
            "category": pa.array(rows["category"], pa.string(), from_pandas=True),
            "created_at": pa.array(rows["created_at"], pa.int64(), from_pandas=True),
            "available": vectors.column("available"),
            "teacher_id": vectors.column("teacher_id"),
        },
        schema=POINTS,
    )


def version_name(points: pa.Table, config: IndexConfig) -> str:
    """v<UTC time to the ms>-<8 hex of the data and build settings>: sorts by age, shows same-data rebuilds."""
    h = hashlib.sha256()
    h.update(points.column("item_id").to_numpy().tobytes())
    h.update(np.ascontiguousarray(vectors_of(points)))  # the bytes tobytes() would give, without the copy
    h.update(points.column("teacher_id")[0].as_py().encode())
    settings = {k: getattr(config, k) for k in BUILD_FIELDS}
    h.update(json.dumps(settings, sort_keys=True).encode())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3]
    return f"v{stamp}Z-{h.hexdigest()[:8]}"


# -- build and verify ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A stored vector to search the new version with, and (dot-product versions) the exact best dot
    product over the table."""

    item_id: int
    vector: np.ndarray
    best_dot: float | None


def verify_probes(points: pa.Table, distance: str, probes: int = 3) -> list[Probe]:
    """The first, middle and last rows as probes, taken while the table is at hand (the build lets go of
    its vectors before the version is optimized); the scan for the best dot product only where it counts."""
    vectors, ids = vectors_of(points), points.column("item_id").to_numpy()
    rows = sorted({0, len(ids) // 2, len(ids) - 1})[:probes]
    return [
        Probe(
            int(ids[r]), vectors[r].copy(), float((vectors @ vectors[r]).max()) if distance == "dot" else None
        )
        for r in rows
    ]


def verify(writer, n_rows: int, probes: list[Probe], distance: str = "cosine") -> str:
    """Point count == rows, and each probe finds its own item first (or an exact twin); with the dot
    product (where an item need not be its own best match) the top hit scores the exact maximum over the
    table."""
    n = writer.count()
    if n != n_rows:
        raise RuntimeError(f"verify: the new version holds {n} points, the table {n_rows} rows")
    for p in probes:
        hits = writer.top(p.vector, 10)
        if distance == "dot":
            if not hits or abs(hits[0][1] - p.best_dot) > 1e-3 * max(1.0, abs(p.best_dot)):
                raise RuntimeError(
                    f"verify: a probe with item {p.item_id}'s vector returned {hits[:3]}, best {p.best_dot}"
                )
            continue
        mine = [s for i, s in hits if i == p.item_id]
        if not hits or not mine or mine[0] < hits[0][1] - 1e-4:
            raise RuntimeError(f"verify: a probe with item {p.item_id}'s vector returned {hits[:3]}")
    what = "scored the exact best dot product" if distance == "dot" else "found their own item first"
    return f"count {n} == rows; {len(probes)}/{len(probes)} probes {what}"


def workspace_teacher_id(ws: Workspace) -> str | None:
    """The teacher id of the workspace's item embeddings (what new items are embedded with), None if none."""
    if not ws.embeddings.exists():
        return None
    from vlmrec.schema import teacher_of

    return teacher_of(ws.embeddings)


def check_teacher(points: pa.Table, teacher_id: str | None, source: str) -> None:
    """Refuse vectors of another teacher than the one the caller's other inputs were made with."""
    got = points.column("teacher_id")[0].as_py()
    if teacher_id is not None and got != teacher_id:
        raise ValueError(
            f"teacher mismatch: column teacher_id: the vectors are from teacher {got!r} but {source} holds "
            f"{teacher_id!r}; new items would be embedded in another space: retrain on the current "
            "embeddings (or re-embed with the vectors' teacher) before indexing"
        )


def build_index(
    vectors,
    items,
    index_dir=None,
    config: IndexConfig = IndexConfig(),
    *,
    client=None,
    teacher_id: str | None = None,
    teacher_source: str = "the workspace's item embeddings",
) -> IndexVersion:
    """Build, verify and switch to a new version. vectors: the item vector table (path/DataFrame/Table);
    items: the catalogue (path or DataFrame); index_dir: Edge folder or Workspace (unused for server);
    client: a QdrantClient for the server backend (else one is made from config.url / config.path);
    teacher_id: refuse vectors of any other teacher (the CLI passes the workspace's embedding teacher)."""
    t0 = time.perf_counter()
    points = points_table(load_vector_table(vectors), read_items(items))
    check_teacher(points, teacher_id, teacher_source)
    config = config.for_size(points.num_rows)  # the HNSW settings left open, from the collection's size
    dim = len(points.column("vector")[0])
    info = VersionInfo(
        version=version_name(points, config),
        teacher_id=points.column("teacher_id")[0].as_py(),
        dim=dim,
        count=points.num_rows,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        distance=config.distance,
    )
    probes = verify_probes(points, config.distance)
    writer = writer_for(index_dir, config, client)
    try:
        try:
            writer.begin(info)
            with tqdm(total=points.num_rows, desc=f"index {info.version}", unit="pt", mininterval=1.0) as bar:
                for start in range(0, points.num_rows, config.batch_size):
                    batch = points.slice(start, config.batch_size)
                    writer.upsert(batch)
                    bar.update(batch.num_rows)
            # our copy of the vectors goes back to the OS (the allocator would keep it): optimize is the peak
            batch = points = None
            pa.default_memory_pool().release_unused()
            writer.index_payload()
            writer.optimize()
            checked = verify(writer, info.count, probes, distance=config.distance)
            indexed = writer.indexed()
            writer.commit()
        except BaseException:
            writer.abort()  # the new version goes; CURRENT / the alias were never touched
            raise
        location = writer.switch()
        dropped = writer.prune(config.keep_versions)
    finally:
        writer.close()
    return IndexVersion(
        name=info.version,
        backend=config.backend,
        location=location,
        teacher_id=info.teacher_id,
        dim=dim,
        count=info.count,
        created=info.created,
        seconds=time.perf_counter() - t0,
        verify=checked,
        indexed=indexed,
        dropped=dropped,
    )


# -- incremental upserts -------------------------------------------------------------------------------


def _check_compatible(points: pa.Table, current: VersionInfo) -> None:
    teacher = points.column("teacher_id")[0].as_py()
    dim = len(points.column("vector")[0])
    if teacher != current.teacher_id:
        raise ValueError(
            f"column teacher_id: {points.num_rows} rows are from teacher {teacher!r} but the current version "
            f"{current.version} holds {current.teacher_id!r}; build a new version instead"
        )
    if dim != current.dim:
        raise ValueError(
            f"column vector: {points.num_rows} rows have dim {dim} but the current version "
            f"{current.version} has dim {current.dim}"
        )


def upsert_items(vectors, items, index_dir=None, config: IndexConfig = IndexConfig(), *, client=None) -> int:
    """Add (or replace) items in the CURRENT version, no rebuild; returns how many points were written.

    Edge: under the version's exclusive lock, append the points to versions/<v>/upserts/ (what running
    replicas replay on refresh()) and then apply them to the version's shard (what new replicas copy).
    Upserts are idempotent, so a replica replaying a log entry its copy already holds is harmless.
    If a build switches CURRENT meanwhile, the points are applied to the new version too.
    A table with no rows is a no-op (0): a scheduled upsert often finds nothing new."""
    if isinstance(vectors, (str, Path)) and pq.read_metadata(vectors).num_rows == 0:
        return 0
    if isinstance(vectors, (pd.DataFrame, pa.Table)) and len(vectors) == 0:
        return 0
    points = points_table(load_vector_table(vectors), read_items(items))
    if config.backend == "server":
        return _server_upsert(points, config, client)
    layout = Layout(index_root(index_dir))
    for _ in range(10):
        current = read_current(layout.root)
        if current is None:
            raise FileNotFoundError(f"no index at {layout.root} (no CURRENT): run `vlmrec index build` first")
        _check_compatible(points, current)
        if _edge_upsert_version(layout, current.version, points, config):
            after = read_current(layout.root)
            if after is not None and after.version == current.version:
                return points.num_rows
    raise RuntimeError(f"upsert: CURRENT in {layout.root} kept moving; try again")


def _edge_upsert_version(layout: Layout, version: str, points: pa.Table, config: IndexConfig) -> bool:
    """Log + apply `points` to one version; False when the version was removed meanwhile."""
    from qdrant_edge import EdgeShard

    try:
        with locked(layout.lock(version), exclusive=True):
            if not layout.shard(version).is_dir():
                return False
            logs = upsert_logs(layout, version)
            seq = int(logs[-1].stem) + 1 if logs else 1
            atomic_write_parquet(points, layout.upserts(version) / f"{seq:08d}.parquet")
            shard = EdgeShard.load(str(layout.shard(version)))
            try:
                edge_upsert(shard, points, config.batch_size)
                shard.flush()
            finally:
                shard.close()
    except FileNotFoundError:
        return False
    return True


def _server_upsert(points: pa.Table, config: IndexConfig, client) -> int:
    writer = ServerWriter(client, config)
    try:
        name = current_collection(writer.client, config.alias)
        if name is None:
            raise FileNotFoundError(
                f"no alias {config.alias!r} on the server: run `vlmrec index build` first"
            )
        _check_compatible(points, collection_info(writer.client, name))
        writer.collection = name
        for start in range(0, points.num_rows, config.batch_size):
            writer.upsert(points.slice(start, config.batch_size))
    finally:
        writer.close()
    return points.num_rows
