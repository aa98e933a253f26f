"""Feast online-store calls from the Producer's thread pools, without freezing the replica.

    with online_lock(store):                    # around every call that touches the online store
        ...
    stored = read_sequences(store, [1, 2])     # online_sequences under that lock

Feast's sqlite online store keeps ONE sqlite connection per FeatureStore and uses it from every thread.
While one thread waits inside sqlite for a lock another process holds (a write, up to the connection's busy
timeout, 5 s), it holds the connection's mutex with the GIL released; a second thread that then calls a
sqlite function taking that mutex with the GIL held (binding the parameters of its SELECT) blocks holding
the GIL, and the whole replica stops: the event loop, /healthz, every timeout (issue 16: /healthz took
15 s with the file locked for 10 s, the 250 ms feature timeout never fired). So on sqlite every call goes
through one threading.Lock per FeatureStore: a waiting thread waits on that lock with the GIL released,
the event loop keeps running, and the callers' timeouts fire. Redis needs no lock (a connection pool).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import AbstractContextManager, nullcontext

from vlmrec.features import online_sequences

# one lock per FeatureStore object (each has its own sqlite connection); dropped with the store
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def online_lock(store) -> AbstractContextManager:
    """The lock every online call of `store` must hold: one per store on sqlite, none otherwise."""
    if store.config.online_store.type != "sqlite":
        return nullcontext()
    with _LOCKS_GUARD:
        lock = _LOCKS.get(store)
        if lock is None:
            lock = _LOCKS[store] = threading.Lock()
        return lock


def read_sequences(store, user_ids) -> dict[int, list[int]]:
    """online_sequences under the store's lock."""
    with online_lock(store):
        return online_sequences(store, user_ids)
