"""ProducerConfig: everything a Producer replica needs, also the shape of its Serve `user_config`.

    cfg = ProducerConfig(workdir=".vlmrec/sample")         # paths default inside the workspace
    # student: runs/student/export + index/; sasrec: runs/sasrec/export + indexes/sasrec;
    # similar: indexes/teacher; popular: data/events.parquet (serving/loading.py)
    Producer.options(user_config=cfg.to_dict()).bind()     # reconfigure() loads (or hot-swaps) from it

Paths are resolved by the properties below; the environment (QDRANT_URL) is read once in serving/cli.py,
never here. The index api key is never part of this config (Serve shows user_config in its status):
a replica of the server backend reads QDRANT_API_KEY from its own environment (serving/producer.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from engine.config import at_least
from index.config import BACKENDS, IndexConfig
from vlmrec.workspace import DEFAULT_WORKDIR, TEACHER_INDEX, Workspace, check_name

API_MAX_K = 1000  # the hard bound of the API's `k` (request validation); max_k may only lower it
# Serve's proxy gives up on a request after this long (http_options.request_timeout_s: HTTP 408), so a lost
# replica costs its callers at most this, never an open-ended hang. Above the longest legitimate request
# (a /v1/mix with the largest budget, 10 s); a caller that wants less sends `x-request-timeout-seconds`.
REQUEST_TIMEOUT_S = 12.0
# The producers one deployment serves (serving/sources.py): the request's `producer` names one of them.
PRODUCERS = ("student", "sasrec", "similar", "popular")


@dataclass(frozen=True)
class ProducerConfig:
    workdir: str = str(DEFAULT_WORKDIR)  # the workspace: feature store, catalogue, runs/, index/
    run: str = "student"  # the training run whose export is served
    model_path: str | None = None  # the export folder; None = <workdir>/runs/<run>/export
    index_dir: str | None = None  # Edge index folder; None = <workdir>/index
    index_backend: str = "edge"  # "edge" (in-process copy per replica) or "server" (Qdrant at index_url)
    index_url: str | None = None  # server backend: http://qdrant:6333
    # server backend: the Qdrant alias the student searches. One alias per served model
    # (`vlmrec index build --alias`), so a reconfigure swaps model and index together (docs/DEPLOY.md,
    # rolling out a new model). The siblings search items_<name> (serving/loading.py).
    index_alias: str = "items"
    producer: str = "student"  # the producer a request that names none gets (one of PRODUCERS)
    # Sibling producers, same request and response. Each may be absent (no export or index): the replica
    # still serves the others; a request naming a missing one gets a 503 `producer_unavailable`.
    sasrec_run: str = "sasrec"  # behavioural baseline: runs/<sasrec_run>/export, an id-space training run
    sasrec_index_dir: str | None = None  # its own (dot-product) index; None = <workdir>/indexes/<sasrec_run>
    similar_index_dir: str | None = None  # raw teacher vectors; None = <workdir>/indexes/teacher
    similar_last_n: int = 3  # `similar`: neighbours of the user's last N distinct clicks
    popular_half_life_days: float = 7.0  # `popular`: an event's weight halves every this many days
    popular_until: str | None = None  # `popular` counts events before this ISO time only (backtests)
    # item-age models score an item's age at this ISO time instead of the request's wall clock (backtests)
    scoring_time: str | None = None
    # /v1/mix: a producer that has not answered within this budget is dropped and named in `warnings`.
    # Healthy producers answer in a few ms here (docs/BENCHMARKS.md); the budget is for stuck ones.
    mix_budget_ms: float = 250.0
    # /v1/mix without quotas or weights: the weights `vlmrec tune-mix` chose on validation; None =
    # <workdir>/mix.json (equal weights when that file does not exist)
    mix_file: str | None = None
    default_k: int = 100  # candidates when a request gives no k
    # Coalescing (serving/pipeline.py): concurrent single /v1/candidates requests answered together, one
    # feature read, forward and search; a request waits only while an earlier batch of its own producer runs,
    # at most max_wait_ms.
    # The bound is for a batch held up by a slow dependency, not the usual wait: under load the requests that
    # wait for the running batch leave together when it ends (batches grow with the load); a few ms split
    # them into small batches that ran at once and queued for the same model thread and cores instead
    # (docs/BENCHMARKS.md, coalescer wait).
    max_batch: int = 32
    max_wait_ms: float = 100.0
    # The exposure log (serving/exposures.py): one record per answer. None = <workdir>/exposures; an
    # object-store URI (s3://bucket/exposures) in Kubernetes; "" = off.
    exposure_path: str | None = None
    # The event log (serving/events.py): every accepted /v1/events, the ingest layout plus request_id and
    # position. None = <workdir>/data/events_log (`vlmrec ingest --logged` folds it in); "" = off.
    event_log_path: str | None = None
    event_types: tuple[str, ...] = ("click", "add_to_cart", "purchase")  # what /v1/events accepts
    log_queue: int = 10_000  # records waiting for a log's writer; beyond, dropped and counted
    log_flush_s: float = 1.0  # how often a log's writer writes a file (per hour partition)
    # An A/B experiment over this deployment's default traffic (serving/experiments.py): {name, arms: [{name,
    # producer, share, run?}], salt?, force?}. None = no experiment.
    experiment: dict | None = None
    # torch's intra-op threads in a replica (the model, and the index scan's matrix product, index/scan.py):
    # batching, not threads, spreads the work; more threads add synchronisation and take cores from the
    # proxy and the other replicas.
    torch_threads: int = 1
    # numpy's BLAS threads in a replica: OpenBLAS's threads spin while they wait for a busy core, so a second
    # one slows a product down when the proxy or another request holds the other core.
    blas_threads: int = 1
    # Search settings of the replica's Edge copies (index/config.py): the HNSW beam (None = chosen from the
    # version's size) and the size up to which a copy is searched exactly by a matrix product instead of
    # its graph (0 = always the graph). The server backend takes hnsw_ef; a reconfigure reopens the copies.
    hnsw_ef: int | None = None
    scan_max_points: int = IndexConfig.scan_max_points
    # User vectors kept per model by their exact input (serving/vector_cache.py): a user who asks again
    # without a new click skips the forward. Entries, each its vector (out_dim x 4 bytes) and about 0.4 KB
    # of bookkeeping; 0 = off.
    vector_cache: int = 50_000
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
    # /v1/events accepts click times from event_min_time up to event_max_future_s ahead of the replica's
    # clock (sender clock skew); outside them a 422. A time far off is a bug upstream, and on Redis one
    # click stamped in year 9999 would make every later write of the user look late.
    event_min_time: str = "2000-01-01T00:00:00+00:00"
    event_max_future_s: float = 300.0

    def __post_init__(self) -> None:
        check_name(self.run, "run")
        check_name(self.sasrec_run, "sasrec_run")
        if self.index_backend not in BACKENDS:
            raise ValueError(f"index_backend must be one of {BACKENDS}, got {self.index_backend!r}")
        if self.index_backend == "server" and not self.index_url:
            raise ValueError("index_backend='server' needs index_url (or QDRANT_URL for `vlmrec serve`)")
        if not self.index_alias:
            raise ValueError("index_alias must be a non-empty Qdrant alias name")
        if self.producer not in PRODUCERS:
            raise ValueError(f"producer must be one of {PRODUCERS}, got {self.producer!r}")
        if self.similar_last_n < 1:
            raise ValueError(f"similar_last_n must be >= 1, got {self.similar_last_n}")
        if self.popular_until is not None:
            _utc(self.popular_until)  # raises ValueError naming the value
        if self.scoring_time is not None:
            _utc(self.scoring_time, "scoring_time")
        _utc(self.event_min_time, "event_min_time")
        if not 1 <= self.max_k <= API_MAX_K:
            raise ValueError(f"max_k must be in 1..{API_MAX_K}, got {self.max_k}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default_k must be in 1..max_k ({self.max_k}), got {self.default_k}")
        if not 1 <= self.max_batch <= 1024:
            raise ValueError(f"max_batch must be in 1..1024, got {self.max_batch}")
        if self.experiment is not None:
            from serving.experiments import Experiment

            Experiment.from_dict(self.experiment)  # a bad experiment is a bad config: refused here
        if not 1 <= self.log_queue <= 10_000_000:
            raise ValueError(f"log_queue must be in 1..10000000, got {self.log_queue}")
        if not 0 < self.log_flush_s <= 3600:
            raise ValueError(f"log_flush_s must be in (0, 3600], got {self.log_flush_s}")
        if not self.event_types or not all(isinstance(t, str) and t for t in self.event_types):
            raise ValueError(f"event_types must be non-empty names, got {self.event_types!r}")
        IndexConfig(hnsw_ef=self.hnsw_ef, scan_max_points=self.scan_max_points)  # refuses bad values, named
        for name in ("torch_threads", "blas_threads"):
            if not 1 <= getattr(self, name) <= 256:
                raise ValueError(f"{name} must be in 1..256, got {getattr(self, name)}")
        if not 0 <= self.vector_cache <= 100_000_000:
            raise ValueError(f"vector_cache must be in 0..100000000 (0 = off), got {self.vector_cache}")
        if self.sequence_len is not None and self.sequence_len < 1:
            raise ValueError(f"sequence_len must be >= 1 or None, got {self.sequence_len}")
        at_least(self, 0, "max_wait_ms", "event_max_future_s")
        at_least(
            self, 0, "feature_timeout_s", "search_timeout_s", "event_timeout_s", "refresh_interval_s",
            "popular_half_life_days", "mix_budget_ms", strictly=True,
        )  # fmt: skip

    @property
    def workspace(self) -> Workspace:
        return Workspace(Path(self.workdir))

    @property
    def export_dir(self) -> Path:
        return Path(self.model_path) if self.model_path else self.workspace.runs / self.run / "export"

    @property
    def index_path(self) -> Path:
        return Path(self.index_dir) if self.index_dir else self.workspace.index

    @property
    def sasrec_export_dir(self) -> Path:
        return self.workspace.runs / self.sasrec_run / "export"

    @property
    def sasrec_index_path(self) -> Path:
        return (
            Path(self.sasrec_index_dir)
            if self.sasrec_index_dir
            else self.workspace.named_index(self.sasrec_run)
        )

    @property
    def similar_index_path(self) -> Path:
        return (
            Path(self.similar_index_dir)
            if self.similar_index_dir
            else self.workspace.named_index(TEACHER_INDEX)
        )

    @property
    def mix_path(self) -> Path:
        return Path(self.mix_file) if self.mix_file else self.workspace.root / "mix.json"

    @property
    def exposures_at(self) -> str | None:
        """Where the exposure log goes; None when it is off."""
        if self.exposure_path == "":
            return None
        return self.exposure_path or str(self.workspace.exposures)

    @property
    def event_log_at(self) -> str | None:
        """Where the event log goes; None when it is off."""
        if self.event_log_path == "":
            return None
        return self.event_log_path or str(self.workspace.events_log)

    def scoring_days(self) -> float:
        """The time item age is scored at: scoring_time, else now (training.item_age days)."""
        ts = _utc(self.scoring_time, "scoring_time") if self.scoring_time else datetime.now(UTC)
        return ts.timestamp() / 86400.0

    @property
    def popular_until_ts(self) -> datetime | None:
        return None if self.popular_until is None else _utc(self.popular_until)

    @property
    def event_min_ts(self) -> datetime:
        return _utc(self.event_min_time, "event_min_time")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> ProducerConfig:
        """From a Serve user_config (None or {} = all defaults); unknown keys are an error."""
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ProducerConfig: unknown keys {unknown}")
        if isinstance(d.get("event_types"), list):  # YAML / JSON lists
            d["event_types"] = tuple(d["event_types"])
        return cls(**d)


def utc(ts: datetime) -> datetime:
    """The time in UTC (a naive time is taken as UTC); ValueError for one UTC cannot hold (an offset at
    either end of the calendar: 0001-01-01T00:00+01:00 falls off it)."""
    try:
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{ts.isoformat()} is out of the range of times in UTC") from None


def _utc(value: str, name: str = "popular_until") -> datetime:
    """An ISO 8601 time (naive = UTC)."""
    try:
        return utc(datetime.fromisoformat(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an ISO 8601 time in UTC's range, got {value!r} ({exc})") from None
