"""How the serving path calls its dependencies (Feast, Qdrant, torch): in small per-dependency thread pools,
awaited with a timeout, timed and counted. A stuck dependency fills its own pool; the event loop and the other
dependencies go on.

    deps = Deps(Pools.create(), metrics)
    stored = await deps.call("features", read_sequences, store, users, timeout=0.25)
    vectors = await deps.forward("student", source.user_vectors, ids)
    hits = await deps.search("student", source.search, vectors, k, excludes, filters, timeout=0.5)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from fastapi.responses import JSONResponse

from serving.config import PRODUCERS

log = logging.getLogger("ray.serve")

MODEL_PRODUCERS = ("student", "sasrec")  # the producers that run a SeqRec forward


class Unavailable(Exception):
    """A dependency an answer needs is down or slow: HTTP 503 with a JSON body, and Retry-After when a
    retry can succeed (a timeout, a dependency down); none when it cannot (a producer never built)."""

    def __init__(self, error: str, message: str, retry_after: int | None = 1) -> None:
        super().__init__(message)
        self.error, self.message, self.retry_after = error, message, retry_after

    def response(self) -> JSONResponse:
        headers = None if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return JSONResponse({"error": self.error, "message": self.message}, status_code=503, headers=headers)


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


def describe(exc: BaseException) -> str:
    """A failure as a client may read it: its kind, never its text (which can hold paths or data)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


class Metrics(Protocol):
    """Where the serving path reports (the deployment's Prometheus metrics; a test's list)."""

    def stage(self, producer: str, stage: str, ms: float) -> None: ...
    def error(self, producer: str, kind: str) -> None: ...
    def answered(self, producer: str, fallback: str | None) -> None: ...
    def batch(self, size: int) -> None: ...
    def logged(self, log: str, outcome: str, n: int) -> None: ...


class NoMetrics:
    def stage(self, producer: str, stage: str, ms: float) -> None:
        pass

    def error(self, producer: str, kind: str) -> None:
        pass

    def answered(self, producer: str, fallback: str | None) -> None:
        pass

    def batch(self, size: int) -> None:
        pass

    def logged(self, log: str, outcome: str, n: int) -> None:
        pass


@dataclass(frozen=True)
class Pools:
    """One small thread pool per dependency: a stuck one fills its own pool, not the others'."""

    pools: dict[str, ThreadPoolExecutor]

    @classmethod
    def create(cls) -> Pools:
        sizes = {"features": 4, "search": 4, "events": 4, "refresh": 1}
        sizes |= {f"model:{name}": 1 for name in MODEL_PRODUCERS}  # a stuck forward holds only its own
        return cls({n: ThreadPoolExecutor(s, thread_name_prefix=f"producer-{n}") for n, s in sizes.items()})


@dataclass(frozen=True)
class Deps:
    """The pools and the metrics every stage of a call uses."""

    pools: Pools
    metrics: Metrics = NoMetrics()

    async def call(self, pool: str, fn: Callable, *args, timeout: float | None = None):
        """Run a blocking call in `pool`; TimeoutError after `timeout` s (the thread finishes on its own)."""
        fut = asyncio.get_running_loop().run_in_executor(self.pools.pools[pool], functools.partial(fn, *args))
        return await (fut if timeout is None else asyncio.wait_for(fut, timeout))

    async def forward(self, producer: str, fn: Callable, *args) -> tuple[object, float]:
        """A model forward in the producer's own pool. -> (result, ms)"""
        t0 = time.perf_counter()
        out = await self.call(f"model:{producer}", fn, *args)
        ms = ms_since(t0)
        self.metrics.stage(producer, "model", ms)
        return out, ms

    async def search(self, producer: str, fn: Callable, *args, timeout: float) -> list:
        """An index call in the search pool within `timeout`; Unavailable (index_unavailable) when it fails."""
        t0 = time.perf_counter()
        try:
            return await self.call("search", fn, *args, timeout=timeout)
        except Exception as exc:
            log.warning("index call of %s failed: %r", producer, exc)
            self.metrics.error(producer, "index")
            raise Unavailable(
                "index_unavailable", f"the {producer} index search failed ({describe(exc)})"
            ) from exc
        finally:
            self.metrics.stage(producer, "search", ms_since(t0))


assert set(MODEL_PRODUCERS) <= set(PRODUCERS)
