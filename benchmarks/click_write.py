"""What one served click costs to store: POST /v1/events' read -> merge -> write -> read back, through Feast's
FeatureStore API (get_feature_view + push, what serving/events.py did before) against the online store's own
calls on the view resolved once (serving/events.py ClickRows, what it does now), on sqlite and on Redis.

    python benchmarks/click_write.py --workdir .vlmrec/ml --out benchmarks/results/click_write.json

The workspace's data/ is materialized twice into a temporary folder (`vlmrec features`, sqlite and a
throwaway redis-server), so the workspace itself is not written. Each store is opened as the Producer opens
it (serving.online.open_online). Then --users random users each get one click by each path in turn, the
same item and time for both (in alternation, so a slow spell of the machine falls on both); every stored
sequence is checked to end with the click. Timed in-process: no HTTP, no Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from machine import RedisServer, machine_facts  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serving.state import DEFAULT_SEQUENCE_LEN  # noqa: E402


def feast_api_append(store, user_id: int, item_id: int, ts: datetime, sequence_len: int) -> list[int]:
    """The baseline: the same read -> merge -> write -> read back through FeatureStore's own API (the view
    looked up by name for each read, the row written by push)."""
    from feast.data_source import PushMode
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from serving.events import FEATURES, VIEW, Clicks, merge, utc
    from serving.online import online_lock
    from vlmrec.features import PUSH_SOURCE

    def read() -> Clicks:
        view = store.get_feature_view(VIEW, allow_registry_cache=True)
        key = EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=int(user_id))])
        ((row_ts, values),) = store._get_provider().online_read(
            config=store.config, table=view, entity_keys=[key], requested_features=list(FEATURES)
        )
        if row_ts is None or not values:
            return Clicks([], [], None)
        ids, times = values["item_ids"].int64_list_val.val, values["click_times"].int64_list_val.val
        return Clicks(list(ids), list(times), utc(row_ts))

    with online_lock(store):
        new = merge(read(), item_id, ts, sequence_len)
        row = {
            "user_id": [int(user_id)],
            "event_timestamp": [pd.Timestamp(new.row_ts)],
            "item_ids": [new.item_ids],
            "click_times": [new.times],
        }
        store.push(PUSH_SOURCE, pd.DataFrame(row), to=PushMode.ONLINE)
        back = read()
    if back.item_ids != new.item_ids:
        raise RuntimeError(f"user {user_id}: the pushed row did not read back")
    return back.item_ids


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": len(a)}


def compare(store, users: np.ndarray, items: np.ndarray, sequence_len: int, warmup: int) -> dict:
    """Each user one click by each path in turn (the baseline first for even users, second for odd)."""
    from serving.events import ClickWriter

    writer = ClickWriter()
    paths = {
        "feast_push": lambda u, i, t: feast_api_append(store, u, i, t, sequence_len),
        "direct": lambda u, i, t: writer.append(store, u, i, t, sequence_len),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    now = datetime.now(UTC)
    for n, (user, item) in enumerate(zip(users.tolist(), items.tolist(), strict=True)):
        order = list(paths) if n % 2 == 0 else list(reversed(paths))
        for k, name in enumerate(order):
            ts = now + timedelta(milliseconds=2 * n + k)
            t0 = time.perf_counter()
            seq = paths[name](user, item, ts)
            ms = (time.perf_counter() - t0) * 1e3
            if seq[-1] != item:
                raise RuntimeError(f"{name}: user {user}'s sequence does not end with the click")
            if n >= warmup:
                times[name].append(ms)
    out = {name: percentiles(v) for name, v in times.items()}
    for q in ("p50", "p99"):
        out[f"ratio_{q}"] = out["direct"][q] / out["feast_push"][q]
    return out


def materialize(workdir: Path, into: Path, env: dict[str, str], *flags: str) -> float:
    shutil.copytree(workdir / "data", into / "data")
    vlmrec = str(Path(sys.executable).with_name("vlmrec"))
    t0 = time.perf_counter()
    subprocess.run(
        [vlmrec, "features", "--workdir", str(into), *flags], check=True, env={**os.environ, **env}
    )
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path(".vlmrec/ml"), help="a workspace with data/")
    p.add_argument("--users", type=int, default=300, help="users clicked by each path (timed)")
    p.add_argument("--warmup", type=int, default=20, help="untimed users first")
    p.add_argument("--sequence-len", type=int, default=DEFAULT_SEQUENCE_LEN, help="N clicks a row keeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/click_write.json"))
    args = p.parse_args()

    from serving.online import open_online
    from vlmrec.workspace import Workspace

    ws = Workspace(args.workdir)
    events = pq.read_table(ws.events, columns=["user_id", "item_id"])
    rng = np.random.default_rng(args.seed)
    n = args.users + args.warmup
    users = rng.choice(np.unique(events.column("user_id").to_numpy()), n, replace=False)
    items = rng.choice(np.unique(events.column("item_id").to_numpy()), n)
    result: dict = {
        "command": "python benchmarks/click_write.py " + " ".join(sys.argv[1:]),
        "machine": machine_facts(),
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
        "users": args.users,
        "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="click-write-") as tmp:
        root = Path(tmp)
        result["materialize_s"] = {"sqlite": materialize(args.workdir, root / "sqlite", {})}
        store = open_online(Workspace(root / "sqlite"))
        result["stores"]["sqlite"] = compare(store, users, items, args.sequence_len, args.warmup)
        with RedisServer() as server:
            env = {"REDIS_CONNECTION_STRING": server.url}
            result["materialize_s"]["redis"] = materialize(
                args.workdir, root / "redis", env, "--online-store", "redis"
            )
            os.environ.update(env)
            store = open_online(Workspace(root / "redis"))
            result["stores"]["redis"] = compare(store, users, items, args.sequence_len, args.warmup)
    result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    for name, r in result["stores"].items():
        print(
            f"{name}: Feast push p50 {r['feast_push']['p50']:.2f} ms, direct {r['direct']['p50']:.2f} ms "
            f"(p50 ratio {r['ratio_p50']:.3f}, p99 ratio {r['ratio_p99']:.3f})",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
