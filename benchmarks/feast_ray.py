"""Feast's file offline store against its Ray offline store and compute engine (issue 20), same workspace.

    python benchmarks/feast_ray.py --workdir .vlmrec/ml --out benchmarks/results/feast_ray.json

For each store, in a fresh process on a copy of the workspace's parquet sources (events, click-sequence
snapshots, items, embeddings): `vlmrec features --offline-store S` (feast apply + the first, full
materialization of every view into sqlite), then the training job's point-in-time join (the queries
`vlmrec train` asks with its defaults: `training.train.example_queries` over the learnable events, max_len
200, with its validation rows). Wall time per stage, the process's peak RSS, and whether the two stores
return the same sequences and online store (digests). `vlmrec features` refuses the Ray store for data
where a user clicks twice in one second (MovieLens); this benchmark measures it anyway and says so. Local Ray (started by the stage itself, as `vlmrec train`
and `vlmrec features` do), the 2 cores shared by nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STORES = ("file", "ray")


def one(workdir: Path, store: str) -> dict:
    """Both stages in this process, on the workspace at `workdir` (a scratch copy)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from training.train import example_queries
    from vlmrec import features
    from vlmrec.features import (
        FeaturesConfig,
        apply_and_materialize,
        historical_sequences,
        online_sequences,
        open_store,
    )
    from vlmrec.split import SplitConfig, learnable_events
    from vlmrec.workspace import Workspace

    ws = Workspace(workdir)
    refused = None
    if store == "ray":
        try:
            features.same_second_clicks(ws)
        except ValueError as exc:  # `vlmrec features` stops here; measured anyway, to show why
            refused = str(exc)
        features.same_second_clicks = lambda ws: None
    t0 = time.perf_counter()
    report = apply_and_materialize(ws, FeaturesConfig(offline_store=store))
    materialize_s = time.perf_counter() - t0
    events = pq.read_table(ws.events).to_pandas()
    queries, valid = example_queries(learnable_events(events, SplitConfig()), 200)
    asked = pd.concat([queries, valid], ignore_index=True)
    t0 = time.perf_counter()
    got = historical_sequences(open_store(ws), asked)
    pit_s = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(got["item_ids"].tolist()).encode()).hexdigest()
    online = online_sequences(open_store(ws), sorted(events["user_id"].unique().tolist()))
    reference = Path(workdir).parent / "file" / "online.json"  # the file store's, written first
    if store == "file":
        reference.write_text(json.dumps(sorted(online.items())))
        differing = 0
    else:
        differing = sum(1 for u, seq in json.loads(reference.read_text()) if online.get(u) != seq)
    return {
        "features_s": round(materialize_s, 2),
        "apply_s": report["apply_s"],
        "materialize_s": report["materialize_s"],
        "pit_join_s": round(pit_s, 2),
        "refused_by_vlmrec_features": refused,
        "pit_rows": len(asked),
        "pit_ids": int(got["item_ids"].map(len).sum()),
        "pit_sha256": digest,
        "online_users_differing": differing,
        "online_sha256": hashlib.sha256(json.dumps(sorted(online.items())).encode()).hexdigest(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".vlmrec/ml", help="an ingested and embedded workspace")
    p.add_argument("--scratch", default="/tmp/vlmrec-feast-ray")
    p.add_argument("--out", default="benchmarks/results/feast_ray.json")
    p.add_argument("--one", choices=STORES, help=argparse.SUPPRESS)  # internal: one store, this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.scratch) / args.one, args.one)))
        return

    from vlmrec.workspace import Workspace

    src = Workspace(args.workdir)
    load = [os.getloadavg()[0]]
    results = {}
    for store in STORES:
        dst = Workspace(Path(args.scratch) / store)
        shutil.rmtree(dst.root, ignore_errors=True)
        dst.root.mkdir(parents=True)
        for path in (src.events, src.sequences, src.items, src.embeddings):
            target = dst.root / path.relative_to(src.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        cmd = [sys.executable, __file__, "--one", store, "--scratch", args.scratch]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[store] = json.loads(out.strip().splitlines()[-1])
        load.append(os.getloadavg()[0])
        print(store, results[store], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    file_pit, ray_pit = results["file"]["pit_ids"], results["ray"]["pit_ids"]
    report = {
        "command": " ".join(["python", "benchmarks/feast_ray.py", *sys.argv[1:]]),
        "commit": commit.strip(),
        "workspace": str(src.root),
        "stores": results,
        "same_sequences": results["file"]["pit_sha256"] == results["ray"]["pit_sha256"],
        "same_online_store": results["file"]["online_sha256"] == results["ray"]["online_sha256"],
        "online_users_differing": results["ray"]["online_users_differing"],
        "pit_ids_lost_on_ray": file_pit - ray_pit,
        "ratio_ray_over_file": {
            k: round(results["ray"][k] / results["file"][k], 2)
            for k in ("features_s", "pit_join_s", "peak_rss_mb")
            if results["file"][k]
        },
        "load_average_1min": load,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
