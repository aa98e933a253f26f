"""The training job through its real entry point on the sample data: Feast examples without leakage,
Ray Train + DeepSpeed fit, export -> reload gives identical scores, resume, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import engine
from training import train, validation
from training.data import ItemTable
from training.model import SeqRec
from training.popular import popular_items
from vlmrec.split import SplitConfig, learnable_events

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(sample_workspace):
    ws = sample_workspace
    args = [
        "--workdir",
        str(ws.root),
        "--name",
        "student",
        "--epochs",
        "2",
        "--patience",
        "5",
        "--max-len",
        "8",
    ]
    args += ["--batch-size", "16", "--d-model", "16", "--n-sampled-negatives", "32"]
    train.main(args)
    return ws, args


def test_examples_hold_only_earlier_clicks(snapshot_workspace):
    ws = snapshot_workspace
    job = train.JobConfig(workdir=str(ws.root))
    data = train.prepare_data(ws, job, max_len=8)
    events = pq.read_table(ws.events).to_pandas()
    queries, _ = train.example_queries(learnable_events(events, SplitConfig()), 8)
    assert len(data.inputs) == len(queries) > 0
    by_user = {u: g.sort_values("event_timestamp") for u, g in events.groupby("user_id")}
    for x, y, q in zip(data.inputs, data.targets, queries.itertuples(), strict=True):
        before = by_user[q.user_id]
        before = before[before.event_timestamp < q.event_timestamp]["item_id"].to_numpy()[-8:]
        assert data.items.raw_of(x[x > 0]).tolist() == before.tolist()  # the sequence just before the target
        assert data.items.raw_of([y[-1]])[0] == q.item_id  # the last target is the query's own event
    cut = learnable_events(events, SplitConfig())["event_timestamp"].max()
    assert (queries["event_timestamp"] <= cut).all()  # nothing from after the training cut


def test_examples_through_feasts_ray_offline_store_equal_the_file_stores(snapshot_workspace, tmp_path):
    """Issue 20: the same workspace with Feast's Ray offline store (the point-in-time join as Ray Data work)
    gives the job exactly the file store's examples, and the job trains on them."""
    import shutil

    from vlmrec.features import FeaturesConfig, write_store_config
    from vlmrec.workspace import Workspace

    ws = snapshot_workspace
    on_ray = Workspace(tmp_path / "ws")
    shutil.copytree(ws.root, on_ray.root, ignore=shutil.ignore_patterns("runs", "eval", "indexes"))
    write_store_config(on_ray, FeaturesConfig(offline_store="ray"))  # the same registry and sources
    job = train.JobConfig(workdir=str(ws.root))
    file_data = train.prepare_data(ws, job, max_len=8)
    ray_data = train.prepare_data(on_ray, train.JobConfig(workdir=str(on_ray.root)), max_len=8)
    for field in ("inputs", "targets", "target_days", "valid_inputs", "valid_targets", "valid_days"):
        assert np.array_equal(getattr(file_data, field), getattr(ray_data, field)), field
    args = ["--workdir", str(on_ray.root), "--name", "on-ray", "--epochs", "1", "--max-len", "8"]
    export, info = train.run(
        _parse([*args, "--batch-size", "16", "--d-model", "16", "--n-sampled-negatives", "32"], 1)
    )
    assert info["data"]["train_examples"] == len(file_data.inputs) and (export / "model").exists()


def test_loo_validates_on_the_second_last_event_and_trains_on_every_earlier_one(snapshot_workspace):
    """The SASRec protocol: with --split loo the last event is test, the second-last validation (never a
    training target), and every event before it is a training target (none held back for validation)."""
    ws = snapshot_workspace
    events = pq.read_table(ws.events).to_pandas()
    split = SplitConfig(split="loo")
    learnable = learnable_events(events, split)
    queries, valid = train.example_queries(learnable, 8, train.split_validation(events, split))
    ordered = events.sort_values(["user_id", "event_timestamp"], kind="stable")
    second_last = ordered[ordered.groupby("user_id").cumcount(ascending=False) == 1]
    assert valid[["user_id", "event_timestamp", "item_id"]].values.tolist() == (
        second_last[["user_id", "event_timestamp", "item_id"]].values.tolist()
    )
    several = learnable.groupby("user_id")["item_id"].transform("size") >= 2  # a target needs a click before
    last_train = learnable[several].sort_values("event_timestamp").groupby("user_id").tail(1)
    ends = set(zip(queries["user_id"], queries["event_timestamp"], strict=True))
    assert all(
        (u, t) in ends for u, t in zip(last_train["user_id"], last_train["event_timestamp"], strict=True)
    )
    assert not set(zip(valid["user_id"], valid["event_timestamp"], strict=True)) & ends
    data = train.prepare_data(ws, train.JobConfig(workdir=str(ws.root), split="loo"), max_len=8)
    assert (
        len(data.valid_targets)
        == (second_last.groupby("user_id").size().index.isin(learnable["user_id"])).sum()
    )


def test_export_reloads_with_identical_scores(trained):
    ws, _ = trained
    export = ws.runs / "student" / "export"
    run = json.loads((export / "run.json").read_text())
    assert run["teacher_id"].startswith("minilm:") and run["best"]["epoch"] >= 1
    model = SeqRec.from_pretrained(export / "model")
    table = pq.read_table(export / "item_vectors.parquet").to_pandas()
    vectors = np.stack(table["vector"].to_numpy())
    with torch.no_grad():
        np.testing.assert_allclose(model.item_vectors()[1:].numpy(), vectors, atol=1e-6)
    # checkpoint -> export -> reload: the exported weights are the best checkpoint's weights
    result_ckpt = _checkpoints(ws)
    assert result_ckpt, "Ray Train kept the DeepSpeed checkpoints"
    popular = json.loads((export / "popular.json").read_text())
    assert popular and popular[0]["score"] >= popular[-1]["score"]
    seq = torch.tensor([[0, 0, 0, 0, 3, 1, 4, 2]])
    again = SeqRec.from_pretrained(export / "model")
    with torch.no_grad():
        assert torch.equal(model.user_vector(seq), again.user_vector(seq))


def test_checkpoint_weights_match_export(trained):
    ws, _ = trained
    from ray.train import Checkpoint

    export = ws.runs / "student" / "export"
    run = json.loads((export / "run.json").read_text())
    model = SeqRec.from_pretrained(export / "model")
    best_epoch = run["best"]["epoch"]
    items = ItemTable(model.item_ids[1:].numpy(), model.teacher[1:].numpy())
    # the hybrid's id tables (zeros at the start) learned row-sparse beside DeepSpeed and reached the export;
    # each of the two workers keeps its share of their moments with each checkpoint
    assert model.id_in.weight.abs().sum() > 0 and model.id_out.weight.abs().sum() > 0
    shares = {engine.ROWS_FILE.format(rank=r, world=2) for r in range(2)}
    assert all({p.name for p in path.glob("rows-*")} == shares for path in _checkpoints(ws))
    matches = []
    for path in _checkpoints(ws):
        loaded = train.load_checkpoint_model(Checkpoint.from_directory(str(path)), model.cfg, items)
        matches.append(all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items()))
    assert any(matches), f"no kept checkpoint equals the export (best epoch {best_epoch})"


def test_rerun_resumes_from_latest_checkpoint(trained):
    ws, args = trained
    _, info = train.run(_parse(args, epochs=3))
    assert info["last"]["resumed_from"] == 2  # the third epoch started from the second's checkpoint
    assert info["last"]["epoch"] == 3


def _checkpoints(ws):
    return sorted(p for p in (ws.runs / "student" / "ray").glob("checkpoint_*") if p.is_dir())


def _parse(args, epochs):
    import argparse

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = parser.parse_args(args)
    out.epochs = epochs
    return out


def test_workers_get_the_arrays_from_the_object_store_not_the_loop_config(
    trained, snapshot_workspace, monkeypatch
):
    """What grows with the catalogue and the users (teacher matrix, validation set, counts) reaches the
    workers as one object-store reference; the loop config itself stays a few KB of configs."""
    import pickle

    import ray

    ws, args = trained
    seen = {}

    def fit(loop, config, datasets, run_dir, engine_cfg, score):
        seen["config"], seen["datasets"] = config, datasets
        raise RuntimeError("captured")

    monkeypatch.setattr(train.engine, "fit", fit)
    with pytest.raises(RuntimeError, match="captured"):
        train.run(_parse([*args[:3], "student-arrays", *args[4:]], epochs=1))
    config = seen["config"]
    assert len(pickle.dumps({k: v for k, v in config.items() if k != "arrays"})) < 20_000
    assert isinstance(config["arrays"], ray.ObjectRef)
    arrays = ray.get(config["arrays"])
    data = train.prepare_data(snapshot_workspace, train.JobConfig(workdir=str(ws.root)), 8)  # the same events
    np.testing.assert_array_equal(arrays["teacher"], data.items.teacher_matrix())
    for name in ("added_days", "held_out"):
        np.testing.assert_array_equal(arrays[name], getattr(data, name), err_msg=name)
    order, expected = np.lexsort(arrays["valid_inputs"].T), np.lexsort(data.valid_inputs.T)
    for name in ("valid_inputs", "valid_targets", "valid_days"):  # the same rows, in the files' order
        np.testing.assert_array_equal(arrays[name][order], getattr(data, name)[expected], err_msg=name)
    # the examples reach the workers as the run's example files, which each worker streams itself
    assert seen["datasets"] == {} and config["examples"] == str(
        ws.runs / "student-arrays" / "examples" / "train"
    )
    assert config["n_train"] == len(data.inputs)


def test_evaluate_writes_reports(trained, capsys):
    """Through the CLI: its flags reach the report (--sampled-negatives was once read and dropped)."""
    from vlmrec.cli import main

    ws, _ = trained
    argv = ["evaluate", "--workdir", str(ws.root), "--runs", "student", "--sampled-negatives", "20"]
    assert main([*argv, "--name", "cli"]) == 0
    out = ws.root / "eval" / "cli"
    assert f"evaluate: wrote {out}" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["sampled_negatives"] == 20 and "20 sampled negatives" in (out / "metrics.md").read_text()
    assert {"popular", "knn", "student"} <= set(report["results"])
    for model in ("popular", "knn", "student"):
        micro = report["results"][model]["full"]["all"]["micro"]
        assert 0.0 <= micro["NDCG@10"] <= micro["HR@10"] <= micro["HR@50"] <= 1.0
    assert (out / "metrics.md").read_text().count("| student |") == 2
    assert (out / "ndcg.png").stat().st_size > 0
    assert report["n_queries"] > 0


def test_tune_mix_writes_the_weights_the_producer_reads(trained):
    from serving.loading import read_mix_weights
    from serving.tune_mix import MixTuneConfig, tune

    ws, _ = trained
    cfg = MixTuneConfig(workdir=str(ws.root), student_run="student", sasrec_run="student", k=10)
    path, report = tune(cfg, with_test=True)
    assert path == ws.root / "mix.json" and read_mix_weights(path) == report["weights"]
    assert sum(report["quotas"].values()) == 10
    valid = report["validation"]
    assert valid["n_queries"] > 0 and valid["n_tried"] > 4
    # every single producer is a point of the grid: the choice is at least as good as any that meets the floor
    floor = valid["cold_floor_recall"]
    for name, alone in valid["producers"].items():
        if alone["recall_cold"] is None or alone["recall_cold"] >= floor:
            assert valid["chosen"]["recall_all"] >= alone["recall_all"], name
    for name in ("student", "sasrec", "similar", "popular", "mixer_validated"):
        assert 0.0 <= report["test"][name]["recall10_all"] <= 1.0


def test_tune_mix_validates_on_the_window_before_the_cut_with_backtest_runs(trained):
    """Window validation: the events between the backtest runs' cut and this split's, asked as test queries
    (history = every earlier click of the user), ranked by the backtest runs; refused when it cannot hold."""
    from serving.tune_mix import MixTuneConfig, tune, window_queries

    ws, _ = trained  # "student" is trained on the default cut (0.8): here the backtest of a 0.9 split
    runs = {"student_run": "student", "sasrec_run": "student"}
    cfg = MixTuneConfig(workdir=str(ws.root), **runs, backtest_student_run="student",
                        backtest_sasrec_run="student", train_fraction=0.9, k=10)  # fmt: skip
    q, data = window_queries(ws, cfg)
    events = pq.read_table(ws.events).to_pandas().sort_values("event_timestamp", kind="stable")
    stamps = events["event_timestamp"].to_numpy()
    start, end = int(np.floor(0.8 * len(events))), int(np.floor(0.9 * len(events)))
    position = np.arange(len(events))
    first = pd.Series(position).groupby(events["user_id"].to_numpy()).transform("min").to_numpy()
    asked = (position >= start) & (position < end) & (stamps < stamps[end]) & (position != first)
    assert (data.items.index_of(events["item_id"].to_numpy()) > 0).all()  # every clicked item is known
    assert len(q.targets) == asked.sum() > 0  # every window event but a user's very first click
    assert (q.days >= 0).all() and sorted(q.users.tolist()) == sorted(
        events["user_id"].to_numpy()[asked].tolist()
    )
    for user, hist, target in zip(q.users[:50], q.histories[:50], q.targets[:50], strict=True):
        before = events[events["user_id"] == user]["item_id"].to_numpy()
        raw = data.items.raw_of(np.append(hist, target)).tolist()
        assert raw == before[: len(raw)].tolist()  # the user's clicks up to and including the target
    train_items = set(events.iloc[:start]["item_id"])
    assert q.cold.tolist() == [i not in train_items for i in data.items.raw_of(q.targets)]
    _, report = tune(cfg)
    assert report["validation"]["kind"] == "window" and report["validation"]["n_queries"] == len(q.targets)
    assert report["validation"]["backtest_split"]["train_fraction"] == 0.8
    with pytest.raises(ValueError, match="trained on split"):  # the served runs must be of this split
        tune(cfg, with_test=True)
    with pytest.raises(ValueError, match="must come before"):
        tune(MixTuneConfig(workdir=str(ws.root), **runs, backtest_student_run="student",
                           backtest_sasrec_run="student", k=10))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no export of run 'missing'"):
        tune(MixTuneConfig(workdir=str(ws.root), **runs, backtest_student_run="student",
                           backtest_sasrec_run="missing", train_fraction=0.9))  # fmt: skip
    with pytest.raises(ValueError, match="go together"):
        MixTuneConfig(backtest_student_run="student")
    with pytest.raises(ValueError, match="cold='natural'"):
        MixTuneConfig(backtest_student_run="a", backtest_sasrec_run="b", cold="launch")


def test_fusion_is_chosen_on_validation_and_saved_with_the_model(trained):
    ws, args = trained
    export = ws.runs / "student" / "export"
    before = SeqRec.from_pretrained(export / "model")
    _, info = train.run(_parse([*args, "--fusion-only"], epochs=3))
    scores = info["fusion_val_ndcg10"]
    assert set(scores) == {validation.fusion_key(w, n) for w, n in validation.FUSION_GRID}
    model = SeqRec.from_pretrained(export / "model")
    chosen = validation.fusion_key(model.cfg.fusion_weight, model.cfg.fusion_last)
    assert chosen in scores and scores[chosen] <= max(scores.values())
    assert json.loads((export / "run.json").read_text())["configs"]["model"] == model.cfg.to_dict()
    state = before.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # weights untouched


def test_fusion_choice_takes_the_most_content_within_one_standard_error_of_the_best():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    noise = rng.normal(0, 0.05, 400)
    ndcg = {
        (0.0, 1): base,
        (0.25, 1): base + 0.02,  # the best
        (1.0, 3): base + 0.02 + noise,  # the same on average: within one error
        (4.0, 5): base - 0.10,  # clearly worse
    }
    assert validation.fusion_choice(ndcg) == (1.0, 3)
    ndcg[1.0, 3] = base + 0.02 - 0.03  # now clearly below the best
    assert validation.fusion_choice(ndcg) == (0.25, 1)
    assert validation.fusion_choice({(0.0, 1): base}) == (0.0, 1)
    assert validation.fusion_choice({(0.0, 1): base[:1], (2.0, 3): base[:1]}) == (
        2.0,
        3,
    )  # one query: ties only


def test_gradient_clipping_comes_from_the_train_config():
    from engine import EngineConfig, ds_config

    shipped = ds_config(EngineConfig(), 128, 1e-3, 0.0)
    assert shipped["gradient_clipping"] == 1.0  # engine/zero.json's
    flags = train.TrainConfig.from_dict({"grad_clip": 0.0})
    assert ds_config(EngineConfig(), 128, 1e-3, 0.0, grad_clip=flags.grad_clip)["gradient_clipping"] == 0.0
    assert train.TrainConfig.from_dict({}).grad_clip == 1.0  # a run.json written before the flag existed


def test_a_task_in_a_reused_process_reports_its_own_peak_memory():
    """The example build's tasks share worker processes at one shard: each resets the peak first."""
    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    before = engine.peak_rss_mb()
    del big
    engine.reset_peak_rss()
    assert engine.peak_rss_mb() < before - 32  # the peak is now this process's current size


@pytest.fixture(scope="module")
def full_snapshots(sample_workspace, tmp_path_factory):
    """The sample workspace ingested again with snapshots longer than any user's history, so Feast's join
    gives every earlier click (the events path's history, whatever max_len)."""
    from tests.conftest import reingest

    return reingest(sample_workspace, tmp_path_factory.mktemp("full"), max_len=1000)


@pytest.mark.parametrize(
    "split",
    [SplitConfig(), SplitConfig(cold="launch", launch_fraction=0.2), SplitConfig(split="loo")],
    ids=["natural", "launch", "loo"],
)
def test_streamed_examples_equal_feasts_join(full_snapshots, tmp_path, split):
    """Issue 20: the examples built from the events by Ray tasks, as files, are exactly the in-memory ones
    from Feast's point-in-time join (the same rows, in another order), with the same arrays."""
    import ray

    from training.example_files import read_examples
    from training.examples import build_examples

    ws = full_snapshots
    job = train.JobConfig(workdir=str(ws.root), **split.to_dict())
    data = train.prepare_data(ws, job, max_len=8)
    # a few hundred events per bucket: several buckets and row-group pieces on the small data
    shards = build_examples(ws, split, 8, True, tmp_path / "examples", events_per_shard=150, popular_k=50)
    assert len(list((tmp_path / "examples" / "train").glob("*.parquet"))) > 2
    got, valid = read_examples(shards.train), read_examples(shards.valid)
    assert got["inputs"].dtype == np.int32 and got["target_days"].dtype == np.float64

    def rows(*columns):
        flat = np.concatenate([np.asarray(c, np.float64).reshape(len(c), -1) for c in columns], axis=1)
        return flat[np.lexsort(flat.T[::-1])]

    assert shards.n_train == len(data.inputs) > 0 and shards.n_valid == len(data.valid_inputs) > 0
    np.testing.assert_array_equal(
        rows(got["inputs"], got["targets"], got["target_days"]),
        rows(data.inputs, data.targets, data.target_days),
    )
    np.testing.assert_array_equal(
        rows(valid["inputs"], valid["targets"], valid["days"]),
        rows(data.valid_inputs, data.valid_targets, data.valid_days),
    )
    arrays = ray.get(shards.arrays)
    np.testing.assert_array_equal(
        arrays["target_counts"], np.bincount(data.targets[data.targets > 0], minlength=data.items.n_items + 1)
    )
    np.testing.assert_array_equal(arrays["added_days"], data.added_days)
    np.testing.assert_array_equal(arrays["held_out"], data.held_out)
    np.testing.assert_array_equal(arrays["teacher"], data.items.teacher_matrix())
    expected = popular_items(data.train_events, 50, 7.0)
    assert [p["item_id"] for p in arrays["popular"]] == [p["item_id"] for p in expected]
    np.testing.assert_allclose([p["score"] for p in arrays["popular"]], [p["score"] for p in expected])
    assert shards.learnable_events == len(data.train_events)
    assert shards.trained_until == data.train_events["event_timestamp"].max()
    assert set(shards.stages) == {"partition", "windows", "arrays"}


def test_workers_stream_equal_shares_of_the_example_files_exactly_once(tmp_path):
    """Each of `world` workers reads an equal run of the rows (the same number of steps everywhere), every
    row is in exactly one share, a seed replays the same batches, and a buffer holds about a window."""
    from training.example_files import stream_batches, worker_rows, write_examples

    sizes = [7, 0, 30, 12]
    start = np.cumsum([0, *sizes])
    for f, (a, n) in enumerate(zip(start, sizes, strict=False)):
        rows = np.arange(a, a + n)
        write_examples(
            tmp_path / f"part-{f:05d}.parquet", {"inputs": np.stack([rows, rows], 1), "targets": rows}
        )
    total = sum(sizes)
    seen = []
    for rank in range(3):
        pieces = worker_rows(tmp_path, rank, 3)
        share = sum(b - a for *_, a, b in pieces)
        assert share in (total // 3, total // 3 + 1)
        for _, _, a, b in pieces:
            assert 0 <= a < b
        batches = list(stream_batches(pieces, 4, window=8, seed=rank))
        assert len(batches) == share // 4 and all(len(x["targets"]) == 4 for x in batches)
        assert all(np.array_equal(x["inputs"][:, 0], x["targets"]) for x in batches)  # rows stay whole
        again = list(stream_batches(pieces, 4, window=8, seed=rank))
        assert all(np.array_equal(x["targets"], y["targets"]) for x, y in zip(batches, again, strict=True))
        everything = list(stream_batches(pieces, 1, window=8, seed=rank))  # batch 1: no row left over
        seen += [int(x["targets"][0]) for x in everything]
    assert sorted(seen) == list(range(total))  # every row in exactly one worker's share
    ordered = [int(x["targets"][0]) for x in stream_batches(worker_rows(tmp_path, 0, 1), 1, 8, seed=0)]
    assert ordered != sorted(ordered)  # shuffled


# Run before a script: any import of Ray fails, so what runs after it needs none (a lent GPU machine has no Ray).
NO_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ImportError(f"{name}: Ray is not installed here")
sys.meta_path.insert(0, NoRay())
"""


def test_example_files_are_read_without_ray(tmp_path):
    """A process with no Ray reads the example files the job wrote (the (N, L) columns arrive as their list
    storage): the same rows as a process with Ray's tensor type registered."""
    import subprocess
    import sys

    from training.example_files import read_examples, write_examples

    inputs = np.arange(30, dtype=np.int32).reshape(10, 3)
    write_examples(tmp_path / "part-00000.parquet", {"inputs": inputs, "targets": inputs[:, -1]})
    script = (
        NO_RAY
        + f"""
import numpy as np
from training.example_files import read_examples, stream_batches, worker_rows
got = read_examples({str(tmp_path)!r})
assert got["inputs"].shape == (10, 3) and got["inputs"].dtype == np.int32, got["inputs"]
(batch,) = stream_batches(worker_rows({str(tmp_path)!r}, 0, 1), 10, window=16, seed=0)
order = np.argsort(batch["targets"])
np.testing.assert_array_equal(batch["inputs"][order], got["inputs"])
print(got["inputs"].tolist())
"""
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == inputs.tolist() == read_examples(tmp_path)["inputs"].tolist()


def test_the_workers_epoch_runs_on_one_device_without_ray(sample_workspace, tmp_path):
    """benchmarks/gpu_epoch.py: the job's example build prepared here, then the worker's own state and epoch
    (train.worker_state, train.train_epoch) through DeepSpeed in a process with no Ray (how --use-gpu's path
    runs on a GPU machine Ray cannot reach); the results file gets the device's entry, learning happens."""
    import subprocess
    import sys

    from benchmarks.gpu_epoch import prepare

    flags = ["--max-len", "8", "--batch-size", "16", "--d-model", "16", "--n-sampled-negatives", "32"]
    prepare(str(sample_workspace.root), tmp_path / "job", flags)
    saved = json.loads((tmp_path / "job" / "config.json").read_text())
    assert saved["train_flags"] == flags and saved["n_train"] > 16
    out = tmp_path / "epoch.json"
    run = "import runpy\nrunpy.run_path('benchmarks/gpu_epoch.py', run_name='__main__')"
    for precision, epochs in (("fp32", "2"), ("bf16", "1")):  # bf16: the loop's autocast, fp32 weights
        argv = ["gpu_epoch.py", "run", "--data", str(tmp_path / "job"), "--device", "cpu",
                "--precision", precision, "--epochs", epochs, "--out", str(out)]  # fmt: skip
        script = f"{NO_RAY}\nsys.argv = {argv!r}\n{run}"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"cpu-fp32", "cpu-bf16"} and np.isfinite(runs["cpu-bf16"]["epochs"][-1]["loss"])
    entry = runs["cpu-fp32"]
    assert entry["backend"] == "gloo" and entry["micro_batch"] == 16 and entry["seq_per_s_median"] > 0
    assert [e["warmup"] for e in entry["epochs"]] == [True, False, False]
    assert entry["sequences_per_epoch"] == saved["n_train"] // 16 * 16
    losses = [e["loss"] for e in entry["epochs"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(0 <= e["val_ndcg10"] <= 1 for e in entry["epochs"])
    assert entry["seq_per_s_ratio_to_cpu"] is None  # the CPU entry is its own baseline


def test_the_id_baseline_trains_through_the_job_without_teacher_vectors(sample_workspace):
    """`--item-space id` on a workspace that has embeddings: its workers get no teacher matrix."""
    ws = sample_workspace
    args = ["--workdir", str(ws.root), "--name", "sasrec-job", "--item-space", "id", "--max-len", "8"]
    export, info = train.run(_parse([*args, "--batch-size", "16", "--d-model", "16"], 1))
    model = SeqRec.from_pretrained(export / "model")
    assert model.cfg.item_space == "id" and model.cfg.teacher_dim == 0 and info["best"]["epoch"] == 1


def test_item_table_reads_a_vector_table_into_one_matrix(tmp_path):
    """ItemTable.from_parquet: ids in the file's row order, vectors as one (n, D) float32 matrix equal to
    the rows; the ids alone without vectors; a table whose vectors differ in length is refused."""
    import pyarrow as pa

    from training.data import ItemTable

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 3)).astype(np.float32)
    ids = np.array([9, 2, 7, 4, 5])
    path = tmp_path / "vectors.parquet"
    pq.write_table(
        pa.table({"item_id": ids, "vector": pa.array(list(vectors), pa.list_(pa.float32()))}), path
    )
    table = ItemTable.from_parquet(path)
    np.testing.assert_array_equal(table.item_ids, ids)
    np.testing.assert_array_equal(table.teacher, vectors)
    assert table.teacher.dtype == np.float32 and table.index_of([7, 3]).tolist() == [3, 0]
    assert ItemTable.from_parquet(path, vectors=False).teacher is None
    ragged = pa.array([[1.0, 2.0, 3.0], [4.0]], pa.list_(pa.float32()))  # 4 values: 2 x 2 would fit
    pq.write_table(pa.table({"item_id": [1, 2], "vector": ragged}), path)
    with pytest.raises(ValueError, match="same length"):
        ItemTable.from_parquet(path)


def test_validation_samples_at_most_max_valid_queries_fixed_by_content(sample_workspace):
    """--max-valid-queries: a run validates on a sample of its queries (full ranking costs queries x items
    every epoch), the same sample whatever order the files hold them in (the training seed shuffles them)."""
    from training.examples import validation_sample

    rng = np.random.default_rng(1)
    inputs, targets, days = rng.integers(0, 50, (40, 6)), rng.integers(1, 50, 40), rng.random(40)
    keep = validation_sample(inputs, targets, days, 12)
    assert len(keep) == 12 and len(set(keep.tolist())) == 12 and (np.diff(keep) > 0).all()
    perm = rng.permutation(40)
    again = validation_sample(inputs[perm], targets[perm], days[perm], 12)
    assert sorted(days[keep]) == sorted(days[perm][again])  # the same rows, by content
    assert validation_sample(inputs, targets, days, 0).tolist() == list(range(40))  # 0: all
    assert validation_sample(inputs, targets, days, 40).tolist() == list(range(40))

    model_cfg = train.ModelConfig(n_items=1, teacher_dim=1, max_len=8)
    capped = train.validation_arrays(sample_workspace, train.JobConfig(max_valid_queries=5), model_cfg)
    whole = train.validation_arrays(sample_workspace, train.JobConfig(max_valid_queries=0), model_cfg)
    assert len(capped["valid_targets"]) == 5 < len(whole["valid_targets"])
    with pytest.raises(ValueError, match="max_valid_queries"):
        train.JobConfig(max_valid_queries=-1)
