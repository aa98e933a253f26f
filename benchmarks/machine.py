"""What every benchmark records about the machine it ran on, and the throwaway servers some of them start.

from machine import RedisServer, machine_facts   # benchmarks/ is on sys.path when run as a script
result["machine"] = machine_facts()
with RedisServer() as server:                    # redis-server on 127.0.0.1, no persistence
    env = {"REDIS_CONNECTION_STRING": server.url}
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine_facts() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None
    )
    mem_kb = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    redis_server = shutil.which("redis-server")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "gpu": None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            p: version(p)
            for p in ("torch", "transformers", "feast", "ray", "pyarrow", "numpy", "pandas", "redis")
        },
        "redis_server": (
            subprocess.run([redis_server, "--version"], capture_output=True, text=True).stdout.split()[2]
            if redis_server
            else None
        ),
        "git": git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
        "niceness": os.nice(0),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (no persistence); stopped on exit."""

    def __enter__(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (make test installs Debian's package)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
            + ["--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    self.__exit__()
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        self.url = f"127.0.0.1:{self.port}"
        return self

    def memory(self) -> dict:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        return {
            "keys": client.dbsize(),
            "used_memory_mb": round(client.info("memory")["used_memory"] / 1e6, 1),
        }

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
