"""Click pushes: append one click to a user's ONLINE click sequence through Feast's push source.

    writer = ClickWriter()                                        # one per process: it holds the locks
    seq = writer.append(store, user_id, item_id, ts, sequence_len=50)   # the new sequence, oldest first

A Feast push writes whole rows, so appending is read (online_sequences) -> append -> keep the last N ->
push `click_push` to the online store. Two concurrent clicks of one user would both read the same old
sequence and one would be lost, so a user's read-modify-writes are serialised:
- inside one replica by `ClickWriter` (striped threading locks, held for the whole read-modify-write);
- across replicas they are NOT: route a user's events to one replica (a sticky route by user_id in the
  gateway) or send them through a single writer (one replica of the events route, or a stream consumer
  keyed by user). The sqlite online store serialises writes (one file lock) but not read-modify-writes.
The click goes to the online store only: training sees clicks when the event log is next ingested.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime

import pandas as pd

from vlmrec.features import online_sequences

PUSH_SOURCE = "click_push"  # feature_repo/features.py: the push source of user_click_sequence


class ClickWriter:
    """Appends clicks, one read-modify-write per user at a time in this process.

    User locks are striped (user u takes lock hash(u) mod stripes: bounded memory, no eviction) and held
    for the whole read-modify-write, also when the caller stopped waiting (a timeout), so a late write
    never interleaves with the next one. On sqlite every push also takes one process-wide lock: Feast
    shares one sqlite connection between threads, and two threads' writes would share a transaction.
    """

    def __init__(self, stripes: int = 1024) -> None:
        self._users = [threading.Lock() for _ in range(stripes)]
        self._sqlite = threading.Lock()

    def lock(self, user_id: int) -> threading.Lock:
        return self._users[hash(int(user_id)) % len(self._users)]

    def append(
        self, store, user_id: int, item_id: int, event_timestamp: datetime, sequence_len: int
    ) -> list[int]:
        """append_click under the user's lock. Returns the new sequence (oldest first)."""
        single_writer = self._sqlite if store.config.online_store.type == "sqlite" else nullcontext()
        with self.lock(user_id):
            return append_click(store, user_id, item_id, event_timestamp, sequence_len, single_writer)


def click_row(user_id: int, event_timestamp: datetime, item_ids: list[int]) -> pd.DataFrame:
    """The one-row frame `click_push` takes: user_id, event_timestamp (UTC), item_ids (oldest first)."""
    ts = pd.Timestamp(event_timestamp)
    ts = ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)
    return pd.DataFrame(
        {"user_id": [int(user_id)], "event_timestamp": [ts], "item_ids": [[int(i) for i in item_ids]]}
    )


def append_click(
    store,
    user_id: int,
    item_id: int,
    event_timestamp: datetime,
    sequence_len: int,
    push_lock: AbstractContextManager = nullcontext(),
) -> list[int]:
    """Read the user's online sequence, append the click, keep the last `sequence_len`, push it (under
    `push_lock`). Returns the new sequence. The caller serialises the user's calls (see ClickWriter)."""
    from feast.data_source import PushMode

    current = online_sequences(store, [int(user_id)])[int(user_id)]
    new = [*current, int(item_id)][-sequence_len:]
    with push_lock:
        store.push(PUSH_SOURCE, click_row(user_id, event_timestamp, new), to=PushMode.ONLINE)
    return new
