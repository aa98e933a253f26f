"""The training examples as files: one parquet file per user bucket, written by the example build
(training/examples.py) and read back by each training worker without Ray Data (reading needs no Ray).

    write_examples(path, {"inputs": (N, L) int32, "targets": (N,) int32, "target_days": (N,)})
    pieces = worker_rows(folder, rank, world)          # a worker's equal share of the rows (footers only)
    for batch in stream_batches(pieces, 128, window=65536, seed=epoch_seed): ...   # shuffled full batches
    read_examples(folder)                              # every row at once (validation, tests, small data)

Why not Ray Data in the workers: its parquet read starts with a listing task that needs a CPU, and when the
training workers and a Producer hold every CPU (`vlmrec refresh` on a small node) the epoch waited forever;
reading its own equal share of rows also lets every worker take the same number of steps and replay an
epoch exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def worker_rows(folder: str | Path, rank: int, world: int) -> list[tuple[str, int, int, int]]:
    """Worker `rank` of `world`'s share of a folder of example files: an equal run of the rows (the first
    n_rows % world workers one more), as (file, row group, first row, end row) pieces. From the files'
    footers only."""
    files = sorted(str(f) for f in Path(folder).glob("*.parquet"))
    groups = []
    for f in files:
        meta = pq.ParquetFile(f).metadata
        groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    total = sum(n for *_, n in groups)
    lo, hi = rank * total // world, (rank + 1) * total // world
    pieces, at = [], 0
    for f, g, n in groups:
        a, b = max(lo, at), min(hi, at + n)
        if a < b:
            pieces.append((f, g, a - at, b - at))
        at += n
    return pieces


def stream_batches(
    pieces: list[tuple[str, int, int, int]], batch_size: int, window: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled full batches of a worker's pieces, read one row group at a time: the pieces in a random
    order, then rows mixed within a buffer of about `window` rows (never more than window + one row
    group in memory). The same seed gives the same batches (an epoch replayed after a failure)."""
    rng = np.random.default_rng(seed)
    buffer: dict[str, np.ndarray] | None = None

    def drain(keep: int) -> Iterator[dict[str, np.ndarray]]:
        nonlocal buffer
        n = len(next(iter(buffer.values())))
        order = rng.permutation(n)
        cut = max(0, (n - keep) // batch_size * batch_size)
        for i in range(0, cut, batch_size):
            yield {k: v[order[i : i + batch_size]] for k, v in buffer.items()}
        buffer = {k: v[order[cut:]] for k, v in buffer.items()}

    for p in rng.permutation(len(pieces)):
        f, g, a, b = pieces[p]
        table = pq.ParquetFile(f).read_row_group(g).slice(a, b - a)
        part = {name: _column(table, name) for name in table.column_names}
        buffer = part if buffer is None else {k: np.concatenate([buffer[k], part[k]]) for k in part}
        if len(next(iter(buffer.values()))) >= window + batch_size:
            yield from drain(keep=window // 2)  # half the window stays to mix with what comes next
    if buffer is not None:
        yield from drain(keep=0)


def read_examples(folder: str | Path) -> dict[str, np.ndarray]:
    """Every row of a folder of example files, as (N, ...) arrays (tests and small data only)."""
    table = pq.read_table(folder)
    return {name: _column(table, name) for name in table.column_names}


def write_examples(path: Path, columns: dict[str, np.ndarray]) -> None:
    """One example file: 1-d columns as they are, (N, L) ones as Ray's tensor column type."""
    from ray.data.extensions import ArrowTensorArray

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in columns.items()}
        ),
        path,
    )


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.num_chunks == 0:
        return np.zeros((0,), np.int64)
    return np.concatenate([_numpy(c) for c in col.chunks])


def _numpy(chunk: pa.Array) -> np.ndarray:
    """A column chunk as numpy; an (N, L) one read without Ray's tensor type registered (a process that has
    not imported ray.data: a reader needs no Ray) arrives as its storage, a list per row."""
    if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
        return chunk.flatten().to_numpy().reshape(len(chunk), -1)
    return chunk.to_numpy(zero_copy_only=False)
