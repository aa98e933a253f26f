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


@dataclass(frozen=True, eq=False)
class Catalogue:
    items: pd.DataFrame  # index item_id; title, category, image (a readable file path or None)
    users: list[int]  # most active first (ties: lower id first)
    categories: list[str]

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
    items = pq.read_table(ws.items, columns=["item_id", "title", "category", "image_uri"]).to_pandas()
    items["image"] = [
        image_path(i, u, images_dir) for i, u in zip(items["item_id"], items["image_uri"], strict=True)
    ]
    items = items.set_index("item_id")
    users: list[int] = []
    if ws.events.exists():
        counts = pq.read_table(ws.events, columns=["user_id"]).to_pandas()["user_id"].value_counts()
        users = sorted(counts.index.astype(int), key=lambda u: (-counts[u], u))
    categories = sorted(items["category"].dropna().astype(str).unique())
    return Catalogue(items[["title", "category", "image"]], users, categories)
