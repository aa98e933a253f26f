"""`vlmrec embed`: embed the catalogue with the teacher into data/item_embeddings.parquet.

    vlmrec embed --workdir .vlmrec/sample                       # minilm (text), the offline default
    vlmrec embed --teacher siglip --teacher-path /models/siglip-base-patch16-224 --image-weight 0.5
    vlmrec embed --teacher .vlmrec/sample/runs/teacher/export              # a teacher tuned by `vlmrec tune`

Runs on Ray Data: `map_batches` over an actor pool (each actor loads the teacher once), batch size and pool
size configurable, with Ray Data's progress bars; batches hold texts of similar length (less padding). An item's vector fuses its image and text vectors; an item
without a usable image falls back to text and is counted. The teacher's model id travels with every vector.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from teacher.encoders import TeacherConfig, embed_items, item_text, load_teacher, resolve_teacher
from vlmrec import schema
from vlmrec.workspace import Workspace, atomic_write_parquet


@dataclass(frozen=True)
class EmbedConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    num_actors: int = 1  # teacher replicas in the Ray Data actor pool (each holds a model copy)
    batch_size: int = 64  # items per map_batches call
    # Batches of texts of similar length: a batch is padded to its longest text, so the catalogue is cut
    # into batches in order of text length (the output keeps the catalogue's order).
    sort_by_length: bool = True


def _load_image(uri):
    from PIL import Image

    if uri is None or (isinstance(uri, float) and np.isnan(uri)) or uri == "":
        return None
    try:
        with Image.open(uri) as img:
            return img.convert("RGB")
    except (OSError, ValueError):
        return None


class ItemEmbedder:
    """A Ray Data actor: loads the teacher once, embeds batches of catalogue rows."""

    def __init__(self, teacher: TeacherConfig):
        self.teacher = load_teacher(teacher)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = [item_text(t, x) for t, x in zip(batch["title"], batch["text"], strict=True)]
        if self.teacher.supports_images:
            images = [_load_image(u) for u in batch["image_uri"]]
        else:
            images = [None] * len(batch)
        has_uri = batch["image_uri"].notna().to_numpy()
        vectors, _ = embed_items(self.teacher, texts, images)  # (B, D)
        used_image = np.array([img is not None for img in images])
        return pd.DataFrame(
            {
                "item_id": batch["item_id"].to_numpy(),
                "vector": list(vectors.astype(np.float32)),
                "teacher_id": self.teacher.model_id,
                "text_fallback": ~used_image,
                "image_unreadable": has_uri & ~used_image & self.teacher.supports_images,
            }
        )


def embed_catalogue(ws: Workspace, config: EmbedConfig = EmbedConfig()) -> dict:
    """Embed every item of ws.items; write ws.embeddings atomically. Returns a summary."""
    import ray

    from vlmrec.raycluster import init_ray

    items = pq.read_table(ws.items).to_pandas()
    if items.empty:
        raise ValueError(f"{ws.items}: no items to embed")
    init_ray()
    t0 = time.perf_counter()
    # Blocks cut here in the driver: a Ray Data repartition task would wait forever for a CPU that the
    # actor pool holds on a small machine.
    n_blocks = max(1, min(len(items) // config.batch_size, 4 * config.num_actors))
    columns = items[["item_id", "title", "text", "image_uri"]]
    if config.sort_by_length:
        lengths = [len(item_text(t, x)) for t, x in zip(columns["title"], columns["text"], strict=True)]
        columns = columns.iloc[np.argsort(lengths, kind="stable")]
    ds = ray.data.from_pandas(
        [columns.iloc[idx] for idx in np.array_split(np.arange(len(columns)), n_blocks)]
    )
    out = ds.map_batches(
        ItemEmbedder,
        fn_constructor_kwargs={"teacher": config.teacher},
        batch_size=config.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
    ).to_pandas()
    seconds = time.perf_counter() - t0
    out = out.set_index("item_id").loc[items["item_id"].to_numpy()].reset_index()
    teacher_ids = out["teacher_id"].unique()
    assert len(teacher_ids) == 1, f"one teacher per run, got {teacher_ids}"
    table = pa.table(
        {
            "item_id": pa.array(out["item_id"].to_numpy(), pa.int64()),
            "event_timestamp": items["event_timestamp"].to_numpy(),
            "vector": pa.array([v.tolist() for v in out["vector"]], pa.list_(pa.float32())),
            "teacher_id": pa.array(out["teacher_id"].astype(str), pa.string()),
        }
    ).cast(schema.ITEM_EMBEDDINGS)
    atomic_write_parquet(table, ws.embeddings)
    return {
        "items": len(out),
        "teacher_id": str(teacher_ids[0]),
        "dim": len(out["vector"].iloc[0]),
        "text_fallback": int(out["text_fallback"].sum()),
        "image_unreadable": int(out["image_unreadable"].sum()),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(out) / seconds, 1),
        "config": asdict(config),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TeacherConfig()
    parser.add_argument("--workdir", type=Path, default=Path(".vlmrec/sample"), help="the workspace folder")
    parser.add_argument(
        "--teacher", default=d.name, help="minilm | siglip | jina-clip-v2 | lit, or a tuned teacher's folder"
    )
    parser.add_argument("--teacher-path", default=None, help="model folder (or a tuned teacher's export)")
    parser.add_argument("--teacher-revision", default=None, help="pinned revision for remote code")
    parser.add_argument("--dim", type=int, default=None, help="Matryoshka truncation (jina-clip-v2)")
    parser.add_argument("--image-weight", type=float, default=d.image_weight)
    parser.add_argument("--batch-size", type=int, default=EmbedConfig.batch_size)
    parser.add_argument("--num-actors", type=int, default=EmbedConfig.num_actors)
    parser.add_argument(
        "--no-sort-by-length",
        dest="sort_by_length",
        action="store_false",
        help="batch in catalogue order (default: texts of similar length together)",
    )


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    name, path = resolve_teacher(args.teacher, args.teacher_path)  # a tuned folder names its own teacher
    teacher = TeacherConfig(
        name=name,
        path=path,
        revision=args.teacher_revision,
        dim=args.dim,
        image_weight=args.image_weight,
        batch_size=args.batch_size,
    )
    return EmbedConfig(
        teacher=teacher,
        num_actors=args.num_actors,
        batch_size=args.batch_size,
        sort_by_length=getattr(args, "sort_by_length", True),
    )


def run(args: argparse.Namespace) -> dict:
    report = embed_catalogue(Workspace(args.workdir), config_from_args(args))
    print(
        f"embed: {report['items']} items, dim {report['dim']}, teacher {report['teacher_id']}, "
        f"{report['items_per_s']} items/s; text fallback {report['text_fallback']} "
        f"(unreadable images {report['image_unreadable']})"
    )
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m teacher.embed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
