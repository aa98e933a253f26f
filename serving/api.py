"""The Producer's HTTP contract: request and response models of every route (docs/API.md explains them).

One contract for every producer: a request names the producer (`producer`, default the deployment's
`producer`, "student" unless configured) and gets the same response shape whichever answers.
"""

# No `from __future__ import annotations`: FastAPI resolves these models' annotations at route registration.
from datetime import datetime
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from serving.config import API_MAX_K, PRODUCERS

INT64_MAX = 2**63 - 1
MAX_RECENT = 1000  # recent_item_ids per request
MAX_BATCH_REQUESTS = 256  # requests per /v1/candidates:batch call
MAX_BUDGET_MS = 10_000.0  # the largest /v1/mix budget a request may ask for

Id = Annotated[int, Field(ge=0, le=INT64_MAX)]  # user and item ids are int64 >= 0 (Qdrant ids are unsigned)
ProducerName = Literal["student", "sasrec", "similar", "popular"]
assert set(get_args(ProducerName)) == set(PRODUCERS)


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
    producer: ProducerName | None = Field(None, description="default: the deployment's producer (student)")
    k: int | None = Field(None, ge=1, le=API_MAX_K, description="default: the deployment's default_k")
    recent_item_ids: list[Id] | None = Field(
        None, max_length=MAX_RECENT, description="clicks not yet in the feature store, oldest first"
    )
    exclude_seen: bool = True
    filters: Filters | None = None


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
    k: int | None = Field(None, ge=1, le=API_MAX_K, description="default: sum(quotas), else default_k")
    recent_item_ids: list[Id] | None = Field(None, max_length=MAX_RECENT)
    exclude_seen: bool = True
    filters: Filters | None = None
    quotas: dict[ProducerName, Annotated[int, Field(ge=0, le=API_MAX_K)]] | None = None
    weights: dict[ProducerName, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    budget_ms: float | None = Field(
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


class ClicksResponse(BaseModel):
    user_id: int
    item_ids: list[int]  # the online click sequence, oldest first ([] for an unknown user)


class ErrorBody(BaseModel):
    error: str
    message: str
