"""UIConfig: where the page finds the Producer, the catalogue and the images.

cfg = UIConfig(api_url="http://127.0.0.1:8000", workdir=".vlmrec/movielens")
os.environ[ENV] = cfg.to_json()          # what `vlmrec ui` does for the page process
UIConfig.from_env(os.environ)            # what the page does, once, at its top
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from vlmrec.workspace import DEFAULT_WORKDIR

ENV = "VLMREC_UI"  # the page's config, JSON


@dataclass(frozen=True)
class UIConfig:
    api_url: str = "http://127.0.0.1:8000"  # the Producer (vlmrec serve's default address)
    workdir: str = str(DEFAULT_WORKDIR)  # catalogue (titles, categories, image_uri) and events (users)
    # <images_dir>/<item_id>.{png,jpg,jpeg,webp} (e.g. ../shared/data/movielens-small/posters);
    # None = the catalogue's image_uri (the sample's drawn images, MovieLens posters as ingested)
    images_dir: str | None = None
    k: int = 10  # candidates per producer shown at first (the page's slider changes it)
    timeout_s: float = 5.0  # per HTTP call: above it the Producer counts as down
    host: str = "127.0.0.1"  # where the page listens
    port: int = 8501

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 100:
            raise ValueError(f"k must be in 1..100, got {self.k}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must start with http:// or https://, got {self.api_url!r}")

    @property
    def page_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> UIConfig:
        """From env[ENV] (JSON; unknown keys are an error); defaults when it is not set."""
        d = json.loads(env.get(ENV) or "{}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{ENV}: unknown keys {unknown}")
        return cls(**d)
