"""Connect to Ray once, at the edge: a running cluster when RAY_ADDRESS is set (ray job submit sets it),
else a fresh local one (`address="local"` avoids a stale ray_current_cluster file, see STACK.md)."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """num_cpus (local only): logical CPUs; default max(cores, 3) so 2 training workers leave one for
    Ray Data and the driver's actors on a 2-core machine."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        cpus = num_cpus or max(os.cpu_count() or 1, 3)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
