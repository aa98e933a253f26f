"""Where the Producer replica's CPU goes at 32 concurrent clients: py-spy samples of the replica process while
the load generator of benchmarks/producer.py runs, grouped by what the code does.

    python benchmarks/profile_producer.py --workdir .vlmrec/ml --out benchmarks/results/producer_profile.json

The Producer is served as in benchmarks/producer.py (the default student, its own index, access log off);
after a warm-up, py-spy (in the dev environment, `pip install py-spy`) records the replica for --seconds at
--rate samples/s while --requests single /v1/candidates requests run at concurrency 32. Shares are of the
replica's active samples (idle threads are not sampled); a sample counts toward every group whose code is on
its stack, so groups overlap where one calls the other (the model forward inside a producer's rank).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from producer import load  # benchmarks/ is on sys.path when run as a script

from vlmrec.workspace import Workspace

# group -> the frames (substrings of "function (file:line)") that mark a stack as doing it
GROUPS = {
    "model forward (SeqRec)": ["ModelSource.user_vectors", "SeqRec."],
    "index search (Qdrant Edge)": ["EdgeIndex._search", "_edge_filter"],
    "feature read (online store)": ["online_read", "read_features"],
    "item age (buckets, queries)": ["age_queries", "live_buckets"],
    "exposure log (writer thread)": ["PartitionedLog"],
    "metrics (ray.util.metrics)": ["_RayMetrics", "Metric._record", "ReplicaMetricsManager"],
    "Serve request plumbing (ASGI proxy calls, replica)": ["ASGIReceiveProxy", "Replica.handle_request"],
    "FastAPI / Starlette (routing, body)": ["fastapi/", "starlette/"],
    "pipeline + coalescer (our glue)": ["Pipeline.", "Coalescer."],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".vlmrec/ml")
    p.add_argument("--run", default="student-hybrid-age-fusion")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/producer_profile.json")
    args = p.parse_args()
    if shutil.which("py-spy") is None and not Path(sys.executable).with_name("py-spy").exists():
        sys.exit("py-spy is not installed: pip install py-spy")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    from serving.cli import start, stop
    from serving.config import ProducerConfig

    ws = Workspace(args.workdir)
    index_dir = ws.root / "bench-index" / args.run
    if not index_dir.exists():
        sys.exit(f"{index_dir} is missing: run benchmarks/producer.py first (it builds it)")
    users = np.unique(pq.read_table(ws.events, columns=["user_id"]).column(0).to_numpy())
    loadavg = {"start": [round(x, 2) for x in os.getloadavg()]}
    config = ProducerConfig(workdir=args.workdir, run=args.run, index_dir=str(index_dir))
    url = f"{start(config, port=args.port, access_log=False)}/v1/candidates"
    raw = Path(tempfile.mkdtemp()) / "replica.txt"
    try:
        asyncio.run(load(url, users, 100, 4, 100, seed=99))  # warm-up
        found = subprocess.run(
            ["pgrep", "-f", "ServeReplica:vlmrec-producer:Producer"], capture_output=True, text=True
        )
        pid = int(found.stdout.split()[0])
        result: dict = {}
        loader = threading.Thread(
            target=lambda: result.update(asyncio.run(load(url, users, args.requests, 32, 100, seed=1)))
        )
        loader.start()
        time.sleep(2)  # past the ramp
        cmd = [py_spy, "record", "-p", str(pid), "-d", str(args.seconds), "-r", str(args.rate), "-f", "raw",
               "-o", str(raw), "--nonblocking"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        loader.join()
    finally:
        stop()
    loadavg["end"] = [round(x, 2) for x in os.getloadavg()]

    total, groups, leaves = 0, Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        total += int(n)
        leaves[stack.split(";")[-1]] += int(n)
        for group, marks in GROUPS.items():
            if any(m in stack for m in marks):
                groups[group] += int(n)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    out = {
        "command": " ".join(["python", "benchmarks/profile_producer.py", *sys.argv[1:]]),
        "commit": commit.strip(),
        "samples": total,
        "load": {k: result[k] for k in ("requests_per_s", "latency_ms", "errors") if k in result},
        "share_by_group": {g: round(groups[g] / total, 4) for g in GROUPS},
        "top_leaf_frames": [{"frame": f, "share": round(c / total, 4)} for f, c in leaves.most_common(15)],
        "load_average": loadavg,
        "note": "shares of the replica's sampled stacks; groups overlap where one calls the other",
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("load", "share_by_group")}, indent=2))


if __name__ == "__main__":
    main()
