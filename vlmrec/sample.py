"""The built-in sample dataset: a small synthetic shop whose clicks a sequence model can learn.

    python -m vlmrec.sample --out .vlmrec/sample/raw --seed 0     # events.csv, catalogue.csv, images/

Products have a category (its shape in the image), a colour (the image's fill), a style (the image's
pattern) and a material (text only). Titles read "Crimson vintage leather bag"; the text repeats the
attributes in words. About 15% of the items are released during the timeline (natural cold items).

Users have favourite colours, a favourite style and a category mix. Each click is, with fixed odds, like the
previous click (same category or same colour), a "complement" of it (bags after shoes, hats after shirts,
...), uniform noise, or drawn from the user's taste alone, always among the items that exist at that time.
Same seed -> byte-identical CSVs and images.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# category -> (noun in titles, materials, complement category)
CATEGORIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "shoes": ("shoes", ("leather", "canvas", "suede"), "bags"),
    "bags": ("bag", ("leather", "canvas", "nylon"), "shoes"),
    "shirts": ("shirt", ("cotton", "linen", "wool"), "hats"),
    "hats": ("hat", ("wool", "straw", "cotton"), "shirts"),
    "lamps": ("lamp", ("brass", "glass", "wood"), "clocks"),
    "clocks": ("clock", ("wood", "brass", "steel"), "lamps"),
    "mugs": ("mug", ("ceramic", "stoneware", "enamel"), "vases"),
    "vases": ("vase", ("glass", "ceramic", "stoneware"), "mugs"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "crimson": (200, 30, 50),
    "navy": (30, 45, 120),
    "emerald": (20, 150, 90),
    "mustard": (220, 170, 30),
    "charcoal": (60, 60, 66),
    "coral": (250, 120, 90),
    "teal": (20, 140, 150),
    "lavender": (170, 140, 210),
}
# style -> (the pattern drawn on the product, how the text describes it)
STYLES: dict[str, tuple[str, str]] = {
    "minimalist": ("plain", "clean lines and a plain finish"),
    "vintage": ("dots", "an old-school polka-dot print"),
    "sporty": ("stripes", "bold horizontal stripes"),
    "floral": ("flowers", "a print of small flowers"),
    "geometric": ("checks", "a checkerboard pattern"),
    "retro": ("diagonal", "diagonal stripes with a retro feel"),
}
# next-click odds: like the last click (same category / same colour), its complement, uniform noise;
# the rest is the user's taste alone
P_SAME_CATEGORY, P_SAME_COLOUR, P_COMPLEMENT, P_NOISE = 0.35, 0.20, 0.15, 0.10
BACKGROUND = (236, 236, 232)


@dataclass(frozen=True)
class SampleConfig:
    seed: int = 0
    n_users: int = 300
    n_items: int = 400
    mean_events: float = 30.0  # per user; a few light users have 3 events, a few heavy ones ~4x the mean
    light_share: float = 0.05
    heavy_share: float = 0.05
    image_size: int = 64  # pixels, square PNG
    start: str = "2024-01-01T00:00:00Z"
    days: int = 60  # length of the timeline
    late_share: float = 0.15  # items created during the timeline instead of at its start
    session_len: int = 6  # mean clicks per session; sessions are a few minutes of clicks


@dataclass(frozen=True)
class SamplePaths:
    events: Path
    catalogue: Path
    images_dir: Path


def generate_sample(out_dir: str | Path, config: SampleConfig = SampleConfig()) -> SamplePaths:
    """Write events.csv, catalogue.csv and images/<item_id>.png under `out_dir` (about 1 s by default)."""
    out = Path(out_dir).absolute()
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    start = pd.Timestamp(config.start).tz_convert("UTC").floor("s")
    span_s = config.days * 86400

    items = _make_items(rng, config, images_dir)
    events = _make_events(rng, config, items, span_s)

    for row in items.itertuples():
        _draw(row, rng, config.image_size).save(images_dir / f"{row.item_id}.png", format="PNG")

    catalogue = pd.DataFrame(
        {
            "item_id": items.item_id,
            "title": items.title,
            "text": items.text,
            "category": items.category,
            "image_uri": items.image_uri,
            "created_at": _iso(start, items.created_s),
        }
    )
    events = events.sort_values(["t", "user_id"], kind="stable")
    events_csv = pd.DataFrame(
        {
            "user_id": events.user_id,
            "item_id": events.item_id,
            "event_timestamp": _iso(start, events.t),
            "event_type": "click",
        }
    )
    paths = SamplePaths(out / "events.csv", out / "catalogue.csv", images_dir)
    events_csv.to_csv(paths.events, index=False, lineterminator="\n")
    catalogue.to_csv(paths.catalogue, index=False, lineterminator="\n")
    return paths


def _iso(start: pd.Timestamp, seconds: pd.Series) -> pd.Series:
    ts = start + pd.to_timedelta(np.asarray(seconds, dtype=np.int64), unit="s")
    return pd.Series(ts.strftime("%Y-%m-%dT%H:%M:%SZ"), index=seconds.index)


def _make_items(rng: np.random.Generator, config: SampleConfig, images_dir: Path) -> pd.DataFrame:
    n = config.n_items
    cats, colours, styles = list(CATEGORIES), list(COLOURS), list(STYLES)
    cat = rng.integers(len(cats), size=n)
    col = rng.integers(len(colours), size=n)
    sty = rng.integers(len(styles), size=n)
    mat_pick = rng.integers(1 << 30, size=n)
    n_late = round(config.late_share * n)
    late = np.zeros(n, dtype=bool)
    late[rng.choice(n, size=n_late, replace=False)] = True
    span_s = config.days * 86400
    created_s = np.where(late, rng.integers(int(0.1 * span_s), int(0.85 * span_s), size=n), 0)
    rows = []
    for i in range(n):
        category, colour, style = cats[cat[i]], colours[col[i]], styles[sty[i]]
        noun, materials, _ = CATEGORIES[category]
        material = materials[mat_pick[i] % len(materials)]
        title = f"{colour.capitalize()} {style} {material} {noun}"
        text = (
            f"{title}. A {style} {noun} made of {material}, in {colour}, with {STYLES[style][1]}. "
            f"Category: {category}. Colour: {colour}. Style: {style}. Material: {material}."
        )
        item_id = i + 1
        rows.append((item_id, title, text, category, colour, style, str(images_dir / f"{item_id}.png")))
    items = pd.DataFrame(
        rows, columns=["item_id", "title", "text", "category", "colour", "style", "image_uri"]
    )
    items["cat_idx"], items["col_idx"], items["sty_idx"] = cat, col, sty
    items["created_s"] = created_s.astype(np.int64)
    return items


def _make_events(
    rng: np.random.Generator, config: SampleConfig, items: pd.DataFrame, span_s: int
) -> pd.DataFrame:
    cat = items.cat_idx.to_numpy()
    col = items.col_idx.to_numpy()
    sty = items.sty_idx.to_numpy()
    created = items.created_s.to_numpy()
    n_items, n_cats, n_cols, n_stys = len(items), len(CATEGORIES), len(COLOURS), len(STYLES)
    complement = np.array([list(CATEGORIES).index(CATEGORIES[c][2]) for c in CATEGORIES])
    same_cat = cat[:, None] == cat[None, :]  # (I, I)
    same_col = col[:, None] == col[None, :]
    comp = cat[None, :] == complement[cat][:, None]

    # event counts: mostly log-normal around the mean, a few light (3) and heavy (~4x) users
    kind = rng.random(config.n_users)
    regular_mean = (
        config.mean_events - 3 * config.light_share - 4 * config.mean_events * config.heavy_share
    ) / max(1e-9, 1 - config.light_share - config.heavy_share)
    counts = np.maximum(3, np.round(rng.lognormal(np.log(max(regular_mean, 3)) - 0.125, 0.5, config.n_users)))
    counts = np.where(kind < config.light_share, 3, counts)
    heavy = kind >= 1 - config.heavy_share
    counts = np.where(heavy, np.round(config.mean_events * rng.uniform(3, 5, config.n_users)), counts)
    counts = counts.astype(np.int64)

    users, item_ids, times = [], [], []
    for u in range(config.n_users):
        fav_cols = rng.choice(n_cols, size=2, replace=False)
        fav_sty = rng.integers(n_stys)
        cat_mix = rng.dirichlet(np.full(n_cats, 0.5)) + 0.02
        taste = (
            np.exp(1.6 * (col == fav_cols[0]) + 0.9 * (col == fav_cols[1]) + 1.4 * (sty == fav_sty))
            * cat_mix[cat]
        )
        t = _user_times(rng, int(counts[u]), span_s, config.session_len)
        last = -1
        for ts in t:
            w = taste * (created <= ts)
            r = rng.random()
            if last >= 0:
                w[last] = 0.0
                if r < P_SAME_CATEGORY:
                    w = w * same_cat[last]
                elif r < P_SAME_CATEGORY + P_SAME_COLOUR:
                    w = w * same_col[last]
                elif r < P_SAME_CATEGORY + P_SAME_COLOUR + P_COMPLEMENT:
                    w = w * comp[last]
                elif r < P_SAME_CATEGORY + P_SAME_COLOUR + P_COMPLEMENT + P_NOISE:
                    w = (w > 0).astype(float)
            if w.sum() <= 0:  # nothing matches the mode yet: fall back to any existing item
                w = (created <= ts).astype(float)
                if last >= 0 and w.sum() > 1:
                    w[last] = 0.0
            cw = np.cumsum(w)
            last = min(int(np.searchsorted(cw, rng.random() * cw[-1], side="right")), n_items - 1)
            users.append(u + 1)
            item_ids.append(last + 1)
            times.append(ts)
    return pd.DataFrame({"user_id": users, "item_id": item_ids, "t": np.asarray(times, dtype=np.int64)})


def _user_times(rng: np.random.Generator, n: int, span_s: int, session_len: int) -> np.ndarray:
    """n strictly increasing whole seconds in [0, span_s): sessions of clicks a minute or so apart."""
    n_sessions = max(1, int(np.ceil(n / session_len)))
    first = rng.integers(0, span_s // 2)
    session_starts = np.sort(rng.integers(first, int(span_s * 0.97), size=n_sessions))
    session_of = np.sort(rng.integers(0, n_sessions, size=n))
    session_of[0] = 0
    gaps = rng.exponential(60.0, size=n).astype(np.int64) + 1
    t = np.empty(n, dtype=np.int64)
    prev = -1
    for k in range(n):
        if k == 0 or session_of[k] != session_of[k - 1]:
            cand = session_starts[session_of[k]]
        else:
            cand = prev + gaps[k]
        prev = max(int(cand), prev + 1)
        t[k] = prev
    return np.minimum(t, span_s - 1 - (n - 1 - np.arange(n)))  # stay inside the timeline, still increasing


def _draw(row, rng: np.random.Generator, size: int):
    """The product picture: the category's shape, filled with the item's colour, patterned by its style."""
    from PIL import Image, ImageDraw

    base = np.array(COLOURS[row.colour]) + rng.integers(-14, 15, size=3)
    fill = tuple(int(v) for v in np.clip(base, 0, 255))
    lum = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    accent = (
        tuple(int(v * 0.55) for v in fill) if lum > 110 else tuple(int(v + (255 - v) * 0.6) for v in fill)
    )

    s = size
    texture = Image.new("RGB", (s, s), fill)
    d = ImageDraw.Draw(texture)
    pattern = STYLES[row.style][0]
    step = max(4, s // 8)
    if pattern == "stripes":
        for y in range(0, s, step):
            d.rectangle([0, y, s, y + step // 2 - 1], fill=accent)
    elif pattern == "dots":
        r = max(1, step // 4)
        for y in range(step // 2, s, step):
            for x in range(step // 2, s, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    elif pattern == "flowers":
        r = max(1, step // 5)
        for y in range(step // 2, s, step + 2):
            for x in range(step // 2, s, step + 2):
                for dx, dy in ((-r, 0), (r, 0), (0, -r), (0, r)):
                    d.ellipse([x + dx - r, y + dy - r, x + dx + r, y + dy + r], fill=accent)
                d.ellipse([x - r, y - r, x + r, y + r], fill=(250, 230, 120))
    elif pattern == "checks":
        for y in range(0, s, step):
            for x in range(0, s, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=accent)
    elif pattern == "diagonal":
        for k in range(-s, s, step):
            d.line([(k, s), (k + s, 0)], fill=accent, width=max(1, step // 3))

    mask = Image.new("L", (s, s), 0)
    m = ImageDraw.Draw(mask)
    for kind, pts in _SHAPES[row.category]:
        xy = [(x * s, y * s) for x, y in pts]
        if kind == "poly":
            m.polygon(xy, fill=255)
        elif kind == "ellipse":
            m.ellipse([xy[0], xy[1]], fill=255)
        elif kind == "ring":
            m.ellipse([xy[0], xy[1]], outline=255, width=max(2, s // 14))
    img = Image.new("RGB", (s, s), BACKGROUND)
    img.paste(texture, (0, 0), mask)
    if row.category == "clocks":  # hands on the dial
        c = s / 2
        ImageDraw.Draw(img).line(
            [(c, c), (c, c - s * 0.25), (c, c), (c + s * 0.18, c)], fill=(20, 20, 20), width=2
        )
    return img


# per category: drawing primitives in the unit square (poly: points; ellipse / ring: two corners)
_SHAPES: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {
    "shoes": [("poly", [(0.1, 0.35), (0.4, 0.35), (0.45, 0.55), (0.9, 0.62), (0.92, 0.78), (0.1, 0.78)])],
    "bags": [
        ("poly", [(0.15, 0.4), (0.85, 0.4), (0.9, 0.88), (0.1, 0.88)]),
        ("ring", [(0.3, 0.12), (0.7, 0.6)]),
    ],
    "shirts": [
        (
            "poly",
            [
                (0.35, 0.12),
                (0.65, 0.12),
                (0.92, 0.3),
                (0.82, 0.45),
                (0.72, 0.38),
                (0.72, 0.9),
                (0.28, 0.9),
                (0.28, 0.38),
                (0.18, 0.45),
                (0.08, 0.3),
            ],
        )
    ],
    "hats": [
        ("poly", [(0.3, 0.25), (0.7, 0.25), (0.76, 0.65), (0.24, 0.65)]),
        ("ellipse", [(0.05, 0.58), (0.95, 0.78)]),
    ],
    "lamps": [
        ("poly", [(0.3, 0.1), (0.7, 0.1), (0.85, 0.45), (0.15, 0.45)]),
        ("poly", [(0.46, 0.45), (0.54, 0.45), (0.54, 0.82), (0.46, 0.82)]),
        ("poly", [(0.28, 0.82), (0.72, 0.82), (0.72, 0.9), (0.28, 0.9)]),
    ],
    "clocks": [("ellipse", [(0.1, 0.1), (0.9, 0.9)])],
    "mugs": [
        ("poly", [(0.15, 0.25), (0.65, 0.25), (0.65, 0.88), (0.15, 0.88)]),
        ("ring", [(0.52, 0.38), (0.9, 0.74)]),
    ],
    "vases": [
        (
            "poly",
            [
                (0.4, 0.08),
                (0.6, 0.08),
                (0.58, 0.3),
                (0.8, 0.55),
                (0.7, 0.92),
                (0.3, 0.92),
                (0.2, 0.55),
                (0.42, 0.3),
            ],
        )
    ],
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmrec.sample", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for events.csv, catalogue.csv, images/"
    )
    defaults = SampleConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--users", type=int, default=defaults.n_users)
    parser.add_argument("--items", type=int, default=defaults.n_items)
    args = parser.parse_args(argv)
    paths = generate_sample(args.out, SampleConfig(seed=args.seed, n_users=args.users, n_items=args.items))
    print(f"wrote {paths.events}, {paths.catalogue}, {paths.images_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
