"""The split every model learns and is scored on, shared by `vlmrec train`, `vlmrec evaluate`, teacher tuning
and the Mixer's tuning: which events a model may learn from, and which items count as launched.

    cfg = SplitConfig(cold="launch", launch_fraction=0.1, launch_seed=0)
    learnable = learnable_events(events, cfg)     # the cut's training events, launched items' events removed
    launched = launched_items(events, cfg)         # (m,) raw ids "launched after the cut"

Splits: `temporal` (a global time cut: the first train_fraction of events by time) and `loo` (each user's
last two events held out). Cold modes:
  natural  models learn from every event before the cut; the cold slice is the targets with no such event.
  launch   a random launch_fraction of the items with events before the cut, stratified by their
           train-period popularity (ten equal strata by event count), is "launched after the cut": every
           event on them before the cut is removed from whatever a model learns from (training examples and
           their input sequences, popularity, teacher-tuning pairs, the Mixer's tuning); test queries whose
           target is one of them form the launch slice. Query histories stay the users' real clicks, so a
           model trained with and one trained without those items answer exactly the same queries (cold
           parity = launch-slice HR@10 without / with).
The launched set depends only on the events, the fraction and the seed, so a natural-split evaluation
reports the same launch slice (the "trained with them" side of cold parity).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pandas as pd

from engine.config import _Config

SplitName = Literal["temporal", "loo"]
ColdMode = Literal["natural", "launch"]
N_STRATA = 10  # popularity strata of the launch draw: deciles of train-period event counts


@dataclass(frozen=True)
class SplitConfig(_Config):
    """What a model may learn from. Saved in every run's run.json; evaluate refuses runs of another split.
    The job's and the teacher-tuning pairs' configs extend it, so its fields are their flags."""

    split: SplitName = "temporal"  # temporal: global time cut; loo: last event test, second-last validation
    train_fraction: float = 0.8  # temporal split: the share of events (by time) that is train
    # temporal split: events before this ISO time are train (replaces train_fraction; `vlmrec refresh`
    # holds out the most recent window this way)
    cut_time: str | None = None
    cold: ColdMode = "natural"  # launch: hold launched items out of everything models learn from
    launch_fraction: float = (
        0.1  # share of the items with train events that is launched (both modes report it)
    )
    launch_seed: int = 0  # the launch draw's seed (not the training seed)

    def __post_init__(self) -> None:
        if self.split not in get_args(SplitName):
            raise ValueError(f"split must be one of {get_args(SplitName)}, got {self.split!r}")
        if self.cold not in get_args(ColdMode):
            raise ValueError(f"cold must be one of {get_args(ColdMode)}, got {self.cold!r}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not 0.0 <= self.launch_fraction < 1.0:
            raise ValueError(f"launch_fraction must be in [0, 1), got {self.launch_fraction}")
        if self.cold == "launch" and self.split != "temporal":
            raise ValueError("cold='launch' needs split='temporal' (a launch is after a time cut)")
        if self.cut_time is not None:
            if self.split != "temporal":
                raise ValueError("cut_time needs split='temporal'")
            self.cut_timestamp()  # raises ValueError naming the value
        if self.cold == "launch" and self.launch_fraction <= 0:
            raise ValueError("cold='launch' needs launch_fraction > 0")

    @classmethod
    def of_run(cls, run: dict) -> SplitConfig:
        """The split of a run.json; runs from before the split was recorded were natural."""
        if "split" in run:
            return cls.from_dict(run["split"])
        job = run["configs"]["job"]
        return cls(split=job["split"], train_fraction=job["train_fraction"])

    def cut_timestamp(self) -> pd.Timestamp:
        """cut_time as a UTC timestamp (naive = UTC)."""
        try:
            ts = pd.Timestamp(self.cut_time)
        except (TypeError, ValueError):
            raise ValueError(f"cut_time must be an ISO 8601 time, got {self.cut_time!r}") from None
        return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")

    def cut_count(self, times: np.ndarray) -> int:
        """How many of the events at `times` (sorted ascending) are train: floor(train_fraction * N), or
        those before cut_time."""
        if self.cut_time is None:
            return int(np.floor(self.train_fraction * len(times)))
        cut = self.cut_timestamp().tz_convert(None).to_datetime64()
        stamps = pd.to_datetime(times, utc=True).tz_convert(None).to_numpy()
        return int(np.searchsorted(stamps, cut, side="left"))

    def split_config(self) -> SplitConfig:
        """Just the split's fields (configs that extend this one carry more)."""
        return SplitConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SplitConfig)})

    def describe(self) -> str:
        cold = (
            f"launch {self.launch_fraction:g} (seed {self.launch_seed})"
            if self.cold == "launch"
            else "natural"
        )
        cut = f" {self.train_fraction:g}" if self.split == "temporal" else ""
        cut = f" before {self.cut_time}" if self.cut_time is not None else cut
        return f"{self.split}{cut}, cold {cold}"


def train_events(events: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Every event before the cut (temporal) or all but each user's last two (loo), in time order."""
    return _cut(events, cfg)[0]


def after_cut(events: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """The rest: the events a model is tested on, in time order."""
    return _cut(events, cfg)[1]


def _cut(events: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    if cfg.split == "temporal":
        order = np.argsort(events["event_timestamp"].to_numpy(), kind="stable")
        cut = cfg.cut_count(events["event_timestamp"].to_numpy()[order])
        parts = events.iloc[order[:cut]], events.iloc[order[cut:]]
    else:
        ordered = events.sort_values(["user_id", "event_timestamp"], kind="stable")
        before = (ordered.groupby("user_id").cumcount(ascending=False) >= 2).to_numpy()
        parts = tuple(ordered[m].sort_values("event_timestamp", kind="stable") for m in (before, ~before))
    return parts[0].reset_index(drop=True), parts[1].reset_index(drop=True)


def split_validation(events: pd.DataFrame, split: SplitConfig) -> pd.DataFrame | None:
    """The validation events a split holds out itself: loo's second-last event of each user (the test
    target is the last); None for temporal (validation then comes from the training events)."""
    if split.split != "loo":
        return None
    rest = after_cut(events, split).sort_values(["user_id", "event_timestamp"], kind="stable")
    return rest[rest.groupby("user_id").cumcount(ascending=False) == 1]


def launched_items(events: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """(m,) sorted raw ids of the launched items: launch_fraction of the items with train events, drawn
    within N_STRATA equal strata of their train-period event count (so launches look like the catalogue's
    items, popular and niche alike). Empty for loo or launch_fraction 0."""
    if cfg.split != "temporal" or cfg.launch_fraction <= 0:
        return np.zeros(0, np.int64)
    counts = train_events(events, cfg)["item_id"].value_counts()
    ids = counts.index.to_numpy(np.int64)
    rng = np.random.default_rng(cfg.launch_seed)
    # popularity order, ties broken at random (by the seed) so a stratum boundary does not follow ids
    order = np.lexsort((rng.permutation(len(ids)), counts.to_numpy()))
    chosen = []
    for stratum in np.array_split(ids[order], N_STRATA):
        n = int(round(cfg.launch_fraction * len(stratum)))
        chosen.append(rng.choice(stratum, size=n, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def learnable_events(
    events: pd.DataFrame, cfg: SplitConfig, train: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The events a model may learn from: the cut's training events (`train`, when the caller has them),
    less the launched items' (launch)."""
    train = train_events(events, cfg) if train is None else train
    if cfg.cold != "launch":
        return train
    keep = ~train["item_id"].isin(launched_items(events, cfg))
    return train[keep.to_numpy()].reset_index(drop=True)


def held_out_items(events: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Raw ids a model must not learn anything about from events: the launched items in launch mode."""
    return launched_items(events, cfg) if cfg.cold == "launch" else np.zeros(0, np.int64)
