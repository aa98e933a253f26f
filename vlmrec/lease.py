"""Build new, then swap: the one reference to a value that requests use while it may be replaced (a Producer's
loaded state, an index replica's private copy). A request leases the current value; a swap puts a new one in
place and retires the old, which is closed when its last lease ends, never under a request still using it.

    current = Current(load(), close=State.close)
    with current.use() as state: ...       # a request: the value it started with, to the end
    current.swap(load())                    # a reload: requests in flight finish on the old value
    current.close()                         # retire the last one (use() raises Closed from now on)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(RuntimeError):
    """Nothing to use: not loaded yet, or closed."""


class _Slot(Generic[T]):
    __slots__ = ("value", "users", "retired")

    def __init__(self, value: T) -> None:
        self.value, self.users, self.retired = value, 0, False


class Current(Generic[T]):
    """The current value, leased by its users, closed (`close(value)`) once retired and unused."""

    def __init__(self, value: T | None, close: Callable[[T], None], what: str = "value") -> None:
        self._lock = threading.Lock()
        self._close, self._what = close, what
        self._slot: _Slot[T] | None = None if value is None else _Slot(value)

    def peek(self) -> T:
        """The current value without a lease (for reading small immutable facts of it)."""
        slot = self._slot
        if slot is None:
            raise Closed(f"the {self._what} is closed or not loaded")
        return slot.value

    @property
    def loaded(self) -> bool:
        return self._slot is not None

    @contextmanager
    def use(self) -> Iterator[T]:
        with self._lock:
            slot = self._slot
            if slot is None:
                raise Closed(f"the {self._what} is closed or not loaded")
            slot.users += 1
        try:
            yield slot.value
        finally:
            with self._lock:
                slot.users -= 1
                done = slot.retired and slot.users == 0
            if done:
                self._close(slot.value)

    def swap(self, value: T | None) -> T | None:
        """Put `value` in place (None: nothing) and retire the old one. -> the old value (None if none)."""
        with self._lock:
            old, self._slot = self._slot, None if value is None else _Slot(value)
            if old is None:
                return None
            old.retired = True
            done = old.users == 0
        if done:
            self._close(old.value)
        return old.value

    def close(self) -> None:
        self.swap(None)
