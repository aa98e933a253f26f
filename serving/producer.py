"""The Producer: a Ray Serve deployment (FastAPI ingress) that turns a user's clicks into candidates.

    serve run serving.producer:app           # from the repo root: serves .vlmrec/sample on 127.0.0.1:8000
    vlmrec serve --workdir W --port 8000     # the same through serving/cli.py (flags, Ctrl-C to stop)
    curl -s localhost:8000/v1/candidates -d '{"user_id": 1, "k": 10}' -H 'content-type: application/json'
    curl -s localhost:8000/v1/mix -d '{"user_id": 1, "k": 20, "weights": {"student": 2, "similar": 1}}' \
        -H 'content-type: application/json'

Endpoints (models in serving/api.py, the contract in docs/API.md; every error body is JSON, never a
traceback):
    POST /v1/candidates        {user_id, producer?, k?, recent_item_ids?, exclude_seen?, filters?} -> candidates
    POST /v1/candidates:batch  {"requests": [...]} -> {"responses": [...]} in order; one forward per model
    POST /v1/mix               {user_id, k?, quotas? | weights?, budget_ms?, ...} -> blended candidates
    POST /v1/events            {user_id, item_id, event_timestamp?, event_type?} -> new sequence length
    GET  /v1/users/{id}/clicks the user's online click sequence
    GET  /healthz              the process answers
    GET  /readyz               default producer loaded and answering, feature store readable (else 503);
                               `producers` gives every producer's readiness

Producers (serving/sources.py): student (the distilled SeqRec, the default), sasrec (the behavioural id
model), similar (teacher neighbours of the last clicks), popular (recency-weighted popularity). All read
the user's click sequence from the Feast ONLINE store (feature service student_v1, the one training reads)
+ recent_item_ids. The models go through `training.data.build_inputs` (training's input function) ->
SeqRec.user_vector -> Index.search_batch (seen ids excluded, filters) -> candidates. A caller with several
users sends them in one :batch call (one feature read, one forward per model, one batched search). Single
requests are not coalesced with @serve.batch: in Ray 2.60 it fails in Serve's local testing mode (no
replica context), which the tests use; handlers are async and the blocking work runs in bounded pools.

Fallbacks and failures (the `fallback` field says which), the same for every producer:
    unknown_user               no stored clicks and no known recent ones   -> popular items
    empty_sequence             stored clicks, none the producer knows      -> popular items
    feature_store_unavailable  the online read failed or passed feature_timeout_s -> popular items
    index down or slower than search_timeout_s -> HTTP 503 {"error": "index_unavailable", "message": ...}
    producer not loaded (no export / index) -> HTTP 503 {"error": "producer_unavailable", "message": why}
Popular items: an export's popular.json (student, sasrec), the `popular` ranking (similar). They still
honour exclude_seen (the ids known to the request) and filters (catalogue metadata).
Blocking calls (Feast, Qdrant, torch) run in small per-dependency thread pools, awaited with a timeout:
a stuck dependency costs its own pool, never the event loop or the other dependencies.
"""

# No `from __future__ import annotations` here: @serve.ingress re-registers the routes on a copy of the
# class, where FastAPI cannot resolve string annotations and took the request model for a query parameter.
import asyncio
import functools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, NamedTuple

import numpy as np
import pyarrow.parquet as pq
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram

from index.search import Index
from serving import guard
from serving.api import (
    INT64_MAX,
    MAX_BATCH_BODY_BYTES,
    MAX_BODY_BYTES,
    BatchRequest,
    BatchResponse,
    CandidatesRequest,
    CandidatesResponse,
    ClicksResponse,
    ErrorBody,
    EventRequest,
    EventResponse,
    Filters,
    MixRequest,
    MixResponse,
)
from serving.config import API_MAX_K, ProducerConfig
from serving.events import ClickWriter, Refused, check_event_time, transient
from serving.guard import invalid
from serving.mixer import MixError, interleave, read_mix_weights, resolve_quotas
from serving.online import read_sequences
from serving.sources import (
    ModelSource,
    PopularSource,
    SimilarSource,
    Source,
    index_config,  # noqa: F401  (re-exported: the search settings a replica uses)
    load_sources,
    popular_candidates,
)
from training.data import ItemTable, ModelInputs, build_inputs
from vlmrec.features import open_store

log = logging.getLogger("ray.serve")

DEFAULT_SEQUENCE_LEN = 50  # N of /v1/events when no model is loaded to say (ingest's default --max-len)
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


api = FastAPI(
    title="vlmrec Producer",
    description="Candidates from four producers (the distilled student, the behavioural SASRec, teacher "
    "neighbours, popularity) under one contract, and a reference Mixer that blends them.",
)
# the edge (serving/guard.py): body limits before parsing, the optional write token, one error shape
guard.install(api, limits={"/v1/candidates:batch": MAX_BATCH_BODY_BYTES}, default_limit=MAX_BODY_BYTES)
# what every POST route may answer besides 200 (FastAPI lists 422 itself, in its own shape: replaced)
ERRORS = {
    400: {"model": ErrorBody, "description": "the body is not UTF-8 JSON, or nested too deep"},
    413: {"model": ErrorBody, "description": "the body is larger than the route's limit"},
    422: {"model": ErrorBody, "description": "a field is invalid: `message` names it"},
    500: {"model": ErrorBody},
    503: {"model": ErrorBody, "description": "a dependency is down or slow; Retry-After when worth it"},
}
WRITE_ERRORS = {
    **ERRORS,
    401: {"model": ErrorBody, "description": "a write token is configured and the request lacks it"},
    409: {
        "model": ErrorBody,
        "description": "the click cannot be placed in the sequence: `message` says why",
    },
}


@api.exception_handler(Exception)
async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    """The last net: a JSON 500 without internals (the traceback goes to the replica log)."""
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return _internal_error()


def _internal_error() -> JSONResponse:
    return JSONResponse(
        {"error": "internal_error", "message": "internal error; the replica log has the details"},
        status_code=500,
    )


# ------------------------------------------------------------------------------------- model input


def model_inputs(
    stored: Mapping[int, Sequence[int]],
    user_ids: Sequence[int],
    recents: Sequence[Sequence[int] | None],
    vocab: ItemTable,
    max_len: int,
) -> tuple[list[list[int]], ModelInputs]:
    """The Producer's model input: each user's stored sequence + their recent clicks, through training's
    `build_inputs`. Returns the raw sequences (oldest first) and ModelInputs (ids (B, max_len))."""
    seqs = [[*stored.get(int(u), ()), *(r or ())] for u, r in zip(user_ids, recents, strict=True)]
    return seqs, build_inputs(seqs, vocab, max_len)


def producer_input(
    store, user_id: int, recent: Sequence[int] | None, vocab: ItemTable, max_len: int
) -> np.ndarray:
    """One user's model input exactly as the Producer builds it from the online store. (max_len,) int64"""
    return model_inputs(read_sequences(store, [int(user_id)]), [user_id], [recent], vocab, max_len)[1].ids[0]


# ----------------------------------------------------------------------------------- loaded state


class State:
    """What one config loaded (every producer's source, the feature store); reconfigure() builds a new one
    and swaps the reference. Leased by requests: a retired state closes its indexes when the last request
    using it is done."""

    def __init__(
        self, config: ProducerConfig, sources: dict[str, Source], missing: dict[str, str], store
    ) -> None:
        ws = config.workspace
        self.config, self.sources, self.missing, self.store = config, sources, missing, store
        self.models = [s for s in sources.values() if isinstance(s, ModelSource)]
        # N of /v1/events: the longest input a loaded model reads (each model keeps its own last max_len)
        self.sequence_len = config.sequence_len or max(
            (m.max_len for m in self.models), default=DEFAULT_SEQUENCE_LEN
        )
        catalogue = (
            pq.read_table(ws.items, columns=["item_id"]).column(0).to_numpy()
            if ws.items.exists()
            else np.zeros(0, np.int64)
        )
        self.catalogue_ids = np.unique(catalogue.astype(np.int64))  # sorted: known ids for /v1/events
        self.mix_weights = read_mix_weights(config.mix_path)  # /v1/mix's default blend (None: equal)
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False

    @property
    def default(self) -> Source:
        return self.sources[self.config.producer]

    def indexes(self) -> list[Index]:
        return [s.index for s in self.sources.values() if s.index is not None]

    def known_item(self, item_id: int) -> bool:
        """In the catalogue or a model vocabulary (items added to an index later: see the caller)."""
        if any(m.vocab.index_of([item_id])[0] > 0 for m in self.models):
            return True
        pos = np.searchsorted(self.catalogue_ids, item_id)
        return bool(pos < len(self.catalogue_ids) and self.catalogue_ids[pos] == item_id)

    def warm_up(self) -> None:
        """One online read before serving (the sources warmed up when loaded): the first request is not
        the one that pays for Feast's registry load. A feature store that is down now only logs (requests
        fall back until it answers)."""
        try:
            read_sequences(self.store, [0])
        except Exception as exc:
            log.warning("feature store not readable at load: %r", exc)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()

    @contextmanager
    def lease(self):
        with self._lock:
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                done = self._retired and self._users == 0
            if done:
                self.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            done = self._users == 0
        if done:
            self.close()


def load_state(config: ProducerConfig) -> State:
    """Load every producer (serving/sources.py: the default one must load, siblings may be missing), open
    the feature store. Refuses a model index built from another teacher's vectors, of another dimension,
    or with the wrong distance."""
    sources, missing = load_sources(config)
    try:
        state = State(config, sources, missing, open_store(config.workspace))
        state.warm_up()
        return state
    except BaseException:
        for source in sources.values():
            source.close()
        raise


# ------------------------------------------------------------------------------------- the replica


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def _filters_dict(filters: Filters | None) -> dict | None:
    return None if filters is None else filters.model_dump(exclude_none=True)


@dataclass(frozen=True)
class _Pools:
    """One small thread pool per dependency: a stuck one fills its own pool, not the others'."""

    features: ThreadPoolExecutor
    search: ThreadPoolExecutor
    events: ThreadPoolExecutor
    refresh: ThreadPoolExecutor
    models: dict[str, ThreadPoolExecutor]  # one per model producer: a stuck forward holds only its own

    @classmethod
    def create(cls) -> "_Pools":
        sizes = {"features": 4, "search": 4, "events": 4, "refresh": 1}
        pools = {n: ThreadPoolExecutor(s, thread_name_prefix=f"producer-{n}") for n, s in sizes.items()}
        models = {n: ThreadPoolExecutor(1, thread_name_prefix=f"producer-model-{n}") for n in MODEL_PRODUCERS}
        return cls(**pools, models=models)


async def _call(pool: ThreadPoolExecutor, timeout: float | None, fn, *args):
    """Run a blocking call in `pool`; TimeoutError after `timeout` s (the thread finishes on its own)."""
    fut = asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
    return await (fut if timeout is None else asyncio.wait_for(fut, timeout))


class Features(NamedTuple):
    """One online read for a call's users: stored sequences, or None and why when it failed."""

    stored: dict[int, list[int]] | None
    error: str | None
    ms: float


@dataclass
class _Ask:
    """What each request of a call asks, once the stored clicks are known."""

    users: list[int]
    recents: list[list[int]]
    seqs: list[list[int]]  # stored + recent, oldest first
    seen: list[set[int]]  # excluded ids (empty when exclude_seen is false)
    ks: list[int]
    filters: list[dict | None]
    warnings: list[list[str]]
    stored: dict[int, list[int]] | None  # None: the feature read failed

    def fallback(self, i: int, personalised: bool) -> str | None:
        """The fallback kind of row i, given whether the producer can personalise it."""
        if self.stored is None:
            return "feature_store_unavailable"
        if not personalised:
            return "empty_sequence" if self.stored.get(self.users[i]) else "unknown_user"
        return None


class _Ranked(NamedTuple):
    hits: list[tuple[int, float]]
    fallback: str | None
    model_ms: float
    search_ms: float


# Everything the Producer's methods use is defined above: @serve.ingress pickles the class when it is
# decorated (the class is not importable yet), and its methods keep the module globals that existed then.
@serve.deployment(
    # Serve's default (5) is low for async handlers that mostly wait on I/O; beyond 32 requests in flight
    # Serve queues them before this replica (backpressure) instead of piling them into the thread pools.
    max_ongoing_requests=32,
    # Beyond this many requests waiting at a proxy for a replica (none left, or all full), Serve answers 503
    # at once instead of queueing more: a lost replica costs a bounded queue, not a pile-up of hanging calls.
    max_queued_requests=64,
    # check_health() below every 2 s; a replica whose event loop does not answer within 10 s is replaced.
    health_check_period_s=2,
    health_check_timeout_s=10,
    user_config={},  # {} = ProducerConfig() defaults; reconfigure() always runs, also on the first start
    graceful_shutdown_timeout_s=5,
)
@serve.ingress(api)
class Producer:
    """One replica: a loaded State (every producer, the feature store), thread pools, metrics, a refresher."""

    def __init__(self) -> None:
        self._state: State | None = None
        self._pools = _Pools.create()
        self._clicks = ClickWriter()  # per-user locks outlive hot swaps
        self._refresher: asyncio.Task | None = None
        self._stage_ms = Histogram(
            "vlmrec_producer_stage_ms",
            description="Latency of one Producer stage (feature read, model forward, index search, mix), ms.",
            boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("producer", "stage"),
        )
        self._requests = Counter(
            "vlmrec_producer_requests",
            description="Candidate requests answered, by producer and fallback (none = personalised).",
            tag_keys=("producer", "fallback"),
        )
        self._errors = Counter(
            "vlmrec_producer_errors",
            description="Errors by kind: feature_store, index, index_refresh, event, internal, mix_dropped.",
            tag_keys=("producer", "kind"),
        )

    async def check_health(self) -> None:
        """Serve's health check: runs on the replica's event loop, so a loop that stopped answering (a
        blocked call on it, a frozen process) fails it by the timeout and Serve replaces the replica. A
        dependency that is down does not fail it (requests fall back or get a 503; /readyz reports it);
        a dead index refresher does: the replica would serve a stale index forever."""
        task = self._refresher
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the index refresh loop died: {task.exception()!r}")

    # -- configuration --------------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict | None) -> None:
        """Load the config's producers and feature store in a thread, then swap the reference: requests
        keep using the old state meanwhile and it closes when they finish. A bad config (the default
        producer cannot load) raises: Serve keeps the old replicas' state / marks the update failed."""
        config = ProducerConfig.from_dict(user_config)
        fresh = await asyncio.to_thread(load_state, config)
        old, self._state = self._state, fresh
        if old is not None:
            old.retire()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        versions = {n: s.model_version for n, s in fresh.sources.items()}
        log.info("producers %s (default %s); missing %s", versions, config.producer, sorted(fresh.missing))

    async def _refresh_loop(self) -> None:
        """Index.refresh() of every index every refresh_interval_s: upserts and new versions reach this
        replica's copies."""
        while True:
            state = self._state
            await asyncio.sleep(state.config.refresh_interval_s if state else 1.0)
            state = self._state
            if state is None:
                continue
            for name, source in state.sources.items():
                if source.index is None:
                    continue
                try:
                    with state.lease():
                        if await _call(self._pools.refresh, None, source.index.refresh):
                            log.info("index of %s refreshed: version %s", name, source.index.version)
                except RuntimeError as exc:
                    if "shutdown" in str(exc):  # the process is exiting and its thread pools are closed
                        return
                    log.warning("index refresh of %s failed: %r", name, exc)
                    self._errors.inc(tags={"producer": name, "kind": "index_refresh"})
                except Exception as exc:  # keep refreshing; searches go on with the copy they have
                    log.warning("index refresh of %s failed: %r", name, exc)
                    self._errors.inc(tags={"producer": name, "kind": "index_refresh"})

    @contextmanager
    def _lease(self):
        state = self._state
        if state is None:
            raise Unavailable("not_ready", "the model is not loaded yet")
        with state.lease() as s:
            yield s

    # -- candidates -----------------------------------------------------------------------------------

    @api.post(
        "/v1/candidates",
        response_model=CandidatesResponse,
        responses=ERRORS,
    )
    async def candidates(self, body: CandidatesRequest):
        """Top-k candidates for one user from one producer (`producer`, default the deployment's)."""
        self._check_k([body], "")
        try:
            (result,) = await self._answer([body])
        except Unavailable as exc:
            return exc.response()
        except Exception:
            return self._internal("candidates")
        return result.response() if isinstance(result, Unavailable) else JSONResponse(result)

    @api.post(
        "/v1/candidates:batch",
        response_model=BatchResponse,
        responses=ERRORS,
    )
    async def candidates_batch(self, body: BatchRequest):
        """Several requests in one call: one feature read, one forward per model, one batched search per
        producer. Responses come in request order; if any of them cannot be answered (an index down, a
        producer missing) the whole call is a 503."""
        self._check_k(body.requests, "requests.{i}.")
        try:
            results = await self._answer(body.requests) if body.requests else []
        except Unavailable as exc:
            return exc.response()
        except Exception:
            return self._internal("candidates:batch")
        failed = next((r for r in results if isinstance(r, Unavailable)), None)
        return failed.response() if failed else JSONResponse({"responses": results})

    def _check_k(self, requests: Sequence[CandidatesRequest], prefix: str) -> None:
        """k <= this deployment's max_k (the request model already bounds it by API_MAX_K)."""
        state = self._state
        max_k = state.config.max_k if state else API_MAX_K
        for i, r in enumerate(requests):
            if r.k is not None and r.k > max_k:
                raise invalid(prefix.format(i=i) + "k", f"Input should be less than or equal to {max_k}", r.k)

    async def _read_features(self, s: State, users: Sequence[int], tag: str, timeout: float) -> Features:
        t0 = time.perf_counter()
        try:
            stored = await _call(self._pools.features, timeout, read_sequences, s.store, sorted(set(users)))
            error = None
        except Exception as exc:
            log.warning("feature store read failed: %r", exc)
            self._errors.inc(tags={"producer": tag, "kind": "feature_store"})
            stored, error = None, _describe(exc)
        ms = _ms(t0)
        self._stage_ms.observe(ms, tags={"producer": tag, "stage": "feature"})
        return Features(stored, error, ms)

    async def _answer(
        self, requests: Sequence[CandidatesRequest], features: Features | None = None
    ) -> list[dict | Unavailable]:
        """The pipeline for a batch of requests -> one response dict (or Unavailable) per request.
        `features`: the call's online read when the caller made it already (the Mixer)."""
        with self._lease() as s:
            cfg = s.config
            t_start = time.perf_counter()
            names = [r.producer or cfg.producer for r in requests]
            users = [int(r.user_id) for r in requests]
            if features is None:
                tag = names[0] if len(set(names)) == 1 else "batch"
                features = await self._read_features(s, users, tag, cfg.feature_timeout_s)
            recents = [list(r.recent_item_ids or ()) for r in requests]
            stored = features.stored or {}
            seqs = [[*stored.get(u, ()), *rec] for u, rec in zip(users, recents, strict=True)]
            ask = _Ask(
                users=users,
                recents=recents,
                seqs=seqs,
                seen=[set(q) if r.exclude_seen else set() for q, r in zip(seqs, requests, strict=True)],
                ks=[r.k or cfg.default_k for r in requests],
                filters=[_filters_dict(r.filters) for r in requests],
                warnings=[[] for _ in requests],
                stored=features.stored,
            )
            if features.error:
                for w in ask.warnings:
                    w.append(f"feature store unavailable ({features.error}): popular items")

            out: list[dict | Unavailable] = [Unavailable("internal", "")] * len(requests)
            for name in dict.fromkeys(names):
                rows = [i for i, n in enumerate(names) if n == name]
                source = s.sources.get(name)
                if source is None:
                    gone = Unavailable(
                        "producer_unavailable", s.missing.get(name, f"{name} is not loaded"), retry_after=None
                    )
                    for i in rows:
                        out[i] = gone
                    continue
                if isinstance(source, ModelSource):
                    ranked = await self._rank_model(cfg, source, ask, rows)
                elif isinstance(source, SimilarSource):
                    ranked = await self._rank_similar(cfg, source, ask, rows)
                else:
                    ranked = self._rank_popular(source, ask, rows)
                for i in rows:
                    r = ranked[i]
                    out[i] = r if isinstance(r, Unavailable) else self._response(source, ask, i, r, features)
                    if isinstance(out[i], dict):
                        out[i]["timings_ms"]["total"] = _ms(t_start)
            return out

    def _response(self, source: Source, ask: _Ask, i: int, r: _Ranked, features: Features) -> dict:
        k = ask.ks[i]
        if len(r.hits) < k:
            what = (
                "items" if r.fallback is None and not isinstance(source, PopularSource) else "popular items"
            )
            ask.warnings[i].append(f"only {len(r.hits)} {what} qualify for k={k}")
        self._requests.inc(tags={"producer": source.name, "fallback": r.fallback or "none"})
        return {
            "producer": source.name,
            "model_version": source.model_version,
            "index_version": None if source.index is None else source.index.version,
            "candidates": [
                {"item_id": int(item), "score": float(score), "rank": rank}
                for rank, (item, score) in enumerate(r.hits, 1)
            ],
            "fallback": r.fallback,
            "warnings": ask.warnings[i],
            "timings_ms": {"feature": features.ms, "model": r.model_ms, "search": r.search_ms, "total": 0.0},
        }

    async def _search(self, cfg, source, vectors, k, excludes, filters, search=None) -> list | Unavailable:
        """One batched index search (search pool, search_timeout_s); Unavailable when it fails. `search`:
        the source's own (a model's `ModelSource.search`), else the index's search_batch."""
        t0 = time.perf_counter()
        try:
            return await _call(
                self._pools.search,
                cfg.search_timeout_s,
                search or source.index.search_batch,
                vectors,
                k,
                excludes,
                filters,
            )
        except Exception as exc:
            log.warning("index search of %s failed: %r", source.name, exc)
            self._errors.inc(tags={"producer": source.name, "kind": "index"})
            return Unavailable(
                "index_unavailable", f"the {source.name} index search failed ({_describe(exc)})"
            )
        finally:
            self._stage_ms.observe(_ms(t0), tags={"producer": source.name, "stage": "search"})

    async def _rank_model(
        self, cfg: ProducerConfig, src: ModelSource, ask: _Ask, rows: list[int]
    ) -> dict[int, _Ranked | Unavailable]:
        """student / sasrec: one forward for every personalised row, one batched search."""
        inputs = build_inputs([ask.seqs[i] for i in rows], src.vocab, src.max_len)
        out: dict[int, _Ranked | Unavailable] = {}
        personal: list[int] = []  # positions in rows
        for j, i in enumerate(rows):
            recent = np.asarray(ask.recents[i], np.int64)
            unknown_recent = [int(x) for x in recent[src.vocab.index_of(recent) == 0]]
            if unknown_recent:
                ask.warnings[i].append(
                    f"recent_item_ids: {len(unknown_recent)} ids unknown to the model were ignored: "
                    f"{unknown_recent[:20]}"
                )
            n_stored_unknown = int(inputs.n_unknown[j]) - len(unknown_recent)
            if n_stored_unknown > 0:
                ask.warnings[i].append(f"{n_stored_unknown} stored clicks unknown to the model were ignored")
            fallback = ask.fallback(i, bool(inputs.ids[j].any()))
            if fallback is None:
                personal.append(j)
            else:
                hits = popular_candidates(src.fallback, ask.ks[i], ask.seen[i], ask.filters[i])
                out[i] = _Ranked(hits, fallback, 0.0, 0.0)
        if not personal:
            return out
        t0 = time.perf_counter()
        vectors = await _call(self._pools.models[src.name], None, src.user_vectors, inputs.ids[personal])
        model_ms = _ms(t0)
        self._stage_ms.observe(model_ms, tags={"producer": src.name, "stage": "model"})
        chosen = [rows[j] for j in personal]
        t0 = time.perf_counter()
        found = await self._search(
            cfg,
            src,
            vectors,
            max(ask.ks[i] for i in chosen),
            [sorted(ask.seen[i]) for i in chosen],
            [ask.filters[i] for i in chosen],
            functools.partial(src.search, request_days=cfg.scoring_days()),
        )
        search_ms = _ms(t0)
        for n, i in enumerate(chosen):
            out[i] = (
                found
                if isinstance(found, Unavailable)
                else _Ranked(found[n][: ask.ks[i]], None, model_ms, search_ms)
            )
        return out

    async def _rank_similar(
        self, cfg: ProducerConfig, src: SimilarSource, ask: _Ask, rows: list[int]
    ) -> dict[int, _Ranked | Unavailable]:
        """similar: the teacher vectors of each row's last N distinct clicks (one lookup), one batched
        search with a query per click, merged per row by each item's best score."""
        out: dict[int, _Ranked | Unavailable] = {}
        clicks = {i: src.last_clicks(ask.seqs[i]) if ask.stored is not None else [] for i in rows}
        wanted = sorted({c for i in rows for c in clicks[i]})
        t0 = time.perf_counter()
        vectors: dict[int, np.ndarray] = {}
        down: Unavailable | None = None
        if wanted:
            try:
                vectors = await _call(self._pools.search, cfg.search_timeout_s, src.index.get_vectors, wanted)
            except Exception as exc:
                log.warning("teacher vector lookup failed: %r", exc)
                self._errors.inc(tags={"producer": src.name, "kind": "index"})
                down = Unavailable("index_unavailable", f"the similar index lookup failed ({_describe(exc)})")
        queries: list[tuple[int, int]] = []  # (row, click)
        for i in rows:
            if down is not None and clicks[i]:
                out[i] = down
                continue
            known = [c for c in clicks[i] if c in vectors]
            unknown = [c for c in clicks[i] if c not in vectors]
            if unknown:
                ask.warnings[i].append(
                    f"{len(unknown)} of the last {len(clicks[i])} clicks are not in the teacher index: "
                    f"{unknown[:20]}"
                )
            fallback = ask.fallback(i, bool(known))
            if fallback is None:
                queries += [(i, c) for c in known]
            else:
                hits = popular_candidates(src.fallback, ask.ks[i], ask.seen[i], ask.filters[i])
                out[i] = _Ranked(hits, fallback, 0.0, 0.0)
        if not queries:
            return out
        found = await self._search(
            cfg,
            src,
            np.stack([vectors[c] for _, c in queries]),  # (Q, D)
            max(ask.ks[i] for i, _ in queries),
            [sorted(ask.seen[i]) for i, _ in queries],
            [ask.filters[i] for i, _ in queries],
        )
        search_ms = _ms(t0)
        for i in dict.fromkeys(i for i, _ in queries):
            if isinstance(found, Unavailable):
                out[i] = found
                continue
            mine = [found[q] for q, (row, _) in enumerate(queries) if row == i]  # most recent click first
            out[i] = _Ranked(src.merge(mine, ask.ks[i]), None, 0.0, search_ms)
        return out

    @staticmethod
    def _rank_popular(src: PopularSource, ask: _Ask, rows: list[int]) -> dict[int, _Ranked]:
        """popular: the ranking itself, filtered; personal only in what it excludes (seen items)."""
        return {
            i: _Ranked(
                popular_candidates(src.items, ask.ks[i], ask.seen[i], ask.filters[i]),
                "feature_store_unavailable" if ask.stored is None else None,
                0.0,
                0.0,
            )
            for i in rows
        }

    # -- the reference Mixer --------------------------------------------------------------------------

    @api.post(
        "/v1/mix",
        response_model=MixResponse,
        responses=ERRORS,
    )
    async def mix(self, body: MixRequest):
        """Candidates of several producers for one user, asked in parallel under one time budget,
        de-duplicated and interleaved by quota (serving/mixer.py). A producer that fails or misses the
        budget is dropped and named in `warnings`; its slots go to the others. Never a failed request
        for a producer's sake (a 503 only when the replica itself is not ready)."""
        t_start = time.perf_counter()
        state = self._state
        cfg = state.config if state else ProducerConfig()
        try:
            k, quotas = resolve_quotas(
                body.k,
                body.quotas,
                body.weights,
                cfg.default_k,
                cfg.max_k,
                state.mix_weights if state else None,
            )
        except MixError as exc:
            raise invalid(exc.field, str(exc), getattr(body, exc.field)) from None
        if k > cfg.max_k:
            raise invalid("k", f"Input should be less than or equal to {cfg.max_k}", k)
        budget_ms = body.budget_ms or cfg.mix_budget_ms
        deadline = t_start + budget_ms / 1e3
        try:
            with self._lease() as s:
                features = await self._read_features(
                    s, [body.user_id], "mix", min(s.config.feature_timeout_s, budget_ms / 1e3)
                )
                shared = body.model_dump(include={"user_id", "recent_item_ids", "exclude_seen", "filters"})
                tasks = {
                    p: asyncio.ensure_future(
                        self._timed(CandidatesRequest(**shared, producer=p, k=k), features)
                    )
                    for p in quotas
                }
                _, pending = await asyncio.wait(
                    tasks.values(), timeout=max(0.0, deadline - time.perf_counter())
                )
                for task in pending:
                    task.cancel()
                lists, reports, warnings = {}, {}, []
                for p, task in tasks.items():
                    report = {"status": "ok", "quota": quotas[p], "taken": 0, "returned": 0}
                    if task in pending:
                        report["status"] = "timeout"
                        warnings.append(f"{p}: no answer within the {budget_ms:g} ms budget: dropped")
                    elif task.exception() is not None:
                        report["status"] = "error"
                        warnings.append(f"{p}: failed ({_describe(task.exception())}): dropped")
                    else:
                        result, ms = task.result()
                        report["ms"] = ms
                        if isinstance(result, Unavailable):
                            report["status"] = "unavailable"
                            warnings.append(f"{p}: {result.error}: {result.message}: dropped")
                        else:
                            lists[p] = [(c["item_id"], c["score"]) for c in result["candidates"]]
                            report.update(
                                returned=len(lists[p]),
                                fallback=result["fallback"],
                                model_version=result["model_version"],
                                index_version=result["index_version"],
                            )
                            warnings += [f"{p}: {w}" for w in result["warnings"]]
                    if report["status"] != "ok":
                        self._errors.inc(tags={"producer": p, "kind": "mix_dropped"})
                    reports[p] = report
                items, taken = interleave(lists, quotas, k)
                for p, n in taken.items():
                    reports[p]["taken"] = n
                if len(items) < k:
                    warnings.append(f"only {len(items)} distinct candidates for k={k}")
                total = _ms(t_start)
                self._stage_ms.observe(total, tags={"producer": "mix", "stage": "mix"})
                return JSONResponse(
                    {
                        "k": k,
                        "candidates": items,
                        "producers": reports,
                        "warnings": warnings,
                        "timings_ms": {"feature": features.ms, "total": total},
                    }
                )
        except Unavailable as exc:
            return exc.response()
        except Exception:
            return self._internal("mix")

    async def _timed(self, request: CandidatesRequest, features: Features):
        t0 = time.perf_counter()
        (result,) = await self._answer([request], features)
        return result, _ms(t0)

    # -- events ---------------------------------------------------------------------------------------

    @api.post(
        "/v1/events",
        response_model=EventResponse,
        responses=WRITE_ERRORS,
    )
    async def events(self, body: EventRequest):
        """Put a click into the user's online sequence (Feast push `click_push`), merged by its time, and
        answer once it is read back from the store; the next /v1/candidates sees it, whichever producer
        answers. Serialised per user inside this replica (serving/events.py says what that means across
        replicas). event_type is accepted for the caller's bookkeeping; every event is a click.
        422: a bad field (an unknown item, a time outside the deployment's bounds); 409: a click the
        sequence cannot hold (older than all of its last N); 503 + Retry-After: the store failed or timed
        out, the click may or may not be stored: retry (a click stored twice is merged twice)."""
        try:
            with self._lease() as s:
                cfg = s.config
                item = int(body.item_id)
                now = datetime.now(UTC)
                try:
                    ts = check_event_time(
                        body.event_timestamp or now, cfg.event_min_ts, cfg.event_max_future_s, now
                    )
                except ValueError as exc:
                    raise invalid("event_timestamp", str(exc), str(body.event_timestamp)) from None
                if not s.known_item(item) and not await self._in_an_index(s, item):
                    raise invalid(
                        "item_id", f"unknown item_id {item}: not in the catalogue or an index", item
                    )
                try:
                    seq = await _call(
                        self._pools.events,
                        cfg.event_timeout_s,
                        self._clicks.append,
                        s.store,
                        int(body.user_id),
                        item,
                        ts,
                        s.sequence_len,
                    )
                except Refused as exc:
                    return guard.error(409, "event_refused", str(exc))
                except Exception as exc:
                    log.warning("click push failed: %r", exc)
                    self._errors.inc(tags={"producer": "events", "kind": "event"})
                    if not transient(exc):
                        raise
                    raise Unavailable(
                        "feature_store_unavailable",
                        f"the click push failed ({_describe(exc)}); it may or may not be stored: retry",
                    ) from exc
                return JSONResponse(
                    {
                        "user_id": int(body.user_id),
                        "item_id": item,
                        "sequence_length": len(seq),
                        "sequence_len_max": s.sequence_len,
                    }
                )
        except Unavailable as exc:
            return exc.response()
        except RequestValidationError:
            raise
        except Exception:
            return self._internal("events")

    async def _in_an_index(self, s: State, item: int) -> bool:
        """An item upserted after load (cold start) is in an index but not yet in the catalogue copy."""
        for index in s.indexes():
            try:
                found = await _call(self._pools.search, s.config.search_timeout_s, index.get_vectors, [item])
            except Exception as exc:
                raise Unavailable(
                    "index_unavailable", f"could not check item_id {item} in the index ({_describe(exc)})"
                ) from exc
            if found:
                return True
        return False

    @api.get(
        "/v1/users/{user_id}/clicks",
        response_model=ClicksResponse,
        responses=ERRORS,
    )
    async def clicks(self, user_id: Annotated[int, Path(ge=0, le=INT64_MAX)]):
        """The user's online click sequence, oldest first (what every producer reads); [] if unknown."""
        try:
            with self._lease() as s:
                features = await self._read_features(s, [user_id], "clicks", s.config.feature_timeout_s)
        except Unavailable as exc:
            return exc.response()
        if features.stored is None:
            return Unavailable(
                "feature_store_unavailable", f"the online read failed ({features.error})"
            ).response()
        return JSONResponse({"user_id": user_id, "item_ids": features.stored.get(user_id, [])})

    # -- probes ---------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self):
        """The process answers (liveness)."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"description": "not ready: `reasons` says why"}})
    async def readyz(self):
        """Readiness: the default producer loaded and its index answering (a 1-NN probe search), the feature
        store readable. `producers`: each producer's own readiness (a missing sibling does not make the
        replica unready: requests naming it get a 503 producer_unavailable)."""
        state = self._state
        if state is None:
            return JSONResponse({"ready": False, "reasons": ["model not loaded"]}, status_code=503)
        with state.lease() as s:
            cfg = s.config
            producers = {name: {"ready": False, "reason": why} for name, why in s.missing.items()}
            for name, source in s.sources.items():
                reason = None
                if source.index is not None:
                    try:
                        probe = np.eye(1, source.index.dim, dtype=np.float32)  # (1, D)
                        await _call(
                            self._pools.search, cfg.search_timeout_s, source.index.search_batch, probe, 1
                        )
                    except Exception as exc:
                        reason = f"index: {_describe(exc)}"
                producers[name] = {
                    "ready": reason is None,
                    "model_version": source.model_version,
                    "index_version": None if source.index is None else source.index.version,
                    "reason": reason,
                }
            reasons = [producers[cfg.producer]["reason"]] if producers[cfg.producer]["reason"] else []
            try:
                await _call(self._pools.features, cfg.feature_timeout_s, read_sequences, s.store, [0])
            except Exception as exc:
                reasons.append(f"feature store: {_describe(exc)}")
            default = producers[cfg.producer]
            body = {
                "ready": not reasons,
                "producer": cfg.producer,
                "model_version": default.get("model_version"),
                "index_version": default.get("index_version"),
                "reasons": reasons,
                "producers": {n: producers[n] for n in sorted(producers)},
            }
        return JSONResponse(body, status_code=503 if reasons else 200)

    def _internal(self, where: str) -> JSONResponse:
        log.exception("internal error in %s", where)
        self._errors.inc(tags={"producer": where, "kind": "internal"})
        return _internal_error()


def producer_app(config: ProducerConfig, replicas: int = 1):
    """The application for serve.run: the Producer with `config` as its user_config."""
    return Producer.options(user_config=config.to_dict(), num_replicas=replicas).bind()


def build_app(args: dict[str, str]):
    """`serve run serving.producer:build_app workdir=W run=student` (values are ProducerConfig fields)."""
    kinds = {f.name: str(f.type).removesuffix(" | None") for f in fields(ProducerConfig)}
    cast = {"int": int, "float": float}
    typed = {k: cast[kinds[k]](v) if kinds.get(k) in cast else v for k, v in args.items()}
    config = ProducerConfig.from_dict(typed)
    return producer_app(replace(config, workdir=str(FilePath(config.workdir).absolute())))


app = Producer.bind()
