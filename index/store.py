"""The Edge index folder and the few pieces build and search share (layout, pointer, locks, points).

    <index_dir>/
      CURRENT                        JSON {version, teacher_id, dim, count, created}: replaced by os.replace
      versions/<version>/shard/      the Qdrant Edge shard; only build_index / upsert_items open it
      versions/<version>/meta.json   the version's manifest and its IndexConfig
      versions/<version>/upserts/    append-only log of incremental upserts, 00000001.parquet, ...
      versions/<version>/LOCK        flock: upsert and prune hold it exclusive, a replica copy shared
      versions/.building-<host>-<pid>-<version>/   a build in progress (never pointed to)
      replicas/<host>-<pid>-<uuid>/shard           one open_index's private copy of a version

Why copies: Qdrant Edge lets one process open a shard folder (a second load fails on the WAL lock,
even in the same process), and the Python binding 0.9.0 has no read-only follower. So each searcher
(each Producer replica) loads its own copy and replays the upsert log onto it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VECTOR = "v"  # the one named vector, in both backends

# One row per point: what build upserts and what the upsert log stores.
POINTS = pa.schema(
    [
        ("item_id", pa.int64()),  # = the point id
        ("vector", pa.list_(pa.float32())),
        ("title", pa.string()),
        ("category", pa.string()),
        ("created_at", pa.int64()),  # epoch seconds
        ("available", pa.bool_()),
        ("teacher_id", pa.string()),
    ]
)
PAYLOAD_FIELDS = ("item_id", "title", "category", "created_at", "available", "teacher_id")
# payload field -> index type (names of PayloadSchemaType members, same spelling in both libraries)
PAYLOAD_INDEXES = {"category": "Keyword", "available": "Bool", "created_at": "Integer", "item_id": "Integer"}


@dataclass(frozen=True)
class VersionInfo:
    """What CURRENT (Edge) or the collection's metadata (server) says about a version."""

    version: str
    teacher_id: str
    dim: int
    count: int
    created: str  # ISO 8601 UTC
    distance: str = "cosine"  # "dot" for id-space vectors; versions built before it existed are cosine

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VersionInfo:
        return cls(
            str(d["version"]),
            str(d["teacher_id"]),
            int(d["dim"]),
            int(d["count"]),
            str(d["created"]),
            str(d.get("distance", "cosine")),
        )


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    @property
    def current(self) -> Path:
        return self.root / "CURRENT"

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def replicas(self) -> Path:
        return self.root / "replicas"

    def version(self, name: str) -> Path:
        return self.versions / name

    def shard(self, name: str) -> Path:
        return self.version(name) / "shard"

    def lock(self, name: str) -> Path:
        return self.version(name) / "LOCK"

    def upserts(self, name: str) -> Path:
        return self.version(name) / "upserts"

    def version_names(self) -> list[str]:
        """Finished versions, oldest first (names start with a UTC timestamp)."""
        if not self.versions.is_dir():
            return []
        return sorted(p.name for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_current(root: Path) -> VersionInfo | None:
    path = Layout(root).current
    try:
        return VersionInfo.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON beside `path`, fsync, then os.replace: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def locked(path: Path, exclusive: bool) -> Iterator[None]:
    """flock on `path` (its folder must exist: FileNotFoundError tells a caller the version is gone)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def upsert_logs(layout: Layout, version: str) -> list[Path]:
    """The version's upsert log files in the order they were written (temp files start with '.')."""
    folder = layout.upserts(version)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def vectors_of(table: pa.Table) -> np.ndarray:
    """The `vector` column as a (N, D) float32 array (all lists must have one length); no copy when the
    column is one float32 chunk without nulls (ChunkedArray.combine_chunks copies even a single chunk)."""
    chunked = table.column("vector")
    col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)


def edge_points(table: pa.Table) -> list:
    """A POINTS table -> qdrant_edge Points (id = item_id, named vector VECTOR, the payload fields)."""
    from qdrant_edge import Point

    vectors = vectors_of(table)  # (N, D)
    cols = {name: table.column(name).to_pylist() for name in PAYLOAD_FIELDS}
    return [
        Point(int(cols["item_id"][i]), {VECTOR: vectors[i].tolist()}, {k: cols[k][i] for k in PAYLOAD_FIELDS})
        for i in range(table.num_rows)
    ]


def _copy_sparse(src: str, dst: str, chunk: int = 1 << 20) -> None:
    """Copy one file, leaving all-zero 1 MiB runs as holes: a shard preallocates its WAL (2 x 32 MiB)
    and storage chunks, so a 2,000-point shard is 139 MB on disk but almost all zeros."""
    zeros = bytes(chunk)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            if block == zeros[: len(block)]:
                fout.seek(len(block), os.SEEK_CUR)
            else:
                fout.write(block)
        fout.truncate()  # sets the size when the file ends in a hole
    shutil.copystat(src, dst)


def copy_shard(src: Path, dst: Path) -> None:
    """Copy a closed (or lock-protected) shard folder for a replica."""
    shutil.copytree(src, dst, copy_function=_copy_sparse)


def edge_upsert(shard, table: pa.Table, batch_size: int) -> None:
    """Upsert a POINTS table into an open EdgeShard, batch_size points per update call."""
    from qdrant_edge import UpdateOperation

    for start in range(0, table.num_rows, batch_size):
        shard.update(UpdateOperation.upsert_points(edge_points(table.slice(start, batch_size))))


def read_log(path: Path) -> pa.Table:
    return pq.read_table(path, schema=POINTS)


def search_params(config, engine: str):
    """hnsw_ef (set: `config.for_size(n)`), and int8 scores always rescored with the float vectors (Edge does
    not by default). quantization off: the float vectors alone, also over a version built with int8 ones
    (a search naming no quantization params would score with the int8 vectors, unrescored). engine: "edge"
    (qdrant_edge) or "server" (qdrant_client): the two name the same classes and fields."""
    if engine == "edge":
        import qdrant_edge as models
    else:
        from qdrant_client import models

    if config.quantization:
        quant = models.QuantizationSearchParams(rescore=True, oversampling=config.oversampling)
    else:
        quant = models.QuantizationSearchParams(ignore=True)
    return models.SearchParams(hnsw_ef=config.hnsw_ef, quantization=quant)


# -- process-owned folders -----------------------------------------------------------------------------


def owner_tag() -> str:
    """host-pid: the prefix of folders this process owns (pids are only comparable on one host)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _dead_owner(name: str) -> bool:
    """True when `name` starts with this host's tag of a pid that no longer runs."""
    host = socket.gethostname()
    if not name.startswith(host + "-"):
        return False
    pid = name[len(host) + 1 :].split("-", 1)[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def clean_stale(layout: Layout) -> list[Path]:
    """Remove replica copies and half-built versions whose process on this host has died."""
    removed = []
    for parent, prefix in ((layout.replicas, ""), (layout.versions, ".building-")):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(prefix) and _dead_owner(p.name[len(prefix) :]):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# -- server backend ------------------------------------------------------------------------------------


def make_client(config):
    """A QdrantClient from an IndexConfig: url (a server) or path (local mode; ":memory:" included)."""
    from qdrant_client import QdrantClient

    if config.url:
        return QdrantClient(url=config.url, api_key=config.api_key)
    if config.path:
        return (
            QdrantClient(location=":memory:") if config.path == ":memory:" else QdrantClient(path=config.path)
        )
    raise ValueError("the server backend needs a url (--url or QDRANT_URL) or a local-mode path")


def current_collection(client, alias: str) -> str | None:
    """The collection `alias` points to, or None."""
    for a in client.get_aliases().aliases:
        if a.alias_name == alias:
            return a.collection_name
    return None


def collection_info(client, collection: str) -> VersionInfo:
    """The VersionInfo build_index stored in the collection's metadata."""
    meta = client.get_collection(collection).config.metadata
    if not meta or "version" not in meta:
        raise ValueError(f"collection {collection}: no vlmrec metadata (not made by build_index?)")
    return VersionInfo.from_dict(meta)
