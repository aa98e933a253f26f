"""Connect to Ray once, at the edge: a running cluster when RAY_ADDRESS is set (ray job submit sets it),
else a fresh local one (`address="local"` avoids a stale ray_current_cluster file, see STACK.md)."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path = CGROUP) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a Kubernetes pod's
    `limits.cpu`, rounded up), not the node's cores: a local Ray sized from os.cpu_count() in a 4-CPU pod
    on a 64-core node would start 64 workers' worth of tasks and thrash."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs allowed by cgroup v2 (cpu.max "<quota> <period>") or v1 (cpu.cfs_quota_us / cpu.cfs_period_us);
    None when unlimited or unreadable."""
    try:
        v2 = cgroup / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = cgroup / "cpu" if (cgroup / "cpu").is_dir() else cgroup / "cpu,cpuacct"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def init_ray(num_cpus: int | None = None) -> None:
    """num_cpus (local only): logical CPUs; default max(available CPUs, 3) so 2 training workers leave one
    for Ray Data and the driver's actors on a 2-core machine."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        cpus = num_cpus or max(available_cpus(), 3)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
