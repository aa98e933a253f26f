"""Materializing the online store through Feast's two offline stores, on the same grown workspaces: the file
store (Feast's parquet store in the `vlmrec features` process, the embedded default) and the Ray store and
engine (`--offline-store ray`: Ray Data reads the sources, Ray tasks write the online store), each from a
fresh copy of the workspace, same run.

    python benchmarks/scale.py --base .vlmrec/ml --sizes 1000000 10000000 ...   # leaves .vlmrec/scale/<n>/ws
    python benchmarks/materialize_stores.py --workspaces .vlmrec/scale/1000000/ws .vlmrec/scale/10000000/ws \
        --out benchmarks/results/materialize_stores.json

Per workspace and store, in <workspace>-<store>/ (its data/ a link to the workspace's, so only the Feast repo,
registry and online store are new): `vlmrec features --workdir ... --offline-store <store>`, sampled by
scale.py's sampler (the process is the driver, its `ray::` processes the workers; `tree_peak_pss_mb`: what the
whole process tree held, shared pages such as Ray's object store counted once, which is what
--memory-limit-gb is checked against); then each online store's tables, their rows and a digest of their
contents, compared between the stores (`same_online_store`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (the stage runner and its memory sampler)

STORES = ("file", "ray")


def online_tables(workdir: Path) -> dict[str, dict]:
    """Per table of the workspace's sqlite online store: its rows and a digest of what they hold (entity,
    feature, value, event time, in key order; not when they were written)."""
    with sqlite3.connect(workdir / "online.db") as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        got = {}
        for t in sorted(tables):
            digest, rows = hashlib.sha256(), 0
            query = f'SELECT entity_key, feature_name, value, event_ts FROM "{t}" ORDER BY entity_key, feature_name'
            for row in db.execute(query):
                digest.update(repr(row).encode())
                rows += 1
            got[t] = {"rows": rows, "sha256": digest.hexdigest()}
        return got


def one_workspace(ws: Path, log: Path) -> dict:
    got = {}
    for store in STORES:
        work = ws.parent / f"{ws.name}-{store}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        (work / "data").symlink_to((ws / "data").resolve())
        argv = [
            sys.executable,
            "-m",
            "vlmrec.cli",
            "features",
            "--workdir",
            str(work),
            "--offline-store",
            store,
        ]
        run = scale.stage(f"materialize ({store})", argv, log, may_stop=True, pss=True)
        got[store] = {
            "wall_s": None if run.get("stopped") else run["wall_s"],
            "driver_peak_rss_mb": run["driver_mb"],
            "worker_peak_rss_mb": run["workers_mb"],
            "tree_peak_pss_mb": run["tree_mb"],
            **({"stopped": run["stopped"]} if run.get("stopped") else {"online_tables": online_tables(work)}),
        }
        shutil.rmtree(work)
    tables = [got[s].get("online_tables") for s in STORES]
    return {**got, "same_online_store": None if None in tables else tables[0] == tables[1]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspaces", type=Path, nargs="+", required=True, help="scale.py's <workroot>/<n>/ws")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/materialize_stores.json"))
    p.add_argument("--memory-limit-gb", type=float, default=18.0, help="a run holding more is killed")
    args = p.parse_args(argv)
    args.workspaces = [ws.resolve() for ws in args.workspaces]  # stages run in the project's root
    scale._LIMIT_MB = args.memory_limit_gb * 1024
    for ws in args.workspaces:
        if not (ws / "data" / "events.parquet").exists():
            p.error(f"--workspaces: {ws} has no data/events.parquet (run benchmarks/scale.py first)")
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=scale.ROOT, capture_output=True, text=True
    )
    out = {
        "command": "python benchmarks/materialize_stores.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git.stdout.strip(),
        "machine": f"{os.cpu_count()} cores",
        "workspaces": {},
    }
    for ws in args.workspaces:
        events = pq.ParquetFile(ws / "data" / "events.parquet").metadata.num_rows
        out["workspaces"][str(events)] = {"workdir": str(ws), **one_workspace(ws, ws.parent / "log.txt")}
        out["workspaces"][str(events)]["load_average"] = list(os.getloadavg())
        args.out.write_text(json.dumps(out, indent=2))  # each workspace as it finishes
    print(json.dumps(out["workspaces"], indent=1))


if __name__ == "__main__":
    main()
