"""The built-in sample: deterministic, the right sizes, readable images, learnable taste and sequences.

pytest -q tests/test_sample.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmrec.sample import CATEGORIES, COLOURS, STYLES, SampleConfig, generate_sample

CONFIG = SampleConfig(seed=3, n_users=120, n_items=160, mean_events=30, image_size=48)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    paths = generate_sample(out, CONFIG)
    events = pd.read_csv(paths.events)
    catalogue = pd.read_csv(paths.catalogue)
    events["event_timestamp"] = pd.to_datetime(events["event_timestamp"], utc=True)
    catalogue["created_at"] = pd.to_datetime(catalogue["created_at"], utc=True)
    words = catalogue["title"].str.lower().str.split()
    catalogue["colour"], catalogue["style"] = words.str[0], words.str[1]
    merged = events.merge(catalogue, on="item_id", how="left", validate="many_to_one")
    return paths, events, catalogue, merged


def test_same_seed_same_bytes(tmp_path, sample):
    paths = sample[0]
    again = generate_sample(tmp_path / "b", CONFIG)
    assert again.events.read_bytes() == paths.events.read_bytes()
    assert again.catalogue.read_text() == paths.catalogue.read_text().replace(
        str(paths.images_dir), str(again.images_dir)
    )
    for name in ("1.png", f"{CONFIG.n_items}.png"):
        assert (again.images_dir / name).read_bytes() == (paths.images_dir / name).read_bytes()
    other = generate_sample(tmp_path / "c", SampleConfig(seed=4, n_users=20, n_items=30))
    assert other.events.read_bytes()[:2000] != paths.events.read_bytes()[:2000]


def test_sizes_columns_and_titles(sample):
    _, events, catalogue, merged = sample
    assert list(events.columns) == ["user_id", "item_id", "event_timestamp", "event_type"]
    assert list(catalogue.columns[:6]) == ["item_id", "title", "text", "category", "image_uri", "created_at"]
    assert len(catalogue) == CONFIG.n_items and catalogue["item_id"].is_unique
    assert events["user_id"].nunique() == CONFIG.n_users
    assert merged["title"].notna().all()  # every click is on a catalogue item
    counts = events.groupby("user_id").size()
    assert counts.min() == 3 and (counts == 3).sum() >= 2  # some light users
    assert counts.max() >= 2.5 * CONFIG.mean_events  # some heavy users
    assert 0.7 * CONFIG.mean_events < counts.mean() < 1.3 * CONFIG.mean_events
    assert set(catalogue["category"]) <= set(CATEGORIES) and catalogue["category"].nunique() >= 6
    assert set(catalogue["colour"]) <= set(COLOURS) and set(catalogue["style"]) <= set(STYLES)
    row = catalogue.iloc[0]
    assert row["colour"] in row["text"] and row["style"] in row["text"] and row["category"] in row["text"]


def test_images_readable_and_coloured(sample):
    _, _, catalogue, _ = sample
    for row in catalogue.itertuples():
        with Image.open(row.image_uri) as im:
            assert im.size == (CONFIG.image_size, CONFIG.image_size) and im.mode == "RGB"
            pixels = np.asarray(im).reshape(-1, 3).astype(int)
        # the item's named colour (with jitter) fills a good part of the picture
        dist = np.abs(pixels - np.array(COLOURS[row.colour])).max(axis=1)
        assert (dist <= 16).mean() > 0.1, row.title


def test_late_items_and_no_click_before_creation(sample):
    _, events, catalogue, merged = sample
    start = pd.Timestamp(CONFIG.start)
    late = catalogue["created_at"] > start
    assert late.sum() == round(CONFIG.late_share * CONFIG.n_items)
    assert (catalogue.loc[~late, "created_at"] == start).all()
    assert (merged["event_timestamp"] >= merged["created_at"]).all()
    assert (
        merged.loc[merged["created_at"] > start, "item_id"].nunique() > 0.5 * late.sum()
    )  # late items get clicks
    assert events["event_timestamp"].min() >= start
    assert events["event_timestamp"].max() < start + pd.Timedelta(days=CONFIG.days)
    per_user = events.groupby("user_id")["event_timestamp"]
    assert per_user.apply(lambda s: s.is_monotonic_increasing and s.is_unique).all()


def _top_share(df: pd.DataFrame, column: str) -> float:
    return df.groupby("user_id")[column].agg(lambda s: s.value_counts(normalize=True).iloc[0]).mean()


def test_clicks_follow_taste(sample):
    _, _, _, merged = sample
    active = merged.groupby("user_id").filter(lambda g: len(g) >= 20)
    shuffled = active.copy()
    perm = np.random.default_rng(0).permutation(len(active))
    shuffled[["colour", "style"]] = active[["colour", "style"]].to_numpy()[perm]  # same popularity, no taste
    for column in ("colour", "style"):
        assert _top_share(active, column) > _top_share(shuffled, column) + 0.07, column
    assert _top_share(active, "colour") > 2 * (1 / len(COLOURS))


def test_next_click_is_like_the_last(sample):
    _, _, _, merged = sample
    seq = merged.sort_values(["user_id", "event_timestamp"], kind="stable")
    same_user = seq["user_id"].eq(seq["user_id"].shift()).to_numpy()

    def similar(s: pd.DataFrame) -> float:
        like = s["category"].eq(s["category"].shift()) | s["colour"].eq(s["colour"].shift())
        return like.to_numpy()[same_user].mean()

    shuffled = seq.copy()
    rng = np.random.default_rng(0)
    shuffled[["category", "colour"]] = (
        seq.groupby("user_id")[["category", "colour"]]
        .transform(lambda c: c.to_numpy()[rng.permutation(len(c))])
        .to_numpy()
    )  # same user's items, order destroyed
    assert similar(seq) > similar(shuffled) + 0.15
