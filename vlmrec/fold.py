"""Fold the Producer's event log into a workspace: what `vlmrec ingest --logged` runs (and `vlmrec refresh`).

    python -m vlmrec.ingest --logged --workdir .vlmrec/sample      # then: vlmrec features --workdir ...

The events /v1/events accepted (data/events_log/, serving/events.py) join data/events.parquet, ordered as
ingest orders them (vlmrec/ingest.py), and the click sequences are rebuilt in their layout and length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from vlmrec.ingest import events_table, order_events
from vlmrec.schema import EVENTS, EVENTS_LOG
from vlmrec.sequences import click_sequences, sequence_layout
from vlmrec.validate import parse_timestamps
from vlmrec.workspace import Workspace, atomic_write_parquet

FOLDED = b"vlmrec.folded"  # events.parquet metadata: the event-log files already in it (json list)


def fold_logged(ws: Workspace) -> dict:
    """`vlmrec ingest --logged`: the events the Producer accepted (data/events_log/, serving/events.py) into
    data/events.parquet and the click sequences (their layout and max_len kept), each log file once (the
    files folded are recorded in the events file itself, so a fold is written whole or not at all, and a
    second one adds nothing). Events on items the catalogue does not hold yet are left out and counted
    (ingest the catalogue first). Run `vlmrec features` after it: Feast's offline and online stores then
    see them."""
    events = pq.read_table(ws.events)
    folded = set(json.loads((events.schema.metadata or {}).get(FOLDED, b"[]")))
    files = []
    if ws.events_log.exists():  # hidden ('.') files are partial writes: skipped
        files = list(ds.dataset(ws.events_log, format="parquet").files)
    rel = {f: str(Path(f).relative_to(ws.events_log)) for f in files}
    files = [f for f in files if rel[f] not in folded]
    logged = (
        ds.dataset(files, format="parquet", schema=EVENTS_LOG).to_table()
        if files
        else EVENTS_LOG.empty_table()
    )
    catalogue = pq.read_table(ws.items, columns=["item_id"])["item_id"]
    known = logged.filter(pc.is_in(logged["item_id"], catalogue)).select(EVENTS.names).cast(EVENTS)
    both = pa.concat_tables([events.select(EVENTS.names).cast(EVENTS), known]).to_pandas()
    ts = parse_timestamps(both["event_timestamp"], "events", "'event_timestamp'")[0]
    ordered, moved = order_events(
        both["user_id"].to_numpy(np.int64), both["item_id"].to_numpy(np.int64), ts,
        both["event_type"].to_numpy(dtype=object),
    )  # fmt: skip
    table = events_table(ordered).replace_schema_metadata(
        {FOLDED: json.dumps(sorted(folded | set(rel[f] for f in files)))}
    )
    layout, max_len = sequence_layout(ws.sequences)
    sequences = click_sequences(ordered.rename(columns={"ts": "event_timestamp"}), max_len, layout)
    atomic_write_parquet(table, ws.events)
    atomic_write_parquet(sequences, ws.sequences)
    return {
        "log_files": len(files),
        "events_added": known.num_rows,
        "unknown_items_left_out": logged.num_rows - known.num_rows,
        "timestamp_ties_moved": moved,
        "events": table.num_rows,
    }
