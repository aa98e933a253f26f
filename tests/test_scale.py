"""The scale generator (issue 20): a real dataset grown to N events and M items keeps its structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlmrec.scale import ScaleConfig, scale


@pytest.fixture
def base():
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, 21):
        n = int(rng.integers(3, 15))
        times = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(
            np.sort(rng.integers(0, 86400 * 30, n)), "s"
        )
        items = rng.choice(np.arange(100, 130), size=n, p=np.r_[np.full(5, 0.1), np.full(25, 0.02)])
        rows += [(user, int(i), t) for i, t in zip(items, times, strict=True)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp"])
    catalogue = pd.DataFrame({"item_id": np.arange(100, 130), "title": [f"item {i}" for i in range(30)],
                              "created_at": pd.Timestamp("2024-01-01", tz="UTC")})  # fmt: skip
    return events, catalogue


def test_the_grown_data_keeps_the_base_and_its_users_shapes(base):
    events, catalogue = base
    out, items = scale(events, catalogue, ScaleConfig(n_events=2_000, n_items=100, seed=1))
    assert len(out) == 2_000 and len(items) == 100 and items["item_id"].is_unique
    assert (
        out.head(len(events))
        .reset_index(drop=True)
        .equals(events.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True))
    )  # the base comes first, unchanged
    assert out["item_id"].isin(items["item_id"]).all()
    assert (
        out["event_timestamp"].between(events["event_timestamp"].min(), events["event_timestamp"].max()).all()
    )
    stride = int(catalogue["item_id"].max()) + 1
    assert set(out["item_id"] % stride) <= set(catalogue["item_id"])  # every click is a clone of a base item
    synthetic = out.iloc[len(events) :]
    base_seqs = {tuple(g["item_id"]) for _, g in events.groupby("user_id")}
    for _, g in synthetic.groupby("user_id"):  # each synthetic user replays a base user's items, in order
        seq = tuple(g.sort_values("event_timestamp", kind="stable")["item_id"] % stride)
        assert any(b[: len(seq)] == seq for b in base_seqs)
    clones = items[items["item_id"] >= stride]
    assert clones["title"].str.contains("edition").all()
    first = out.groupby("item_id")["event_timestamp"].min()  # no click before its item exists
    created = items.set_index("item_id")["created_at"]
    assert (created.loc[first.index] <= first).all()
    again, _ = scale(events, catalogue, ScaleConfig(n_events=2_000, n_items=100, seed=1))
    assert again.equals(out)  # deterministic by seed
    other, _ = scale(events, catalogue, ScaleConfig(n_events=2_000, n_items=100, seed=2))
    assert not other.equals(out)


def test_scale_refuses_what_it_cannot_grow(base):
    events, catalogue = base
    with pytest.raises(ValueError, match="n_events"):
        ScaleConfig(n_events=0, n_items=10)
    with pytest.raises(ValueError, match="user_id"):
        scale(events.drop(columns=["user_id"]), catalogue, ScaleConfig(100, 10))
    with pytest.raises(ValueError, match="catalogue does not hold"):
        scale(events.assign(item_id=999), catalogue, ScaleConfig(100, 10))


def test_the_stage_sampler_reads_rss_and_stops_a_tree_past_its_limit():
    """benchmarks/scale.py's sampler: peaks from RSS; PSS (a page-table walk) only when asked for, or once the
    tree's RSS passes the limit, where it decides the kill."""
    import subprocess
    import sys

    from benchmarks.scale import sample_tree

    hold = "import time; b = bytearray(64 * 2**20); time.sleep({})"
    got = sample_tree(subprocess.Popen([sys.executable, "-c", hold.format(1.0)]), every_s=0.05)
    assert got["driver_mb"] >= 64 and "tree_mb" not in got and "stopped" not in got
    got = sample_tree(subprocess.Popen([sys.executable, "-c", hold.format(1.0)]), every_s=0.05, pss=True)
    assert got["tree_mb"] >= 64
    proc = subprocess.Popen([sys.executable, "-c", hold.format(60)])
    got = sample_tree(proc, every_s=0.05, limit_mb=32)
    assert proc.returncode is not None and "(PSS)" in got["stopped"] and got["wall_s"] < 30
