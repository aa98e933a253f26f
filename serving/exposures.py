"""The exposure log: one record per answer the Producer serves, what an A/B analysis joins clicks to.

    log = ExposureLog("W/exposures")                   # starts its writer thread
    log.record(Exposure(request_id, time, user_id, ...)) # never blocks, never raises
    log.close()                                          # writes what it still holds
    table = read_exposures("W/exposures")                # every complete file, as one table

Records wait in a bounded queue; a background thread writes them every `flush_s` (or every `flush_rows`),
one parquet file per hour partition per flush: `<path>/hour=2026-11-30T07/part-<writer>-<n>.parquet`.
A full queue drops the record and counts it (`dropped`, and the metric), never silently. A local file is
written under a name readers skip (a leading '.') and renamed into place, so a killed writer loses only
what it had not written and leaves no partial file a reader would take; an object store (s3://, gs://)
publishes an object only when its upload completes.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("ray.serve")

ITEM = pa.struct(
    [
        ("item_id", pa.int64()),
        ("rank", pa.int32()),
        ("score", pa.float32()),
        ("producer", pa.string()),  # the producer that placed it (a Mixer answer has several)
    ]
)
SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("user_id", pa.int64()),
        ("arm", pa.string()),  # the experiment arm, None outside an experiment
        ("endpoint", pa.string()),  # candidates, batch, mix
        ("producer", pa.string()),
        ("model_version", pa.string()),
        ("index_version", pa.string()),
        ("fallback", pa.string()),
        ("items", pa.list_(ITEM)),
    ]
)


@dataclass(frozen=True)
class Exposure:
    """What one answer showed one user."""

    request_id: str
    time: datetime  # UTC
    user_id: int
    endpoint: str
    producer: str
    model_version: str | None
    index_version: str | None
    fallback: str | None
    items: Sequence[tuple[int, int, float, str | None]]  # (item_id, rank, score, producer)
    arm: str | None = None

    @classmethod
    def of_answer(
        cls, request_id: str, user_id: int, endpoint: str, answer: dict, arm: str | None = None
    ) -> Exposure:
        """From a candidates answer (serving/pipeline.py) or a Mixer answer (serving/mixer.py: each item
        with the producer whose slot it fills, versions as `producer=version` joined by ',')."""
        if "producers" in answer:  # the Mixer
            ok = {p: r for p, r in answer["producers"].items() if r["status"] == "ok"}
            producer = "mix"
            versions = [
                ",".join(f"{p}={r.get(key)}" for p, r in ok.items())
                for key in ("model_version", "index_version")
            ]
            items = [
                (c["item_id"], c["rank"], c["scores"][c["producer"]], c["producer"])
                for c in answer["candidates"]
            ]
            fallback = None
        else:
            producer = answer["producer"]
            versions = [answer.get("model_version"), answer.get("index_version")]
            items = [(c["item_id"], c["rank"], c["score"], producer) for c in answer["candidates"]]
            fallback = answer.get("fallback")
        return cls(
            request_id=request_id,
            time=datetime.now(UTC),
            user_id=int(user_id),
            endpoint=endpoint,
            producer=producer,
            model_version=versions[0],
            index_version=versions[1],
            fallback=fallback,
            items=[(int(i), int(r), float(sc), p) for i, r, sc, p in items],
            arm=arm,
        )


def hour_of(t: datetime) -> str:
    """The partition value of a record's time: its UTC hour, e.g. 2026-11-30T07."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H")


def to_table(records: Sequence[Exposure]) -> pa.Table:
    return pa.table(
        {
            "request_id": [r.request_id for r in records],
            "time": [r.time for r in records],
            "user_id": [r.user_id for r in records],
            "arm": [r.arm for r in records],
            "endpoint": [r.endpoint for r in records],
            "producer": [r.producer for r in records],
            "model_version": [r.model_version for r in records],
            "index_version": [r.index_version for r in records],
            "fallback": [r.fallback for r in records],
            "items": [
                [{"item_id": i, "rank": k, "score": s, "producer": p} for i, k, s, p in r.items]
                for r in records
            ],
        },
        schema=SCHEMA,
    )


def _filesystem(path: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path in it, local?) for a local folder or an object-store URI (s3://, gs://, ...)."""
    if "://" in path and not path.startswith("file://"):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner, False
    local = os.path.abspath(path.removeprefix("file://"))
    return pafs.LocalFileSystem(), local, True


class ExposureLog:
    """A bounded queue of exposures and the thread that writes them (see the module docstring)."""

    def __init__(
        self,
        path: str,
        queue_size: int = 10_000,
        flush_s: float = 1.0,
        flush_rows: int = 5_000,
        on_count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.path, self.queue_size = str(path), queue_size
        self.fs, self.root, self.local = _filesystem(self.path)
        self.flush_s, self.flush_rows = flush_s, flush_rows
        self._queue: queue.Queue[Exposure] = queue.Queue(maxsize=queue_size)
        self._on_count = on_count or (lambda outcome, n: None)
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.written = self.dropped = self.failed = 0
        self._files = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exposure-writer", daemon=True)
        self._thread.start()

    def record(self, exposure: Exposure) -> None:
        """Queue one exposure; when the queue is full, drop it and count it. Never blocks, never raises."""
        try:
            self._queue.put_nowait(exposure)
        except queue.Full:
            self.dropped += 1
            self._on_count("dropped", 1)

    def _take(self, deadline: float) -> list[Exposure]:
        batch: list[Exposure] = []
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

    def _write(self, batch: list[Exposure]) -> None:
        by_hour: dict[str, list[Exposure]] = {}
        for r in batch:
            by_hour.setdefault(hour_of(r.time), []).append(r)
        for hour, records in by_hour.items():
            self._files += 1
            folder = f"{self.root}/hour={hour}"
            name = f"part-{self.writer}-{self._files:06d}.parquet"
            try:
                self.fs.create_dir(folder, recursive=True)
                target = f"{folder}/{name}"
                temp = f"{folder}/.{name}.tmp" if self.local else target
                with self.fs.open_output_stream(temp) as out:
                    pq.write_table(to_table(records), out)
                if self.local:
                    self.fs.move(temp, target)
            except Exception as exc:  # a full disk, a lost bucket: counted and logged, never raised
                log.warning("exposure log: %d records not written to %s: %r", len(records), folder, exc)
                self.failed += len(records)
                self._on_count("failed", len(records))
                continue
            self.written += len(records)
            self._on_count("written", len(records))

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking time-based flushes and write everything still queued (a replica that stops)."""
        self._stop.set()
        self._thread.join(timeout)


def read_exposures(path: str) -> pa.Table:
    """Every complete exposure file under `path` (hidden and partial files skipped) as one table."""
    fs, root, _ = _filesystem(str(path))
    try:
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return SCHEMA.empty_table()
    except OSError:
        return SCHEMA.empty_table()
    dataset = ds.dataset(root, filesystem=fs, format="parquet", schema=SCHEMA)  # ignores '.' and '_' names
    return dataset.to_table()
