"""IndexConfig: how an item index is built and searched, one frozen dataclass for both backends.

The CLI builds its flags from these fields (`vlmrec index build --help`); the environment (QDRANT_URL,
QDRANT_API_KEY) is read once there, never here. Every build writes `to_dict()` next to the version it made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from engine.config import at_least

BACKENDS = ("edge", "server")
DISTANCES = ("cosine", "dot")


# (collections up to this many items, hnsw m, ef_construct, search ef); the last row has no bound. Chosen so
# that recall@100 against exact search stays >= 0.98 at each row's smallest and largest sizes (real-like
# minilm vectors, measured up to 1M items: docs/BENCHMARKS.md, search). The beam is at least k x oversampling
# (top 100 x 2) where the graph is walked; below full_scan_threshold_kb Qdrant scans exactly and the graph
# settings do not matter.
HNSW_BY_SIZE: tuple[tuple[int | None, int, int, int], ...] = (
    (150_000, 32, 100, 256),
    (300_000, 32, 100, 512),
    (None, 32, 100, 1024),
)


def named_alias(name: str) -> str:
    """The server alias of a named index (a run's own, or the teacher's): what `vlmrec index build --run NAME`
    / `--teacher` builds and the Producer's sibling producers (and a refreshed run) search."""
    return f"{IndexConfig.alias}_{name}"


def hnsw_for(n: int) -> tuple[int, int, int]:
    """(m, ef_construct, ef) for a collection of n items."""
    for bound, m, ef_construct, ef in HNSW_BY_SIZE:
        if bound is None or n <= bound:
            return m, ef_construct, ef
    raise AssertionError("HNSW_BY_SIZE ends with an unbounded row")


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

    # HNSW graph (m, ef_construct) and search beam (ef): None = chosen from the collection's size when a
    # version is built (`hnsw_for`, HNSW_BY_SIZE below; a replica searches a version with the beam its size
    # gives), so recall holds as the catalogue grows. Any of them may be set to override.
    hnsw_m: int | None = None
    hnsw_ef_construct: int | None = None
    # Below this many KB of vectors in a segment (or matching a filter) Qdrant scans exactly instead of
    # walking the graph: Qdrant's default, about 6.5k items at 384-d float32. Above it the graph costs less
    # per query, even at MovieLens's size, for a recall a little under exact (docs/BENCHMARKS.md, search),
    # and a search holds the replica's interpreter while it runs. benchmarks/search.py reports both
    # ("forced_graph").
    full_scan_threshold_kb: int = 10_000
    # Segments smaller than this are not given a graph at all. Equal to full_scan_threshold_kb so no graph
    # is built that searches would then bypass. Tests set both tiny to exercise the graph on small data.
    indexing_threshold_kb: int = 10_000
    hnsw_ef: int | None = None
    # Edge: a version of at most this many points (upserts included) is searched exactly
    # (index/scan.py: one matrix product, the interpreter released) instead of through the shard's graph;
    # up to about this size a batch costs less that way (docs/BENCHMARKS.md, search). It holds the vectors
    # in memory beside the shard (points x dim x 4 bytes). 0: always the shard. The server backend always
    # searches on the server.
    scan_max_points: int = 50_000

    # int8 scalar quantisation (4x less RAM, faster scoring), always rescored with the float vectors.
    # Qdrant Edge does NOT rescore unless asked: oversampling 2 made an int8 full scan exact (recall 1.0)
    # where plain int8 scoring gave 0.976 and scores off by ~7e-3. Off at search time: the float vectors
    # alone, whatever the version was built with (index/store.py search_params).
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
        if self.scan_max_points < 0:
            raise ValueError(f"scan_max_points must be >= 0 (0: never scan), got {self.scan_max_points}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.alias:
            raise ValueError("alias must be a non-empty Qdrant alias name")
        at_least(self, 0, "full_scan_threshold_kb", "indexing_threshold_kb")
        at_least(self, 1, "oversampling")  # rescoring reads k x oversampling candidates
        if not 0.5 <= self.quantization_quantile <= 1:  # Qdrant's own range
            raise ValueError(f"quantization_quantile must be in [0.5, 1], got {self.quantization_quantile}")
        for name, low in (("hnsw_m", 2), ("hnsw_ef_construct", 4), ("hnsw_ef", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(
                    f"{name} must be >= {low} (or None: from the collection's size), got {value}"
                )

    def for_size(self, n: int) -> IndexConfig:
        """This config with the HNSW settings left None chosen for a collection of n items."""
        m, ef_construct, ef = hnsw_for(n)
        return replace(
            self,
            hnsw_m=self.hnsw_m or m,
            hnsw_ef_construct=self.hnsw_ef_construct or ef_construct,
            hnsw_ef=self.hnsw_ef or ef,
        )

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
