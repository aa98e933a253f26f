"""Training faults: a Ray Train worker killed mid-epoch, and the whole job killed and run again; each must end
where an uninterrupted run of the same flags ends.

    nice -n 5 .venv/bin/python benchmarks/train_faults.py --workdir .vlmrec/ml --out benchmarks/results/train_faults.json

Three runs of `python -m training.train` with the same flags, each under a `--name` of its own:
    reference    uninterrupted
    worker_kill  one RayTrainWorker process SIGKILLed half an epoch after the run's first checkpoint: Ray
                 Train's FailureConfig restarts the worker group, which resumes from the latest checkpoint
    job_kill     the driver and its workers SIGKILLed at the same point (a lost `ray job`), then the same
                 command again: the re-run of the same --name resumes from the latest checkpoint
Every draw of an epoch (shuffle, dropout, negatives) comes from (seed, epoch, rank), so a replayed epoch is
the uninterrupted one again: the runs' validation NDCG@10 may differ only by float reduction order.
Reported per run: best and last validation NDCG@10, epochs, the epoch it resumed from, wall seconds; and the
largest difference from the reference. tests/test_train_faults.py runs the same harness on a small sample.
Needs a workspace that `vlmrec features` has materialized; with RAY_ADDRESS set, the runs join that cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A fault run must outlive its first checkpoint: the default student with an epoch cap (this measures
# recovery, not model quality; early stopping still applies).
DEFAULT_FLAGS = ["--epochs", "6", "--patience", "10"]


def registered_epoch(run_dir: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (what a restart resumes from), 0 if none.
    A checkpoint folder exists a moment before the controller registers it: a failure in between resumes
    from the one before."""
    snapshot = run_dir / "ray" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or being written
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout_s: float) -> float:
    """Block until the run's first checkpoint is registered -> its monotonic time (the run must not end first)."""
    end = time.monotonic() + timeout_s
    while not registered_epoch(run_dir):
        if proc.poll() is not None:
            raise RuntimeError(
                f"{run_dir.name}: the run ended (rc {proc.returncode}) before its first checkpoint"
            )
        if time.monotonic() > end:
            raise TimeoutError(f"{run_dir.name}: no checkpoint within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic()


def train_workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start(workdir: Path, name: str, flags: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "training.train", "--workdir", str(workdir), "--name", name, *flags]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.wait(timeout=timeout_s) != 0:
        raise RuntimeError(f"training exited {proc.returncode}: {proc.args}")


def summary(workdir: Path, name: str, seconds: float, **extra) -> dict:
    info = json.loads((workdir / "runs" / name / "export" / "run.json").read_text())
    last = info["last"]
    return {
        "best_val_ndcg10": info["best"]["val_ndcg10"],
        "best_epoch": info["best"]["epoch"],
        "last_val_ndcg10": last["val_ndcg10"],
        "epochs": last["epoch"],
        "resumed_from": last["resumed_from"],  # the epoch the last (re)start began at; 0: never restarted
        "epoch_s": last["epoch_s"],
        "wall_s": round(seconds, 1),
        **extra,
    }


def run_reference(workdir: Path, name: str, flags: list[str], log: Path, timeout_s: float) -> dict:
    t0 = time.monotonic()
    finish(start(workdir, name, flags, log), timeout_s)
    return summary(workdir, name, time.monotonic() - t0)


def run_worker_kill(
    workdir: Path, name: str, flags: list[str], log: Path, timeout_s: float, delay_s: float
) -> dict:
    """One training worker SIGKILLed delay_s after the first checkpoint; the same run must finish."""
    t0 = time.monotonic()
    proc = start(workdir, name, flags, log)
    killed: list[int] = []

    def kill() -> None:
        at = wait_for_checkpoint(workdir / "runs" / name, proc, timeout_s)
        time.sleep(delay_s)
        pids = train_workers()
        if pids:
            epoch = registered_epoch(workdir / "runs" / name)
            os.kill(pids[-1], signal.SIGKILL)
            killed.append((time.monotonic() - at, epoch))

    killer = threading.Thread(target=kill)
    killer.start()
    finish(proc, timeout_s)
    killer.join()
    if not killed:
        raise RuntimeError(f"{name}: no training worker was running to kill")
    seconds, epoch = killed[0]
    return summary(
        workdir,
        name,
        time.monotonic() - t0,
        killed_s_after_checkpoint=round(seconds, 2),
        checkpoint_epoch_at_kill=epoch,
    )


def run_job_kill(
    workdir: Path, name: str, flags: list[str], log: Path, timeout_s: float, delay_s: float
) -> dict:
    """The job's driver (and with it its workers) SIGKILLed delay_s after the first checkpoint, then the same
    command again."""
    t0 = time.monotonic()
    proc = start(workdir, name, flags, log)
    wait_for_checkpoint(workdir / "runs" / name, proc, timeout_s)
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = registered_epoch(workdir / "runs" / name)
    for _ in range(100):  # the killed job's workers leave with their driver
        if not train_workers():
            break
        time.sleep(0.1)
    finish(start(workdir, name, flags, log), timeout_s)
    return summary(workdir, name, time.monotonic() - t0, checkpoint_epoch_at_kill=kept)


def run_all(workdir: Path, flags: list[str], prefix: str, log: Path, timeout_s: float = 1800) -> dict:
    """reference, worker_kill, job_kill under <prefix>-<case> (fresh run folders) -> the results table."""
    import shutil

    for case in ("reference", "worker-kill", "job-kill"):
        shutil.rmtree(workdir / "runs" / f"{prefix}-{case}", ignore_errors=True)
    ref = run_reference(workdir, f"{prefix}-reference", flags, log, timeout_s)
    delay = ref["epoch_s"] / 2  # mid-epoch: half an epoch after the first checkpoint
    runs = {
        "reference": ref,
        "worker_kill": run_worker_kill(workdir, f"{prefix}-worker-kill", flags, log, timeout_s, delay),
        "job_kill": run_job_kill(workdir, f"{prefix}-job-kill", flags, log, timeout_s, delay),
    }
    for case in ("worker_kill", "job_kill"):
        runs[case]["abs_diff_best_val_ndcg10"] = abs(runs[case]["best_val_ndcg10"] - ref["best_val_ndcg10"])
        runs[case]["abs_diff_last_val_ndcg10"] = abs(runs[case]["last_val_ndcg10"] - ref["last_val_ndcg10"])
    return {"flags": flags, "kill_delay_s": round(delay, 2), "runs": runs}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="a materialized workspace")
    p.add_argument("--name-prefix", default="faults")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_faults.json")
    p.add_argument("flags", nargs="*", help="extra `training.train` flags (after --)")
    args = p.parse_args(argv)
    log = args.out.with_suffix(".log")
    log.unlink(missing_ok=True)
    results = {
        "command": "benchmarks/train_faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        **run_all(args.workdir.resolve(), DEFAULT_FLAGS + args.flags, args.name_prefix, log),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["runs"], indent=2))
    return results


if __name__ == "__main__":
    main()
