"""Where every stage reads and writes: one folder per dataset (a "workspace").

    <workdir>/
      data/events.parquet            user_id, item_id, event_timestamp, event_type      (ingest)
      data/events_log/hour=<h>/      the same + request_id, position: served events    (the Producer)
      data/items.parquet             item_id, title, text, category, image_uri, created_at, event_timestamp
      data/click_sequences.parquet   user_id, event_timestamp, item_ids, click_times    (ingest; a row per user)
      data/item_embeddings.parquet   item_id, event_timestamp, vector, teacher_id       (embed)
      feature_store.yaml, registry.db, online.db                                        (features)
      runs/<name>/                   checkpoints and the exported model                 (train)
      index/                         index versions and the current pointer             (index)
      indexes/<name>/                the same for the other producers: indexes/<run> of a run's
                                     export (e.g. sasrec), indexes/teacher of the raw teacher vectors
      exposures/hour=<h>/            what the Producer served, one record per answer   (the Producer)

The Feast definitions in feature_repo/ name their sources relative to this folder, which is the repo_path
of the FeatureStore that `vlmrec features` builds.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = Path(".vlmrec/sample")
TEACHER_INDEX = "teacher"  # indexes/teacher: the raw teacher vectors (the `similar` producer searches it)


def check_name(name: str, what: str) -> str:
    """A run's or an index's name: one folder under the workspace, never a path out of it. -> name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise ValueError(
            f"{what} must be a folder name (letters, digits, '.', '_', '-', starting with a letter or digit), "
            f"got {name!r}"
        )
    return name


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def events(self) -> Path:
        return self.data / "events.parquet"

    @property
    def events_log(self) -> Path:
        return self.data / "events_log"

    @property
    def exposures(self) -> Path:
        return self.root / "exposures"

    @property
    def items(self) -> Path:
        return self.data / "items.parquet"

    @property
    def sequences(self) -> Path:
        return self.data / "click_sequences.parquet"

    @property
    def embeddings(self) -> Path:
        return self.data / "item_embeddings.parquet"

    @property
    def feature_store_yaml(self) -> Path:
        return self.root / "feature_store.yaml"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def serve_config(self) -> Path:
        """The `serve deploy` config `vlmrec serve` applied last (serving/cli.py); `vlmrec refresh` edits it."""
        return self.root / "serve.json"

    def need(self, path: Path, stage: str) -> Path:
        """path, or FileNotFoundError naming it and the `vlmrec` stage that writes it."""
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `vlmrec {stage} --workdir {self.root}`")
        return path

    def export(self, run: str) -> Path:
        """runs/<run>/export, the folder `vlmrec train` exports a run to; FileNotFoundError naming the command
        that trains it when it holds no export."""
        folder = self.runs / check_name(run, "a run name") / "export"
        if not (folder / "run.json").is_file():
            raise FileNotFoundError(
                f"no export of run {run!r} at {folder}: run `vlmrec train --workdir {self.root} --name {run}`"
            )
        return folder

    def named_index(self, name: str) -> Path:
        """indexes/<name>: a run's own index (`vlmrec index build --run NAME`) or the teacher's."""
        return self.root / "indexes" / check_name(name, "an index name")

    def ensure(self) -> Workspace:
        self.data.mkdir(parents=True, exist_ok=True)
        return self


def atomic_write_parquet(table, path: Path) -> None:
    """Write a pyarrow Table next to `path`, then rename it into place: never a half-written file."""
    with atomic_parquet_writer(path, table.schema) as writer:
        writer.write_table(table)


@contextmanager
def atomic_parquet_writer(path: Path, schema) -> Iterator:
    """A pyarrow ParquetWriter on a file next to `path`, renamed into place when the block ends; removed if
    it fails. For tables written a part at a time (`vlmrec embed`'s windows):

        with atomic_parquet_writer(ws.embeddings, schema.ITEM_EMBEDDINGS) as writer:
            writer.write_table(part)
    """
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            yield writer
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Build a folder next to `final`, then swap it in: readers see the old folder or the new one, never a
    half-written one; if the block fails, the new one is removed and the old one stays.

        with staged_dir(run_dir / "export") as tmp:
            (tmp / "run.json").write_text(...)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}-old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
