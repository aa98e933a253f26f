"""Feast online-store calls from the Producer's thread pools, without freezing the replica.

    with online_lock(store):                    # around every call that touches the online store
        ...
    stored = read_sequences(store, [1, 2])     # online_sequences under that lock
    store = open_online(workspace)             # the Producer's store: on sqlite, commits without an fsync

Feast's sqlite online store keeps ONE sqlite connection per FeatureStore and uses it from every thread.
While one thread waits inside sqlite for a lock another process holds (a write, up to the connection's busy
timeout, 5 s), it holds the connection's mutex with the GIL released; a second thread that then calls a
sqlite function taking that mutex with the GIL held (binding the parameters of its SELECT) blocks holding
the GIL, and the whole replica stops: the event loop, /healthz, every timeout (issue 16: /healthz took
15 s with the file locked for 10 s, the 250 ms feature timeout never fired). So on sqlite every call goes
through one threading.Lock per FeatureStore: a waiting thread waits on that lock with the GIL released,
the event loop keeps running, and the callers' timeouts fire. Redis needs no lock (a connection pool).

A click push commits on sqlite; in its default journal that is three fsyncs, and on a machine writing other
files (the exposure log) one of them now and then waited far longer than the rest of the request
(docs/BENCHMARKS.md, freshness). The Producer's store runs the file in WAL mode (readers and the one writer
no longer block each other) at synchronous=NORMAL: no fsync per commit; a commit survives the process, an OS
crash may lose the last ones (the event log keeps every accepted click, `vlmrec ingest --logged` folds them
back).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import AbstractContextManager, nullcontext

from vlmrec.features import online_sequences, open_store, per_store
from vlmrec.workspace import Workspace

log = logging.getLogger("ray.serve")

_lock_of = per_store(lambda store: threading.Lock())  # each store has its own sqlite connection


def online_lock(store) -> AbstractContextManager:
    """The lock every online call of `store` must hold: one per store on sqlite, none otherwise."""
    return _lock_of(store) if store.config.online_store.type == "sqlite" else nullcontext()


def read_sequences(store, user_ids) -> dict[int, list[int]]:
    """online_sequences under the store's lock."""
    with online_lock(store):
        return online_sequences(store, user_ids)


def open_online(ws: Workspace):
    """The workspace's FeatureStore as the Producer uses it: on sqlite, its file in WAL mode (kept in the
    file; left as it is, with a warning, when another process holds it locked now) and the connection at
    synchronous=NORMAL."""
    store = open_store(ws)
    if store.config.online_store.type == "sqlite":
        with online_lock(store):
            conn = store._get_provider().online_store._get_conn(store.config)  # the one Feast then uses
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                log.warning("online store %s kept its journal mode: %r", store.config.online_store.path, exc)
            conn.execute("PRAGMA synchronous=NORMAL")
    return store
