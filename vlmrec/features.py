"""`vlmrec features`: make a workspace a Feast repository, `feast apply` it and materialize the online store.

    vlmrec features --workdir .vlmrec/sample                    # sqlite online store (embedded default)
    REDIS_CONNECTION_STRING=127.0.0.1:6379 vlmrec features --online-store redis
    vlmrec features --workdir W --until 2016-03-22T08:26:02Z   # the online store as of a time (replays)

The workspace then holds what the Feast CLI expects of a repository: feature_store.yaml (from
feature_repo/), feature_definitions.py (imports the definitions of the installed package feature_repo, so one
set of definitions serves every workspace; source paths are relative to the workspace) and a .feastignore
that keeps every sub-folder (runs/, indexes/, data/, ...) out of `feast plan` / `feast apply`. So
`feast -c W plan`, `feast -c W apply` and `feast -c W materialize-incremental <now>` work there, and this
command is a thin wrapper doing the same through Feast's API: apply (`feast apply`), then
`materialize_incremental` up to now (each view from where its last materialization ended; a view's first
materialization covers its sources, which Feast's would start a year back for a ttl-0 view), or, with
--until, materialize everything up to that time (an explicit range: what a replay resets the store to; the
click sequences, whose default table holds each user's latest only, are then built as of that time from the
events and pushed).

Also the two readers of the student's feature service, used by training (historical, point-in-time) and the
Producer (online): the same FeatureService `student_v1`, so the two paths cannot drift.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from vlmrec.sequences import sequence_layout, utc_micros
from vlmrec.workspace import Workspace

T = TypeVar("T")

REPO_DIR = Path(__file__).resolve().parent.parent / "feature_repo"
REPO_FILE = "feature_definitions.py"  # the workspace's Feast definitions: the installed package's
REPO_SHIM = (
    '"""This workspace\'s Feast definitions (written by `vlmrec features`): the installed feature_repo package\'s,\n'
    'so `feast plan` / `feast apply` here see exactly what vlmrec applies."""\n\n'
    "from feature_repo.features import *  # noqa: F403\n"
)
FEASTIGNORE = "# every sub-folder: runs/, indexes/, data/, ... hold no Feast definitions (written by vlmrec features)\n*/\n"
STORE_TEMPLATES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
# The registry: "file" (registry.db in the workspace, the embedded default) or "sql" (Feast's SQL registry,
# its SQLAlchemy URL from the environment, e.g. postgresql+psycopg://feast:PASSWORD@postgres:5432/feast: what
# the cluster's replicas and jobs share instead of a file on a shared volume).
REGISTRIES = ("file", "sql")
# The offline store: "file" (Feast's parquet store in this process, the embedded default) or "ray" (Feast's
# Ray offline store and compute engine: the point-in-time join and materialization run as Ray Data work, on
# the cluster when this process is connected to one; training's job uses the same Ray it runs on).
OFFLINE_STORES = ("file", "ray")
# storage_path: relative to the workspace. The broadcast join always: Feast's distributed join (0.67) matches
# an entity only with rows inside the same time window (window_size_for_joins), and a user's last snapshot
# before a click may be years old: it returned empty sequences on MovieLens (docs/BENCHMARKS.md, issue 20).
RAY_OFFLINE_STORE = {"type": "ray", "storage_path": "ray_storage", "broadcast_join_threshold_mb": 1_000_000}
RAY_BATCH_ENGINE = {"type": "ray.engine"}
REGISTRY_URL_ENV = "FEAST_REGISTRY_URL"
SQL_REGISTRY = {
    "registry_type": "sql",
    "path": "${" + REGISTRY_URL_ENV + "}",  # Feast expands ${...} from the environment when it loads the yaml
    "cache_ttl_seconds": 60,  # replicas re-read the registry this often
    "sqlalchemy_config_kwargs": {"pool_pre_ping": True},  # a dropped connection is replaced, not an error
}
STUDENT_SERVICE = "student_v1"
SEQUENCE_VIEW = "user_click_sequence"  # the view behind student_v1 (feature_repo/features.py)
PUSH_SOURCE = "click_push"  # its push source: a served click, or a replay's starting state
ITEM_VECTORS_SERVICE = "item_vectors_v1"
ITEM_CATALOG_SERVICE = "item_catalog_v1"
# The sequence "just before" an event is the snapshot at event_timestamp - 1 us (timestamps are unique per user).
JUST_BEFORE = timedelta(microseconds=1)


@dataclass(frozen=True)
class FeaturesConfig:
    online_store: str = (
        "sqlite"  # "sqlite" (embedded) or "redis" (REDIS_CONNECTION_STRING in the environment)
    )
    until: str | None = None  # ISO time: materialize rows up to it only (None: everything)
    registry: str = "file"  # "file" (workspace/registry.db) or "sql" (FEAST_REGISTRY_URL, e.g. PostgreSQL)
    offline_store: str = "file"  # "file" (parquet, in this process) or "ray" (Feast's Ray store and engine)
    # rows a materialization (or a replay's push) converts and writes at a time; None: the yaml's (10,000)
    write_batch: int | None = None

    def __post_init__(self) -> None:
        if self.write_batch is not None and self.write_batch < 1:
            raise ValueError(f"write_batch must be a positive number of rows, got {self.write_batch}")
        if self.registry not in REGISTRIES:
            raise ValueError(f"registry must be one of {list(REGISTRIES)}, got {self.registry!r}")
        if self.offline_store not in OFFLINE_STORES:
            raise ValueError(
                f"offline_store must be one of {list(OFFLINE_STORES)}, got {self.offline_store!r}"
            )
        if self.until is not None:
            _until(self.until)  # a bad time is refused before anything is applied
        if self.online_store not in STORE_TEMPLATES:
            raise ValueError(
                f"online_store must be one of {sorted(STORE_TEMPLATES)}, got {self.online_store!r}"
            )


def write_store_config(ws: Workspace, config: FeaturesConfig) -> Path:
    """The chosen feature_store.yaml from feature_repo/ in the workspace (its repo_path); with the SQL
    registry, its `registry:` replaced by SQL_REGISTRY (the URL stays an environment reference); with the
    Ray offline store, `offline_store:` and `batch_engine:` are Feast's Ray store and engine; with a write
    batch, `materialization: online_write_batch_size`."""
    import yaml

    ws.root.mkdir(parents=True, exist_ok=True)
    text = (REPO_DIR / STORE_TEMPLATES[config.online_store]).read_text()
    if config.registry == "sql" and not os.environ.get("FEAST_REGISTRY_URL"):
        raise ValueError(f"--registry sql needs {REGISTRY_URL_ENV} (a SQLAlchemy URL) in the environment")
    if config.registry == "sql" or config.offline_store == "ray" or config.write_batch is not None:
        store = yaml.safe_load(text)
        flags = []
        if config.registry == "sql":
            store["registry"], flags = SQL_REGISTRY, [*flags, "--registry sql"]
        if config.offline_store == "ray":
            store["offline_store"], store["batch_engine"] = RAY_OFFLINE_STORE, RAY_BATCH_ENGINE
            flags.append("--offline-store ray")
        if config.write_batch is not None:
            store["materialization"]["online_write_batch_size"] = config.write_batch
            flags.append(f"--write-batch {config.write_batch}")
        text = f"# written by `vlmrec features {' '.join(flags)}`\n" + yaml.safe_dump(store, sort_keys=False)
    ws.feature_store_yaml.write_text(text)
    return ws.feature_store_yaml


def feast_unchecked() -> None:
    """Let Feast's modules, from now on, import as under `python -O`: typeguard's `@typechecked` (which only
    Feast uses here; typeguard's own words: "meant for selectively introducing type checking into a code
    base where the checks aren't meant to be run in production") then leaves a class or function as
    written instead of re-compiling it with argument checks at import, which was more than half of the time
    `import feast` takes and of a Producer replica's state load (docs/BENCHMARKS.md). Our asserts stay on,
    and what reaches Feast is checked on our side first (the API's models, the ingest schema). Called before
    the first Feast import of each entry point here; modules already imported keep their checks."""
    import typeguard

    typeguard.typechecked = _as_written


def _as_written(target=None, **_):
    """typeguard.typechecked under `python -O`: the decorated object itself."""
    return target if target is not None else (lambda f: f)


def open_store(ws: Workspace):
    """The workspace's FeatureStore (run `vlmrec features` first)."""
    feast_unchecked()
    from feast import FeatureStore

    ws.need(ws.feature_store_yaml, "features")
    return FeatureStore(repo_path=str(ws.root))


def _time_range(paths: Sequence[Path]) -> tuple[datetime, datetime]:
    lo, hi = None, None
    for path in paths:
        if not path.exists():
            continue
        ts = pq.read_table(path, columns=["event_timestamp"]).column(0).to_pandas()
        if len(ts):
            lo = ts.min() if lo is None else min(lo, ts.min())
            hi = ts.max() if hi is None else max(hi, ts.max())
    if lo is None:
        raise FileNotFoundError("no source table with rows to materialize: run `vlmrec ingest` first")
    return lo.to_pydatetime() - timedelta(seconds=1), max(hi.to_pydatetime(), datetime.now(UTC)) + timedelta(
        seconds=1
    )


def _until(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--until must be an ISO 8601 time, got {value!r}") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def write_repo(ws: Workspace, config: FeaturesConfig) -> None:
    """The workspace as a Feast repository: feature_store.yaml, the definitions module, .feastignore."""
    write_store_config(ws, config)
    (ws.root / REPO_FILE).write_text(REPO_SHIM)
    (ws.root / ".feastignore").write_text(FEASTIGNORE)


def feast_apply(ws: Workspace) -> None:
    """`feast apply` through Feast's API, as its CLI calls it (the repository on sys.path to import the
    definitions module; Feast changes the working directory: both restored here)."""
    import sys

    feast_unchecked()
    from feast.repo_config import load_repo_config
    from feast.repo_operations import apply_total

    cwd, path = Path.cwd(), list(sys.path)
    sys.path.append(str(ws.root.absolute()))
    try:
        apply_total(load_repo_config(ws.root, ws.feature_store_yaml), ws.root, skip_source_validation=False)
    finally:
        os.chdir(cwd)
        sys.path[:] = path


def apply_and_materialize(ws: Workspace, config: FeaturesConfig = FeaturesConfig()) -> dict:
    """feast apply, then materialize_incremental up to now (or everything up to config.until). Returns
    timings."""
    feast_unchecked()
    from feature_repo.features import item_embedding, item_metadata, user_click_sequence

    start, end = _time_range([ws.sequences, ws.items, ws.embeddings])  # fails early when nothing was ingested
    if "click_times" not in pq.read_schema(ws.sequences).names:  # written by ingest since issue 16
        raise FileNotFoundError(
            f"{ws.sequences} has no click_times column (written by an older vlmrec ingest): "
            f"run `vlmrec ingest --workdir {ws.root}` again"
        )
    layout, max_len = sequence_layout(ws.sequences)
    if config.offline_store == "ray" and layout == "snapshots":
        same_second_clicks(ws)  # refuses data the Ray store would materialize wrongly
    before = ws.feature_store_yaml.read_text() if ws.feature_store_yaml.exists() else None
    write_repo(ws, config)
    new_store = (
        before != ws.feature_store_yaml.read_text()
    )  # another online store (or registry) than last time
    t0 = time.perf_counter()
    feast_apply(ws)
    t_apply = time.perf_counter() - t0
    store = open_store(ws)
    views = [user_click_sequence, item_metadata] + ([item_embedding] if ws.embeddings.exists() else [])
    names = [v.name for v in views]  # embeddings come later (vlmrec embed): the views that have data now
    t0 = time.perf_counter()
    with feast_on_ray() if on_ray(store) else nullcontext():  # the cluster's Ray when connected to one
        if config.until is not None:  # the online store as of that time (a replay of what came after)
            until = min(end, _until(config.until))
            # a latest table holds each user's state at their last click only: their state as of `until`
            # is built from the events and pushed (the push source a served click takes), not materialized
            from_source = names if layout == "snapshots" else [n for n in names if n != SEQUENCE_VIEW]
            store.materialize(start_date=start, end_date=until, feature_views=from_source)
            if layout == "latest":
                push_sequences_as_of(store, ws, max_len, until)
        else:  # later rows only: each view from where its last materialization ended, up to now
            now = datetime.now(UTC)
            # A view never materialized has no such end, and Feast then starts a ttl-0 view a year back, which
            # would skip older data (MovieLens is 1996-2018): its first materialization covers the sources. So
            # does every view's after a change of store: the registry's ends say nothing of a new online store.
            first = [n for n in names if new_store or store.get_feature_view(n).most_recent_end_time is None]
            if first:
                store.materialize(start_date=start, end_date=max(end, now), feature_views=first)
            if later := [n for n in names if n not in first]:
                store.materialize_incremental(end_date=now, feature_views=later)
    return {
        "online_store": config.online_store,
        "offline_store": config.offline_store,
        "views": names,
        "apply_s": round(t_apply, 3),
        "materialize_s": round(time.perf_counter() - t0, 3),
        "mode": "until" if config.until is not None else "incremental",
    }


def push_sequences_as_of(store, ws: Workspace, max_len: int, until: datetime) -> int:
    """Each user's click sequence as of `until`, from the events, pushed to the online store in batches of
    the store's online_write_batch_size rows. Returns the users written."""
    from feast.data_source import PushMode

    from vlmrec.sequences import click_sequences

    events = pq.read_table(ws.events, columns=["user_id", "item_id", "event_timestamp"]).to_pandas()
    until_us = int(pd.Timestamp(until).value // 1000)
    table = click_sequences(events, max_len, until=until_us)
    batch = store.config.materialization_config.online_write_batch_size or max(len(table), 1)
    for rows in table.to_batches(max_chunksize=batch):
        store.push(PUSH_SOURCE, rows.to_pandas(), to=PushMode.ONLINE)
    return len(table)


def same_second_clicks(ws: Workspace) -> None:
    """Refuse the Ray offline store for data where a user clicks twice in one second: Feast's Ray store and
    engine (0.67) compare times in whole seconds, so materializing keeps an arbitrary snapshot of that second
    (on MovieLens-small a stale sequence for 99 and 103 of 610 users in two runs), not the latest."""
    seq = pq.read_table(ws.sequences, columns=["user_id", "event_timestamp"]).to_pandas()
    seconds = pd.to_datetime(seq["event_timestamp"], utc=True).dt.floor("s")
    tied = seq.assign(second=seconds).duplicated(["user_id", "second"])
    if tied.any():
        users = seq.loc[tied.to_numpy(), "user_id"].nunique()
        raise ValueError(
            f"offline_store ray: {users} users click more than once in one second ({ws.sequences}); Feast's Ray "
            "offline store compares whole seconds and would serve stale sequences: use --offline-store file"
        )


def per_store(make: Callable[[Any], T]) -> Callable[[Any], T]:
    """`make(store)` once per FeatureStore object: made on first use, dropped with the store (so what it
    makes must not hold the store itself, or its entry would keep the store alive).

        lock_of = per_store(lambda store: threading.Lock())
        assert lock_of(store) is lock_of(store)
    """
    made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    guard = threading.Lock()

    def of(store) -> T:
        with guard:
            got = made.get(store)
            if got is None:
                got = made[store] = make(store)
            return got

    return of


class OnlineView:
    """One feature view's rows through the store's online store's own `online_read` / `online_write_batch`,
    the view resolved from the registry once. Feast's get_online_features, get_feature_view and push rebuild
    the registry's views from protos on every call: most of a small read's or one click's write time
    (benchmarks/foundation.py, benchmarks/click_write.py). Holds the store's config, not the store."""

    def __init__(self, store, view_name: str) -> None:
        self.view = store.get_feature_view(view_name, allow_registry_cache=True)
        self.join_key = self.view.entity_columns[0].name
        self.config = store.config
        self.online = store._get_provider().online_store  # Feast's OnlineStore interface

    def key(self, entity_id: int):
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        return EntityKey(join_keys=[self.join_key], entity_values=[Value(int64_val=int(entity_id))])

    def read_rows(self, entity_ids: Sequence[int], features: Sequence[str]) -> list[tuple]:
        """(row timestamp or None, {feature: Value proto} or None) per entity, in order."""
        keys = [self.key(e) for e in entity_ids]
        return self.online.online_read(self.config, self.view, keys, list(features))

    def write_row(self, entity_id: int, values: dict, ts: datetime) -> None:
        """Write one entity's row (Value protos by feature name), stamped ts."""
        row = (self.key(entity_id), values, ts, None)
        self.online.online_write_batch(self.config, self.view, [row], None)


class SequenceReader(OnlineView):
    """The student service's click sequences straight from the online store (the view it reads item_ids
    from, resolved once)."""

    def __init__(self, store) -> None:
        projections = store.get_feature_service(STUDENT_SERVICE, allow_cache=True).feature_view_projections
        views = [p for p in projections if "item_ids" in {f.name for f in p.features}]
        if len(views) != 1:
            raise ValueError(f"feature service {STUDENT_SERVICE} must read item_ids from one view")
        super().__init__(store, views[0].name)

    def __call__(self, user_ids: Sequence[int]) -> dict[int, list[int]]:
        users = [int(u) for u in user_ids]
        return {
            u: list(values["item_ids"].int64_list_val.val) if values and "item_ids" in values else []
            for u, (_, values) in zip(users, self.read_rows(users, ["item_ids"]), strict=True)
        }


sequence_reader = per_store(SequenceReader)


def online_sequences(store, user_ids: Sequence[int]) -> dict[int, list[int]]:
    """Each user's current click sequence (oldest first) from the online store; [] for an unknown user.

    Read through the online store's own `online_read` on the student service's feature view (`SequenceReader`,
    one per store), not Feast's get_online_features, which rebuilds the service's views from registry protos on
    every call. A test holds the two reads equal."""
    return sequence_reader(store)(user_ids) if user_ids else {}


@contextmanager
def feast_on_ray() -> Iterator[None]:
    """Feast's Ray work on the Ray this process uses (started if none), and Ray Data's settings as they were
    after it: Feast 0.67 rewrites the process-wide DataContext (tensor casting off, shuffle strategy, block
    sizes), which broke Ray Data pipelines that ran later in the same process (the teacher's embedding)."""
    from ray.data.context import DataContext

    from vlmrec.raycluster import init_ray

    init_ray()  # before Feast's own init, which would start a second local Ray in a job's driver
    saved = DataContext.get_current().copy()
    try:
        yield
    finally:
        DataContext._set_current(saved)


def on_ray(store) -> bool:
    """The store's offline store is Feast's Ray store (its joins and materialization are Ray work)."""
    return getattr(store.config.offline_store, "type", None) in (
        "ray",
        "feast.offline_stores.contrib.ray_offline_store.ray.RayOfflineStore",
    )


def historical_sequences(store, queries: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time: for each (user_id, event_timestamp) row, the user's sequence just BEFORE that event.
    With the Ray offline store the join is Ray Data work on the Ray this process uses (started if none).

    Returns the query rows (in their order) with a column `item_ids` (oldest first; [] when none). Needs the
    per-event snapshots (`vlmrec ingest --sequences snapshots`): ValueError on a latest-per-user table, where
    every earlier query would find no sequence.
    """
    sequences = Workspace(store.repo_path).sequences
    if (layout := sequence_layout(sequences)[0]) != "snapshots":
        raise ValueError(
            f"{sequences} holds the {layout} sequence per user, not a snapshot per event: a point-in-time "
            "join needs `vlmrec ingest --sequences snapshots` (training builds its examples from the events)"
        )
    ray = on_ray(store)
    features = store.get_feature_service(STUDENT_SERVICE)
    if ray:
        # Feast's Ray store compares times in whole seconds (0.67 floors both sides), so it may answer with a
        # snapshot from later in the query's second, holding the target itself: ask for the snapshot's click
        # times too and keep only the clicks before the query (no leak; a same-second burst may shorten it).
        features = [f"{SEQUENCE_VIEW}:item_ids", f"{SEQUENCE_VIEW}:click_times"]
    entity_df = queries[["user_id", "event_timestamp"]].copy()
    times = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    entity_df["event_timestamp"] = times - JUST_BEFORE
    entity_df["_row"] = range(len(entity_df))
    with feast_on_ray() if ray else nullcontext():
        out = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    # Feast's file store drops an entity row whose user has rows only AFTER its timestamp (seen in 0.67):
    # join back on the row number so every query keeps its place, with [] for "no history yet".
    by_row = dict(zip(out["_row"], out["item_ids"], strict=True))
    result = queries.reset_index(drop=True).copy()
    result["item_ids"] = [_as_list(by_row.get(i)) for i in range(len(result))]
    if ray:
        clicked = dict(zip(out["_row"], out["click_times"], strict=True))
        before = utc_micros(times).tolist()
        result["item_ids"] = [
            [item for item, t in zip(ids, _as_list(clicked.get(i)), strict=True) if t < before[i]]
            for i, ids in enumerate(result["item_ids"])
        ]
    return result


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int | np.integer):  # the Ray offline store unwraps a one-element list (0.67)
        return [int(value)]
    try:
        if pd.isna(value):
            return []
    except (TypeError, ValueError):
        pass
    return [int(v) for v in value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path(".vlmrec/sample"), help="the workspace folder")
    parser.add_argument(
        "--online-store", choices=sorted(STORE_TEMPLATES), default=FeaturesConfig.online_store
    )
    parser.add_argument(
        "--until",
        default=None,
        help="materialize rows up to this ISO time only (the online store as of a split's cut, for replay)",
    )
    parser.add_argument(
        "--offline-store",
        choices=OFFLINE_STORES,
        default=FeaturesConfig.offline_store,
        help="file: Feast's parquet store in this process; ray: Feast's Ray offline store and compute engine",
    )
    parser.add_argument(
        "--registry",
        choices=REGISTRIES,
        default=FeaturesConfig.registry,
        help=f"file: registry.db in the workspace; sql: Feast's SQL registry at ${REGISTRY_URL_ENV} (PostgreSQL)",
    )
    parser.add_argument(
        "--write-batch",
        type=int,
        default=None,
        help="rows materialized (converted and written to the online store) at a time; default 10,000",
    )


def run(args: argparse.Namespace) -> dict:
    config = FeaturesConfig(
        online_store=args.online_store,
        until=getattr(args, "until", None),
        write_batch=getattr(args, "write_batch", None),
        registry=getattr(args, "registry", "file"),
        offline_store=getattr(args, "offline_store", "file"),
    )
    report = apply_and_materialize(Workspace(args.workdir), config)
    print(
        f"features: applied to {args.workdir}, materialized {', '.join(report['views'])} "
        f"into {report['online_store']} in {report['materialize_s']:.1f}s (offline store: {report['offline_store']})"
    )
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmrec.features", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
