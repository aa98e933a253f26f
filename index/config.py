"""IndexConfig: how an item index is built and searched, one frozen dataclass for both backends.

The CLI builds its flags from these fields (`vlmrec index build --help`); the environment (QDRANT_URL,
QDRANT_API_KEY) is read once there, never here. Every build writes `to_dict()` next to the version it made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

BACKENDS = ("edge", "server")
DISTANCES = ("cosine", "dot")


@dataclass(frozen=True)
class IndexConfig:
    # "edge": Qdrant Edge shards in a folder, in-process (no server). "server": a Qdrant server (url) or
    # qdrant-client's local mode (path, ":memory:" included: exact search in Python, for tests and laptops).
    backend: str = "edge"
    url: str | None = None  # server: http://host:6333
    api_key: str | None = None  # server: never written to disk by to_dict()
    path: str | None = None  # server in qdrant-client local mode (a folder or ":memory:")
    alias: str = "items"  # server: the alias searches use; versions are collections "<alias>_<version>"
    # "cosine" for content spaces (unit vectors); "dot" for an id-space export (the behavioural SASRec scores
    # items by the dot product of unnormalised id embeddings: a cosine index would re-rank them).
    distance: str = "cosine"

    # HNSW graph: Qdrant's defaults; m 16 / ef_construct 100 gave recall@100 0.97 at ef 128 on the MiniLM
    # MovieLens titles (STACK.md).
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    # Below this many KB of vectors in a segment (or matching a filter) Qdrant scans exactly instead of
    # walking the graph. 20,000 KB is about 13k items at 384-d float32 (5k at 1024-d), so a catalogue the
    # size of MovieLens (9,742 x 384 = 14,600 KB) is searched exactly: recall 1.0, no graph to build.
    # The price is small (measured here on a busy 2-core box, top-100, int8 + rescoring): scan p50 ~1.2 ms
    # vs graph ~0.8 ms at recall 0.9975 on the real MiniLM titles; on 10k synthetic clusters both ~0.25 ms
    # with the graph at recall 0.974. Above it the graph wins (100k x 256: exact p50 6-7 ms vs the graph's
    # 1-2 ms, STACK.md).
    # Qdrant's default is 10,000 KB. benchmarks/search.py reports both ("forced_graph").
    full_scan_threshold_kb: int = 20_000
    # Segments smaller than this are not given a graph at all. Equal to full_scan_threshold_kb so no graph
    # is built that searches would then bypass (Qdrant's default is 10,000 KB). Tests set both tiny to
    # exercise the graph on small data.
    indexing_threshold_kb: int = 20_000
    # Search-time beam; the benchmark sweeps it. With int8 + oversampling 2 at k = 100, ef 64 and 128 gave
    # the same recall (0.9975, real vectors): the beam seems to be at least k x oversampling.
    hnsw_ef: int = 128

    # int8 scalar quantisation (4x less RAM, faster scoring), always rescored with the float vectors.
    # Qdrant Edge does NOT rescore unless asked: oversampling 2 made an int8 full scan exact (recall 1.0)
    # where plain int8 scoring gave 0.976 and scores off by ~7e-3.
    quantization: bool = True
    quantization_quantile: float = 0.99
    oversampling: float = 2.0

    keep_versions: int = 2  # the current version + one to roll back to
    batch_size: int = 512  # points per upsert call

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1 (the current version), got {self.keep_versions}")
        if self.batch_size < 1 or self.hnsw_ef < 1 or self.hnsw_m < 2:
            raise ValueError("batch_size, hnsw_ef must be >= 1 and hnsw_m >= 2")

    def to_dict(self) -> dict:
        """Every field but the api key (this dict is written next to each version)."""
        d = asdict(self)
        d.pop("api_key")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> IndexConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown IndexConfig keys: {unknown}")
        return cls(**d)
