"""Training faults (benchmarks/train_faults.py: the harness, and the MovieLens run behind docs/BENCHMARKS.md):
a Ray Train worker SIGKILLed mid-epoch must be recovered by FailureConfig within the same run, a killed job
must resume under the same --name, and both must end at the uninterrupted run's validation NDCG@10."""

from __future__ import annotations

import pytest

from benchmarks.train_faults import run_all

pytestmark = pytest.mark.slow

FLAGS = ["--epochs", "5", "--patience", "10", "--max-len", "8", "--batch-size", "16", "--d-model", "16"]
FLAGS += ["--n-sampled-negatives", "32"]
# Every draw of an epoch comes from (seed, epoch, rank): a replayed epoch repeats the uninterrupted one, so
# only float reduction order may differ.
TOLERANCE = 1e-6


def test_killed_worker_and_killed_job_end_where_the_uninterrupted_run_ends(
    sample_workspace, ray_local, monkeypatch, tmp_path
):
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)  # the runs join this Ray
    table = run_all(sample_workspace.root, FLAGS, "faults", tmp_path / "train.log", timeout_s=600)
    ref, worker, job = (table["runs"][c] for c in ("reference", "worker_kill", "job_kill"))
    assert ref["resumed_from"] == 0 and ref["epochs"] == 5
    for run in (worker, job):  # the restarted worker group / the re-run began at the registered checkpoint
        assert run["checkpoint_epoch_at_kill"] >= 1 and run["resumed_from"] >= run["checkpoint_epoch_at_kill"]
    for run in (worker, job):
        assert run["epochs"] == ref["epochs"], run
        assert run["abs_diff_best_val_ndcg10"] <= TOLERANCE, table
        assert run["abs_diff_last_val_ndcg10"] <= TOLERANCE, table
