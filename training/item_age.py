"""Item age: the ONE function that turns (request time, an item's first event time) into an age bucket, used by
training (every position's target and negatives, at the target's time), evaluation (at each query's time)
and serving (at the request's time). YouTube's "example age" (Covington et al., RecSys'16) is the anchor:
fresh items are clicked far more than their history says, and a model that cannot see age buries them.

    added = added_days(catalogue, table)              # (n + 1,) days (index 0 = padding: +inf)
    buckets = age_bucket(torch.tensor([t_days]), added)   # (1, n + 1) in 0..N_AGE_BUCKETS - 1
    bucket_ranges(t_days)                              # the same buckets as index range filters (serving)

The anchor is the item's catalogue `created_at` (when it was added; `vlmrec ingest` fills a missing one with
the item's first event). Bucket 0 is "not added before the request": a product added at this very moment
or later; buckets 1.. are the age since it was added, cut at AGE_EDGES_DAYS. Times are float days since the
Unix epoch (`to_days`); an anchor counts only when strictly before the request time, so a catalogue whose
created_at is its first event never tells a model about an item before someone clicked it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from training.data import ItemTable

if TYPE_CHECKING:  # torch only where buckets are computed: the example build's tasks import this module too
    from torch import Tensor

# Log-spaced: a day, a week, a month, a quarter, a year, three years. Launch-day and launch-week items differ
# most from the catalogue; beyond three years age says little.
AGE_EDGES_DAYS = (1.0, 7.0, 30.0, 90.0, 365.0, 1095.0)
N_AGE_BUCKETS = len(AGE_EDGES_DAYS) + 2  # 0 = unseen, then one more than the edges
UNSEEN = 0
# age <= 0 (and -inf: never added) -> UNSEEN; the smallest positive double up to a day -> 1; and so on.
_BOUNDARIES = np.array((np.nextafter(0.0, 1.0), *AGE_EDGES_DAYS), dtype=np.float64)
EPOCH = pd.Timestamp(0, tz="UTC")


def to_days(timestamps) -> np.ndarray:
    """Timestamps (datetime64 / pandas, any unit or tz) -> float64 days since the Unix epoch."""
    ts = pd.to_datetime(pd.Series(np.asarray(timestamps).reshape(-1)), utc=True)
    return ((ts - EPOCH) / pd.Timedelta(days=1)).to_numpy(np.float64)  # unit-safe (ns, us, s columns)


def added_days(
    catalogue: pd.DataFrame,
    items: ItemTable,
    events: pd.DataFrame | None = None,
    relaunched: np.ndarray | None = None,
) -> np.ndarray:
    """(n + 1,) float64: each model index's age anchor, in days: the item's catalogue `created_at` (floored
    to the second, as the index stores it; `vlmrec ingest` fills a missing one with the item's first event),
    +inf for items not in the catalogue and at index 0 (padding). `relaunched` raw ids (a launch split's
    launched items) are anchored at their first event in `events` instead, +inf without one: they did not
    exist before the cut."""
    out = np.full(items.n_items + 1, np.inf)
    idx = items.index_of(catalogue["item_id"].to_numpy(np.int64))
    seconds = (
        (pd.to_datetime(catalogue["created_at"], utc=True) - EPOCH) // pd.Timedelta(seconds=1)
    ).to_numpy()
    keep = idx > 0
    out[idx[keep]] = seconds[keep] / 86400.0
    if relaunched is not None and len(relaunched):
        out[items.index_of(relaunched)] = np.inf
        if events is not None:
            mine = events[events["item_id"].isin(relaunched)]
            first = mine.groupby("item_id")["event_timestamp"].min()
            out[items.index_of(first.index.to_numpy(np.int64))] = to_days(first.to_numpy())
        out[0] = np.inf
    return out


def bucket_ranges(request_days: float) -> dict[int, dict[str, float]]:
    """What serving filters an index by: for each bucket, the anchor times (days) that fall in it at
    `request_days`, as a range {gt, gte, lt, lte} (age_bucket's exact boundaries; a test holds them equal).
    UNSEEN: anchors at or after the request time."""
    t = float(request_days)
    edges = (0.0, *AGE_EDGES_DAYS)
    out: dict[int, dict[str, float]] = {UNSEEN: {"gte": t}}
    for b in range(1, N_AGE_BUCKETS):
        rng = {"lt": t} if b == 1 else {"lte": t - edges[b - 1]}  # age > 0 ... / age >= lower edge
        if b < len(edges):
            rng["gt"] = t - edges[b]  # age < upper edge
        out[b] = rng
    return out


def age_bucket(request_days: Tensor, added_days: Tensor) -> Tensor:
    """Age buckets by broadcasting: request_days (..., 1) or (...,) against added_days (..., C) -> int64.
    UNSEEN where the item has no event strictly before the request (added_days >= request, or +inf). Times
    are finite or +inf anchors (a NaN time is not an age: it lands in the last bucket)."""
    import torch

    age = request_days.to(torch.float64) - added_days.to(torch.float64)
    edges = torch.as_tensor(_BOUNDARIES, device=age.device)
    return torch.bucketize(age, edges, right=True)  # one pass over (P, C): no where
