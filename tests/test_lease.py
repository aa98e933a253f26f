"""vlmrec/lease.py: the build-new-then-swap reference the Producer's state and each Edge index replica use."""

from __future__ import annotations

import threading

import pytest

from vlmrec.lease import Closed, Current


def test_a_retired_value_closes_when_its_last_lease_ends():
    closed: list[str] = []
    current = Current("v1", closed.append)
    with current.use() as a:
        assert current.swap("v2") == "v1"  # swapped while "v1" is in use
        assert closed == [] and a == "v1"  # the request keeps its value to the end
        with current.use() as b:
            assert b == "v2"  # new requests get the new value
    assert closed == ["v1"]
    current.swap("v3")
    assert closed == ["v1", "v2"]  # unused: closed at once
    current.close()
    assert closed == ["v1", "v2", "v3"]
    with pytest.raises(Closed):
        with current.use():
            pass
    with pytest.raises(Closed):
        current.peek()


def test_concurrent_leases_and_swaps_close_each_value_once_after_its_users():
    closed: list[int] = []
    in_use: dict[int, int] = {}
    lock = threading.Lock()

    def close(v: int) -> None:
        with lock:
            assert in_use.get(v, 0) == 0, f"{v} closed under a request"
            closed.append(v)

    current = Current(0, close)

    def request() -> None:
        for _ in range(300):
            with current.use() as v:
                with lock:
                    in_use[v] = in_use.get(v, 0) + 1
                with lock:
                    in_use[v] -= 1

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for v in range(1, 50):
        current.swap(v)
    for t in threads:
        t.join()
    current.close()
    assert sorted(closed) == list(range(50))  # every value closed exactly once
