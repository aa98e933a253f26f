"""The reference Mixer: quotas from weights, every producer asked in parallel under one time budget, and the
de-duplicating quota interleave.

    k, quotas = resolve_quotas(k=10, quotas=None, weights={"student": 3, "similar": 1}, default_k=100)
    # -> 10, {"student": 8, "similar": 2}
    items, taken = interleave({"student": [(7, .9), (3, .8)], "similar": [(3, .7), (5, .6)]}, quotas, k)
    body = await blend(pipeline, request, k, quotas, budget_ms=150)    # what POST /v1/mix answers

`blend` reads the user's clicks once, asks every producer with a quota for k candidates through the
Pipeline (serving/pipeline.py), drops those that fail or miss the budget, and interleaves the rest. docs/API.md
states the contract; the arithmetic is deterministic, so the same answers always blend to the same list.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from serving.api import CandidatesRequest, MixRequest
from serving.asks import read_features
from serving.calls import Unavailable, describe, ms_since
from serving.config import PRODUCERS

if TYPE_CHECKING:
    from serving.pipeline import Pipeline

Hit = tuple[int, float]  # (item_id, the producer's score)


class MixError(ValueError):
    """A request the Mixer cannot honour: `field` names the request field (an HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def apportion(k: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Quotas summing to k in proportion to weights (largest remainder; ties go to the earlier producer).

    Only the ratios count: the weights are divided by the largest first, so huge ones (1e308: their sum
    overflows to inf) and tiny ones (their products underflow) give the same quotas as moderate ones."""
    top = max(weights.values(), default=0.0)
    if not (math.isfinite(top) and top > 0):
        raise MixError("weights", "weights must be finite and at least one > 0")
    scaled = {p: w / top for p, w in weights.items()}  # in [0, 1], the largest exactly 1
    total = sum(scaled.values())  # in [1, len(weights)]
    exact = {p: k * w / total for p, w in scaled.items()}
    quotas = {p: math.floor(x) for p, x in exact.items()}
    order = list(weights)
    by_remainder = sorted(order, key=lambda p: (-(exact[p] - quotas[p]), order.index(p)))
    for p in by_remainder[: k - sum(quotas.values())]:
        quotas[p] += 1
    return quotas


def resolve_quotas(
    k: int | None,
    quotas: Mapping[str, int] | None,
    weights: Mapping[str, float] | None,
    default_k: int,
    max_k: int,
    default_weights: Mapping[str, float] | None = None,
) -> tuple[int, dict[str, int]]:
    """The request's k and slots per producer (request order kept; producers with 0 slots left out).
    Neither quotas nor weights: default_weights (the validated mix.json), else equal weights."""
    if quotas is not None and weights is not None:
        raise MixError("quotas", "give quotas or weights, not both")
    if quotas is not None:
        total = sum(quotas.values())
        if total < 1:
            raise MixError("quotas", "at least one quota must be > 0")
        if k is not None and k != total:
            raise MixError("k", f"k ({k}) must equal the sum of quotas ({total}), or be left out")
        if total > max_k:
            raise MixError("quotas", f"the quotas sum to {total}, more than max_k {max_k}")
        return total, {p: q for p, q in quotas.items() if q > 0}
    k = default_k if k is None else k
    if weights is None:
        weights = default_weights if default_weights is not None else dict.fromkeys(PRODUCERS, 1.0)
    weights = dict(weights)
    if not any(w > 0 for w in weights.values()):
        raise MixError("weights", "at least one weight must be > 0")
    return k, {p: q for p, q in apportion(k, weights).items() if q > 0}


def interleave(
    lists: Mapping[str, Sequence[Hit]], quotas: Mapping[str, int], k: int
) -> tuple[list[dict], dict[str, int]]:
    """Blend ranked lists by quota, without duplicates (the slots: `placements`). Each item carries every
    producer that returned it, with its rank and score there. Returns (items in blended order, slots filled
    per producer)."""
    order = [p for p in quotas if quotas[p] > 0]
    ranks = {p: {item: r for r, (item, _) in enumerate(lists.get(p, ()), 1)} for p in order}
    scores = {p: dict(lists.get(p, ())) for p in order}
    placed, taken = placements(lists, quotas, k)
    out = []
    for rank, (item, p) in enumerate(placed, 1):
        sources = [q for q in order if item in ranks[q]]
        out.append(
            {
                "item_id": int(item),
                "rank": rank,
                "producer": p,
                "sources": sources,
                "ranks": {q: ranks[q][item] for q in sources},
                "scores": {q: float(scores[q][item]) for q in sources},
            }
        )
    return out, taken


def placements(
    lists: Mapping[str, Sequence[Hit]], quotas: Mapping[str, int], k: int
) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """The quota interleave's slots: (item, producer) in blended order, and slots filled per producer.

    Slots go one at a time to the producer furthest behind its quota (taken / quota smallest; ties: the
    earlier producer in `quotas`), which gives its best candidate not already taken. First every producer
    fills its quota; if fewer than k candidates were placed (a producer lacked candidates, lost them to
    duplicates, or is absent from `lists`: dropped), the producers with candidates left keep taking turns
    in the same proportion until k."""
    order = [p for p in quotas if quotas[p] > 0]
    hits = [lists.get(p, ()) for p in order]
    quota = [quotas[p] for p in order]
    pos, taken = [0] * len(order), [0] * len(order)
    live = [i for i, h in enumerate(hits) if h]  # producers with candidates left (an exhausted one stays out)
    placed: set[int] = set()
    out: list[tuple[int, str]] = []
    for capped in (True, False):
        while len(out) < k:
            # the producer furthest behind its quota (taken / quota, compared exactly); ties: the earlier one
            best = -1
            for i in live:
                if (not capped or taken[i] < quota[i]) and (
                    best < 0 or taken[i] * quota[best] < taken[best] * quota[i]
                ):
                    best = i
            if best < 0:
                break
            h, j = hits[best], pos[best]
            while j < len(h) and h[j][0] in placed:  # past its candidates placed already
                j += 1
            pos[best] = j
            if j == len(h):
                live.remove(best)  # exhausted: the slot goes to the next producer in turn
                continue
            placed.add(h[j][0])
            taken[best] += 1
            out.append((h[j][0], order[best]))
    return out, dict(zip(order, taken, strict=True))


async def blend(
    pipeline: Pipeline, body: MixRequest, k: int, quotas: dict[str, int], budget_ms: float
) -> dict:
    """One user's candidates from every producer in `quotas`, asked in parallel within budget_ms, blended.
    A producer that fails or misses the budget is dropped and named in `warnings`; its slots go to the
    others. Unavailable only when no state is loaded."""
    t_start = time.perf_counter()
    deadline = t_start + budget_ms / 1e3
    deps = pipeline.deps
    with pipeline.lease() as s:
        timeout = min(s.config.feature_timeout_s, budget_ms / 1e3)
        features = await read_features(deps, s.store, [body.user_id], "mix", timeout)
        shared = body.model_dump(include={"user_id", "recent_item_ids", "exclude_seen", "filters"})

        async def ask(p: str):
            t0 = time.perf_counter()
            (result,) = await pipeline.answer([CandidatesRequest(**shared, producer=p, k=k)], features)
            return result, ms_since(t0)

        tasks = {p: asyncio.ensure_future(ask(p)) for p in quotas}
        _, pending = await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - time.perf_counter()))
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
                warnings.append(f"{p}: failed ({describe(task.exception())}): dropped")
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
                deps.metrics.error(p, "mix_dropped")
            reports[p] = report
        items, taken = interleave(lists, quotas, k)
        for p, n in taken.items():
            reports[p]["taken"] = n
        if len(items) < k:
            warnings.append(f"only {len(items)} distinct candidates for k={k}")
        total = ms_since(t_start)
        deps.metrics.stage("mix", "mix", total)
        return {
            "k": k,
            "candidates": items,
            "producers": reports,
            "warnings": warnings,
            "timings_ms": {"feature": features.ms, "total": total},
        }
