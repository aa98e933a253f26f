"""A log of records written as parquet under hour partitions, never in the way of the caller.

    log = PartitionedLog("W/exposures", to_table, time_of=lambda r: r.time)   # starts its writer thread
    log.record(r)            # never blocks, never raises
    log.close()              # writes what it still holds
    table = read_log("W/exposures", schema)

Records wait in a bounded queue; a background thread writes them every `flush_s` (or every `flush_rows`),
one parquet file per hour partition per flush: `<path>/hour=2026-11-30T07/part-<writer>-<n>.parquet`. A full
queue drops the record and counts it (`dropped`, and `on_count`), never silently; a failed write is counted
(`failed`) and logged, never raised. A local file is written under a name readers skip (a leading '.') and
renamed into place, so a killed writer loses only what it had not written and leaves no partial file a
reader would take; an object store (s3://, gs://) publishes an object only when its upload completes.
(The exposure log, serving/exposures.py; the event log, serving/events.py.)
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("ray.serve")
R = TypeVar("R")


def hour_of(t: datetime) -> str:
    """The partition value of a record's time: its UTC hour, e.g. 2026-11-30T07."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H")


def _filesystem(path: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path in it, local?) for a local folder or an object-store URI (s3://, gs://, ...)."""
    if "://" in path and not path.startswith("file://"):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner, False
    local = os.path.abspath(path.removeprefix("file://"))
    return pafs.LocalFileSystem(), local, True


class PartitionedLog(Generic[R]):
    """A bounded queue of records and the thread that writes them (see the module docstring)."""

    def __init__(
        self,
        path: str,
        to_table: Callable[[list[R]], pa.Table],
        time_of: Callable[[R], datetime],
        queue_size: int = 10_000,
        flush_s: float = 1.0,
        flush_rows: int = 5_000,
        on_count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.path, self.queue_size = str(path), queue_size
        self._to_table, self._time_of = to_table, time_of
        self.fs, self.root, self.local = _filesystem(self.path)
        self.flush_s, self.flush_rows = flush_s, flush_rows
        self._queue: queue.Queue[R] = queue.Queue(maxsize=queue_size)
        self._on_count = on_count or (lambda outcome, n: None)
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.written = self.dropped = self.failed = 0
        self._files = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"log-writer-{Path(self.root).name}", daemon=True
        )
        self._thread.start()

    def record(self, record: R) -> None:
        """Queue one record; when the queue is full, drop it and count it. Never blocks, never raises."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self._on_count("dropped", 1)

    def _take(self, deadline: float) -> list[R]:
        batch: list[R] = []
        while len(batch) < self.flush_rows:
            timeout = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=max(timeout, 0.0)) if timeout > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take(time.monotonic() + self.flush_s)
            if batch:
                self._write(batch)
        while batch := self._take(time.monotonic()):  # closing: everything still queued
            self._write(batch)

    def _write(self, batch: list[R]) -> None:
        by_hour: dict[str, list[R]] = {}
        for r in batch:
            by_hour.setdefault(hour_of(self._time_of(r)), []).append(r)
        for hour, records in by_hour.items():
            self._files += 1
            folder = f"{self.root}/hour={hour}"
            name = f"part-{self.writer}-{self._files:06d}.parquet"
            try:
                self.fs.create_dir(folder, recursive=True)
                target = f"{folder}/{name}"
                temp = f"{folder}/.{name}.tmp" if self.local else target
                with self.fs.open_output_stream(temp) as out:
                    pq.write_table(self._to_table(records), out)
                if self.local:
                    self.fs.move(temp, target)
            except Exception as exc:  # a full disk, a lost bucket: counted and logged, never raised
                log.warning("%d records not written to %s: %r", len(records), folder, exc)
                self.failed += len(records)
                self._on_count("failed", len(records))
                continue
            self.written += len(records)
            self._on_count("written", len(records))

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking time-based flushes and write everything still queued (a replica that stops)."""
        self._stop.set()
        self._thread.join(timeout)


def read_log(path: str, schema: pa.Schema) -> pa.Table:
    """Every complete file under `path` (hidden and partial files skipped) as one table of `schema`."""
    fs, root, _ = _filesystem(str(path))
    try:
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return schema.empty_table()
    except OSError:
        return schema.empty_table()
    return ds.dataset(root, filesystem=fs, format="parquet", schema=schema).to_table()  # skips '.' and '_'
