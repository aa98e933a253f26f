"""Click writes: put one click into a user's ONLINE click sequence (the view Feast's push source `click_push`
feeds), in time order, and confirm it was stored.

    writer = ClickWriter()                                        # one per process: it holds the locks
    seq = writer.append(store, user_id, item_id, ts, sequence_len=50)   # the new sequence, oldest first

The online store holds whole rows, so a click is read -> merge -> write -> read back, each through the
online store's own calls on the view `click_push` feeds (`ClickRows`: the row Feast's push writes, without
push's per-call registry work):
- **Merge by time.** The row holds the last N item ids and each one's click time (`click_times`, UTC
  microseconds). A click goes after every stored click not newer than it, so late and out-of-order clicks
  land where they happened; the N newest are kept. A click older than all of a full sequence's N would
  fall off at once: it is refused (`Refused`, HTTP 409), never acknowledged and lost.
- **The row's timestamp.** Feast's Redis store skips a write whose event timestamp is not strictly newer
  than the row it holds (the sqlite store overwrites). The row is written with the newest click time it
  holds, or 1 microsecond after the stored row's when that is not newer (a late click merged behind the
  newest one): every write of a sequence is newer than the one it read.
- **Confirmed.** The row is read back; the write counts only when it holds exactly what was written. A
  write some other writer overtook (another replica: see below) is merged again, up to `attempts` times,
  then `NotConfirmed` (a transient error: HTTP 503 with Retry-After).
- A user's read-modify-writes are serialised inside one replica by `ClickWriter` (striped threading locks,
  held for the whole read-modify-write). Across replicas they are not: a concurrent writer with a newer
  row overwrites, so route a user's events to one replica (sticky by user_id) or a single writer.
The event also goes to the event log (`event_log`: data/events_log/, the ingest layout plus request_id and
position); training sees it once `vlmrec ingest --logged` folds that log into data/events.parquet.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import pyarrow as pa

from serving.calls import Deps, Unavailable, describe, ms_since
from serving.config import utc
from serving.guard import invalid
from serving.online import online_lock
from serving.parquet_log import PartitionedLog
from vlmrec.features import PUSH_SOURCE, OnlineView, per_store
from vlmrec.features import SEQUENCE_VIEW as VIEW  # the feature view it feeds
from vlmrec.schema import EVENTS_LOG

FEATURES = ("item_ids", "click_times")
log = logging.getLogger("ray.serve")
ONE_US = timedelta(microseconds=1)


class Refused(ValueError):
    """A click that cannot be placed in the sequence (a permanent answer: HTTP 409, not a retry)."""


class NotConfirmed(RuntimeError):
    """The read-back did not show the write (overtaken each time): transient, retry later."""


def transient(exc: BaseException) -> bool:
    """Whether a failed push is worth retrying: a timeout, a connection or I/O error, a locked sqlite file,
    a Redis connection / timeout / loading error, an overtaken write. Anything else is not (a bug or a bad
    value): retrying would fail the same way."""
    if isinstance(exc, (TimeoutError, ConnectionError, NotConfirmed, sqlite3.OperationalError)):
        return True
    if type(exc).__module__.startswith("redis") and type(exc).__name__ in (
        "ConnectionError",
        "TimeoutError",
        "BusyLoadingError",
        "TryAgainError",
    ):
        return True
    return isinstance(exc, OSError)


def to_us(ts: datetime) -> int:
    """UTC microseconds since the epoch (what click_times holds)."""
    return (utc(ts) - datetime(1970, 1, 1, tzinfo=UTC)) // ONE_US


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us))


def check_event_time(ts: datetime, earliest: datetime, max_future_s: float, now: datetime) -> datetime:
    """The click's time in UTC, or ValueError saying which bound it breaks: not before `earliest` (the
    deployment's epoch), not more than `max_future_s` ahead of `now` (clock skew), one UTC can hold."""
    ts = utc(ts)
    if ts < earliest:
        raise ValueError(f"{ts.isoformat()} is before the earliest accepted time {earliest.isoformat()}")
    latest = now + timedelta(seconds=max_future_s)
    if ts > latest:
        raise ValueError(
            f"{ts.isoformat()} is more than {max_future_s:g} s in the future (now {now.isoformat()})"
        )
    return ts


@dataclass(frozen=True)
class Clicks:
    """A user's stored row: item ids and their click times (oldest first), the row's timestamp."""

    item_ids: list[int]
    times: list[int]  # UTC microseconds, aligned with item_ids
    row_ts: datetime | None  # None: no row yet


class ClickRows(OnlineView):
    """One store's click-sequence rows, read and written on the view `click_push` feeds: the row Feast's push
    writes, without push's per-call registry work (a test holds them equal on sqlite and Redis).

        rows = click_rows(store)    # one per FeatureStore
        rows.write(user_id, rows.read(user_id))
    """

    def __init__(self, store) -> None:
        fed = sorted(
            v.name
            for v in store.list_feature_views(allow_cache=True)
            if v.stream_source is not None and v.stream_source.name == PUSH_SOURCE
        )
        if fed != [VIEW]:
            raise ValueError(f"push source {PUSH_SOURCE} must feed exactly the view {VIEW}, not {fed}")
        super().__init__(store, VIEW)

    def read(self, user_id: int) -> Clicks:
        """The user's row (the row timestamp to the microsecond, which OnlineResponse rounds to seconds)."""
        ((ts, values),) = self.read_rows([user_id], FEATURES)
        if ts is None or not values:
            return Clicks([], [], None)
        ids = list(values["item_ids"].int64_list_val.val) if "item_ids" in values else []
        times = list(values["click_times"].int64_list_val.val) if "click_times" in values else []
        if len(times) != len(ids):
            raise Refused(
                f"user {user_id}'s stored sequence has no click times (it was materialized before they were "
                "recorded): re-run `vlmrec ingest` and `vlmrec features` so clicks can be merged by time"
            )
        return Clicks(ids, times, utc(ts))

    def write(self, user_id: int, clicks: Clicks) -> None:
        """Write the user's whole row, stamped clicks.row_ts (UTC)."""
        from feast.protos.feast.types.Value_pb2 import Int64List, Value

        values = {
            "item_ids": Value(int64_list_val=Int64List(val=[int(i) for i in clicks.item_ids])),
            "click_times": Value(int64_list_val=Int64List(val=[int(t) for t in clicks.times])),
        }
        self.write_row(user_id, values, utc(clicks.row_ts))


click_rows = per_store(ClickRows)  # the store's ClickRows, made on first use, dropped with the store


def read_clicks(store, user_id: int) -> Clicks:
    """The user's row straight from the online store."""
    return click_rows(store).read(user_id)


def merge(stored: Clicks, item_id: int, ts: datetime, sequence_len: int) -> Clicks:
    """The stored row with one click merged in by time (after every click not newer than it), the newest
    `sequence_len` kept, and the timestamp to write it with (strictly newer than the stored row's)."""
    at = to_us(ts)
    pos = sum(1 for t in stored.times if t <= at)  # times are sorted: the clicks not newer than it
    ids = [*stored.item_ids[:pos], int(item_id), *stored.item_ids[pos:]]
    times = [*stored.times[:pos], at, *stored.times[pos:]]
    if len(ids) > sequence_len and pos < len(ids) - sequence_len:
        oldest = from_us(stored.times[len(stored.times) - sequence_len]).isoformat()
        raise Refused(
            f"the click at {utc(ts).isoformat()} is older than all of the user's last {sequence_len} clicks "
            f"(the oldest kept is at {oldest}): it would not be in the sequence"
        )
    ids, times = ids[-sequence_len:], times[-sequence_len:]
    row_ts = from_us(times[-1])
    if stored.row_ts is not None and row_ts <= stored.row_ts:
        row_ts = stored.row_ts + ONE_US
    return Clicks(ids, times, row_ts)


def append_click(
    store,
    user_id: int,
    item_id: int,
    event_timestamp: datetime,
    sequence_len: int,
    push_lock: AbstractContextManager = nullcontext(),
    attempts: int = 3,
) -> list[int]:
    """Read the user's row, merge the click in by time, write it, read it back (all under `push_lock`, the
    store's lock: serving/online.py). Returns the stored sequence (oldest first). Refused: the click cannot
    be placed; NotConfirmed: overtaken `attempts` times. The caller serialises the user's calls (see
    ClickWriter)."""
    rows = click_rows(store)
    for _ in range(attempts):
        with push_lock:
            stored = rows.read(user_id)
            new = merge(stored, item_id, event_timestamp, sequence_len)
            rows.write(user_id, new)
            back = rows.read(user_id)
        if back.item_ids == new.item_ids and back.times == new.times:
            return back.item_ids
    raise NotConfirmed(
        f"the click of user {user_id} was overtaken by other writes {attempts} times: not stored"
    )


class ClickWriter:
    """Appends clicks, one read-modify-write per user at a time in this process.

    User locks are striped (user u takes lock hash(u) mod stripes: bounded memory, no eviction) and held
    for the whole read-modify-write, also when the caller stopped waiting (a timeout), so a late write
    never interleaves with the next one. On sqlite every read-modify-write also takes the store's lock
    (serving/online.py): Feast shares one sqlite connection between threads; two threads' writes would
    share a transaction, and a thread blocked on the connection can freeze the whole process.
    """

    def __init__(self, stripes: int = 1024) -> None:
        self._users = [threading.Lock() for _ in range(stripes)]

    def lock(self, user_id: int) -> threading.Lock:
        return self._users[hash(int(user_id)) % len(self._users)]

    def append(
        self, store, user_id: int, item_id: int, event_timestamp: datetime, sequence_len: int
    ) -> list[int]:
        """append_click under the user's lock. Returns the new sequence (oldest first)."""
        with self.lock(user_id):
            return append_click(store, user_id, item_id, event_timestamp, sequence_len, online_lock(store))


async def record_click(
    s, deps: Deps, writer: ClickWriter, body, logged: PartitionedLog | None = None
) -> dict:
    """POST /v1/events on a loaded State `s`: check the event (one of the deployment's event types, a known
    item, a time within its bounds: else `invalid`, a 422 naming the field), append it through `writer`
    within event_timeout_s, answer once it is read back, and add it to the event log `logged` (the offline events
    the next training reads, with its request_id and position). Refused (409) when the sequence cannot hold
    it; Unavailable (503) when the store failed transiently; any other failure propagates (a 500).
    The answer's `timings_ms`: `write` (the append in the events pool: the user's and the store's locks,
    the read, the write, the read back), `total` (this call)."""
    t0 = time.perf_counter()
    cfg = s.config
    item = int(body.item_id)
    now = datetime.now(UTC)
    if body.event_type not in cfg.event_types:
        raise invalid("event_type", f"must be one of {list(cfg.event_types)}", body.event_type)
    try:
        ts = check_event_time(body.event_timestamp or now, cfg.event_min_ts, cfg.event_max_future_s, now)
    except ValueError as exc:
        raise invalid("event_timestamp", str(exc), str(body.event_timestamp)) from None
    if not s.known_item(item) and not await _in_an_index(s, deps, item):
        raise invalid("item_id", f"unknown item_id {item}: not in the catalogue or an index", item)
    t_write = time.perf_counter()
    try:
        seq = await deps.call(
            "events",
            writer.append,
            s.store,
            int(body.user_id),
            item,
            ts,
            s.sequence_len,
            timeout=cfg.event_timeout_s,
        )
    except Refused:
        raise
    except Exception as exc:
        log.warning("click push failed: %r", exc)
        deps.metrics.error("events", "event")
        if not transient(exc):
            raise
        raise Unavailable(
            "feature_store_unavailable",
            f"the click push failed ({describe(exc)}); it may or may not be stored: retry",
        ) from exc
    write_ms = ms_since(t_write)
    if logged is not None:
        logged.record(
            LoggedEvent(int(body.user_id), item, ts, body.event_type, body.request_id, body.position)
        )
    return {
        "user_id": int(body.user_id),
        "item_id": item,
        "sequence_length": len(seq),
        "sequence_len_max": s.sequence_len,
        "timings_ms": {"write": write_ms, "total": ms_since(t0)},
    }


class LoggedEvent(NamedTuple):
    """One accepted event as the event log keeps it (vlmrec.schema.EVENTS_LOG)."""

    user_id: int
    item_id: int
    event_timestamp: datetime
    event_type: str
    request_id: str | None
    position: int | None


def event_log(path: str, queue_size: int = 10_000, flush_s: float = 1.0, **kw) -> PartitionedLog[LoggedEvent]:
    """The writer of accepted events under `path` (hour partitions by event time)."""

    def to_table(rows: list[LoggedEvent]) -> pa.Table:
        return pa.Table.from_pylist([r._asdict() for r in rows], schema=EVENTS_LOG)

    return PartitionedLog(path, to_table, lambda r: r.event_timestamp, queue_size, flush_s, **kw)


async def _in_an_index(s, deps: Deps, item: int) -> bool:
    """An item upserted after load (cold start) is in an index but not yet in the catalogue copy."""
    for index in s.indexes():
        try:
            found = await deps.call("search", index.get_vectors, [item], timeout=s.config.search_timeout_s)
        except Exception as exc:
            raise Unavailable(
                "index_unavailable", f"could not check item_id {item} in the index ({describe(exc)})"
            ) from exc
        if found:
            return True
    return False
