"""The training job through its real entry point on the sample data: Feast examples without leakage,
Ray Train + DeepSpeed fit, export -> reload gives identical scores, resume, evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from training import evaluate, train, validation
from training.data import ItemTable
from training.model import SeqRec
from vlmrec.split import SplitConfig, learnable_events


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


def test_examples_hold_only_earlier_clicks(sample_workspace):
    ws = sample_workspace
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


def test_examples_through_feasts_ray_offline_store_equal_the_file_stores(sample_workspace, tmp_path):
    """Issue 20: the same workspace with Feast's Ray offline store (the point-in-time join as Ray Data work)
    gives the job exactly the file store's examples, and the job trains on them."""
    import shutil

    from vlmrec.features import FeaturesConfig, write_store_config
    from vlmrec.workspace import Workspace

    ws = sample_workspace
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


def test_loo_validates_on_the_second_last_event_and_trains_on_every_earlier_one(sample_workspace):
    """The SASRec protocol: with --split loo the last event is test, the second-last validation (never a
    training target), and every event before it is a training target (none held back for validation)."""
    ws = sample_workspace
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
    data = train.TrainingData(
        items=ItemTable(model.item_ids[1:].numpy(), model.teacher[1:].numpy()),
        teacher_id=run["teacher_id"],
        train_events=pd.DataFrame(),
        held_out=np.zeros(0, np.int64),
        inputs=np.zeros((0, 8), np.int64),
        targets=np.zeros((0, 8), np.int64),
        target_days=np.zeros((0, 8)),
        valid_inputs=np.zeros((0, 8), np.int64),
        valid_targets=np.zeros(0, np.int64),
        valid_days=np.zeros(0),
        added_days=np.full(model.cfg.n_items + 1, np.inf),
    )
    matches = []
    for path in _checkpoints(ws):
        loaded = train.load_checkpoint_model(Checkpoint.from_directory(str(path)), model.cfg, data)
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


def test_workers_get_the_arrays_from_the_object_store_not_the_loop_config(trained, monkeypatch):
    """What grows with the catalogue and the users (teacher matrix, validation set, counts) reaches the
    workers as one object-store reference; the loop config itself stays a few KB of configs."""
    import pickle

    import ray

    ws, args = trained
    seen = {}

    def fit(loop, config, datasets, run_dir, engine_cfg, score):
        seen["config"] = config
        raise RuntimeError("captured")

    monkeypatch.setattr(train.engine, "fit", fit)
    with pytest.raises(RuntimeError, match="captured"):
        train.run(_parse([*args[:3], "student-arrays", *args[4:]], epochs=1))
    config = seen["config"]
    assert len(pickle.dumps({k: v for k, v in config.items() if k != "arrays"})) < 20_000
    assert isinstance(config["arrays"], ray.ObjectRef)
    arrays = ray.get(config["arrays"])
    data = train.prepare_data(ws, train.JobConfig(workdir=str(ws.root)), 8)
    np.testing.assert_array_equal(arrays["teacher"], data.items.teacher_matrix())
    for name in ("valid_inputs", "valid_targets", "valid_days", "added_days", "held_out"):
        np.testing.assert_array_equal(arrays[name], getattr(data, name), err_msg=name)


def test_evaluate_writes_reports(trained):
    ws, _ = trained
    out, report = evaluate.evaluate(
        str(ws.root), ["student"], SplitConfig(), ("full", "sampled"), n_negatives=20
    )
    assert {"popular", "knn", "student"} <= set(report["results"])
    for model in ("popular", "knn", "student"):
        micro = report["results"][model]["full"]["all"]["micro"]
        assert 0.0 <= micro["NDCG@10"] <= micro["HR@10"] <= micro["HR@50"] <= 1.0
    assert (out / "metrics.md").read_text().count("| student |") == 2
    assert (out / "ndcg.png").stat().st_size > 0
    assert report["n_queries"] > 0


def test_tune_mix_writes_the_weights_the_producer_reads(trained):
    from serving.mixer import read_mix_weights
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
    with pytest.raises(ValueError, match="no export"):
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
