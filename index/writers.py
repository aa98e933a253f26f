"""The two index backends behind one set of steps (begin, upsert, index_payload, optimize, count, top,
indexed, commit / abort, switch, prune, close), driven by index/build.py:

    writer = writer_for(ws, IndexConfig(), client=None)   # EdgeWriter (a folder) or ServerWriter (a collection)

Edge builds a version folder under versions/.building-* and renames it into place once verified; the server
builds a collection <alias>_<version> and points the alias at it in one call.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from index.config import IndexConfig
from index.store import (
    PAYLOAD_FIELDS,
    PAYLOAD_INDEXES,
    VECTOR,
    Layout,
    VersionInfo,
    clean_stale,
    current_collection,
    edge_upsert,
    locked,
    make_client,
    owner_tag,
    read_current,
    search_params,
    vectors_of,
    write_json_atomic,
)
from vlmrec.workspace import Workspace

SERVER_OPTIMIZE_TIMEOUT_S = 3600.0  # a server builds HNSW in the background; wait this long for green


def _edge_config(dim: int, config: IndexConfig):
    from qdrant_edge import (
        Distance,
        EdgeConfig,
        EdgeOptimizersConfig,
        EdgeVectorParams,
        HnswIndexConfig,
        Memory,
        ScalarQuantizationConfig,
        ScalarType,
    )

    quant = (
        ScalarQuantizationConfig(ScalarType.Int8, quantile=config.quantization_quantile, memory=Memory.Pinned)
        if config.quantization
        else None
    )
    hnsw = HnswIndexConfig(config.hnsw_m, config.hnsw_ef_construct, config.full_scan_threshold_kb)
    return EdgeConfig(
        vectors={
            VECTOR: EdgeVectorParams(
                dim,
                Distance.Dot if config.distance == "dot" else Distance.Cosine,
                quantization_config=quant,
                hnsw_config=hnsw,
            )
        },
        optimizers=EdgeOptimizersConfig(indexing_threshold=config.indexing_threshold_kb),
    )


class EdgeWriter:
    """A version folder built under versions/.building-*, renamed into place once verified."""

    def __init__(self, root: Path, config: IndexConfig):
        self.layout, self.config = Layout(root), config
        self.shard = None

    def begin(self, info: VersionInfo) -> None:
        from qdrant_edge import EdgeShard

        self.info = info
        self.layout.versions.mkdir(parents=True, exist_ok=True)
        clean_stale(self.layout)
        self.folder = self.layout.versions / f".building-{owner_tag()}-{info.version}"
        self.shard = EdgeShard.create(str(self.folder / "shard"), _edge_config(info.dim, self.config))

    def upsert(self, batch: pa.Table) -> None:
        edge_upsert(self.shard, batch, batch.num_rows)

    def index_payload(self) -> None:
        from qdrant_edge import PayloadSchemaType, UpdateOperation

        for field, kind in PAYLOAD_INDEXES.items():
            self.shard.update(UpdateOperation.create_field_index(field, getattr(PayloadSchemaType, kind)))

    def optimize(self) -> None:
        self.shard.optimize()  # blocks until segments are merged and HNSW / quantisation are built

    def count(self) -> int:
        from qdrant_edge import CountRequest

        return self.shard.count(CountRequest(exact=True))

    def top(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        from qdrant_edge import Query, QueryRequest

        params = search_params(self.config, "edge")
        request = QueryRequest(limit=k, query=Query.Nearest(vector.tolist(), using=VECTOR), params=params)
        return [(int(p.id), float(p.score)) for p in self.shard.query(request)]

    def indexed(self) -> int:
        return self.shard.info().indexed_vectors_count

    def commit(self) -> None:
        self.shard.flush()
        self.shard.close()
        self.shard = None
        meta = {**self.info.to_dict(), "backend": "edge", "config": self.config.to_dict()}
        write_json_atomic(self.folder / "meta.json", meta)
        (self.folder / "LOCK").touch()
        self.folder.rename(self.layout.version(self.info.version))

    def abort(self) -> None:
        if self.shard is not None:
            try:
                self.shard.close()
            finally:
                self.shard = None
        if hasattr(self, "folder"):
            shutil.rmtree(self.folder, ignore_errors=True)

    def switch(self) -> str:
        write_json_atomic(self.layout.current, self.info.to_dict())  # the one atomic step
        return str(self.layout.version(self.info.version))

    def prune(self, keep: int) -> tuple[str, ...]:
        """Drop versions older than the current one beyond keep - 1 (newer ones may be other builds)."""
        current = read_current(self.layout.root).version
        older = [v for v in self.layout.version_names() if v < current]
        doomed = older[: max(0, len(older) - (keep - 1))]
        for v in doomed:
            with locked(self.layout.lock(v), exclusive=True):  # waits for a replica copying it
                shutil.rmtree(self.layout.version(v))
        return tuple(doomed)

    def close(self) -> None:
        pass


def _server_points(batch: pa.Table) -> list:
    from qdrant_client import models

    vectors = vectors_of(batch)  # (B, D)
    cols = {name: batch.column(name).to_pylist() for name in PAYLOAD_FIELDS}
    return [
        models.PointStruct(
            id=int(cols["item_id"][i]),
            vector={VECTOR: vectors[i].tolist()},
            payload={k: cols[k][i] for k in PAYLOAD_FIELDS},
        )
        for i in range(batch.num_rows)
    ]


class ServerWriter:
    """A collection <alias>_<version>, made the alias's target once verified."""

    def __init__(self, client, config: IndexConfig):
        self.config = config
        self.client, self.owns_client = (client, False) if client is not None else (make_client(config), True)
        self.created = False

    def begin(self, info: VersionInfo) -> None:
        from qdrant_client import models

        c = self.config
        self.info = info
        self.collection = f"{c.alias}_{info.version}"
        quant = (
            models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(
                    type=models.ScalarType.INT8, quantile=c.quantization_quantile, always_ram=True
                )
            )
            if c.quantization
            else None
        )
        self.client.create_collection(
            self.collection,
            vectors_config={
                VECTOR: models.VectorParams(
                    size=info.dim,
                    distance=models.Distance.DOT if c.distance == "dot" else models.Distance.COSINE,
                )
            },
            hnsw_config=models.HnswConfigDiff(
                m=c.hnsw_m, ef_construct=c.hnsw_ef_construct, full_scan_threshold=c.full_scan_threshold_kb
            ),
            quantization_config=quant,
            optimizers_config=models.OptimizersConfigDiff(indexing_threshold=c.indexing_threshold_kb),
            metadata={**info.to_dict(), "config": c.to_dict()},
        )
        self.created = True

    def upsert(self, batch: pa.Table) -> None:
        self.client.upsert(self.collection, points=_server_points(batch), wait=True)

    def index_payload(self) -> None:
        from qdrant_client import models

        for field, kind in PAYLOAD_INDEXES.items():
            self.client.create_payload_index(
                self.collection,
                field,
                field_schema=getattr(models.PayloadSchemaType, kind.upper()),
                wait=True,
            )

    def optimize(self) -> None:
        from qdrant_client import models

        deadline = time.monotonic() + SERVER_OPTIMIZE_TIMEOUT_S
        while (status := self.client.get_collection(self.collection).status) != models.CollectionStatus.GREEN:
            if status == models.CollectionStatus.GREY:  # optimisations pending but not started: nudge
                self.client.update_collection(
                    self.collection, optimizers_config=models.OptimizersConfigDiff()
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.collection} still {status} after {SERVER_OPTIMIZE_TIMEOUT_S:.0f} s"
                )
            time.sleep(1.0)

    def count(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def top(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        res = self.client.query_points(
            self.collection,
            query=vector.tolist(),
            using=VECTOR,
            limit=k,
            search_params=search_params(self.config, "server"),
        )
        return [(int(p.id), float(p.score)) for p in res.points]

    def indexed(self) -> int:
        return self.client.get_collection(self.collection).indexed_vectors_count or 0

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        if self.created:
            self.client.delete_collection(self.collection)
            self.created = False

    def switch(self) -> str:
        from qdrant_client import models

        alias = self.config.alias
        ops = []
        if current_collection(self.client, alias) is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=self.collection, alias_name=alias)
            )
        )
        self.client.update_collection_aliases(change_aliases_operations=ops)  # one atomic call
        return self.collection

    def prune(self, keep: int) -> tuple[str, ...]:
        prefix = f"{self.config.alias}_v"
        current = current_collection(self.client, self.config.alias)
        names = sorted(c.name for c in self.client.get_collections().collections if c.name.startswith(prefix))
        older = [n for n in names if n < current]
        doomed = older[: max(0, len(older) - (keep - 1))]
        for name in doomed:
            self.client.delete_collection(name)
        return tuple(n.removeprefix(f"{self.config.alias}_") for n in doomed)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()


def index_root(index_dir) -> Path:
    if index_dir is None:
        raise ValueError("the Edge backend needs an index folder or a Workspace")
    return index_dir.index if isinstance(index_dir, Workspace) else Path(index_dir)


def writer_for(index_dir, config: IndexConfig, client):
    return (
        ServerWriter(client, config)
        if config.backend == "server"
        else EdgeWriter(index_root(index_dir), config)
    )
