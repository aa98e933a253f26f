"""Recency-weighted popularity: the popular list every export carries (the fallback for unknown users) and
the `popular` producer's ranking, one function for both.

    popular_items(events, k=1000, half_life_days=7.0)   # [{"item_id", "score"}, ...] best first
    top_popular(popularity(part, ref, 7.0), 1000)      # the same over parts of the events, summed
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def popular_items(train: pd.DataFrame, k: int, half_life_days: float) -> list[dict]:
    """Recency-weighted popularity over the training events: weight 0.5 ** (age / half life), age counted
    from the newest event."""
    return top_popular(popularity(train, train["event_timestamp"].max(), half_life_days), k)


def popularity(events: pd.DataFrame, reference, half_life_days: float) -> pd.Series:
    """item_id -> the sum of its events' weights 0.5 ** (age / half life), age counted from `reference`
    (a time): parts of the events give parts that sum to the whole's."""
    ts = pd.to_datetime(events["event_timestamp"], utc=True)
    ref = pd.Timestamp(reference)
    ref = ref.tz_localize("UTC") if ref.tzinfo is None else ref
    age_days = (ref - ts).dt.total_seconds().to_numpy() / 86400.0
    weights = np.power(0.5, age_days / half_life_days)
    return pd.Series(weights).groupby(events["item_id"].to_numpy()).sum()


def top_popular(scores: pd.Series, k: int) -> list[dict]:
    """The k best of item_id -> score, ties by item id."""
    ranked = scores.sort_index().sort_values(ascending=False, kind="stable")
    return [{"item_id": int(i), "score": float(s)} for i, s in ranked.head(k).items()]
