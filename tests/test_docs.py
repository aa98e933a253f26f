"""README.md and docs/DEPLOY.md as written: every command of every ```bash block either runs here, in a fresh
shell of a fresh checkout (the tracked files and the project's .venv, nothing else in the environment), or is
listed with the reason it cannot (a Kubernetes cluster, an image registry, model weights, a placeholder for
the reader's own workspace or data, an interactive page).

The commands that run, in the README's order: `make demo`; the training section (local training, evaluation,
then the local Ray cluster path: `ray start --head`, `ray job submit`, `ray stop`); the Producer section and
the Mixer's `curl` in one shell, with the Producer in the background. About five minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/DEPLOY.md")


@dataclass(frozen=True)
class Command:
    doc: str
    block: int  # 0-based index of its ```bash block in the doc
    text: str  # as written: continuation lines kept with their backslashes


def commands(doc: str) -> list[Command]:
    """Every command of every ```bash block of a doc, comment-only and blank lines left out."""
    out, block, inside, pending = [], -1, False, []
    for line in (REPO / doc).read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash" and not inside
            block += inside
            continue
        if not inside or (not pending and (not line.strip() or line.lstrip().startswith("#"))):
            continue
        pending.append(line)
        if not line.split("  #")[0].rstrip().endswith("\\"):
            out.append(Command(doc, block, "\n".join(pending)))
            pending = []
    return out


# Why a command cannot run here: the first pattern that matches it names the reason. A cluster or a
# placeholder also holds back the rest of its block (a block is one procedure on that cluster or workspace).
ELSEWHERE = (
    (r"^\(?(kubectl|helm)\b|port-forward|localhost:6333", "needs a Kubernetes cluster (tests/test_k8s.py renders "
     "and validates the manifests)"),
    (r"^! kubectl kustomize", "tests/test_k8s.py runs this check on the prod overlay, before and after pinning"),
    (r"^docker |kustomize edit", "needs a container runtime and a registry"),
    (r"\bW\b|/workspace\b|\.vlmrec/shop|clicks\.parquet|PASSWORD|\$NS\b",
     "a placeholder for the reader's own workspace, data, password or namespace"),
    (r"^make test\b", "this suite's own entry point"),
    (r"UI=1|^vlmrec ui\b", "interactive: the page serves until Ctrl-C (tests/test_ui.py drives the page)"),
    (r"\.\./shared/", "reads the shared datasets (tests never do; benchmarks do)"),
    (r"/models/|jinaai/", "needs VLM weights from a model hub (tests/test_teacher.py loads tiny random configs)"),
)  # fmt: skip
WHOLE_BLOCK = 4  # the first four: a cluster, an image registry, a placeholder


def why_not_here(command: Command, block: list[Command]) -> str | None:
    for pattern, reason in ELSEWHERE:
        if re.search(pattern, command.text, re.M):
            return reason
    for pattern, reason in ELSEWHERE[:WHOLE_BLOCK]:
        if any(re.search(pattern, c.text, re.M) for c in block):
            return f"its block: {reason}"
    return None


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands(doc)]


def runnable() -> list[Command]:
    every = all_commands()
    return [
        c
        for c in every
        if why_not_here(c, [b for b in every if (b.doc, b.block) == (c.doc, c.block)]) is None
    ]


# The shells the runnable commands run in, in order: each a list of first-line prefixes of README commands.
SHELLS = (
    ("make demo",),
    (
        "source .venv/bin/activate",
        "vlmrec train --workdir .vlmrec/sample --name student",
        "vlmrec train --workdir .vlmrec/sample --name sasrec",
        "vlmrec evaluate",
        "ray start --head",
        "export RAY_AUTH_MODE=token",
        "ray job submit",
        "ray stop",
    ),
    (
        "source .venv/bin/activate",
        "vlmrec index build",
        "vlmrec serve &",
        "until curl",
        "curl -s localhost:8000/v1/candidates",
        "curl -s localhost:8000/v1/events",
        "curl -s localhost:8000/v1/mix",
    ),
)


def test_every_command_runs_here_or_says_why_not():
    every = all_commands()
    assert len(every) > 40, "the docs' commands were not found"
    here = runnable()
    planned = [p for shell in SHELLS for p in shell]
    for c in here:  # each runnable command is run by one of the shells below
        assert c.doc == "README.md" and any(c.text.startswith(p) for p in planned), c.text
    for p in planned:
        assert any(c.text.startswith(p) for c in here), f"{p!r}: not a runnable README command any more"


def _script(prefixes: tuple[str, ...]) -> str:
    """The commands of one shell, each as written (a repeated one, `source ...`, has one text)."""
    here = runnable()
    return "".join(next(c.text for c in here if c.text.startswith(p)) + "\n" for p in prefixes)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh checkout: the tracked files (their times kept, so make finds the .venv up to date) and the
    project's .venv."""
    root = tmp_path_factory.mktemp("checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    # `make demo` would re-install a .venv older than pyproject.toml, pointing the shared editable install
    # at this temporary copy: only an up-to-date .venv is borrowed (`make test` makes it so).
    fresh = subprocess.run(["make", "-q", "venv"], cwd=root, capture_output=True, timeout=60)
    if fresh.returncode != 0:
        pytest.fail(f"{sys.prefix} is older than pyproject.toml or constraints.txt: run `make venv` first")
    return root


def _shell(root: Path, script: str, timeout: int) -> subprocess.CompletedProcess:
    """bash -euo pipefail in a fresh environment (a home of its own: Ray's token goes to ~/.ray); a
    background job left running is stopped (kill %1) at the end; a cluster it started is stopped if it
    failed before its own `ray stop`."""
    home = root.parent / f"{root.name}-home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script + "kill %1 2>/dev/null || true; wait\n"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        if "ray start" in script and proc.returncode != 0:
            subprocess.run(["bash", "-c", "source .venv/bin/activate && ray stop"], cwd=root, env=env,
                           capture_output=True, timeout=120)  # fmt: skip
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_the_readme_runs_as_written(checkout):
    import ray

    ray.shutdown()  # the session's Ray: `make demo` would join it, the README's `ray stop` would kill it
    done = _shell(checkout, _script(SHELLS[0]), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (checkout / ".vlmrec" / "sample" / "runs" / "student" / "export" / "run.json").exists()

    done = _shell(checkout, _script(SHELLS[1]), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "succeeded" in done.stdout, done.stdout[-3000:]  # the submitted job's final status
    runs = checkout / ".vlmrec" / "sample" / "runs"
    assert all((runs / r / "export" / "run.json").exists() for r in ("student", "sasrec", "student-cluster"))

    done = _shell(checkout, _script(SHELLS[2]), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    # curl prints no newline: the answers may share a line with each other and with Serve's logs
    answered = len(re.findall(r'"candidates":\s*\[\{', done.stdout))
    assert answered >= 2, done.stdout[-3000:]  # /v1/candidates and /v1/mix, each with candidates
    assert '"sequence_length"' in done.stdout, done.stdout[-3000:]  # /v1/events
