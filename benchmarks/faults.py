"""Dependency faults while clients keep calling: what each costs, and to whom.

    nice -n 5 .venv/bin/python benchmarks/faults.py --seconds 10 --out benchmarks/results/faults.json

Each fault runs against a live Producer over a tiny world of its own (tests/producer_world.py) while a
client loop calls, every 50-200 ms: GET /healthz, /v1/candidates of the `popular` producer (needs no index)
and of the default `student`, and POST /v1/events. Faults, each `--seconds` long:
    sqlite_lock   another process holds a write lock on the sqlite online store (BEGIN IMMEDIATE)
    redis_stop    the Redis online store's redis-server is SIGSTOPped (then SIGCONT)
    slow_index    every index search takes 2 s more (Serve's local testing mode: the fault is patched into
                  the replica's process; the client calls go through the same route methods)
    replica_kill  the only replica's process is SIGKILLed (HTTP; Serve starts a new one and retries the
                  requests it held); replica_kill_of_2: one of two replicas
For each fault and call: requests during the fault, errors (non-200), fallbacks, p99 latency, and the
seconds from the fault's end until that call answers normally again. tests/test_serving_faults.py runs
the same harness with short faults and asserts the bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, method, path, body, period s): the calls the client loop repeats
CALLS = [
    ("healthz", "GET", "/healthz", None, 0.05),
    ("popular", "POST", "/v1/candidates", {"user_id": 1, "k": 5, "producer": "popular"}, 0.1),
    ("student", "POST", "/v1/candidates", {"user_id": 2, "k": 5}, 0.1),
    ("events", "POST", "/v1/events", {"user_id": 9_000_003, "item_id": 1001}, 0.2),  # a user of its own
]
LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


@dataclass
class Record:
    call: str
    t0: float
    seconds: float
    status: int | str
    fallback: str | None


@dataclass
class ClientLoop:
    """One thread per call, each repeating it until stopped; every answer recorded."""

    send: Callable[[str, str, str, dict | None], tuple[int, dict]]  # (name, method, path, body) -> answer
    calls: list = field(default_factory=lambda: list(CALLS))
    records: list[Record] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self, name, method, path, body, period) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status, answer = self.send(name, method, path, body)
                fallback = answer.get("fallback") if isinstance(answer, dict) else None
            except Exception as exc:  # a client-side timeout or a refused connection
                status, fallback = type(exc).__name__, None
            self.records.append(Record(name, t0, time.monotonic() - t0, status, fallback))
            self._stop.wait(max(0.0, period - (time.monotonic() - t0)))

    def __enter__(self) -> ClientLoop:
        self._threads = [threading.Thread(target=self._loop, args=c, daemon=True) for c in self.calls]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop calling and wait for the calls in flight (a hanging call ends by its client timeout)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def __exit__(self, *exc) -> None:
        self.stop()

    def table(self, start: float, end: float) -> dict:
        """Per call: the requests in flight at any time during [start, end) (a request that hangs through
        the whole fault counts), their errors, fallbacks, p99, and the seconds from `end` until the call
        first answered normally (200, no fallback) again."""
        out = {}
        for name, *_ in self.calls:
            rec = [r for r in self.records if r.call == name]
            during = [r for r in rec if r.t0 < end and r.t0 + r.seconds > start]
            ok_after = [r.t0 + r.seconds for r in rec if r.t0 >= end and r.status == 200 and not r.fallback]
            lat = np.array([r.seconds for r in during]) * 1e3
            out[name] = {
                "requests": len(during),
                "errors": sum(1 for r in during if r.status != 200),
                "statuses": sorted({str(r.status) for r in during}),
                "fallbacks": sum(1 for r in during if r.fallback),
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
                "max_ms": round(float(lat.max()), 1) if len(lat) else None,
                "recover_s": round(min(ok_after) - end, 2) if ok_after else None,
            }
        return out


def http_sender(url: str, headers: dict | None = None, timeout: float = 60.0):
    import httpx

    clients = threading.local()

    def send(name, method, path, body):
        if not hasattr(clients, "c"):
            clients.c = httpx.Client(base_url=url, timeout=timeout, headers=headers)
        r = clients.c.request(method, path, json=body)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {}

    return send


def local_sender(handle):
    """Calls of a local-testing-mode handle, as the routes would get them."""
    from serving.api import CandidatesRequest, EventRequest

    def send(name, method, path, body):
        if path == "/healthz":
            return 200, handle.healthz.remote().result()
        if path == "/v1/events":
            resp = handle.events.remote(EventRequest(**body)).result()
        else:
            resp = handle.candidates.remote(CandidatesRequest(**body)).result()
        return resp.status_code, json.loads(resp.body)

    return send


def run_fault(loop: ClientLoop, fault: Callable[[float], None], seconds: float, warm_s: float, tail_s: float):
    """warm_s of normal calls, the fault (blocking for `seconds`), tail_s after -> the loop's table."""
    time.sleep(warm_s)
    start = time.monotonic()
    fault(seconds)
    end = time.monotonic()
    time.sleep(tail_s)
    loop.stop()  # calls still hanging are counted when they end
    return {
        "fault_s": round(end - start, 2),
        "before": loop.table(start - warm_s, start),
        **loop.table(start, end),
    }


def lock_sqlite(db: Path) -> Callable[[float], None]:
    def fault(seconds: float) -> None:
        proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)], stdout=subprocess.PIPE)
        proc.stdout.readline()  # "locked"
        proc.wait()

    return fault


def stop_process(pid: int) -> Callable[[float], None]:
    def fault(seconds: float) -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    return fault


def slow_index(delay_s: float = 2.0) -> Callable[[float], None]:
    """Every Edge search of this process sleeps `delay_s` while the fault lasts."""
    import index.search

    def fault(seconds: float) -> None:
        real = index.search.EdgeIndex._search

        def slow(self, *args, **kwargs):
            time.sleep(delay_s)
            return real(self, *args, **kwargs)

        index.search.EdgeIndex._search = slow
        try:
            time.sleep(seconds)
        finally:
            index.search.EdgeIndex._search = real

    return fault


def replica_pids(app: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{app}:"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_replica(app: str) -> Callable[[float], None]:
    """SIGKILL the app's replica process; the fault 'lasts' until Serve runs a new replica (or `seconds`)."""

    def fault(seconds: float) -> None:
        before = replica_pids(app)
        pid = before[0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if [p for p in replica_pids(app) if p not in before]:
                return
            time.sleep(0.05)

    return fault


@contextlib.contextmanager
def redis_server(workdir: Path):
    """A throwaway redis-server on 127.0.0.1 -> (address, pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        + ["--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


def deploy(
    config, env: dict[str, str] | None = None, name: str = "vlmrec-producer", replicas: int = 1
) -> str:
    """The Producer over HTTP on 127.0.0.1 (a free port), `env` in its replica's environment -> url."""
    from ray import serve

    from serving.config import REQUEST_TIMEOUT_S
    from serving.producer import Producer
    from tests.producer_world import free_port
    from vlmrec.raycluster import init_ray

    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    options = {"runtime_env": {"env_vars": env}} if env else {}
    serve.run(
        Producer.options(
            user_config=config.to_dict(), ray_actor_options=options, num_replicas=replicas
        ).bind(),
        name=name,
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"


def production_timeouts(config):
    """The shipped timeouts (the test world's are generous for a busy box)."""
    from serving.config import ProducerConfig

    d = ProducerConfig()
    return replace(
        config,
        feature_timeout_s=d.feature_timeout_s,
        search_timeout_s=d.search_timeout_s,
        event_timeout_s=d.event_timeout_s,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="how long each fault lasts")
    p.add_argument(
        "--faults",
        nargs="+",
        default=["sqlite_lock", "redis_stop", "replica_kill", "replica_kill_of_2", "slow_index"],
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/faults.json")
    args = p.parse_args(argv)

    from ray import serve

    from serving.producer import producer_app
    from tests.producer_world import write_world
    from vlmrec.features import FeaturesConfig, apply_and_materialize

    root = Path(tempfile.mkdtemp(prefix="vlmrec-faults-"))
    world = write_world(root / "sqlite")
    config = production_timeouts(world.config)
    results: dict = {"loadavg_before": [round(x, 2) for x in os.getloadavg()], "faults": {}}
    if "slow_index" in args.faults[:-1]:  # a local-mode replica leaves the class unpicklable for a deploy
        raise SystemExit("slow_index (local testing mode) must come last")
    for name in args.faults:
        print(f"faults: {name} for {args.seconds:g} s", flush=True)
        if name == "sqlite_lock":
            url = deploy(config)
            with ClientLoop(http_sender(url)) as loop:
                table = run_fault(loop, lock_sqlite(world.ws.root / "online.db"), args.seconds, 3, 5)
            serve.shutdown()
        elif name == "redis_stop":
            with redis_server(root) as (address, pid):
                os.environ["REDIS_CONNECTION_STRING"] = address
                rworld = write_world(root / "redis")
                apply_and_materialize(rworld.ws, FeaturesConfig(online_store="redis"))
                url = deploy(production_timeouts(rworld.config), env={"REDIS_CONNECTION_STRING": address})
                with ClientLoop(http_sender(url)) as loop:
                    table = run_fault(loop, stop_process(pid), args.seconds, 3, 8)
                serve.shutdown()
        elif name == "slow_index":
            handle = serve.run(producer_app(config), name="faults-local", _local_testing_mode=True)
            deadline = time.monotonic() + 60
            while handle.readyz.remote().result().status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            with ClientLoop(local_sender(handle)) as loop:
                table = run_fault(loop, slow_index(), args.seconds, 3, 5)
        elif name in ("replica_kill", "replica_kill_of_2"):  # the only replica, or one of two
            url = deploy(config, replicas=2 if name.endswith("of_2") else 1)
            time.sleep(2)  # both replicas answering
            with ClientLoop(http_sender(url, timeout=60)) as loop:
                table = run_fault(loop, kill_replica("vlmrec-producer"), 120, 3, 10)
            serve.shutdown()
        else:
            raise SystemExit(f"unknown fault {name!r}")
        table["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        results["faults"][name] = table
        print(
            json.dumps({name: {c: table[c] for c in ("fault_s", "healthz", "popular", "student", "events")}})
        )
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"] = {"cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
