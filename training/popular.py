"""Recency-weighted popularity: the popular list every export carries (the fallback for unknown users) and
the `popular` producer's ranking, one function for both.

    popular_items(events, k=1000, half_life_days=7.0)   # [{"item_id", "score"}, ...] best first
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def popular_items(train: pd.DataFrame, k: int, half_life_days: float) -> list[dict]:
    """Recency-weighted popularity over the training events: weight 0.5 ** (age / half life)."""
    ts = pd.to_datetime(train["event_timestamp"], utc=True)
    age_days = (ts.max() - ts).dt.total_seconds().to_numpy() / 86400.0
    weights = np.power(0.5, age_days / half_life_days)
    scores = (
        pd.Series(weights)
        .groupby(train["item_id"].to_numpy())
        .sum()
        .sort_values(ascending=False, kind="stable")
    )
    return [{"item_id": int(i), "score": float(s)} for i, s in scores.head(k).items()]
