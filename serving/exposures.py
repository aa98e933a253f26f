"""The exposure log: one record per answer the Producer serves, what an A/B analysis joins clicks to.

log = exposure_log("W/exposures")                     # serving/parquet_log.py: bounded, in the background
log.record(Exposure.of_answer(request_id, user_id, "candidates", answer))
table = read_exposures("W/exposures")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from serving.parquet_log import PartitionedLog, read_log

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
    def of_answer(cls, request_id: str, user_id: int, endpoint: str, answer: dict) -> Exposure:
        """From a candidates answer (serving/pipeline.py) or a Mixer answer (serving/mixer.py: each item
        with the producer whose slot it fills, versions as `producer=version` joined by ','), with the
        experiment arm the answer names."""
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
            arm=answer.get("arm"),
        )


def to_table(records: Sequence[Exposure]) -> pa.Table:
    """Exposures -> one table (SCHEMA), the items built column by column (the writer thread's work)."""
    item_ids: list[int] = []
    ranks: list[int] = []
    scores: list[float] = []
    producers: list[str | None] = []
    offsets = [0]
    for r in records:
        for item_id, rank, score, producer in r.items:
            item_ids.append(item_id)
            ranks.append(rank)
            scores.append(score)
            producers.append(producer)
        offsets.append(len(item_ids))
    items = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.StructArray.from_arrays(
            [
                pa.array(item_ids, pa.int64()),
                pa.array(ranks, pa.int32()),
                pa.array(scores, pa.float32()),
                pa.array(producers, pa.string()),
            ],
            fields=list(ITEM),
        ),
    )
    columns = {
        name: pa.array([getattr(r, name) for r in records], SCHEMA.field(name).type)
        for name in SCHEMA.names
        if name != "items"
    }
    return pa.table({**columns, "items": items}, schema=SCHEMA)


def exposure_log(path: str, queue_size: int = 10_000, flush_s: float = 1.0, **kw) -> PartitionedLog[Exposure]:
    """The writer of exposures under `path` (hour partitions by each record's time)."""
    return PartitionedLog(path, to_table, lambda r: r.time, queue_size, flush_s, **kw)


def read_exposures(path: str) -> pa.Table:
    """Every complete exposure file under `path` as one table."""
    return read_log(path, SCHEMA)
