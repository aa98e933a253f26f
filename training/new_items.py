"""`python -m training.new_items`: item vectors for the catalogue items a trained export has never seen.

    python -m training.new_items --workdir W --run student        # -> W/runs/student/new_item_vectors.parquet
    vlmrec index upsert --workdir W --vectors W/runs/student/new_item_vectors.parquet   # cold start, no rebuild

A content-space student (frozen, whitened, adapter; the hybrid too) gives any item a vector from its teacher
vector alone (`SeqRec.item_vectors_for`). This reads the teacher vectors `vlmrec embed` wrote
(data/item_embeddings.parquet), keeps the items outside the model's vocabulary, maps them into the model's
item space and writes the table the index upserts (item_id, vector, teacher_id). No new item writes a table
with no rows, which `vlmrec index upsert` takes as a no-op. The Kubernetes catalogue CronJob runs
embed -> this -> index upsert (k8s/base/cronjobs.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.model import SeqRec
from vlmrec.schema import teacher_of
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace, atomic_write_parquet

OUT_NAME = "new_item_vectors.parquet"  # written next to the run's export: runs/<run>/new_item_vectors.parquet


@dataclass(frozen=True)
class NewItemsConfig:
    workdir: str = str(DEFAULT_WORKDIR)
    run: str = "student"  # the run whose export is served
    model_path: str | None = None  # the export folder; None = <workdir>/runs/<run>/export
    out: str | None = None  # None = <workdir>/runs/<run>/new_item_vectors.parquet
    batch_size: int = 8192  # teacher vectors per forward of the item head (memory bound only)

    @property
    def export_dir(self) -> Path:
        return (
            Path(self.model_path) if self.model_path else Workspace(self.workdir).runs / self.run / "export"
        )

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Workspace(self.workdir).runs / self.run / OUT_NAME


def new_item_vectors(export_dir: Path, embeddings: Path, batch_size: int = 8192) -> pa.Table:
    """The model-space vectors of every embedded item outside the export's vocabulary: item_id, vector,
    teacher_id. Refuses vectors of another teacher than the one the model was trained on."""
    export_dir = Path(export_dir)
    if not (export_dir / "model").is_dir() or not (export_dir / "run.json").exists():
        raise FileNotFoundError(f"no export at {export_dir} (model/, run.json): train first")
    if not Path(embeddings).exists():
        raise FileNotFoundError(f"{embeddings} is missing: run `vlmrec embed` first")
    teacher_id = str(json.loads((export_dir / "run.json").read_text())["teacher_id"])
    model = SeqRec.from_pretrained(export_dir / "model")
    if model.cfg.item_space == "id":
        raise ValueError(
            f"{export_dir}: item_space 'id' gives no vector to an item it was not trained on; "
            "serve a content-space student (frozen / whitened / adapter) for cold-start items"
        )
    held = teacher_of(embeddings)
    if held != teacher_id:
        raise ValueError(
            f"{embeddings}: column teacher_id holds {held!r} but the model was trained on "
            f"{teacher_id!r}; retrain on the new teacher instead of mixing spaces"
        )
    table = pq.read_table(embeddings, columns=["item_id", "vector", "teacher_id"])
    ids = table.column("item_id").to_numpy().astype(np.int64)
    vocabulary = model.item_ids[1:].cpu().numpy()
    new = ~np.isin(ids, vocabulary)
    if not new.any():
        return _vector_table(np.zeros(0, np.int64), np.zeros((0, model.cfg.out_dim), np.float32), teacher_id)
    rows = table.column("vector").to_numpy(zero_copy_only=False)[new]
    teacher = np.stack(rows).astype(np.float32)  # (m, D)
    if teacher.shape[1] != model.cfg.teacher_dim:
        raise ValueError(
            f"{embeddings}: column vector has dim {teacher.shape[1]}, the model expects {model.cfg.teacher_dim}"
        )
    with torch.inference_mode():
        vectors = np.concatenate(
            [
                model.item_vectors_for(torch.from_numpy(teacher[a : a + batch_size])).float().numpy()
                for a in range(0, len(teacher), batch_size)
            ]
        )  # (m, out_dim)
    return _vector_table(ids[new], vectors, teacher_id)


def _vector_table(ids: np.ndarray, vectors: np.ndarray, teacher_id: str) -> pa.Table:
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "vector": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32())),
            "teacher_id": pa.array([teacher_id] * len(ids), pa.string()),
        }
    )


def run(config: NewItemsConfig) -> tuple[Path, int]:
    table = new_item_vectors(config.export_dir, Workspace(config.workdir).embeddings, config.batch_size)
    atomic_write_parquet(table, config.out_path)
    return config.out_path, table.num_rows


def build_parser() -> argparse.ArgumentParser:
    d = NewItemsConfig()
    parser = argparse.ArgumentParser(prog="python -m training.new_items", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=d.workdir, help="the workspace folder")
    parser.add_argument("--run", default=d.run, help="the served run: <workdir>/runs/<run>/export")
    parser.add_argument("--model-path", default=None, help="an export folder (default: from --run)")
    parser.add_argument("--out", default=None, help=f"default: <workdir>/runs/<run>/{OUT_NAME}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = NewItemsConfig(args.workdir, args.run, args.model_path, args.out, args.batch_size)
    try:
        out, n = run(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"new_items: error: {err}", file=sys.stderr)
        return 2
    print(f"new_items: {n} items outside {config.export_dir}'s vocabulary -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
