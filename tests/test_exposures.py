"""The exposure log (serving/exposures.py): bounded, never blocking, never half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from serving.exposures import Exposure, exposure_log, read_exposures, to_table


def exposure(n: int, t: datetime | None = None) -> Exposure:
    return Exposure(
        request_id=f"r{n}",
        time=t or datetime.now(UTC),
        user_id=n,
        endpoint="candidates",
        producer="student",
        model_version="student@abc",
        index_version="v1",
        fallback=None,
        items=[(100 + n, 1, 0.9, "student"), (200 + n, 2, 0.8, "student")],
    )


def test_every_record_is_written_once_in_its_hour_partition(tmp_path):
    counts: list[tuple[str, int]] = []
    log = exposure_log(str(tmp_path / "exp"), flush_s=0.05, on_count=lambda o, n: counts.append((o, n)))
    now = datetime(2026, 11, 30, 7, 59, 59, tzinfo=UTC)
    for n in range(10):
        log.record(exposure(n, now + timedelta(seconds=n % 2)))  # two hours
    log.close()
    table = read_exposures(str(tmp_path / "exp"))
    assert sorted(table["request_id"].to_pylist()) == sorted(f"r{n}" for n in range(10))
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"hour=2026-11-30T07", "hour=2026-11-30T08"}
    row = {r["request_id"]: r for r in table.to_pylist()}["r3"]
    assert row["user_id"] == 3 and row["items"][0] == {
        "item_id": 103,
        "rank": 1,
        "score": pytest.approx(0.9),
        "producer": "student",
    }
    assert log.written == 10 and log.dropped == 0 and sum(n for o, n in counts if o == "written") == 10


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path):
    counts: list[tuple[str, int]] = []
    log = exposure_log(
        str(tmp_path / "exp"),
        queue_size=5,
        flush_s=0.01,
        flush_rows=1,
        on_count=lambda o, n: counts.append((o, n)),
    )
    gate, write = threading.Event(), log._write
    log._write = lambda batch: (gate.wait(), write(batch))  # a stuck disk: the writer holds one batch
    t0 = time.perf_counter()
    for n in range(50):
        log.record(exposure(n))
    assert time.perf_counter() - t0 < 0.5, "record() never waits for the writer"
    assert log.dropped >= 40 and sum(n for o, n in counts if o == "dropped") == log.dropped
    gate.set()
    log.close()
    assert (
        len(read_exposures(str(tmp_path / "exp"))) == 50 - log.dropped == log.written
    )  # the rest, all of it


def test_a_write_that_fails_is_counted_not_raised(tmp_path):
    log = exposure_log(str(tmp_path / "exp"), flush_s=0.05)
    log.fs = _Broken(log.fs)
    log.record(exposure(1))
    log.close()
    assert log.failed == 1 and log.written == 0


class _Broken:
    def __init__(self, fs):
        self.fs = fs

    def create_dir(self, *a, **k):
        raise OSError("no space left on device")


def test_a_killed_writer_leaves_only_complete_files(tmp_path):
    """SIGKILL a process in the middle of writing: readers see whole files only (partial ones are hidden),
    and everything it had written is readable."""
    root = tmp_path / "exp"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tests.test_exposures import exposure
        from serving.exposures import exposure_log
        log = exposure_log({str(root)!r}, flush_s=0.01, flush_rows=2000)
        n = 0
        while True:
            for _ in range(500):
                log.record(exposure(n)); n += 1
            time.sleep(0.005)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(root.glob("hour=*/part-*.parquet"))) < 5:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # a crash in the middle of a write leaves a hidden temporary file: readers skip it
    hour = next(root.glob("hour=*"))
    (hour / ".part-crashed-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    table = read_exposures(str(root))
    files = list(root.glob("hour=*/part-*.parquet"))
    assert len(files) >= 5 and len(table) == sum(pq.read_metadata(f).num_rows for f in files)
    ids = [int(r[1:]) for r in table["request_id"].to_pylist()]
    assert len(set(ids)) == len(ids)  # nothing twice


def test_an_empty_or_missing_log_reads_as_an_empty_table(tmp_path):
    assert len(read_exposures(str(tmp_path / "none"))) == 0
    assert to_table([]).num_rows == 0
