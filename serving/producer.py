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

This class keeps the routes, the config and the lifecycle; the work is in plain modules with no Ray in them:
serving/pipeline.py (the ranking path and the coalescer), serving/sources.py (each producer's rank()),
serving/mixer.py (the Mixer), serving/events.py (the click write), serving/state.py (what a config loads),
serving/calls.py (pools, timeouts, metrics). Producers: student (the distilled SeqRec, the default), sasrec
(the behavioural id model), similar (teacher neighbours of the last clicks), popular (recency-weighted
popularity). All read the user's click sequence from the Feast ONLINE store (feature service student_v1, the
one training reads) + recent_item_ids; the models go through `training.data.build_inputs` -> SeqRec ->
the index (seen ids excluded, filters). Concurrent single requests are coalesced into one feature read, one
forward per model and one batched search per producer (serving/pipeline.py's Coalescer, not @serve.batch:
in Ray 2.60 that fails in Serve's local testing mode, which the tests use); :batch takes the same path. A
model input seen before (no new click, the same model) reuses its user vector (serving/vector_cache.py).

Fallbacks and failures (the `fallback` field says which), the same for every producer:
    unknown_user               no stored clicks and no known recent ones   -> popular items
    empty_sequence             stored clicks, none the producer knows      -> popular items
    feature_store_unavailable  the online read failed or passed feature_timeout_s -> popular items
    index down or slower than search_timeout_s -> HTTP 503 {"error": "index_unavailable", "message": ...}
    producer not loaded (no export / index) -> HTTP 503 {"error": "producer_unavailable", "message": why}
Popular items: an export's popular.json (student, sasrec), the `popular` ranking (similar). They still
honour exclude_seen (the ids known to the request) and filters (catalogue metadata).
Blocking calls (Feast, Qdrant, torch) run in small per-dependency thread pools, awaited with a timeout
(serving/calls.py): a stuck dependency costs its own pool, never the event loop or the other dependencies.
"""

# No `from __future__ import annotations` here: @serve.ingress re-registers the routes on a copy of the
# class, where FastAPI cannot resolve string annotations and took the request model for a query parameter.
import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path as FilePath
from typing import Annotated

import torch
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram
from threadpoolctl import threadpool_limits

from serving import guard
from serving.api import (
    INT64_MAX,
    MAX_BATCH_BODY_BYTES,
    MAX_BODY_BYTES,
    Answer,
    BatchRequest,
    BatchResponse,
    CandidatesRequest,
    CandidatesResponse,
    ClicksResponse,
    ErrorBody,
    EventRequest,
    EventResponse,
    MixRequest,
    MixResponse,
    RequestId,
    new_request_id,
)
from serving.asks import read_features
from serving.calls import Deps, Pools, Unavailable
from serving.config import API_MAX_K, ProducerConfig
from serving.events import ClickWriter, Refused, event_log, record_click
from serving.exposures import Exposure, exposure_log
from serving.guard import invalid
from serving.mixer import MixError, blend, resolve_quotas
from serving.parquet_log import PartitionedLog
from serving.pipeline import Pipeline
from serving.state import State, load_state, readiness
from vlmrec.lease import Current

log = logging.getLogger("ray.serve")
LOGS = {"exposures": exposure_log, "events": event_log}  # the replica's logs, by name: how each is opened

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


class _RayMetrics:
    """The serving path's reports (serving/calls.py Metrics) as Ray Serve's Prometheus metrics."""

    def __init__(self) -> None:
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
        self._logged = Counter(
            "vlmrec_producer_logged",
            description="Exposure and event log records by log and outcome: written, dropped (queue full), "
            "failed (write error).",
            tag_keys=("log", "outcome"),
        )
        self._batch = Histogram(
            "vlmrec_producer_batch_size",
            description="Requests answered together by one feature read, forward and search (coalesced).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )

    def stage(self, producer: str, stage: str, ms: float) -> None:
        self._stage_ms.observe(ms, tags={"producer": producer, "stage": stage})

    def error(self, producer: str, kind: str) -> None:
        self._errors.inc(tags={"producer": producer, "kind": kind})

    def answered(self, producer: str, fallback: str | None) -> None:
        self._requests.inc(tags={"producer": producer, "fallback": fallback or "none"})

    def batch(self, size: int) -> None:
        self._batch.observe(size)

    def logged(self, log: str, outcome: str, n: int) -> None:
        self._logged.inc(n, tags={"log": log, "outcome": outcome})


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
    """One replica: the current State (built new, then swapped), the Pipeline over it, a click writer, an
    index refresher."""

    def __init__(self) -> None:
        self._deps = Deps(Pools.create(), _RayMetrics())
        self._state: Current[State] = Current(None, State.close, "model")
        self._pipeline = Pipeline(self._state, self._deps)
        self._clicks = ClickWriter()  # per-user locks outlive hot swaps
        self._refresher: asyncio.Task | None = None
        # the exposure and event logs ("exposures", "events"): reconfigure() opens them where the config says
        self._logs: dict[str, PartitionedLog | None] = dict.fromkeys(LOGS)
        self._update_error: str | None = None  # the last config update this replica could not apply

    def __del__(self) -> None:
        """Serve's graceful shutdown: the exposure and event logs write what they still hold."""
        for open_log in self._logs.values():
            if open_log is not None:
                open_log.close()

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
        keep using the old state meanwhile and it closes when they finish. A config whose default producer
        cannot load: a starting replica raises (Serve retries it, then the deployment fails); a serving one
        keeps its state and says why in `update_error()` and /readyz (Serve would replace a replica whose
        reconfigure raised by a new one with the bad config: no replica would serve). serving/cli.py's
        deploy() reads it and puts the previous config back."""
        try:
            config = ProducerConfig.from_dict(user_config)
            torch.set_num_threads(config.torch_threads)
            threadpool_limits(config.blas_threads, user_api="blas")
            fresh = await asyncio.to_thread(load_state, config)
        except Exception as exc:
            if not self._state.loaded:
                raise
            self._update_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            log.error("config update not applied, the previous one serves on: %s", self._update_error)
            self._deps.metrics.error("reconfigure", "internal")
            return
        self._update_error = None
        self._state.swap(fresh)
        await asyncio.to_thread(self._open_logs, config)
        self._pipeline.coalescer.max_batch = config.max_batch
        self._pipeline.coalescer.max_wait_s = config.max_wait_ms / 1e3
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        versions = {n: s.model_version for n, s in fresh.sources.items()}
        log.info("producers %s (default %s); missing %s", versions, config.producer, sorted(fresh.missing))

    def update_error(self) -> str | None:
        """Why the last config update was not applied (this replica serves the one before), else None."""
        return self._update_error

    def _open_logs(self, config: ProducerConfig) -> None:
        """The exposure and event logs the config asks for: each kept when unchanged, else a new one opened
        before the old one closes (it writes what it holds)."""
        for name, where in (("exposures", config.exposures_at), ("events", config.event_log_at)):
            old = self._logs[name]
            wanted = (where, config.log_queue, config.log_flush_s)
            if old is not None and (old.path, old.queue_size, old.flush_s) == wanted:
                continue
            on_count = functools.partial(self._deps.metrics.logged, name)
            self._logs[name] = None if where is None else LOGS[name](*wanted, on_count=on_count)
            if old is not None:
                old.close()

    def _expose(self, request_id: str, user_id: int, endpoint: str, answer: dict) -> None:
        answer["request_id"] = request_id
        if self._logs["exposures"] is not None:
            self._logs["exposures"].record(Exposure.of_answer(request_id, user_id, endpoint, answer))

    async def _refresh_loop(self) -> None:
        """Index.refresh() of every index every refresh_interval_s: upserts and new versions reach this
        replica's copies."""
        while True:
            loaded = self._state.loaded
            await asyncio.sleep(self._state.peek().config.refresh_interval_s if loaded else 1.0)
            if not self._state.loaded:
                continue
            with self._state.use() as state:
                for name, source in state.sources.items():
                    if source.index is None:
                        continue
                    try:
                        if await self._deps.call("refresh", source.index.refresh):
                            log.info("index of %s refreshed: version %s", name, source.index.version)
                    except RuntimeError as exc:
                        if "shutdown" in str(exc):  # the process is exiting and its thread pools are closed
                            return
                        log.warning("index refresh of %s failed: %r", name, exc)
                        self._deps.metrics.error(name, "index_refresh")
                    except Exception as exc:  # keep refreshing; searches go on with the copy they have
                        log.warning("index refresh of %s failed: %r", name, exc)
                        self._deps.metrics.error(name, "index_refresh")

    # -- candidates -----------------------------------------------------------------------------------

    @api.post("/v1/candidates", response_model=CandidatesResponse, responses=ERRORS)
    async def candidates(self, body: CandidatesRequest, x_request_id: RequestId = None):
        """Top-k candidates for one user from one producer (`producer`, default the deployment's). The
        answer carries a request_id (the X-Request-ID header: the caller's, else the one Serve's proxy
        made, which it also returns; a new one without a proxy) and is logged as an exposure."""
        self._check_k([body], "")
        try:
            result = await self._pipeline.candidates(body)
        except Unavailable as exc:
            return exc.response()
        except Exception:
            return self._internal("candidates")
        if isinstance(result, Unavailable):
            return result.response()
        rid = x_request_id or new_request_id()
        self._expose(rid, body.user_id, "candidates", result)
        return Answer(result)

    @api.post("/v1/candidates:batch", response_model=BatchResponse, responses=ERRORS)
    async def candidates_batch(self, body: BatchRequest, x_request_id: RequestId = None):
        """Several requests in one call: one feature read, one forward per model, one batched search per
        producer. Responses come in request order; if any of them cannot be answered (an index down, a
        producer missing) the whole call is a 503."""
        self._check_k(body.requests, "requests.{i}.")
        try:
            results = await self._pipeline.answer(body.requests) if body.requests else []
        except Unavailable as exc:
            return exc.response()
        except Exception:
            return self._internal("candidates:batch")
        failed = next((r for r in results if isinstance(r, Unavailable)), None)
        if failed:
            return failed.response()
        rid = x_request_id or new_request_id()
        for i, (request, result) in enumerate(zip(body.requests, results, strict=True)):
            self._expose(f"{rid}.{i}", request.user_id, "batch", result)  # one exposure per answer
        return Answer({"responses": results})

    def _check_k(self, requests: Sequence[CandidatesRequest], prefix: str) -> None:
        """k <= this deployment's max_k (the request model already bounds it by API_MAX_K)."""
        max_k = self._state.peek().config.max_k if self._state.loaded else API_MAX_K
        for i, r in enumerate(requests):
            if r.k is not None and r.k > max_k:
                raise invalid(prefix.format(i=i) + "k", f"Input should be less than or equal to {max_k}", r.k)

    @api.post("/v1/mix", response_model=MixResponse, responses=ERRORS)
    async def mix(self, body: MixRequest, x_request_id: RequestId = None):
        """Candidates of several producers for one user, asked in parallel under one time budget,
        de-duplicated and interleaved by quota (serving/mixer.py). A producer that fails or misses the
        budget is dropped and named in `warnings`; its slots go to the others. Never a failed request
        for a producer's sake (a 503 only when the replica itself is not ready)."""
        state = self._state.peek() if self._state.loaded else None
        cfg = state.config if state else ProducerConfig()
        default_weights = state.mix_weights if state else None
        arm = state.mix_arm(body) if state else None  # a Mixer experiment's arm: its weights blend
        if arm is not None:
            default_weights = arm.weights
        try:
            k, quotas = resolve_quotas(
                body.k, body.quotas, body.weights, cfg.default_k, cfg.max_k, default_weights
            )
        except MixError as exc:
            raise invalid(exc.field, str(exc), getattr(body, exc.field)) from None
        if k > cfg.max_k:
            raise invalid("k", f"Input should be less than or equal to {cfg.max_k}", k)
        try:
            answer = await blend(self._pipeline, body, k, quotas, body.budget_ms or cfg.mix_budget_ms)
        except Unavailable as exc:
            return exc.response()
        except Exception:
            return self._internal("mix")
        rid = x_request_id or new_request_id()
        answer["arm"] = None if arm is None else arm.name
        self._expose(rid, body.user_id, "mix", answer)
        return Answer(answer)

    # -- events ---------------------------------------------------------------------------------------

    @api.post("/v1/events", response_model=EventResponse, responses=WRITE_ERRORS)
    async def events(self, body: EventRequest):
        """Put a click into the user's online sequence (Feast push `click_push`), merged by its time, and
        answer once it is read back from the store; the next /v1/candidates sees it, whichever producer
        answers. Serialised per user inside this replica (serving/events.py says what that means across
        replicas). Every accepted event type goes into the sequence; each event also goes to the event
        log with its request_id and position (the answer it followed).
        422: a bad field (an unknown item, a time outside the deployment's bounds); 409: a click the
        sequence cannot hold (older than all of its last N); 503 + Retry-After: the store failed or timed
        out, the click may or may not be stored: retry (a click stored twice is merged twice)."""
        try:
            with self._pipeline.lease() as s:
                return JSONResponse(
                    await record_click(s, self._deps, self._clicks, body, self._logs["events"])
                )
        except Refused as exc:
            return guard.error(409, "event_refused", str(exc))
        except Unavailable as exc:
            return exc.response()
        except RequestValidationError:
            raise
        except Exception:
            return self._internal("events")

    @api.get("/v1/users/{user_id}/clicks", response_model=ClicksResponse, responses=ERRORS)
    async def clicks(self, user_id: Annotated[int, Path(ge=0, le=INT64_MAX)]):
        """The user's online click sequence, oldest first (what every producer reads); [] if unknown."""
        try:
            with self._pipeline.lease() as s:
                features = await read_features(
                    self._deps, s.store, [user_id], "clicks", s.config.feature_timeout_s
                )
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
        """Readiness: the default producer (and an experiment's arms) loaded and its index answering (a 1-NN
        probe search), the feature store readable. `producers`: each producer's own readiness (a missing
        sibling does not make the replica unready: requests naming it get a 503 producer_unavailable);
        `logs`: the exposure and event logs' counts."""
        try:
            with self._pipeline.lease() as s:
                body = await readiness(s, self._deps)
        except Unavailable:
            return JSONResponse({"ready": False, "reasons": ["model not loaded"]}, status_code=503)
        body["logs"] = {  # the exposure and event logs: where, and what they wrote, dropped, failed
            name: None
            if open_log is None
            else {
                "path": open_log.path,
                "written": open_log.written,
                "dropped": open_log.dropped,
                "failed": open_log.failed,
            }
            for name, open_log in self._logs.items()
        }
        body["update_error"] = self._update_error  # a config update not applied: the previous one serves
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    def _internal(self, where: str) -> JSONResponse:
        log.exception("internal error in %s", where)
        self._deps.metrics.error(where, "internal")
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
