"""Snapshots of the Qdrant server's served collections, and their retention (`vlmrec index snapshot`).

    QDRANT_URL=http://vlmrec-qdrant:6333 vlmrec index snapshot --backend server --keep 3

For every alias (each points at the served version of one index: items-student, items_sasrec,
items_teacher, ...), Qdrant writes a snapshot of that collection under its snapshots path (a PVC in
Kubernetes, k8s/base/qdrant.yaml), then all but the newest `keep` snapshots of it are deleted. Collections no
alias points at (older versions) are left to `vlmrec index build`'s pruning. Restore: docs/DEPLOY.md
("Qdrant snapshots").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SnapshotReport:
    alias: str
    collection: str
    created: str
    deleted: tuple[str, ...]


def snapshot_aliases(client, keep: int = 3) -> list[SnapshotReport]:
    """Snapshot every aliased collection once, keep its newest `keep` snapshots."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    reports = []
    aliases = sorted(client.get_aliases().aliases, key=lambda a: a.alias_name)
    for alias in aliases:
        made = client.create_snapshot(collection_name=alias.collection_name, wait=True)
        snapshots = sorted(
            client.list_snapshots(collection_name=alias.collection_name),
            key=lambda s: (s.creation_time or "", s.name),
            reverse=True,
        )
        stale = [s.name for s in snapshots[keep:]]
        for name in stale:
            client.delete_snapshot(collection_name=alias.collection_name, snapshot_name=name, wait=True)
        reports.append(SnapshotReport(alias.alias_name, alias.collection_name, made.name, tuple(stale)))
    return reports
