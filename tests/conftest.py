"""Shared fixtures: small data made here (never the benchmark data), a real redis-server on 127.0.0.1, one Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A throwaway redis-server bound to 127.0.0.1 (make test installs Debian's package when missing)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test` (it installs Debian's redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs seconds)."""
    import ray

    from vlmrec.raycluster import init_ray

    init_ray(num_cpus=3)  # 2 training workers + a CPU for Ray Data
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_workspace(tmp_path_factory, ray_local):
    """A small sample dataset ingested, embedded with minilm and materialized: the stages' real outputs."""
    from vlmrec.embed import EmbedConfig, embed_catalogue
    from vlmrec.features import apply_and_materialize
    from vlmrec.ingest import IngestConfig, ingest
    from vlmrec.sample import SampleConfig, generate_sample
    from vlmrec.workspace import Workspace

    root = tmp_path_factory.mktemp("sample")
    paths = generate_sample(root / "raw", SampleConfig(seed=3, n_users=40, n_items=60, mean_events=12))
    ws = Workspace(root / "ws")
    ingest(paths.events, paths.catalogue, ws, IngestConfig(max_len=8))
    embed_catalogue(ws, EmbedConfig(batch_size=16, num_actors=1))
    apply_and_materialize(ws)
    return ws
