"""The click-sequence table (Feast's `click_sequences` source): each user's last N clicks, in one of two layouts.

    table = click_sequences(events, max_len=50)                          # latest: one row per user
    table = click_sequences(events, max_len=50, until=cut_us)            # ... as of a time (a replay's start)
    table = click_sequences(events, max_len=50, layout="snapshots")      # one row per event
    layout, max_len = sequence_layout(ws.sequences)

latest (the default of `vlmrec ingest`): one row per user, their last N clicks up to their last event. It is
what the online store holds (`vlmrec features` materializes it), and it grows with users, not with events:
    rows = U,  ids = sum over users of min(n_u, N)  <=  N * U
snapshots (`vlmrec ingest --sequences snapshots`): one row per event, the user's last N clicks up to and
including it. Feast's point-in-time join over it answers "the sequence just before this event" for any
event (training's `prepare_data`, the in-memory reference of the example files); it grows as N x E:
    rows = E,  ids = sum over users of sum_k min(k, N)  <=  N * E
Both: bytes ~= 16 * ids + 24 * rows before compression (8 B per id and 8 per its click time; user id,
timestamp, two list offsets per row). Training itself builds its windows from the events
(training/examples.py) and needs neither. The layout and N are written in the file's metadata.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from vlmrec.schema import CLICK_SEQUENCES, ts_array

LAYOUTS = ("latest", "snapshots")
LAYOUT_KEY, MAX_LEN_KEY = b"vlmrec.sequences", b"vlmrec.max_len"  # the table's metadata
_CHUNK_IDS = 1 << 24  # ids per record batch: bounded memory and int32 list offsets


def click_sequences(
    events: pd.DataFrame, max_len: int, layout: str = "latest", until: int | None = None
) -> pa.Table:
    """CLICK_SEQUENCES rows: per user (latest) or per event (snapshots), the user's last `max_len` item ids
    up to and including that event, oldest first, with their click times (UTC microseconds). `until` (UTC
    microseconds, latest only): the events after it are left out, so each row is the user's sequence as of
    that time.

    `events` has user_id, item_id, event_timestamp (int64 UTC microseconds or datetimes), each user's times
    unique; rows come out ordered by user, then time. The layout and max_len go into the metadata.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if until is not None and layout != "latest":
        raise ValueError("until applies to the latest layout (snapshots already hold every time)")
    ts = events["event_timestamp"]
    ts = ts.to_numpy() if ts.dtype == np.int64 else utc_micros(ts)
    keep = slice(None) if until is None else ts <= until
    uid = events["user_id"].to_numpy(dtype=np.int64)[keep]
    items, ts = events["item_id"].to_numpy(dtype=np.int64)[keep], ts[keep]
    order = np.lexsort((ts, uid))
    u, t, items = uid[order], ts[order], items[order]
    metadata = {LAYOUT_KEY: layout.encode(), MAX_LEN_KEY: str(max_len).encode()}
    if len(u) == 0:
        return CLICK_SEQUENCES.empty_table().replace_schema_metadata(metadata)
    new_user = np.r_[True, u[1:] != u[:-1]]
    pos = np.arange(len(u)) - np.flatnonzero(new_user)[np.cumsum(new_user) - 1]  # index within the user
    rows = np.arange(len(u)) if layout == "snapshots" else np.r_[np.flatnonzero(new_user)[1:] - 1, len(u) - 1]
    lengths = np.minimum(pos[rows] + 1, max_len)
    cum = np.cumsum(lengths)
    batches, start = [], 0
    while start < len(rows):
        done = cum[start - 1] if start else 0
        end = max(start + 1, int(np.searchsorted(cum, done + _CHUNK_IDS, side="right")))
        lens = lengths[start:end]
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        last = np.repeat(rows[start:end], lens)  # the event each id's row ends at
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lens)
        at = last - np.repeat(lens, lens) + 1 + within  # oldest first, ending at the row's own event
        list_offsets = pa.array(offsets.astype(np.int32))
        batches.append(
            pa.RecordBatch.from_arrays(
                [
                    pa.array(u[rows[start:end]], pa.int64()),
                    ts_array(t[rows[start:end]]),
                    pa.ListArray.from_arrays(list_offsets, pa.array(items[at], pa.int64())),
                    pa.ListArray.from_arrays(list_offsets, pa.array(t[at], pa.int64())),
                ],
                schema=CLICK_SEQUENCES,
            )
        )
        start = end
    return pa.Table.from_batches(batches, schema=CLICK_SEQUENCES).replace_schema_metadata(metadata)


def sequence_layout(path) -> tuple[str, int]:
    """(layout, max_len) of a click-sequence file. A file written before the layouts existed (no metadata)
    holds snapshots; its max_len is then its longest sequence."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    if LAYOUT_KEY in meta:
        return meta[LAYOUT_KEY].decode(), int(meta[MAX_LEN_KEY])
    lengths = pc.list_value_length(pq.read_table(path, columns=["item_ids"])["item_ids"])
    return "snapshots", max(1, int(pc.max(lengths).as_py() or 1))


def utc_micros(ts: pd.Series) -> np.ndarray:
    """Datetimes (naive = UTC) as int64 UTC microseconds."""
    return (
        pd.to_datetime(ts, utc=True).dt.tz_convert(None).to_numpy().astype("datetime64[us]").astype(np.int64)
    )
