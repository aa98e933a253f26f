"""Model inputs: the ONE input-building function (training and serving both call `build_inputs`), the item
vocabulary (`ItemTable`), and next-item training examples for all-position training.

Index convention: model index 0 is padding; training items are 1..n_items; `ItemTable.item_ids[k]` has
index k + 1. Unknown raw ids (not in the training vocabulary) are dropped from inputs and reported.

    table = ItemTable(item_ids=np.array([10, 20, 30]), teacher=vectors)       # vectors (3, D)
    build_input([20, 99, 30], table, max_len=4)  # ModelInput(ids=[0, 0, 2, 3], unknown=[99])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd


@dataclass(frozen=True, eq=False)  # holds arrays: equality is identity
class ItemTable:
    """The training vocabulary: raw item ids, their model indices (k + 1) and aligned teacher vectors."""

    item_ids: np.ndarray  # (n,) int64 raw ids, unique; index of item_ids[k] is k + 1
    teacher: np.ndarray | None = None  # (n, D) float32, row k is item_ids[k]'s teacher vector
    _sorted: np.ndarray = field(init=False, repr=False, compare=False)  # (n,) sorted raw ids
    _order: np.ndarray = field(init=False, repr=False, compare=False)  # (n,) positions of the sorted ids

    def __post_init__(self) -> None:
        ids = np.asarray(self.item_ids, dtype=np.int64)
        if ids.ndim != 1 or len(np.unique(ids)) != len(ids):
            raise ValueError("item_ids must be a 1-D array of unique ids")
        object.__setattr__(self, "item_ids", ids)
        if self.teacher is not None:
            teacher = np.asarray(self.teacher, dtype=np.float32)
            if teacher.shape[0] != len(ids):
                raise ValueError(f"teacher has {teacher.shape[0]} rows for {len(ids)} items")
            object.__setattr__(self, "teacher", teacher)
        order = np.argsort(ids, kind="stable")
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_sorted", ids[order])

    @classmethod
    def from_parquet(cls, path, vectors: bool = True) -> ItemTable:
        """From an item vector table (item_id, vector): the vectors read straight from Arrow's buffers into
        one (n, D) matrix (no per-row arrays: a million items' vectors cost their own size once)."""
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["item_id", "vector"] if vectors else ["item_id"])
        ids = table.column("item_id").to_numpy()
        if not vectors:
            return cls(ids)
        import pyarrow.compute as pc

        column = table.column("vector").combine_chunks()
        lengths = pc.list_value_length(column)
        if column.null_count or (len(ids) and pc.min(lengths) != pc.max(lengths)):
            raise ValueError(f"{path}: column vector must hold one vector of the same length per item")
        dim = lengths[0].as_py() if len(ids) else 0
        return cls(ids, column.flatten().to_numpy().reshape(len(ids), dim))

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def index_of(self, raw_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw ids -> model indices, 0 where unknown. Same shape as the input."""
        raw = np.asarray(raw_ids, dtype=np.int64)
        if len(self._sorted) == 0:
            return np.zeros(raw.shape, np.int64)
        pos = np.searchsorted(self._sorted, raw).clip(max=len(self._sorted) - 1)
        found = self._sorted[pos] == raw
        return np.where(found, self._order[pos] + 1, 0).astype(np.int64)

    def raw_of(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """Model indices (1..n) -> raw ids."""
        return self.item_ids[np.asarray(index, dtype=np.int64) - 1]

    def teacher_matrix(self) -> np.ndarray:
        """(n + 1, D) float32 teacher vectors aligned with model indices; row 0 (padding) is zero."""
        if self.teacher is None:
            raise ValueError("this ItemTable has no teacher vectors")
        return np.concatenate([np.zeros((1, self.teacher.shape[1]), np.float32), self.teacher])


IdMap = ItemTable | Mapping[int, int] | np.ndarray


def map_ids(raw_ids: Sequence[int] | np.ndarray, id_map: IdMap) -> np.ndarray:
    """Raw ids -> model indices (0 = unknown) through an ItemTable, a dict, or a dense lookup array
    (`lookup[raw]`, raw ids outside it unknown)."""
    raw = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
    if isinstance(id_map, ItemTable):
        return id_map.index_of(raw)
    if isinstance(id_map, np.ndarray):
        inside = (raw >= 0) & (raw < len(id_map))
        return np.where(inside, id_map[raw.clip(0, len(id_map) - 1)], 0).astype(np.int64)
    return np.fromiter((id_map.get(int(r), 0) for r in raw), np.int64, count=len(raw))


class ModelInput(NamedTuple):
    ids: np.ndarray  # (max_len,) int64 model indices, oldest first, left-padded with 0
    unknown: np.ndarray  # raw ids dropped because they are not in the vocabulary, in input order


class ModelInputs(NamedTuple):
    ids: np.ndarray  # (B, max_len) int64, each row as in ModelInput.ids
    n_unknown: np.ndarray  # (B,) int64 raw ids dropped per row


def build_inputs(sequences: Sequence[Sequence[int] | np.ndarray], id_map: IdMap, max_len: int) -> ModelInputs:
    """The model input for a batch of click sequences (raw item ids, oldest first).

    Per row: map raw ids to indices, DROP unknown ids (counted in n_unknown), keep the LAST max_len known
    items, left-pad with 0. An empty or all-unknown row is all padding (the model returns a zero vector).
    """
    lengths = np.fromiter((len(s) for s in sequences), np.int64, count=len(sequences))
    flat = (
        np.concatenate([np.asarray(s, np.int64).reshape(-1) for s in sequences])
        if lengths.sum()
        else np.zeros(0, np.int64)
    )
    idx = map_ids(flat, id_map)  # (sum L,)
    row = np.repeat(np.arange(len(lengths)), lengths)
    known = idx > 0
    n_unknown = np.bincount(row[~known], minlength=len(lengths)).astype(np.int64)
    idx, row = idx[known], row[known]
    count = np.bincount(row, minlength=len(lengths))  # (B,) known items per row
    start = np.cumsum(count) - count
    from_end = count[row] - 1 - (np.arange(len(idx)) - start[row])  # 0 = the row's last item
    keep = from_end < max_len
    out = np.zeros((len(lengths), max_len), np.int64)
    out[row[keep], max_len - 1 - from_end[keep]] = idx[keep]
    return ModelInputs(out, n_unknown)


def build_input(item_ids: Sequence[int] | np.ndarray, id_map: IdMap, max_len: int) -> ModelInput:
    """One user's model input: `build_inputs` on one row, plus the unknown raw ids themselves."""
    ids = build_inputs([item_ids], id_map, max_len).ids[0]
    raw = np.asarray(item_ids, np.int64).reshape(-1)
    return ModelInput(ids, raw[map_ids(raw, id_map) == 0])


def user_sequences(events: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    """(user_ids (U,), per-user raw item ids oldest first) from an events frame (user_id, item_id,
    event_timestamp). Ties in time keep frame order."""
    users = events["user_id"].to_numpy(np.int64)
    items = events["item_id"].to_numpy(np.int64)
    ts = events["event_timestamp"].to_numpy()
    order = np.lexsort((np.arange(len(users)), ts, users))
    users, items = users[order], items[order]
    uniq, starts = np.unique(users, return_index=True)
    return uniq, np.split(items, starts[1:]) if len(users) else []


class Examples(NamedTuple):
    inputs: np.ndarray  # (N, T) int64 model indices, left-padded
    targets: np.ndarray  # (N, T) int64: targets[:, t] is the item after inputs[:, t]; 0 where inputs pad


def make_examples(
    sequences: Iterable[np.ndarray], max_len: int, windows: Literal["last", "all"] = "last"
) -> Examples:
    """Next-item examples from per-user index sequences (oldest first, unknown items already dropped).

    A sequence s (length L >= 2) gives inputs s[:-1] and targets s[1:] at every position. "last" keeps the
    last max_len positions (SASRec: one example per user); "all" cuts the L - 1 targets into windows of
    max_len from the end, so every event is a target exactly once (long histories are not wasted).
    """
    rows_in: list[np.ndarray] = []
    rows_tg: list[np.ndarray] = []
    for s in sequences:
        s = np.asarray(s, np.int64)
        n = len(s) - 1  # number of targets
        ends = [n] if windows == "last" else list(range(n, 0, -max_len))
        for end in ends if n > 0 else []:
            a = max(0, end - max_len)
            rows_in.append(s[a:end])
            rows_tg.append(s[a + 1 : end + 1])
    inputs = np.zeros((len(rows_in), max_len), np.int64)
    targets = np.zeros((len(rows_in), max_len), np.int64)
    for i, (x, y) in enumerate(zip(rows_in, rows_tg, strict=True)):
        inputs[i, max_len - len(x) :] = x
        targets[i, max_len - len(y) :] = y
    return Examples(inputs, targets)


def target_counts(examples: Examples, n_items: int) -> np.ndarray:
    """(n_items + 1,) how often each index is a training target (the logQ correction's popularity)."""
    t = examples.targets[examples.targets > 0]
    return np.bincount(t, minlength=n_items + 1).astype(np.int64)


def trim_padding(ids, *aligned):
    """Left padding trimmed from (B, T) model inputs `ids` (numpy or torch) and arrays aligned with them: to
    the longest row's length (at least 1). The model's output does not depend on left padding, so this
    changes nothing but speed. -> (ids, *aligned), each (B, width)."""
    width = max(int((ids > 0).sum(1).max()), 1) if len(ids) else 1
    return tuple(a[:, a.shape[1] - width :] for a in (ids, *aligned))


def iterate_batches(
    examples: Examples, batch_size: int, rng: np.random.Generator, bucket_pool: int = 0
) -> Iterator[Examples]:
    """Shuffled mini-batches, left padding trimmed to the longest row of each batch.

    The model's output is invariant to left padding, so trimming changes nothing but speed. bucket_pool > 0
    sorts rows by length inside pools of bucket_pool batches first (far fewer padded positions on short
    Amazon-like sequences); batch order is shuffled either way.
    """
    n = len(examples.inputs)
    perm = rng.permutation(n)
    if bucket_pool > 0:
        lengths = (examples.inputs > 0).sum(1)
        pool = batch_size * bucket_pool
        perm = np.concatenate(
            [p[np.argsort(lengths[p], kind="stable")] for p in np.split(perm, range(pool, n, pool))]
        )
    batches = np.split(perm, range(batch_size, n, batch_size))
    for b in (batches[i] for i in rng.permutation(len(batches))):
        yield Examples(*trim_padding(examples.inputs[b], examples.targets[b]))
