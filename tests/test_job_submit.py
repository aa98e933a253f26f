"""`ray job submit` against a real local head node runs the unchanged entry points: the student's training job and
the teacher tuning (one head node for both)."""

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


@pytest.fixture(scope="module")
def head_node():
    """`ray start --head --block` in its own process group (so teardown stops only this cluster)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this cluster's token, shared with the client
    dashboard = free_port()
    cmd = [
        f"{bin_dir}/ray", "start", "--head", "--block", "--num-cpus", "3", "--disable-usage-stats",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "true",
    ]  # fmt: skip
    subprocess.run(
        [f"{bin_dir}/ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True
    )
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run(
            [f"{bin_dir}/ray", "job", "list", "--address", address], env=env, capture_output=True
        )
        if ok.returncode == 0:
            break
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the Ray head node did not come up")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


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


def test_teacher_tuning_runs_unchanged_under_ray_job_submit(head_node, sample_workspace):
    ws = sample_workspace
    submit(
        head_node,
        "python", "-m", "teacher.tune.cli", "--workdir", str(ws.root), "--name", "submitted-tune",
        "--epochs", "1", "--max-pairs", "120", "--batch-size", "16", "--num-workers", "1",
    )  # fmt: skip
    tuned = json.loads((ws.runs / "submitted-tune" / "export" / "model" / "teacher.json").read_text())
    assert tuned["teacher_id"].startswith("minilm:") and "+lora@" in tuned["teacher_id"]
