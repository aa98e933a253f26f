"""The Producer's HTTP contract: request and response models of every route (docs/API.md explains them).

One contract for every producer: a request names the producer (`producer`, default the deployment's
`producer`, "student" unless configured) and gets the same response shape whichever answers.
"""

# No `from __future__ import annotations`: FastAPI resolves these models' annotations at route registration.
import uuid
from datetime import datetime
from typing import Annotated, Literal, get_args

import orjson
from fastapi import Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

from serving.config import API_MAX_K, PRODUCERS

INT64_MAX = 2**63 - 1
MAX_RECENT = 1000  # recent_item_ids per request
MAX_BATCH_REQUESTS = 256  # requests per /v1/candidates:batch call
MAX_BUDGET_MS = 10_000.0  # the largest /v1/mix budget a request may ask for
MAX_CATEGORIES = 256  # categories in one filter
MAX_NAME = 256  # characters of a category or an event type
# Request bodies are refused above these sizes before anything parses them (serving/guard.py, HTTP 413).
# The largest valid single request (MAX_RECENT ids of 19 digits, MAX_CATEGORIES names) is about 90 kB;
# a batch of MAX_BATCH_REQUESTS of them about 23 MB, so a batch of the largest requests must be split.
MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_BATCH_BODY_BYTES = 8 << 20  # 8 MiB: /v1/candidates:batch

# Types are strict (a JSON true is not the integer 1, "no" is not a boolean, 5.0 is not an int) and
# numbers finite: a request means exactly what it says or is refused naming the field.
Int = Annotated[int, Field(strict=True)]
Id = Annotated[
    int, Field(strict=True, ge=0, le=INT64_MAX)
]  # user and item ids: int64 >= 0 (Qdrant: unsigned)
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # an int is a float; a bool is not
Bool = StrictBool
Name = Annotated[str, Field(strict=True, max_length=MAX_NAME)]
ProducerName = Literal["student", "sasrec", "similar", "popular"]
assert set(get_args(ProducerName)) == set(PRODUCERS)


class Filters(BaseModel):
    """Restrict candidates: category (one or any of several) and availability. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")
    category: str | list[str] | None = None
    available: Bool | None = None

    @field_validator("category", mode="before")
    @classmethod
    def _one_or_many(cls, v):  # one clear error instead of one per member of the union
        names = [v] if isinstance(v, str) else v
        if v is not None and not (
            isinstance(names, list) and names and all(isinstance(c, str) for c in names)
        ):
            raise ValueError("must be a string or a non-empty list of strings")
        if v is not None and (len(names) > MAX_CATEGORIES or any(len(c) > MAX_NAME for c in names)):
            raise ValueError(f"at most {MAX_CATEGORIES} categories of at most {MAX_NAME} characters each")
        return v


class CandidatesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field must not be silently ignored
    user_id: Id
    producer: ProducerName | None = Field(None, description="default: the deployment's producer (student)")
    k: Int | None = Field(None, ge=1, le=API_MAX_K, description="default: the deployment's default_k")
    recent_item_ids: list[Id] | None = Field(
        None, max_length=MAX_RECENT, description="clicks not yet in the feature store, oldest first"
    )
    exclude_seen: Bool = True
    filters: Filters | None = None


REQUEST_ID_HEADER = "X-Request-ID"
# A request's id: its X-Request-ID header (the caller's, else the one Serve's HTTP proxy adds and returns),
# written in the answer and the exposure log
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
RequestId = Annotated[
    str | None, Header(alias=REQUEST_ID_HEADER, min_length=1, max_length=128, pattern=REQUEST_ID_PATTERN)
]


def new_request_id() -> str:
    return uuid.uuid4().hex


class Candidate(BaseModel):
    item_id: int
    score: float  # the producer's own score (cosine, or dot product for sasrec, or popularity)
    rank: int  # 1 = best


class CandidatesResponse(BaseModel):
    producer: str
    model_version: str
    index_version: str | None  # None for popular (no index)
    candidates: list[Candidate]
    fallback: str | None  # None, "unknown_user", "empty_sequence" or "feature_store_unavailable"
    warnings: list[str]
    timings_ms: dict[str, float]  # feature, model, search, total
    batch_size: int = 1  # requests answered together with this one (one feature read, forward, search)
    arm: str | None = None  # the experiment arm that answered (None: no experiment, or a named producer)
    request_id: (
        str  # the caller's X-Request-ID, else a new one (":batch": "<id>.<i>"); the exposure log's key
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[CandidatesRequest] = Field(max_length=MAX_BATCH_REQUESTS)


class BatchResponse(BaseModel):
    responses: list[CandidatesResponse]


class MixRequest(BaseModel):
    """One user's candidates from several producers, blended. Give `quotas` (slots per producer; k = their
    sum) or `weights` (shares of k), not both; neither = equal weights over every producer."""

    model_config = ConfigDict(extra="forbid")
    user_id: Id
    k: Int | None = Field(None, ge=1, le=API_MAX_K, description="default: sum(quotas), else default_k")
    recent_item_ids: list[Id] | None = Field(None, max_length=MAX_RECENT)
    exclude_seen: Bool = True
    filters: Filters | None = None
    quotas: dict[ProducerName, Annotated[Int, Field(ge=0, le=API_MAX_K)]] | None = None
    # any finite weight >= 0: only their ratios count (serving/mixer.py scales them before use)
    weights: dict[ProducerName, Annotated[Float, Field(ge=0)]] | None = None
    budget_ms: Float | None = Field(
        None, gt=0, le=MAX_BUDGET_MS, description="default: the deployment's mix_budget_ms"
    )


class MixedCandidate(BaseModel):
    item_id: int
    rank: int  # 1 = first in the blended list
    producer: str  # the producer whose slot it fills
    sources: list[str]  # every producer that returned it (in the request's producer order)
    ranks: dict[str, int]  # its rank in each of those producers' lists
    scores: dict[str, float]  # its score there (scores of different producers are not comparable)


class ProducerReport(BaseModel):
    status: Literal["ok", "timeout", "unavailable", "error"]
    quota: int  # slots asked
    taken: int  # slots it filled (quota minus duplicates it lost and what it lacked, plus refills)
    returned: int  # candidates it returned
    fallback: str | None = None
    model_version: str | None = None
    index_version: str | None = None
    ms: float | None = None  # its own answer time (None when it did not answer)


class MixResponse(BaseModel):
    k: int
    candidates: list[MixedCandidate]
    producers: dict[str, ProducerReport]
    warnings: list[str]  # every dropped producer is named here
    timings_ms: dict[str, float]  # feature, total
    request_id: str  # the caller's X-Request-ID, else a new one; the exposure log's key
    arm: str | None = None  # a Mixer experiment's arm whose weights made the blend (None: no such arm)


def _iso_time(v):
    """An event time is an ISO 8601 string (JSON has no time type): a number is refused, not read as an
    epoch in some unit."""
    if v is not None and not isinstance(v, str):
        raise ValueError("must be an ISO 8601 time string, e.g. 2026-01-31T12:00:00Z")
    return v


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id
    # default: now (UTC); a naive time is taken as UTC. Bounded by the deployment (ProducerConfig:
    # event_min_time, event_max_future_s): a 422 outside, never a write.
    event_timestamp: Annotated[datetime | None, BeforeValidator(_iso_time)] = None
    event_type: Name = "click"  # one of the deployment's event_types (click, add_to_cart, purchase)
    # the answer it followed (its request_id) and the item's place in it: the exposure log's join keys
    request_id: Annotated[str, Field(min_length=1, max_length=128, pattern=REQUEST_ID_PATTERN)] | None = None
    position: Int | None = Field(None, ge=1, le=API_MAX_K)


class EventResponse(BaseModel):
    user_id: int
    item_id: int
    sequence_length: int  # after the append, at most sequence_len_max
    sequence_len_max: int  # N
    timings_ms: dict[str, float]  # write (the append: locks, read, push, read back), total


class ClicksResponse(BaseModel):
    user_id: int
    item_ids: list[int]  # the online click sequence, oldest first ([] for an unknown user)


class ErrorBody(BaseModel):
    error: str
    message: str


class Answer(JSONResponse):
    """A candidates / mix answer as JSON, encoded by orjson: lists of a hundred candidates are the bulk of
    the Producer's responses and of its encoding time. Starlette's JSONResponse otherwise (same media type)."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
