"""`vlmrec embed`: embed the catalogue with the teacher into data/item_embeddings.parquet.

    vlmrec embed --workdir .vlmrec/sample                       # minilm (text), the offline default
    vlmrec embed --teacher siglip --teacher-path /models/siglip-base-patch16-224 --image-weight 0.5
    vlmrec embed --teacher .vlmrec/sample/runs/teacher/export              # a teacher tuned by `vlmrec tune`
    vlmrec embed --workdir .vlmrec/big --precision bf16                    # the forward in bfloat16

Runs on Ray Data: `map_batches` over an actor pool (each actor loads the teacher once), batch size and pool
size configurable, with Ray Data's progress bars; batches hold texts of similar length (less padding). A
catalogue of at most `EmbedConfig.in_process_max_items` rows (the sample's) is embedded in this process, by the
same batches, without Ray: a pool takes longer to start than such a catalogue takes to embed. The
catalogue goes through in windows (`EmbedConfig.window` rows): the driver length-sorts each window and puts
its texts into the object store (all of them before the pool starts), then writes one window's vectors at a
time, in the catalogue's order, to a file renamed into place at the end. An item's vector fuses its image
and text vectors; an item without a usable image falls back to text and is counted. The teacher's model id
travels with every vector.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from teacher.encoders import (
    PRECISIONS,
    TeacherConfig,
    embed_items,
    item_text,
    load_teacher,
    resolve_teacher,
)
from vlmrec import schema
from vlmrec.workspace import Workspace, atomic_parquet_writer


@dataclass(frozen=True)
class EmbedConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # teacher replicas in the Ray Data actor pool, each a model copy on one CPU (one torch thread); None: the
    # pool grows from one to one per CPU of the cluster but one, as the queue asks (a busy cluster keeps it small)
    num_actors: int | None = None
    batch_size: int = 64  # items per map_batches call
    # Batches of texts of similar length: a batch is padded to its longest text, so the catalogue is cut
    # into batches in order of text length (the output keeps the catalogue's order).
    sort_by_length: bool = True
    # Catalogue rows per window: the driver reads, sorts and writes back one window at a time (length sorting
    # happens within one); it holds one window's vectors, and the object store every window's texts.
    window: int = 65_536
    # Catalogues of at most this many rows are embedded in this process (one teacher load, no Ray Data pool,
    # the same length-sorted batches); 0: always on Ray Data.
    in_process_max_items: int = 2_000


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
    """A Ray Data actor: loads the teacher once, embeds batches of catalogue rows. A teacher that does not load
    (a bad path, an unpinned hub id) gives one-row frames of its `error` instead, which the driver raises as
    the command's error: an actor's constructor that raised would end the run in Ray's traceback."""

    def __init__(self, teacher: TeacherConfig):
        try:
            self.teacher, self.error = load_teacher(teacher), None
        except (ValueError, OSError) as err:  # OSError: files transformers cannot find or read
            self.teacher, self.error = None, f"--teacher: {teacher.name} did not load: {err}"

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.error is not None:
            return pd.DataFrame({"error": [self.error]})
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
                "row": batch["row"].to_numpy(),
                "item_id": batch["item_id"].to_numpy(),
                "vector": list(vectors.astype(np.float32)),
                "teacher_id": self.teacher.model_id,
                "text_fallback": ~used_image,
                "image_unreadable": has_uri & ~used_image & self.teacher.supports_images,
            }
        )


TEXT_COLUMNS = ["item_id", "title", "text", "image_uri"]


def embed_catalogue(ws: Workspace, config: EmbedConfig = EmbedConfig()) -> dict:
    """Embed every item of ws.items; write ws.embeddings atomically, in the catalogue's order. Returns a
    summary."""
    catalogue = pq.ParquetFile(ws.need(ws.items, "ingest"))
    n = catalogue.metadata.num_rows
    if n == 0:
        raise ValueError(f"{ws.items}: no items to embed")
    t0 = time.perf_counter()
    embedded = _in_process if n <= config.in_process_max_items else _on_ray
    with embedded(catalogue, config) as (sizes, batches, actors):
        stamps = _windows(catalogue, ["item_id", "event_timestamp"], config.window)
        with atomic_parquet_writer(ws.embeddings, schema.ITEM_EMBEDDINGS) as writer:
            counts = _write_windows(batches, sizes, stamps, writer)
    seconds = time.perf_counter() - t0
    return {
        **counts,
        "seconds": round(seconds, 2),
        "items_per_s": round(counts["items"] / seconds, 1),
        "actors": actors,  # the pool's size (at most, where it grows); 0: embedded in this process
        "config": asdict(config),
    }


@contextmanager
def _on_ray(catalogue: pq.ParquetFile, config: EmbedConfig):
    """-> (window sizes, the embedded batches in order, the pool's size) through a Ray Data actor pool."""
    import ray

    from vlmrec.raycluster import init_ray

    init_ray()
    # one CPU left for the tasks that feed the pool (a local cluster counts one logical CPU more than cores)
    most = config.num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    pool = (
        ray.data.ActorPoolStrategy(size=most)
        if config.num_actors
        else ray.data.ActorPoolStrategy(min_size=1, max_size=most)
    )
    sizes, blocks = [], []
    for rows in _windows(catalogue, TEXT_COLUMNS, config.window):
        sizes.append(len(rows))
        blocks += [ray.put(b) for b in _blocks(rows, config, most)]
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # windows come back whole and in turn
    try:
        out = ray.data.from_pandas_refs(blocks).map_batches(
            ItemEmbedder,
            fn_constructor_kwargs={"teacher": config.teacher},
            batch_size=config.batch_size,
            batch_format="pandas",
            compute=pool,
        )
        del blocks
        yield sizes, out.iter_batches(batch_size=None, batch_format="pandas"), most
    finally:
        context.execution_options.preserve_order = ordered


@contextmanager
def _in_process(catalogue: pq.ParquetFile, config: EmbedConfig):
    """-> (window sizes, the embedded batches in order, 0): one teacher here, the same sorted batches."""
    embedder = ItemEmbedder(config.teacher)
    windows = [_by_length(rows, config) for rows in _windows(catalogue, TEXT_COLUMNS, config.window)]
    size = config.batch_size
    batches = (embedder(rows.iloc[a : a + size]) for rows in windows for a in range(0, len(rows), size))
    yield [len(rows) for rows in windows], batches, 0


def _windows(catalogue: pq.ParquetFile, columns: list[str], window: int):
    """The catalogue's rows `window` at a time (pandas, a `row` column: the catalogue position)."""
    start = 0
    for batch in catalogue.iter_batches(batch_size=window, columns=columns):
        rows = batch.to_pandas()
        rows["row"] = np.arange(start, start + len(rows))
        start += len(rows)
        yield rows


def _blocks(rows: pd.DataFrame, config: EmbedConfig, actors: int) -> list[pd.DataFrame]:
    """One window cut into Ray Data blocks, its texts sorted by length first. Blocks are cut here in the
    driver: a Ray Data repartition task would wait forever for a CPU the actor pool holds on a small machine."""
    rows = _by_length(rows, config)
    n_blocks = max(1, min(len(rows) // config.batch_size, 4 * actors))
    return [rows.iloc[idx] for idx in np.array_split(np.arange(len(rows)), n_blocks)]


def _by_length(rows: pd.DataFrame, config: EmbedConfig) -> pd.DataFrame:
    """One window's rows in order of text length (stable), or as they are without `sort_by_length`."""
    if not config.sort_by_length:
        return rows
    lengths = [len(item_text(t, x)) for t, x in zip(rows["title"], rows["text"], strict=True)]
    return rows.iloc[np.argsort(lengths, kind="stable")]


def _write_windows(batches, sizes: list[int], stamps, writer: pq.ParquetWriter) -> dict:
    """Gather the embedded batches a window at a time (they arrive in order), put each window back in the
    catalogue's order, and write it with the catalogue's timestamps."""
    pending: list[pd.DataFrame] = []
    held = 0
    counts = {"items": 0, "text_fallback": 0, "image_unreadable": 0}
    teacher_ids: set[str] = set()
    batches = iter(batches)
    for size, catalogue in zip(sizes, stamps, strict=True):
        while held < size:
            batch = next(batches)
            if "error" in batch.columns:
                raise ValueError(batch["error"].iloc[0])
            pending.append(batch)
            held += len(batch)
        both = pd.concat(pending, ignore_index=True)
        done, rest = both.iloc[:size].sort_values("row"), both.iloc[size:]
        pending, held = [rest], len(rest)
        if not np.array_equal(done["row"].to_numpy(), catalogue["row"].to_numpy()):
            raise RuntimeError("embedded rows came back out of their window")  # preserve_order broken
        vectors = np.stack(done["vector"].to_numpy()).astype(np.float32, copy=False)
        teacher_ids.update(done["teacher_id"].astype(str).unique())
        table = pa.table(
            {
                "item_id": pa.array(catalogue["item_id"].to_numpy(), pa.int64()),
                "event_timestamp": catalogue["event_timestamp"].to_numpy(),
                "vector": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), vectors.shape[1]),
                "teacher_id": pa.array(done["teacher_id"].astype(str).to_numpy(), pa.string()),
            }
        )
        writer.write_table(table.cast(writer.schema))
        counts["items"] += size
        counts["dim"] = int(vectors.shape[1])
        counts["text_fallback"] += int(done["text_fallback"].sum())
        counts["image_unreadable"] += int(done["image_unreadable"].sum())
    if held or next(batches, None) is not None:
        raise RuntimeError("more embedded rows than catalogue rows")
    assert len(teacher_ids) == 1, f"one teacher per run, got {teacher_ids}"
    return {**counts, "teacher_id": teacher_ids.pop()}


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
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="the forward's precision: bf16 runs it under bfloat16 autocast (faster on CPUs with AVX512-BF16 "
        "or AMX, and on GPUs; vectors stay float32)",
    )
    parser.add_argument("--batch-size", type=_positive, default=EmbedConfig.batch_size)
    parser.add_argument(
        "--num-actors",
        type=_positive,
        default=EmbedConfig.num_actors,
        help="teacher replicas, one CPU each (default: grow to one per CPU of the cluster, but one)",
    )
    parser.add_argument(
        "--window",
        type=_positive,
        default=EmbedConfig.window,
        help="catalogue rows the driver reads, length-sorts and writes at a time (its memory: one window)",
    )
    parser.add_argument(
        "--in-process-max-items",
        type=_non_negative,
        default=EmbedConfig.in_process_max_items,
        help="a catalogue of at most this many items is embedded in this process, without a Ray Data pool "
        "(0: always on Ray Data)",
    )
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
        precision=getattr(args, "precision", TeacherConfig.precision),
    )
    return EmbedConfig(
        teacher=teacher,
        num_actors=args.num_actors,
        batch_size=args.batch_size,
        sort_by_length=getattr(args, "sort_by_length", True),
        window=getattr(args, "window", EmbedConfig.window),
        in_process_max_items=getattr(args, "in_process_max_items", EmbedConfig.in_process_max_items),
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


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
