"""What a call's requests ask, once the feature store has answered: the input every producer's rank() reads.

features = await read_features(deps, store, users, "student", timeout=0.25)
ask = Ask.of(requests, features, config)
ranked = await source.rank(deps, config, ask, rows)     # serving/sources.py: {row: Ranked | Unavailable}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from serving.api import CandidatesRequest
from serving.calls import Deps, describe, ms_since
from serving.config import ProducerConfig
from serving.online import read_sequences

log = logging.getLogger("ray.serve")


class Features(NamedTuple):
    """One online read for a call's users: stored sequences, or None and why when it failed."""

    stored: dict[int, list[int]] | None
    error: str | None
    ms: float


async def read_features(deps: Deps, store, users: Sequence[int], tag: str, timeout: float) -> Features:
    """The users' stored click sequences in one online read (the features pool, `timeout` s); a failure is
    Features(None, why): the callers fall back, they do not fail."""
    t0 = time.perf_counter()
    try:
        stored = await deps.call("features", read_sequences, store, sorted(set(users)), timeout=timeout)
        error = None
    except Exception as exc:
        log.warning("feature store read failed: %r", exc)
        deps.metrics.error(tag, "feature_store")
        stored, error = None, describe(exc)
    ms = ms_since(t0)
    deps.metrics.stage(tag, "feature", ms)
    return Features(stored, error, ms)


@dataclass
class Ask:
    """What each request of a call asks, once the stored clicks are known (row i = request i)."""

    users: list[int]
    recents: list[list[int]]
    seqs: list[list[int]]  # stored + recent, oldest first: what every producer reads
    seen: list[set[int]]  # excluded ids (empty when exclude_seen is false)
    ks: list[int]
    filters: list[dict | None]
    warnings: list[list[str]]
    stored: dict[int, list[int]] | None  # None: the feature read failed

    @classmethod
    def of(cls, requests: Sequence[CandidatesRequest], features: Features, cfg: ProducerConfig) -> Ask:
        users = [int(r.user_id) for r in requests]
        recents = [list(r.recent_item_ids or ()) for r in requests]
        stored = features.stored or {}
        seqs = [[*stored.get(u, ()), *rec] for u, rec in zip(users, recents, strict=True)]
        warnings: list[list[str]] = [[] for _ in requests]
        if features.error:
            for w in warnings:
                w.append(f"feature store unavailable ({features.error}): popular items")
        return cls(
            users=users,
            recents=recents,
            seqs=seqs,
            seen=[set(q) if r.exclude_seen else set() for q, r in zip(seqs, requests, strict=True)],
            ks=[r.k or cfg.default_k for r in requests],
            filters=[
                None if r.filters is None else r.filters.model_dump(exclude_none=True) for r in requests
            ],
            warnings=warnings,
            stored=features.stored,
        )

    def fallback(self, i: int, personalised: bool) -> str | None:
        """The fallback kind of row i, given whether the producer can personalise it."""
        if self.stored is None:
            return "feature_store_unavailable"
        if not personalised:
            return "empty_sequence" if self.stored.get(self.users[i]) else "unknown_user"
        return None


class Ranked(NamedTuple):
    """One row's answer from a producer's rank()."""

    hits: list[tuple[int, float]]
    fallback: str | None
    model_ms: float = 0.0
    search_ms: float = 0.0
