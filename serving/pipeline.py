"""The ranking path of /v1/candidates, its :batch and the Mixer, with no Ray in it: one feature read for a
call's users, then each producer's own rank() (serving/sources.py: build inputs with training's function,
forward, search, fallbacks) for its rows, all producers at once, then one response per request.

    pipeline = Pipeline(Current(load_state(config), State.close, "model"), Deps(Pools.create()))
    [answer] = await pipeline.answer([CandidatesRequest(user_id=1, k=10)])   # a dict, or Unavailable
    answer = await pipeline.candidates(request)   # the same, coalesced with concurrent single requests

Concurrent single requests are coalesced (`Coalescer`) into one answer() call: one feature read, one forward
and one batched search per producer. A request waits only while an earlier batch of its own producer is
running, and at most `max_wait_ms` (a bound for a batch held up by a slow dependency); a batch leaves at once
when it holds `max_batch` requests, and takes every waiting request, of any producer. Under load, batches
grow with it: what arrives while one batch runs goes next, together. A batch held up by one producer's slow
index holds no other producer's request (a stuck dependency costs only its own requests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

from serving.api import CandidatesRequest
from serving.asks import Ask, Features, Ranked, read_features
from serving.calls import Deps, Unavailable, ms_since
from serving.config import ProducerConfig
from serving.sources import PopularSource, Source
from serving.state import State
from vlmrec.lease import Closed, Current

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Single calls made concurrently -> one call of `run` on their list. Each caller gets exactly its own
    answer (or the batch's exception); a caller that gives up (cancelled, timed out) leaves the batch running
    for the others and is skipped if it had not started yet. A call waits only behind a running batch that
    holds a call of its own `key` (default: every call one key), at most max_wait_s."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        key: Callable[[T], Hashable] = lambda item: None,
    ) -> None:
        self._run, self.max_batch, self.max_wait_s, self._key = run, max_batch, max_wait_s, key
        self._on_batch = on_batch or (lambda n: None)
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: dict[asyncio.Task, frozenset] = {}  # each running batch: the keys of its calls

    def _waits(self, item: T) -> bool:
        """Whether a running batch holds a call of item's key."""
        k = self._key(item)
        return any(k in keys for keys in self._running.values())

    async def submit(self, item: T) -> R:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if not self._waits(item) or len(self._pending) >= self.max_batch:
            self._flush()  # nothing of its own to wait for, or a full batch
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch = [(i, f) for i, f in self._pending[: self.max_batch] if not f.done()]
            del self._pending[: self.max_batch]
            if batch:
                task = asyncio.get_running_loop().create_task(self._answer(batch))
                self._running[task] = frozenset(self._key(i) for i, _ in batch)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        if self._pending and not all(self._waits(i) for i, _ in self._pending):
            self._flush()  # what waited for this batch goes now

    async def _answer(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        self._on_batch(len(batch))
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():  # a caller that gave up: its future is cancelled
                fut.set_result(result)


class Pipeline:
    """The candidates path over the current loaded State (leased for each call's whole length)."""

    def __init__(
        self,
        current: Current[State],
        deps: Deps,
        max_batch: int = ProducerConfig.max_batch,
        max_wait_ms: float = ProducerConfig.max_wait_ms,
    ):
        self.current, self.deps = current, deps
        self.coalescer: Coalescer[CandidatesRequest, dict | Exception] = Coalescer(
            self._rows, max_batch, max_wait_ms / 1e3, deps.metrics.batch, key=lambda r: r.producer
        )

    async def candidates(self, request: CandidatesRequest) -> dict | Unavailable:
        """One request's answer, computed in one batch with the single requests that arrive meanwhile. A
        producer that fails with an error (a bug, not an Unavailable) fails its own rows only: raised here."""
        result = await self.coalescer.submit(request)
        if isinstance(result, Exception) and not isinstance(result, Unavailable):
            raise result
        return result

    async def answer(
        self, requests: Sequence[CandidatesRequest], features: Features | None = None
    ) -> list[dict | Unavailable]:
        """A list of requests -> one response dict (or Unavailable) each, in order; a producer's error is
        raised. `features`: the call's online read when the caller made it already (the Mixer)."""
        rows = await self._rows(requests, features)
        failed = next((r for r in rows if isinstance(r, Exception) and not isinstance(r, Unavailable)), None)
        if failed is not None:
            raise failed
        return rows

    async def _rows(
        self, requests: Sequence[CandidatesRequest], features: Features | None = None
    ) -> list[dict | Exception]:
        with self.lease() as s:
            return await self._answer(s, requests, features)

    @contextmanager
    def lease(self) -> Iterator[State]:
        """The current State for a call's whole length; Unavailable (not_ready) when none is loaded."""
        use = self.current.use()
        try:
            s = use.__enter__()
        except Closed:  # only here: a Closed raised by the call itself (an index) is not "not loaded"
            raise Unavailable("not_ready", "the model is not loaded yet") from None
        try:
            yield s
        finally:
            use.__exit__(None, None, None)

    async def _answer(
        self, s: State, requests: Sequence[CandidatesRequest], features: Features | None
    ) -> list[dict | Exception]:
        cfg, t_start = s.config, time.perf_counter()
        routes = [s.route(r) for r in requests]  # (sources key, arm): an experiment's user gets their arm
        names = [key for key, _ in routes]
        if features is None:
            tag = names[0] if len(set(names)) == 1 else "batch"
            users = [int(r.user_id) for r in requests]
            features = await read_features(self.deps, s.store, users, tag, cfg.feature_timeout_s)
        ask = Ask.of(requests, features, cfg)
        rows_of = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}
        loaded = {name: s.sources[name] for name in rows_of if name in s.sources}
        ranked = await asyncio.gather(  # a producer's error stays with its own rows
            *(source.rank(self.deps, cfg, ask, rows_of[name]) for name, source in loaded.items()),
            return_exceptions=True,
        )
        out: list[dict | Exception] = [Unavailable("internal", "")] * len(requests)
        for name, rows in rows_of.items():
            if name not in loaded:
                gone = Unavailable(
                    "producer_unavailable", s.missing.get(name, f"{name} is not loaded"), retry_after=None
                )
                for i in rows:
                    out[i] = gone
        for (name, source), by_row in zip(loaded.items(), ranked, strict=True):
            if isinstance(by_row, BaseException):
                if not isinstance(by_row, Exception):  # a cancellation: not a producer's error
                    raise by_row
                for i in rows_of[name]:
                    out[i] = by_row
                continue
            for i in rows_of[name]:
                r = by_row[i]
                out[i] = (
                    r
                    if isinstance(r, Unavailable)
                    else self._response(source, ask, i, r, features, routes[i][1])
                )
        total = ms_since(t_start)
        for o in out:
            if isinstance(o, dict):
                o["timings_ms"]["total"] = total
                o["batch_size"] = len(requests)
        return out

    def _response(
        self, source: Source, ask: Ask, i: int, r: Ranked, features: Features, arm: str | None = None
    ) -> dict:
        k = ask.ks[i]
        if len(r.hits) < k:
            what = (
                "items" if r.fallback is None and not isinstance(source, PopularSource) else "popular items"
            )
            ask.warnings[i].append(f"only {len(r.hits)} {what} qualify for k={k}")
        self.deps.metrics.answered(source.name, r.fallback)
        return {
            "producer": source.name,
            "model_version": source.model_version,
            "index_version": None if source.index is None else source.index.version,
            "candidates": [
                {"item_id": int(item), "score": float(score), "rank": rank}
                for rank, (item, score) in enumerate(r.hits, 1)
            ],
            "fallback": r.fallback,
            "arm": arm,
            "warnings": ask.warnings[i],
            "timings_ms": {"feature": features.ms, "model": r.model_ms, "search": r.search_ms, "total": 0.0},
        }
