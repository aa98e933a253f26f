"""Item age: the ONE function that turns (request time, an item's first event time) into an age bucket, used by
training (every position's target and negatives, at the target's time), evaluation (at each query's time)
and serving (at the request's time). YouTube's "example age" (Covington et al., RecSys'16) is the anchor:
fresh items are clicked far more than their history says, and a model that cannot see age buries them.

    first = first_seen_days(events, table)            # (n + 1,) days, +inf where no event (index 0 = padding)
    buckets = age_bucket(torch.tensor([t_days]), first)   # (1, n + 1) in 0..N_AGE_BUCKETS - 1

Bucket 0 is "no event before the request" (a product launched a minute ago, or one nobody clicked yet);
buckets 1.. are the age since the item's first event, cut at AGE_EDGES_DAYS. Times are float days since the
Unix epoch (`to_days`); an item's first event counts only when strictly before the request time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from training.data import ItemTable

# Log-spaced: a day, a week, a month, a quarter, a year, three years. Launch-day and launch-week items differ
# most from the catalogue; beyond three years age says little.
AGE_EDGES_DAYS = (1.0, 7.0, 30.0, 90.0, 365.0, 1095.0)
N_AGE_BUCKETS = len(AGE_EDGES_DAYS) + 2  # 0 = unseen, then one more than the edges
UNSEEN = 0


def to_days(timestamps) -> np.ndarray:
    """Timestamps (datetime64 / pandas, any unit or tz) -> float64 days since the Unix epoch."""
    ts = pd.to_datetime(pd.Series(np.asarray(timestamps).reshape(-1)), utc=True)
    return (ts.astype("int64").to_numpy() / 1e9 / 86400.0) if len(ts) else np.zeros(0)


def first_seen_days(events: pd.DataFrame, items: ItemTable) -> np.ndarray:
    """(n + 1,) float64: each model index's first event time in `events` (days), +inf where it has none
    (and at index 0, padding). Events on items outside the table are ignored."""
    idx = items.index_of(events["item_id"].to_numpy(np.int64))
    days = to_days(events["event_timestamp"].to_numpy())
    out = np.full(items.n_items + 1, np.inf)
    keep = idx > 0
    np.minimum.at(out, idx[keep], days[keep])
    return out


def age_bucket(request_days: Tensor, first_days: Tensor) -> Tensor:
    """Age buckets by broadcasting: request_days (..., 1) or (...,) against first_days (..., C) -> int64.
    UNSEEN where the item has no event strictly before the request (first_days >= request, or +inf)."""
    age = request_days.to(torch.float64) - first_days.to(torch.float64)
    edges = torch.tensor(AGE_EDGES_DAYS, dtype=torch.float64, device=age.device)
    bucket = torch.bucketize(age, edges, right=True) + 1  # age < 1 day -> 1, ...
    return torch.where(age > 0, bucket, torch.zeros_like(bucket))
