"""ProducerConfig: everything a Producer replica needs, also the shape of its Serve `user_config`.

    cfg = ProducerConfig(workdir=".vlmrec/sample")         # paths default inside the workspace
    Producer.options(user_config=cfg.to_dict()).bind()     # reconfigure() loads (or hot-swaps) from it

Paths are resolved by the properties below; the environment (QDRANT_URL) is read once in serving/cli.py,
never here. The index api key is never part of this config (Serve shows user_config in its status):
a replica of the server backend reads QDRANT_API_KEY from its own environment (serving/producer.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from index.config import BACKENDS
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace

API_MAX_K = 1000  # the hard bound of the API's `k` (request validation); max_k may only lower it


@dataclass(frozen=True)
class ProducerConfig:
    workdir: str = str(DEFAULT_WORKDIR)  # the workspace: feature store, catalogue, runs/, index/
    run: str = "student"  # the training run whose export is served
    model_path: str | None = None  # the export folder; None = <workdir>/runs/<run>/export
    index_dir: str | None = None  # Edge index folder; None = <workdir>/index
    index_backend: str = "edge"  # "edge" (in-process copy per replica) or "server" (Qdrant at index_url)
    index_url: str | None = None  # server backend: http://qdrant:6333
    # server backend: the Qdrant alias searched. One alias per served model (`vlmrec index build --alias`), so a
    # reconfigure swaps model and index together (docs/DEPLOY.md, rolling out a new model).
    index_alias: str = "items"
    producer: str = "student"  # the name the Mixer sees in responses and metrics
    default_k: int = 100  # candidates when a request gives no k
    max_k: int = API_MAX_K  # the largest k this deployment accepts (<= API_MAX_K)
    # N, the length of the online click sequence a /v1/events push keeps; None = the model's max_len
    # (read from the export, so it is always known; the ingest snapshot length is not recorded anywhere).
    sequence_len: int | None = None
    # Timeouts: far above the healthy p99 (online read ~3 ms, search ~1 ms here), so they fire when a
    # dependency is down or stuck, not on jitter. Feature store -> a marked popular fallback;
    # index -> HTTP 503; a click push (lock wait + read + write) -> HTTP 503.
    feature_timeout_s: float = 0.25
    search_timeout_s: float = 0.5
    event_timeout_s: float = 5.0
    refresh_interval_s: float = (
        2.0  # Index.refresh() period: upserts / new versions reach a replica this fast
    )

    def __post_init__(self) -> None:
        if self.index_backend not in BACKENDS:
            raise ValueError(f"index_backend must be one of {BACKENDS}, got {self.index_backend!r}")
        if self.index_backend == "server" and not self.index_url:
            raise ValueError("index_backend='server' needs index_url (or QDRANT_URL for `vlmrec serve`)")
        if not self.index_alias:
            raise ValueError("index_alias must be a non-empty Qdrant alias name")
        if not 1 <= self.max_k <= API_MAX_K:
            raise ValueError(f"max_k must be in 1..{API_MAX_K}, got {self.max_k}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default_k must be in 1..max_k ({self.max_k}), got {self.default_k}")
        if self.sequence_len is not None and self.sequence_len < 1:
            raise ValueError(f"sequence_len must be >= 1 or None, got {self.sequence_len}")
        for name in ("feature_timeout_s", "search_timeout_s", "event_timeout_s", "refresh_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def workspace(self) -> Workspace:
        return Workspace(Path(self.workdir))

    @property
    def export_dir(self) -> Path:
        return Path(self.model_path) if self.model_path else self.workspace.runs / self.run / "export"

    @property
    def index_path(self) -> Path:
        return Path(self.index_dir) if self.index_dir else self.workspace.index

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> ProducerConfig:
        """From a Serve user_config (None or {} = all defaults); unknown keys are an error."""
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ProducerConfig: unknown keys {unknown}")
        return cls(**d)
