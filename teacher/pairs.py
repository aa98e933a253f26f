"""Training pairs for teacher tuning, mined only from what was known before the evaluation cut.

    train = learnable_events(events, SplitConfig())         # the student's training events: the same split
    co = co_engagement_pairs(train, PairConfig())           # a, b: items one user clicked close together
    it = image_title_pairs(items, cut=train["event_timestamp"].max())   # a = b: an item's image and title

A pair is (a, b, kind): kind CO (a's item vector, b's item vector) or IMAGE_TITLE (a's image, a's text).
Co-engagement bends the content space toward what users treat as related while every item vector stays
content-derived: a new item still gets one, without retraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from engine.config import at_least
from vlmrec.split import SplitConfig, held_out_items, learnable_events

CO, IMAGE_TITLE = 0, 1
PairKind = Literal["co-engagement", "image-title", "both"]


@dataclass(frozen=True)
class PairConfig(SplitConfig):
    """Which pairs, from which events: only those the split lets a model learn from (SplitConfig's fields:
    before the cut, launched items left out)."""

    pairs: PairKind = "co-engagement"
    window_s: float = 3600.0  # two clicks of one user at most an hour apart (one session) ...
    max_gap: int = 3  # ... and at most 3 clicks apart: neighbours in a session, not the whole history
    max_pairs: int = 20000  # a uniform subsample of the mined pairs (0 = all); sized for minutes on 2 cores
    valid_fraction: float = 0.05  # held out for the per-epoch validation loss

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, 0, "window_s", strictly=True)
        at_least(self, 1, "max_gap")
        at_least(self, 0, "max_pairs")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}")


def co_engagement_pairs(events: pd.DataFrame, window_s: float, max_gap: int) -> pd.DataFrame:
    """(a, b) for every two clicks of one user at most `max_gap` clicks and `window_s` seconds apart, a
    before b, a != b. Occurrences, not distinct pairs: pairs users make often are drawn often.
    events: user_id, item_id, event_timestamp (only events the caller may learn from). -> a, b, kind"""
    ordered = events.sort_values(["user_id", "event_timestamp"], kind="stable")
    users = ordered["user_id"].to_numpy(np.int64)
    items = ordered["item_id"].to_numpy(np.int64)
    seconds = pd.to_datetime(ordered["event_timestamp"], utc=True).astype("int64").to_numpy() / 1e9
    parts = []
    for gap in range(1, max_gap + 1):
        keep = (users[gap:] == users[:-gap]) & (seconds[gap:] - seconds[:-gap] <= window_s)
        keep &= items[gap:] != items[:-gap]
        parts.append(np.stack([items[:-gap][keep], items[gap:][keep]], axis=1))
    ab = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    return pd.DataFrame({"a": ab[:, 0], "b": ab[:, 1], "kind": np.full(len(ab), CO, np.int8)})


def image_title_pairs(
    items: pd.DataFrame, cut: pd.Timestamp | None, launched: np.ndarray | None = None
) -> pd.DataFrame:
    """(a, a) for every item with an image that the catalogue held at `cut` (created_at <= cut; None = all),
    launched items (not in the catalogue before the cut) left out. items: item_id, image_uri, created_at.
    -> a, b, kind"""
    has_image = items["image_uri"].notna() & (items["image_uri"].astype(str) != "")
    if cut is not None:
        has_image &= pd.to_datetime(items["created_at"], utc=True) <= cut
    if launched is not None and len(launched):
        has_image &= ~items["item_id"].isin(launched)
    ids = items.loc[has_image, "item_id"].to_numpy(np.int64)
    return pd.DataFrame({"a": ids, "b": ids, "kind": np.full(len(ids), IMAGE_TITLE, np.int8)})


def mine_pairs(
    events: pd.DataFrame, items: pd.DataFrame, cfg: PairConfig, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train pairs, validation pairs, counts) from the events the split lets a model learn from and the
    catalogue as it was at the cut. Shuffled; at most cfg.max_pairs in all."""
    split = cfg.split_config()
    train_events = learnable_events(events, split)
    if train_events.empty:
        raise ValueError("events: no events before the temporal cut to mine pairs from")
    cut = pd.to_datetime(train_events["event_timestamp"], utc=True).max()
    parts, counts = [], {"cut": str(cut), "train_events": len(train_events)}
    if cfg.pairs in ("co-engagement", "both"):
        co = co_engagement_pairs(train_events, cfg.window_s, cfg.max_gap)
        parts.append(co)
        counts["co_engagement_mined"] = len(co)
    if cfg.pairs in ("image-title", "both"):
        it = image_title_pairs(items, cut, held_out_items(events, split))
        parts.append(it)
        counts["image_title_mined"] = len(it)
    pairs = pd.concat(parts, ignore_index=True)
    if pairs.empty:
        raise ValueError(f"--pairs {cfg.pairs}: no pairs mined before the cut {cut}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    if cfg.max_pairs:
        order = order[: cfg.max_pairs]
    pairs = pairs.iloc[order].reset_index(drop=True)
    n_valid = max(2, int(round(cfg.valid_fraction * len(pairs))))  # one in-batch negative at least
    if len(pairs) - n_valid < 2:
        raise ValueError(f"--pairs {cfg.pairs}: {len(pairs)} pairs mined: too few to train and validate on")
    valid, train = pairs.iloc[:n_valid].reset_index(drop=True), pairs.iloc[n_valid:].reset_index(drop=True)
    counts.update(train_pairs=len(train), valid_pairs=len(valid))
    return train, valid, counts


def pair_labels(a, b, extra=None):
    """(B, B [+ K]) bool: which (x_i, y_j) are positives; x_i is row i's a side, y_j row j's b side, then
    the K `extra` items (random negatives). The diagonal, plus rows that share an item: a_i == a_j (y_j is
    a partner of a_i's item too), b_i == b_j (the same partner), a_i == b_j (the same item on both sides);
    an extra item is a positive only where it is a_i or b_i. Everything else is a negative.
    a, b (B,), extra (K,): numpy arrays of item ids (or rows)."""
    labels = (a[:, None] == a[None, :]) | (b[:, None] == b[None, :]) | (a[:, None] == b[None, :])
    if extra is None or len(extra) == 0:
        return labels
    hit = (extra[None, :] == a[:, None]) | (extra[None, :] == b[:, None])  # (B, K)
    return np.concatenate([labels, hit], axis=1)
