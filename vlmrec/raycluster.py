"""Connect to Ray once, at the edge: a running cluster when RAY_ADDRESS is set (ray job submit sets it),
else a fresh local one (`address="local"` avoids a stale ray_current_cluster file, see STACK.md)."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
