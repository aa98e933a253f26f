"""Local Ray is sized from the CPUs a process may use (affinity, cgroup quota), not the node's cores."""

from __future__ import annotations

import os

import pytest

from vlmrec.raycluster import available_cpus

CORES = len(os.sched_getaffinity(0))


def _write(folder, files: dict[str, str]):
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, min(CORES, 2)),  # v2: 1.5 CPUs -> 2
        ({"cpu.max": "50000 100000\n"}, 1),  # v2: half a CPU -> 1, never 0
        ({"cpu.max": "max 100000\n"}, CORES),  # v2: unlimited
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1: 1 CPU
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, CORES),
        ({"cpu.max": "garbage\n"}, CORES),  # unreadable: the affinity mask
        ({}, CORES),  # no cgroup files at all
    ],
)
def test_available_cpus_follows_the_cgroup_quota(tmp_path, files, expected):
    assert available_cpus(_write(tmp_path, files)) == expected


def test_a_quota_above_the_affinity_mask_changes_nothing(tmp_path):
    files = {"cpu.max": f"{(CORES + 8) * 100000} 100000\n"}
    assert available_cpus(_write(tmp_path, files)) == CORES
