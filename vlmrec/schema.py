"""The parquet tables the stages exchange: one pyarrow schema each, shared by writers and readers.

Timestamps are UTC microseconds. Within one user, event timestamps are made unique at ingest (ties keep
file order and are moved apart by 1 us each), so "the sequence just before event t" is the snapshot at
t - 1 us, fetched by Feast's point-in-time join.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


def ts_array(us: np.ndarray) -> pa.Array:
    """UTC microseconds (int64) as a TS column."""
    return pa.array(np.asarray(us, dtype=np.int64).view("datetime64[us]"), type=TS)


EVENTS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event_timestamp", TS),
        ("event_type", pa.string()),
    ]
)
# data/events_log/: what the Producer's /v1/events accepted, the same columns plus what ties an event to the
# answer it followed (serving/exposures.py): the answer's request_id and the item's 1-based position in it
EVENTS_LOG = pa.schema([*EVENTS, ("request_id", pa.string()), ("position", pa.int32())])

ITEMS = pa.schema(
    [
        ("item_id", pa.int64()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("category", pa.string()),
        ("image_uri", pa.string()),  # absolute path or URI; null when there is no usable image
        ("created_at", TS),
        ("event_timestamp", TS),  # = created_at: when the item's metadata became valid (Feast's timestamp)
    ]
)

CLICK_SEQUENCES = pa.schema(
    [
        ("user_id", pa.int64()),
        ("event_timestamp", TS),
        (
            "item_ids",
            pa.list_(pa.int64()),
        ),  # the last N item ids up to and including this event, oldest first
        # each of those clicks' time (UTC microseconds since the epoch), aligned with item_ids: a late click
        # pushed to the online store is merged into the sequence by time (serving/events.py)
        ("click_times", pa.list_(pa.int64())),
    ]
)

ITEM_EMBEDDINGS = pa.schema(
    [
        ("item_id", pa.int64()),
        ("event_timestamp", TS),
        ("vector", pa.list_(pa.float32())),  # L2-normalised teacher vector
        ("teacher_id", pa.string()),  # which teacher made it; stages refuse to mix ids
    ]
)


def teacher_of(table_path) -> str:
    """The one teacher id of an item vector table (item embeddings, an export's item_vectors.parquet): its
    vectors live in that teacher's space. ValueError naming the file when it mixes teachers."""
    import pyarrow.parquet as pq

    ids = pq.read_table(table_path, columns=["teacher_id"]).column(0).unique().to_pylist()
    if len(ids) != 1:
        raise ValueError(f"{table_path}: column teacher_id holds {len(ids)} teachers {ids[:3]}; re-run embed")
    return str(ids[0])
