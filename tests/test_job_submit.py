"""`ray job submit` against a real two-node Ray cluster runs the unchanged entry points: the student's training
job and the teacher tuning. Multi-node, locally (issue 20): a head and a second node are separate `ray start`
processes on this machine; the head has no CPU for tasks, so the job's driver runs on the head and its Ray
Train workers on the second node."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the node's process group, SIGKILL to what is left after 5 s (a head whose second node is
    gone takes about 30 s to stop on its own; the group holds every process it started)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def head_node():
    """`ray start --head --block` and a second node (`ray start --address --block`), each in its own process
    group (so teardown stops only this cluster). -> (dashboard address, client environment)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this cluster's token, shared with the client and node 2
    dashboard, gcs = free_port(), free_port()
    head = [
        f"{bin_dir}/ray", "start", "--head", "--block", "--num-cpus", "0", "--disable-usage-stats",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "true",
    ]  # fmt: skip
    second = [
        f"{bin_dir}/ray", "start", "--address", f"127.0.0.1:{gcs}", "--block", "--num-cpus", "3",
        "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
    ]  # fmt: skip
    subprocess.run(
        [f"{bin_dir}/ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True
    )
    procs = [subprocess.Popen(
        head, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait(lambda: run_ray(env, "job", "list", "--address", address).returncode == 0, "the head node")
        procs.append(subprocess.Popen(
            second, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ))  # fmt: skip
        _wait(lambda: len(alive_nodes(address, env)) == 2, "the second node")
        yield address, env
    finally:
        for proc in reversed(procs):
            _stop(proc)


def run_ray(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("ray")), *args], env=env, capture_output=True, text=True
    )


def _wait(ready, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            pytest.fail(f"{what} did not come up")
        time.sleep(1)


def alive_nodes(address: str, env: dict) -> list[dict]:
    done = run_ray(env, "list", "nodes", "--address", address, "--format", "json", "--filter", "state=ALIVE")
    out = done.stdout
    return json.loads(out[out.index("[") :]) if done.returncode == 0 and "[" in out else []


def submit(head_node, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` of this repo with `entrypoint`; asserts the job succeeded."""
    address, env = head_node
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_training_runs_unchanged_under_ray_job_submit(head_node, sample_workspace):
    ws = sample_workspace
    done = submit(
        head_node,
        "python", "-m", "training.train", "--workdir", str(ws.root), "--name", "submitted",
        "--epochs", "1", "--max-len", "8", "--batch-size", "16", "--d-model", "16",
    )  # fmt: skip
    assert "succeeded" in done.stdout + done.stderr
    run = json.loads((ws.runs / "submitted" / "export" / "run.json").read_text())
    assert run["last"]["epoch"] == 1 and run["teacher_id"].startswith("minilm:")
    # across the two nodes: the driver on the head, the Ray Train workers on the second node
    address, env = head_node
    nodes = {n["node_id"]: n["is_head_node"] for n in alive_nodes(address, env)}
    listed = run_ray(env, "list", "actors", "--address", address, "--format", "json", "--detail",
                     "--filter", "class_name=RayTrainWorker", "--limit", "100")  # fmt: skip
    assert listed.returncode == 0 and "[" in listed.stdout, listed.stdout[-2000:] + listed.stderr[-2000:]
    workers = [a["node_id"] for a in json.loads(listed.stdout[listed.stdout.index("[") :])]
    assert len(nodes) == 2 and workers and not any(nodes[n] for n in workers), (nodes, workers)


def test_teacher_tuning_runs_unchanged_under_ray_job_submit(head_node, sample_workspace):
    ws = sample_workspace
    submit(
        head_node,
        "python", "-m", "teacher.tune.cli", "--workdir", str(ws.root), "--name", "submitted-tune",
        "--epochs", "1", "--max-pairs", "120", "--batch-size", "16", "--num-workers", "1",
    )  # fmt: skip
    tuned = json.loads((ws.runs / "submitted-tune" / "export" / "model" / "teacher.json").read_text())
    assert tuned["teacher_id"].startswith("minilm:") and "+lora@" in tuned["teacher_id"]
