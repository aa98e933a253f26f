"""The Producer: a Ray Serve deployment (FastAPI ingress) that turns a user's clicks into candidates.

    serve run serving.producer:app           # from the repo root: serves .vlmrec/sample on 127.0.0.1:8000
    vlmrec serve --workdir W --port 8000     # the same through serving/cli.py (flags, Ctrl-C to stop)
    curl -s localhost:8000/v1/candidates -d '{"user_id": 1, "k": 10}' -H 'content-type: application/json'

Endpoints (request and response models below; every error body is JSON, never a traceback):
    POST /v1/candidates        {user_id, k?, recent_item_ids?, exclude_seen?, filters?} -> candidates
    POST /v1/candidates:batch  {"requests": [...]} -> {"responses": [...]} in order; one model forward
    POST /v1/events            {user_id, item_id, event_timestamp?, event_type?} -> new sequence length
    GET  /healthz              the process answers
    GET  /readyz               model loaded, index version resolvable, feature store readable (else 503)

/v1/candidates: the user's click sequence from the Feast ONLINE store (feature service student_v1, the one
training reads) + recent_item_ids -> `training.data.build_inputs` (training's input function) ->
SeqRec.user_vector -> Index.search_batch (seen ids excluded, filters) -> candidates. A caller with several
users sends them in one :batch call (one feature read, one forward, one batched search). Single requests
are not coalesced with @serve.batch: in Ray 2.60 it fails in Serve's local testing mode (no replica
context), which the tests use; handlers are async and the blocking work runs in bounded pools instead.

Fallbacks and failures (the `fallback` field says which):
    unknown_user               no stored clicks and no known recent ones   -> popular items (popular.json)
    empty_sequence             stored clicks, none in the model vocabulary -> popular items
    feature_store_unavailable  the online read failed or passed feature_timeout_s -> popular items
    index down or slower than search_timeout_s -> HTTP 503 {"error": "index_unavailable", "message": ...}
Popular items still honour exclude_seen (the ids known to the request) and filters (catalogue metadata).
Blocking calls (Feast, Qdrant, torch) run in small per-dependency thread pools, awaited with a timeout:
a stuck dependency costs its own pool, never the event loop or the other dependencies.
"""

# No `from __future__ import annotations` here: @serve.ingress re-registers the routes on a copy of the
# class, where FastAPI cannot resolve string annotations and took the request model for a query parameter.
import asyncio
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from ray import serve
from ray.serve.metrics import Counter, Histogram

from index.config import IndexConfig
from index.search import Index, open_index
from serving.config import API_MAX_K, ProducerConfig
from serving.events import ClickWriter
from training.data import ItemTable, ModelInputs, build_inputs
from training.model import WEIGHTS_FILE, SeqRec
from vlmrec.features import online_sequences, open_store

log = logging.getLogger("ray.serve")

INT64_MAX = 2**63 - 1
MAX_RECENT = 1000  # recent_item_ids per request
MAX_BATCH_REQUESTS = 256  # requests per /v1/candidates:batch call

# ---------------------------------------------------------------------------------------------- API

Id = Annotated[int, Field(ge=0, le=INT64_MAX)]  # user and item ids are int64 >= 0 (Qdrant ids are unsigned)


class Filters(BaseModel):
    """Restrict candidates: category (one or any of several) and availability. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")
    category: str | list[str] | None = None
    available: StrictBool | None = None

    @field_validator("category", mode="before")
    @classmethod
    def _one_or_many(cls, v):  # one clear error instead of one per member of the union
        if (
            v is None
            or isinstance(v, str)
            or (isinstance(v, list) and v and all(isinstance(c, str) for c in v))
        ):
            return v
        raise ValueError("must be a string or a non-empty list of strings")


class CandidatesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field must not be silently ignored
    user_id: Id
    k: int | None = Field(None, ge=1, le=API_MAX_K, description="default: the deployment's default_k")
    recent_item_ids: list[Id] | None = Field(
        None, max_length=MAX_RECENT, description="clicks not yet in the feature store, oldest first"
    )
    exclude_seen: bool = True
    filters: Filters | None = None


class Candidate(BaseModel):
    item_id: int
    score: float
    rank: int  # 1 = best


class CandidatesResponse(BaseModel):
    producer: str
    model_version: str
    index_version: str | None
    candidates: list[Candidate]
    fallback: str | None  # None, "unknown_user", "empty_sequence" or "feature_store_unavailable"
    warnings: list[str]
    timings_ms: dict[str, float]  # feature, model, search, total


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[CandidatesRequest] = Field(max_length=MAX_BATCH_REQUESTS)


class BatchResponse(BaseModel):
    responses: list[CandidatesResponse]


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id
    event_timestamp: datetime | None = None  # default: now (UTC); a naive time is taken as UTC
    event_type: str = Field("click", max_length=64)


class EventResponse(BaseModel):
    user_id: int
    item_id: int
    sequence_length: int  # after the append, at most sequence_len_max
    sequence_len_max: int  # N


class ErrorBody(BaseModel):
    error: str
    message: str


class Unavailable(Exception):
    """A dependency an answer needs is down or slow: HTTP 503 with a JSON body."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error, self.message = error, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "message": self.message}, status_code=503)


def _field(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def invalid(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 422 in FastAPI's shape, for checks that depend on the deployment's config (e.g. max_k)."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", *field.split(".")), "msg": message, "input": value}]
    )


api = FastAPI(
    title="vlmrec Producer",
    description="Candidates from the student's user vector and a Qdrant index of item vectors.",
)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    message = "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors)
    detail = [{k: e[k] for k in ("type", "loc", "msg", "input") if k in e} for e in errors]
    return JSONResponse(
        {"error": "invalid_request", "message": message, "detail": jsonable_encoder(detail)},
        status_code=422,
    )


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
    return model_inputs(online_sequences(store, [int(user_id)]), [user_id], [recent], vocab, max_len)[1].ids[
        0
    ]


class PopularItem(NamedTuple):
    item_id: int
    score: float
    category: str | None
    available: bool


def popular_candidates(
    popular: Sequence[PopularItem], k: int, exclude: set[int], filters: Filters | None
) -> list[tuple[int, float]]:
    """The fallback: the first k popular items not excluded that match the filters (as the index would:
    category any-of, available equal; an item without a category never matches a category filter)."""
    cats = None
    if filters is not None and filters.category is not None:
        cats = {filters.category} if isinstance(filters.category, str) else set(filters.category)
    avail = None if filters is None else filters.available
    out = []
    for p in popular:
        if p.item_id in exclude or (cats is not None and p.category not in cats):
            continue
        if avail is not None and p.available != avail:
            continue
        out.append((p.item_id, p.score))
        if len(out) == k:
            break
    return out


# ----------------------------------------------------------------------------------- loaded state


def index_config(cfg: ProducerConfig) -> IndexConfig:
    """Search settings: IndexConfig's defaults; the server backend's api key comes from this replica's
    environment (QDRANT_API_KEY), never from user_config."""
    if cfg.index_backend == "server":
        return IndexConfig(
            backend="server",
            url=cfg.index_url,
            api_key=os.environ.get("QDRANT_API_KEY"),
            alias=cfg.index_alias,
        )
    return IndexConfig()


def read_popular(export: Path, catalogue: Path, vectors: Path) -> list[PopularItem]:
    """popular.json joined with the category (items.parquet) and availability (item_vectors.parquet's
    optional `available`, else True, as the index builder assumes): what filters on popular items need."""
    path = export / "popular.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    if not rows:
        return []
    ids = [int(r["item_id"]) for r in rows]
    category: dict[int, str | None] = {}
    if catalogue.exists():
        items = pq.read_table(catalogue, columns=["item_id", "category"]).to_pandas()
        items = items[items["item_id"].isin(ids)]
        category = dict(zip(items["item_id"].astype(int), items["category"], strict=True))
    available: dict[int, bool] = {}
    if vectors.exists() and "available" in pq.read_schema(vectors).names:
        vt = pq.read_table(vectors, columns=["item_id", "available"]).to_pandas()
        vt = vt[vt["item_id"].isin(ids)]
        available = dict(
            zip(vt["item_id"].astype(int), vt["available"].fillna(True).astype(bool), strict=True)
        )
    return [
        PopularItem(i, float(r["score"]), _str_or_none(category.get(i)), available.get(i, True))
        for i, r in zip(ids, rows, strict=True)
    ]


def _str_or_none(v) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


class State:
    """What one config loaded; reconfigure() builds a new one and swaps the reference. Leased by requests:
    a retired state closes its index when the last request using it is done."""

    def __init__(self, config: ProducerConfig, model: SeqRec, index: Index, store, run_info: dict) -> None:
        ws = config.workspace
        self.config, self.model, self.index, self.store = config, model, index, store
        self.vocab = ItemTable(model.item_ids[1:].cpu().numpy())
        self.max_len = model.cfg.max_len
        self.sequence_len = config.sequence_len or model.cfg.max_len  # N of /v1/events
        self.teacher_id = str(run_info["teacher_id"])
        digest = hashlib.sha256((config.export_dir / "model" / WEIGHTS_FILE).read_bytes()).hexdigest()
        self.model_version = f"{config.run}@{digest[:12]}"
        self.popular = read_popular(config.export_dir, ws.items, config.export_dir / "item_vectors.parquet")
        catalogue = (
            pq.read_table(ws.items, columns=["item_id"]).column(0).to_numpy()
            if ws.items.exists()
            else np.zeros(0, np.int64)
        )
        self.catalogue_ids = np.unique(catalogue.astype(np.int64))  # sorted: known ids for /v1/events
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False

    def user_vectors(self, ids: np.ndarray) -> np.ndarray:
        """(B, max_len) model input -> (B, D) user vectors. Left padding is trimmed (the model's output does
        not depend on it)."""
        width = max(int((ids > 0).sum(1).max()), 1) if len(ids) else 1
        with torch.inference_mode():
            return self.model.user_vector(torch.as_tensor(ids[:, -width:])).float().numpy()

    def known_item(self, item_id: int) -> bool:
        """In the model vocabulary or the catalogue (items added to the index later: see the caller)."""
        if self.vocab.index_of([item_id])[0] > 0:
            return True
        pos = np.searchsorted(self.catalogue_ids, item_id)
        return bool(pos < len(self.catalogue_ids) and self.catalogue_ids[pos] == item_id)

    def warm_up(self) -> None:
        """One forward, one search and one online read before serving: the first request is not the one
        that pays for Feast's registry load or torch's first call. A feature store that is down now only
        logs (requests fall back until it answers)."""
        self.user_vectors(np.zeros((1, self.max_len), np.int64))
        self.index.search_batch(np.eye(1, self.index.dim, dtype=np.float32), 1)
        try:
            online_sequences(self.store, [0])
        except Exception as exc:
            log.warning("feature store not readable at load: %r", exc)

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
                self.index.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            done = self._users == 0
        if done:
            self.index.close()


def check_export_teacher(export: Path, run_info: dict) -> None:
    """The export's item table must hold the vectors of the teacher its run.json names."""
    vectors = export / "item_vectors.parquet"
    if not vectors.exists():
        return
    ids = pq.read_table(vectors, columns=["teacher_id"]).column(0).unique().to_pylist()
    if ids != [run_info.get("teacher_id")]:
        raise ValueError(
            f"teacher mismatch: {export / 'run.json'} names teacher {run_info.get('teacher_id')!r} but "
            f"{vectors} holds vectors of {ids}; re-export the run (vlmrec train) instead of mixing files"
        )


def load_state(config: ProducerConfig) -> State:
    """Load the export (model, run.json, popular.json), open the index and the feature store. Refuses an
    index built from another teacher's vectors, or of another dimension, than the model's."""
    export = config.export_dir
    if not (export / "model").is_dir() or not (export / "run.json").exists():
        raise FileNotFoundError(
            f"no export at {export} (model/, run.json): run `vlmrec train --workdir {config.workdir} "
            f"--name {config.run}`"
        )
    run_info = json.loads((export / "run.json").read_text())
    check_export_teacher(export, run_info)
    model = SeqRec.from_pretrained(export / "model")
    where = config.index_url if config.index_backend == "server" else config.index_path
    index = open_index(where, index_config(config))
    try:
        if index.teacher_id != run_info.get("teacher_id"):
            raise ValueError(
                f"teacher mismatch: the export {export} was trained on {run_info.get('teacher_id')!r} but "
                f"the index version {index.version} holds {index.teacher_id!r} vectors; build the index "
                f"from this export (vlmrec index build --vectors {export / 'item_vectors.parquet'})"
            )
        if index.dim != model.cfg.out_dim:
            raise ValueError(f"dimension mismatch: model out_dim {model.cfg.out_dim}, index dim {index.dim}")
        state = State(config, model, index, open_store(config.workspace), run_info)
        state.warm_up()
        return state
    except BaseException:
        index.close()
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
    model: ThreadPoolExecutor
    search: ThreadPoolExecutor
    events: ThreadPoolExecutor
    refresh: ThreadPoolExecutor

    @classmethod
    def create(cls) -> "_Pools":
        sizes = {"features": 4, "model": 1, "search": 4, "events": 4, "refresh": 1}
        return cls(**{n: ThreadPoolExecutor(s, thread_name_prefix=f"producer-{n}") for n, s in sizes.items()})


async def _call(pool: ThreadPoolExecutor, timeout: float | None, fn, *args):
    """Run a blocking call in `pool`; TimeoutError after `timeout` s (the thread finishes on its own)."""
    fut = asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
    return await (fut if timeout is None else asyncio.wait_for(fut, timeout))


# Everything the Producer's methods use is defined above: @serve.ingress pickles the class when it is
# decorated (the class is not importable yet), and its methods keep the module globals that existed then.
@serve.deployment(
    # Serve's default (5) is low for async handlers that mostly wait on I/O; beyond 32 requests in flight
    # Serve queues them before this replica (backpressure) instead of piling them into the thread pools.
    max_ongoing_requests=32,
    user_config={},  # {} = ProducerConfig() defaults; reconfigure() always runs, also on the first start
    graceful_shutdown_timeout_s=5,
)
@serve.ingress(api)
class Producer:
    """One replica: a loaded State (model, index copy, feature store), thread pools, metrics, a refresher."""

    def __init__(self) -> None:
        self._state: State | None = None
        self._pools = _Pools.create()
        self._clicks = ClickWriter()  # per-user locks outlive hot swaps
        self._refresher: asyncio.Task | None = None
        self._stage_ms = Histogram(
            "vlmrec_producer_stage_ms",
            description="Latency of one Producer stage (feature read, model forward, index search), ms.",
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
            description="Errors by kind: feature_store, index, index_refresh, event, internal.",
            tag_keys=("producer", "kind"),
        )

    # -- configuration --------------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict | None) -> None:
        """Load the config's model, index and feature store in a thread, then swap the reference: requests
        keep using the old state meanwhile and it closes when they finish. A bad config raises (Serve keeps
        the old replicas' state / marks the update failed)."""
        config = ProducerConfig.from_dict(user_config)
        fresh = await asyncio.to_thread(load_state, config)
        old, self._state = self._state, fresh
        if old is not None:
            old.retire()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        log.info("producer %s: model %s, index %s", config.producer, fresh.model_version, fresh.index.version)

    async def _refresh_loop(self) -> None:
        """Index.refresh() every refresh_interval_s: upserts and new versions reach this replica's copy."""
        while True:
            state = self._state
            await asyncio.sleep(state.config.refresh_interval_s if state else 1.0)
            state = self._state
            if state is None:
                continue
            try:
                with state.lease() as s:
                    if await _call(self._pools.refresh, None, s.index.refresh):
                        log.info("index refreshed: version %s", s.index.version)
            except Exception as exc:  # keep refreshing; searches go on with the copy they have
                log.warning("index refresh failed: %r", exc)
                self._errors.inc(tags={"producer": state.config.producer, "kind": "index_refresh"})

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
        responses={422: {"model": ErrorBody}, 503: {"model": ErrorBody}, 500: {"model": ErrorBody}},
    )
    async def candidates(self, body: CandidatesRequest):
        """Top-k candidates for one user."""
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
        responses={422: {"model": ErrorBody}, 503: {"model": ErrorBody}, 500: {"model": ErrorBody}},
    )
    async def candidates_batch(self, body: BatchRequest):
        """Several users in one call: one feature read, one forward, one batched search. Responses come in
        request order; if the index is down for any of them the whole call is a 503."""
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

    async def _answer(self, requests: Sequence[CandidatesRequest]) -> list[dict | Unavailable]:
        """The pipeline for a batch of requests -> one response dict (or Unavailable) per request."""
        with self._lease() as s:
            cfg = s.config
            t_start = time.perf_counter()
            tags = {"producer": cfg.producer}
            users = [int(r.user_id) for r in requests]
            recents = [list(r.recent_item_ids or ()) for r in requests]
            ks = [r.k or cfg.default_k for r in requests]
            warnings: list[list[str]] = [[] for _ in requests]

            # 1. features: the online sequences (one read for the distinct users)
            t0 = time.perf_counter()
            try:
                stored = await _call(
                    self._pools.features, cfg.feature_timeout_s, online_sequences, s.store, sorted(set(users))
                )
            except Exception as exc:
                log.warning("feature store read failed: %r", exc)
                self._errors.inc(tags={**tags, "kind": "feature_store"})
                stored = None
                for w in warnings:
                    w.append(f"feature store unavailable ({_describe(exc)}): popular items")
            t_feature = _ms(t0)
            self._stage_ms.observe(t_feature, tags={**tags, "stage": "feature"})

            seqs, inputs = model_inputs(stored or {}, users, recents, s.vocab, s.max_len)
            fallback: list[str | None] = []
            for i, u in enumerate(users):
                unknown_recent = [
                    int(x) for x in np.asarray(recents[i], np.int64)[s.vocab.index_of(recents[i]) == 0]
                ]
                if unknown_recent:
                    warnings[i].append(
                        f"recent_item_ids: {len(unknown_recent)} ids unknown to the model were ignored: "
                        f"{unknown_recent[:20]}"
                    )
                n_stored_unknown = int(inputs.n_unknown[i]) - len(unknown_recent)
                if n_stored_unknown > 0:
                    warnings[i].append(f"{n_stored_unknown} stored clicks unknown to the model were ignored")
                if stored is None:
                    fallback.append("feature_store_unavailable")
                elif not inputs.ids[i].any():
                    fallback.append("empty_sequence" if stored.get(u) else "unknown_user")
                else:
                    fallback.append(None)
            seen = [set(seq) if r.exclude_seen else set() for seq, r in zip(seqs, requests, strict=True)]
            rows = [i for i, f in enumerate(fallback) if f is None]

            # 2. model: one forward for every personalised row
            t0 = time.perf_counter()
            vectors = await _call(self._pools.model, None, s.user_vectors, inputs.ids[rows]) if rows else None
            t_model = _ms(t0) if rows else 0.0
            if rows:
                self._stage_ms.observe(t_model, tags={**tags, "stage": "model"})

            # 3. search: one batched query, k = the largest k asked, cut per request
            t0 = time.perf_counter()
            hits: dict[int, list[tuple[int, float]]] = {}
            down: Unavailable | None = None
            if rows:
                try:
                    found = await _call(
                        self._pools.search,
                        cfg.search_timeout_s,
                        s.index.search_batch,
                        vectors,
                        max(ks[i] for i in rows),
                        [sorted(seen[i]) for i in rows],
                        [_filters_dict(requests[i].filters) for i in rows],
                    )
                    hits = {i: h[: ks[i]] for i, h in zip(rows, found, strict=True)}
                except Exception as exc:
                    log.warning("index search failed: %r", exc)
                    self._errors.inc(tags={**tags, "kind": "index"})
                    down = Unavailable("index_unavailable", f"the index search failed ({_describe(exc)})")
                self._stage_ms.observe(_ms(t0), tags={**tags, "stage": "search"})
            t_search = _ms(t0) if rows else 0.0

            out: list[dict | Unavailable] = []
            for i, r in enumerate(requests):
                if fallback[i] is None and down is not None:
                    out.append(down)
                    continue
                if fallback[i] is None:
                    ranked = hits[i]
                else:
                    ranked = popular_candidates(s.popular, ks[i], seen[i], r.filters)
                if len(ranked) < ks[i]:
                    source = "items" if fallback[i] is None else "popular items"
                    warnings[i].append(f"only {len(ranked)} {source} qualify for k={ks[i]}")
                self._requests.inc(tags={**tags, "fallback": fallback[i] or "none"})
                out.append(
                    {
                        "producer": cfg.producer,
                        "model_version": s.model_version,
                        "index_version": s.index.version,
                        "candidates": [
                            {"item_id": int(item), "score": float(score), "rank": rank}
                            for rank, (item, score) in enumerate(ranked, 1)
                        ],
                        "fallback": fallback[i],
                        "warnings": warnings[i],
                        "timings_ms": {
                            "feature": t_feature,
                            "model": t_model if fallback[i] is None else 0.0,
                            "search": t_search if fallback[i] is None else 0.0,
                            "total": _ms(t_start),
                        },
                    }
                )
            return out

    # -- events ---------------------------------------------------------------------------------------

    @api.post(
        "/v1/events",
        response_model=EventResponse,
        responses={422: {"model": ErrorBody}, 503: {"model": ErrorBody}, 500: {"model": ErrorBody}},
    )
    async def events(self, body: EventRequest):
        """Append a click to the user's online sequence (Feast push `click_push`); the next /v1/candidates
        sees it. Serialised per user inside this replica (serving/events.py says what that means across
        replicas). event_type is accepted for the caller's bookkeeping; every event appends."""
        try:
            with self._lease() as s:
                cfg = s.config
                item = int(body.item_id)
                if not s.known_item(item):
                    try:
                        in_index = bool(
                            await _call(self._pools.search, cfg.search_timeout_s, s.index.get_vectors, [item])
                        )
                    except Exception as exc:
                        raise Unavailable(
                            "index_unavailable",
                            f"could not check item_id {item} in the index ({_describe(exc)})",
                        ) from exc
                    if not in_index:
                        raise invalid(
                            "item_id", f"unknown item_id {item}: not in the catalogue or the index", item
                        )
                ts = body.event_timestamp or datetime.now(UTC)
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
                except Exception as exc:
                    log.warning("click push failed: %r", exc)
                    self._errors.inc(tags={"producer": cfg.producer, "kind": "event"})
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

    # -- probes ---------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self):
        """The process answers (liveness)."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"description": "not ready: `reasons` says why"}})
    async def readyz(self):
        """Readiness: model loaded, index answering (a 1-NN probe search), feature store readable."""
        state = self._state
        if state is None:
            return JSONResponse({"ready": False, "reasons": ["model not loaded"]}, status_code=503)
        reasons = []
        with state.lease() as s:
            cfg = s.config
            try:
                probe = np.eye(1, s.index.dim, dtype=np.float32)  # (1, D)
                await _call(self._pools.search, cfg.search_timeout_s, s.index.search_batch, probe, 1)
            except Exception as exc:
                reasons.append(f"index: {_describe(exc)}")
            try:
                await _call(self._pools.features, cfg.feature_timeout_s, online_sequences, s.store, [0])
            except Exception as exc:
                reasons.append(f"feature store: {_describe(exc)}")
            body = {
                "ready": not reasons,
                "producer": cfg.producer,
                "model_version": s.model_version,
                "index_version": s.index.version,
                "reasons": reasons,
            }
        return JSONResponse(body, status_code=503 if reasons else 200)

    def _internal(self, where: str) -> JSONResponse:
        log.exception("internal error in %s", where)
        state = self._state
        self._errors.inc(tags={"producer": state.config.producer if state else "", "kind": "internal"})
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
    return producer_app(replace(config, workdir=str(Path(config.workdir).absolute())))


app = Producer.bind()
