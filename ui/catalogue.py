"""What the page shows about items and offers as users: titles, categories, images by path, active users.

cat = load_catalogue(".vlmrec/movielens", images_dir="../shared/data/movielens-small/posters")
cat.title(1), cat.category(1), cat.image(1)     # "Toy Story (1995)", "Adventure", ".../posters/1.jpg"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from vlmrec.workspace import Workspace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


NEW_DAYS = 30.0  # an item added this recently (before the data's last event) gets a "new" badge


@dataclass(frozen=True, eq=False)
class Catalogue:
    items: pd.DataFrame  # index item_id; title, category, image (a readable file path or None), added
    users: list[int]  # most active first (ties: lower id first)
    categories: list[str]
    now: pd.Timestamp | None = None  # the data's last event: "new" is relative to it

    def new_days(self, item_id: int) -> float | None:
        """Days since the item was added (catalogue created_at) when under NEW_DAYS, else None: a launch."""
        added = self.items["added"].get(item_id) if "added" in self.items else None
        if added is None or pd.isna(added) or self.now is None:
            return None
        days = (self.now - added) / pd.Timedelta(days=1)
        return float(days) if 0 <= days < NEW_DAYS else None

    def title(self, item_id: int) -> str:
        return str(self.items["title"].get(item_id, f"item {item_id}"))

    def category(self, item_id: int) -> str:
        return str(self.items["category"].get(item_id, "?"))

    def image(self, item_id: int) -> str | None:
        return self.items["image"].get(item_id)


def image_path(item_id: int, image_uri: str | None, images_dir: str | None) -> str | None:
    """<images_dir>/<item_id>.<png|jpg|jpeg|webp> when images_dir is set, else the catalogue's image_uri;
    only a file that exists (the page shows a placeholder otherwise)."""
    if images_dir:
        for suffix in IMAGE_SUFFIXES:
            p = Path(images_dir) / f"{int(item_id)}{suffix}"
            if p.is_file():
                return str(p)
        return None
    if image_uri and Path(image_uri).is_file():
        return str(image_uri)
    return None


def load_catalogue(workdir: str, images_dir: str | None = None) -> Catalogue:
    ws = Workspace(Path(workdir))
    if not ws.items.exists():
        raise FileNotFoundError(f"no catalogue at {ws.items}: run `vlmrec ingest --workdir {workdir}`")
    columns = ["item_id", "title", "category", "image_uri", "created_at"]
    items = pq.read_table(ws.items, columns=columns).to_pandas()
    items["added"] = pd.to_datetime(items.pop("created_at"), utc=True)
    items["image"] = [
        image_path(i, u, images_dir) for i, u in zip(items["item_id"], items["image_uri"], strict=True)
    ]
    items = items.set_index("item_id")
    users: list[int] = []
    now = None
    if ws.events.exists():
        events = pq.read_table(ws.events, columns=["user_id", "event_timestamp"]).to_pandas()
        counts = events["user_id"].value_counts()
        users = sorted(counts.index.astype(int), key=lambda u: (-counts[u], u))
        now = pd.to_datetime(events["event_timestamp"], utc=True).max() if len(events) else None
    categories = sorted(items["category"].dropna().astype(str).unique())
    return Catalogue(items[["title", "category", "image", "added"]], users, categories, now)
