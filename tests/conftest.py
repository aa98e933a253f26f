"""Shared fixtures: small data made here (never the benchmark data), a real redis-server on 127.0.0.1, one Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vlmrec.features import feast_unchecked

feast_unchecked()  # Feast as every entry point of the product imports it, before a test module imports it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def pytest_collection_modifyitems(items):
    """tests/test_docs.py runs last: the README's `ray stop` stops every Ray on the machine, the session's
    one too (tests/test_docs.py shuts that one down first)."""
    items.sort(key=lambda item: item.path.name == "test_docs.py")  # stable: the rest keep their order


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


def postgres_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (not on PATH: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name)
    )
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 with a database `feast` (make test installs Debian's
    postgresql when missing); a SQLAlchemy URL to it. As root, the server runs as the package's `postgres`
    user (PostgreSQL refuses to run as root)."""
    import pwd

    bin_dir = postgres_binaries()
    if bin_dir is None:
        pytest.fail("PostgreSQL is not installed: run `make test` (it installs Debian's postgresql)")
    import tempfile

    # not under pytest's tmp folder: it is private to root, and the server may run as `postgres`
    root = Path(tempfile.mkdtemp(prefix="vlmrec-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "vlmrec", "--auth=trust", "-E", "UTF8"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proc = subprocess.Popen(
        [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(sockets)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    import psycopg

    deadline = time.time() + 30
    while True:
        try:
            with psycopg.connect(f"postgresql://vlmrec@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE feast")
            break
        except psycopg.OperationalError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("PostgreSQL did not start")
            time.sleep(0.2)
    yield f"postgresql+psycopg://vlmrec@127.0.0.1:{port}/feast"
    proc.terminate()
    proc.wait(timeout=30)
    shutil.rmtree(root, ignore_errors=True)


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
    from teacher.embed import EmbedConfig, embed_catalogue
    from vlmrec.features import apply_and_materialize
    from vlmrec.ingest import IngestConfig, ingest
    from vlmrec.sample import SampleConfig, generate_sample
    from vlmrec.workspace import Workspace

    root = tmp_path_factory.mktemp("sample")
    paths = generate_sample(root / "raw", SampleConfig(seed=3, n_users=40, n_items=60, mean_events=12))
    ws = Workspace(root / "ws")
    ingest(paths.events, paths.catalogue, ws, IngestConfig(max_len=8))
    embed_catalogue(ws, EmbedConfig(batch_size=16))  # in this process: a small catalogue
    apply_and_materialize(ws)
    return ws


@pytest.fixture(scope="session")
def snapshot_workspace(sample_workspace, tmp_path_factory):
    """The sample workspace ingested with a sequence snapshot per event (`--sequences snapshots`), as
    Feast's point-in-time join (training's in-memory `prepare_data`) needs; the same embeddings."""
    return reingest(sample_workspace, tmp_path_factory.mktemp("snapshots"), max_len=8)


def reingest(sample_workspace, root, max_len: int):
    """The sample's raw data ingested again into root/ws with per-event snapshots, embeddings copied,
    materialized."""
    import shutil

    from vlmrec.features import apply_and_materialize
    from vlmrec.ingest import IngestConfig, ingest
    from vlmrec.workspace import Workspace

    ws = Workspace(root / "ws")
    raw = sample_workspace.root.parent / "raw"  # the fixture's generated sample
    ingest(
        raw / "events.csv", raw / "catalogue.csv", ws, IngestConfig(max_len=max_len, sequences="snapshots")
    )
    shutil.copy(sample_workspace.embeddings, ws.embeddings)
    apply_and_materialize(ws)
    return ws
