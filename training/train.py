"""`vlmrec train` (also `python -m training.train`): the student's training job, Ray Train + DeepSpeed.

    vlmrec train --workdir .vlmrec/sample --name student --item-space adapter       # local Ray, 2 CPU workers
    ray start --head && ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m training.train --workdir $PWD/.vlmrec/sample --name student        # unchanged on a cluster

Data flows one way: the split's training events -> (user, target time) queries -> the student's Feast
feature service by point-in-time join (the sequence just before each target) -> next-item examples ->
Ray Data shards them to the workers. Each worker runs `train_loop_per_worker`: DeepSpeed (ZeRO JSON in
engine/zero.json; gloo on CPU, NCCL on GPU), validation NDCG@10 every epoch, a DeepSpeed checkpoint
reported to Ray Train, early stopping. A re-run with the same name (or a restarted worker, FailureConfig)
resumes from the latest checkpoint. The driver then exports one folder, `<workdir>/runs/<name>/export/`:

    model/               model.safetensors + config.json (SeqRec.from_pretrained rebuilds it)
    item_vectors.parquet item_id, vector (the chosen item space), teacher_id: what the index loads
    popular.json         recency-weighted popular items: the fallback for unknown users
    run.json             every config, the teacher id, data counts, the per-epoch history
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import engine
from training.config import LossConfig, ModelConfig, TrainConfig
from training.data import ItemTable, build_inputs, trim_padding
from training.item_age import added_days, to_days
from training.model import SeqRec, warm_start
from training.popular import popular_items
from training.validation import choose_fusion, validation_ndcg
from vlmrec.schema import teacher_of
from vlmrec.split import SplitConfig, after_cut, held_out_items, learnable_events
from vlmrec.workspace import Workspace, atomic_write_parquet, staged_dir


@dataclass(frozen=True)
class JobConfig(SplitConfig):
    """Where and how the job runs, and on which split (SplitConfig's fields first; not what it learns)."""

    workdir: str = ".vlmrec/sample"
    name: str = "student"  # the run folder <workdir>/runs/<name>; the same name resumes
    num_workers: int = 2  # Ray Train workers (data parallel)
    use_gpu: bool = False  # NCCL + one GPU per worker when True
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_config: str = str(
        engine.ZERO_CONFIG
    )  # the DeepSpeed JSON; batch size, lr and precision from configs
    max_failures: int = 2  # worker failures Ray Train recovers from (resuming from the latest checkpoint)
    popular_k: int = 1000  # length of the popular-items fallback list
    popular_half_life_days: float = 7.0  # recency weighting of popularity

    def engine(self) -> engine.EngineConfig:
        """The fields that say where and how the job runs, for the shared engine."""
        return engine.EngineConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            precision=self.precision,
            zero_config=self.zero_config,
            max_failures=self.max_failures,
        )


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainingData:
    items: ItemTable  # the vocabulary: every catalogue item with a teacher vector
    teacher_id: str | None  # None: an id-only run on a workspace with no embeddings
    train_events: pd.DataFrame  # the events the run learns from (real timestamps)
    held_out: np.ndarray  # model indices of items the run must learn nothing about (launched items)
    inputs: np.ndarray  # (N, T) model indices
    targets: np.ndarray  # (N, T) next items, 0 = none
    target_days: np.ndarray  # (N, T) float64 time of each target (training.item_age days), 0 = none
    valid_inputs: np.ndarray  # (V, T) the sequence before each validation target
    valid_targets: np.ndarray  # (V,) model indices
    valid_days: np.ndarray  # (V,) float64 time of each validation target
    added_days: np.ndarray  # (n + 1,) item-age anchor of each item (training.item_age.added_days)


def load_items(ws: Workspace, need_teacher: bool = True) -> tuple[ItemTable, str | None]:
    """The teacher vectors of every catalogue item (the item_embedding source) and the teacher id.
    need_teacher=False (the id baseline) takes the catalogue's ids when nothing is embedded: (table, None)."""
    if not ws.embeddings.exists():
        if not need_teacher and ws.items.exists():
            ids = pq.read_table(ws.items, columns=["item_id"]).column("item_id").to_numpy()
            return ItemTable(np.sort(ids)), None
        raise FileNotFoundError(f"{ws.embeddings} is missing: run `vlmrec embed --workdir {ws.root}`")
    teacher_id = teacher_of(ws.embeddings)
    return ItemTable.from_frame(pq.read_table(ws.embeddings).to_pandas()), teacher_id


def example_queries(
    train: pd.DataFrame, max_len: int, validation: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training queries, validation queries): each a frame of (user_id, event_timestamp, item_id) target events.

    Validation: `validation` when the split holds its own validation events (loo: each user's second-last
    event, the SASRec protocol), else each user's last training event (users with >= 2), then not trained
    on. Training: windows of max_len targets from the end of the rest, so every other event is a target
    exactly once (all-position training).
    """
    cols = ["user_id", "event_timestamp", "item_id"]
    ordered = train.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
    pos = ordered.groupby("user_id").cumcount().to_numpy()
    n = ordered.groupby("user_id")["item_id"].transform("size").to_numpy()
    if validation is None:
        valid_rows = ordered.loc[(pos == n - 1) & (n >= 2), cols]
        last_train = np.where(n >= 2, n - 2, n - 1)  # index of each user's last training target
    else:
        valid_rows = validation.sort_values(["user_id", "event_timestamp"], kind="stable")[cols]
        last_train = n - 1
    is_end = (pos >= 1) & (pos <= last_train) & ((last_train - pos) % max_len == 0)
    return ordered.loc[is_end, cols].reset_index(drop=True), valid_rows.reset_index(drop=True)


def split_validation(events: pd.DataFrame, split: SplitConfig) -> pd.DataFrame | None:
    """The validation events a split holds out itself: loo's second-last event of each user (the test
    target is the last); None for temporal (validation then comes from the training events)."""
    if split.split != "loo":
        return None
    rest = after_cut(events, split).sort_values(["user_id", "event_timestamp"], kind="stable")
    return rest[rest.groupby("user_id").cumcount(ascending=False) == 1]


def prepare_data(ws: Workspace, job: JobConfig, max_len: int, need_teacher: bool = True) -> TrainingData:
    """Everything the workers need, with sequences read from Feast by point-in-time join. Launched items
    (a launch split) are removed from the examples' input sequences as well as from the targets."""
    from vlmrec.features import historical_sequences, open_store

    items, teacher_id = load_items(ws, need_teacher)
    events = pq.read_table(ws.events).to_pandas()
    split = job.split_config()
    train = learnable_events(events, split)
    held_out_raw = held_out_items(events, split)
    queries, valid = example_queries(train, max_len, split_validation(events, split))
    store = open_store(ws)
    hist = historical_sequences(store, pd.concat([queries, valid], ignore_index=True))["item_ids"].tolist()
    kept = max((len(h) for h in hist), default=0)
    if kept < max_len and events.groupby("user_id").size().max() > kept + 1:
        raise ValueError(
            f"{ws.sequences}: column item_ids keeps {kept} ids per snapshot but max_len is {max_len}: "
            f"re-run `vlmrec ingest --max-len {max_len}` or train with --max-len {kept}"
        )
    if len(held_out_raw):  # the snapshots hold every click; a launched item's were never made
        hist = [np.asarray(h, np.int64)[~np.isin(h, held_out_raw)] for h in hist]
    hist_train, hist_valid = hist[: len(queries)], hist[len(queries) :]
    # inputs = the sequence before the target; targets = the same shifted by one, ending with the target.
    full = [[*h, t] for h, t in zip(hist_train, queries["item_id"], strict=True)]
    inputs = build_inputs([f[:-1] for f in full], items, max_len).ids
    targets = build_inputs([f[1:] for f in full], items, max_len).ids
    target_days = _target_days(train, queries, targets, items)
    keep = targets[:, -1] > 0
    inputs, targets, target_days = inputs[keep], targets[keep], target_days[keep]
    targets = np.where(inputs > 0, targets, 0)  # a target only where there is an input before it
    target_days = np.where(targets > 0, target_days, 0.0)
    v_inputs = build_inputs(hist_valid, items, max_len).ids
    v_targets = items.index_of(valid["item_id"].to_numpy())
    v_keep = (v_targets > 0) & (v_inputs[:, -1] > 0)
    return TrainingData(
        items=items,
        teacher_id=teacher_id,
        train_events=train,
        held_out=items.index_of(held_out_raw),
        inputs=inputs,
        targets=targets,
        target_days=target_days,
        valid_inputs=v_inputs[v_keep],
        valid_targets=v_targets[v_keep],
        valid_days=to_days(valid["event_timestamp"].to_numpy())[v_keep],
        added_days=added_days(pq.read_table(ws.items).to_pandas(), items, train, held_out_raw),
    )


def _target_days(
    train: pd.DataFrame, queries: pd.DataFrame, targets: np.ndarray, items: ItemTable
) -> np.ndarray:
    """(N, T) the time of every target in `targets` (0 where none): a window's targets are the user's
    learnable events ending at its query event, so position T - 1 - j is the j-th event before it. Checked
    against the targets' ids (a mismatch means the sequences and the events disagree)."""
    ordered = train.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
    ordered["row"] = np.arange(len(ordered))
    first = ordered.groupby("user_id")["row"].transform("min").to_numpy()
    rows = queries.merge(ordered, on=["user_id", "event_timestamp", "item_id"], how="left")["row"]
    if rows.isna().any():
        raise ValueError(f"{int(rows.isna().sum())} training queries are not among the learnable events")
    rows = rows.to_numpy(np.int64)
    T = targets.shape[1]
    back = rows[:, None] - np.arange(T)[None, ::-1]  # (N, T) event row of each position, last = the query
    valid = (back >= first[rows][:, None]) & (targets > 0)
    back = back.clip(min=0)
    days = to_days(ordered["event_timestamp"].to_numpy())[back]
    ids = items.index_of(ordered["item_id"].to_numpy(np.int64))[back]
    wrong = valid & (ids != targets)
    if wrong.any():
        raise ValueError(f"{int(wrong.sum())} training targets do not match the events' order in time")
    return np.where(valid, days, 0.0)


# ------------------------------------------------------------------------------------------- workers


def refit_fusion(job: JobConfig) -> tuple[Path, dict]:
    """`vlmrec train --name N --fusion-only`: choose the fusion of an existing export on validation again
    (the same data and rule as after training) and rewrite its model config and run.json in place."""
    ws = Workspace(job.workdir)
    export = ws.runs / job.name / "export"
    info = json.loads((export / "run.json").read_text())
    if SplitConfig.of_run(info) != job.split_config():
        raise ValueError(
            f"{export}: trained on another split than the flags give; pass the run's split flags"
        )
    model = SeqRec.from_pretrained(export / "model")
    data = prepare_data(ws, job, model.cfg.max_len, model.cfg.is_content)
    model, scores = choose_fusion(
        model, data.valid_inputs, data.valid_targets, data.valid_days, data.added_days
    )
    info["configs"]["model"] = model.cfg.to_dict()
    info["fusion_val_ndcg10"] = scores
    with staged_dir(export) as tmp:
        shutil.copytree(export, tmp, dirs_exist_ok=True)
        (tmp / "model" / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}, indent=2))
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return export, info


def epoch_seed_of(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, epochs over its Ray Data shard, validation, checkpoints."""
    import ray.train
    from ray.experimental import tqdm_ray

    from training.losses import SeqRecLoss

    model_cfg = ModelConfig.from_dict(config["model"])
    loss_cfg = LossConfig.from_dict(config["loss"])
    train_cfg = TrainConfig.from_dict(config["train"])
    job = JobConfig.from_dict(config["job"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(
        train_cfg.seed + rank
    )  # the model's initial weights (the same on every rank after sync)

    arrays = ray.get(config["arrays"])  # the vocabulary, loss and validation arrays, from the object store
    model = SeqRec(model_cfg, teacher=arrays["teacher"], item_ids=arrays["item_ids"])
    if config["init_from"]:  # a checkpoint of this run (resume, below) still wins
        warm_start(model, SeqRec.from_pretrained(Path(config["init_from"]) / "model"))
    criterion = SeqRecLoss(loss_cfg, model_cfg, arrays["target_counts"], arrays["held_out"])
    ds_engine = engine.initialize(model, config["ds"], job.use_gpu)
    device = ds_engine.device
    criterion = criterion.to(device)
    added_days = torch.as_tensor(arrays["added_days"], device=device) if model_cfg.item_age else None
    # resume: a re-run of the same name, or Ray restarting a failed worker group
    state = engine.resume(ds_engine, {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": []})
    resumed_from = state["epoch"]  # 0 for a fresh run

    shard = ray.train.get_dataset_shard("train")
    micro = config["ds"]["train_micro_batch_size_per_gpu"]
    # The buffer holds the whole shard (examples are a few KB): each epoch is a fresh permutation of it.
    buffer = max(4 * micro, config["shard_size"])
    while state["epoch"] < train_cfg.epochs and state["bad_epochs"] < train_cfg.patience:
        # Every draw of an epoch (shuffle, dropout, negatives) comes from (seed, epoch, rank): an epoch that a
        # failure interrupted is replayed exactly from the checkpoint before it.
        epoch_seed = epoch_seed_of(train_cfg.seed, state["epoch"], rank)
        torch.manual_seed(epoch_seed)
        t0, n_seq, losses = time.perf_counter(), 0, []
        ds_engine.train()
        # rank 0's progress through its shard, drawn by the driver (Ray's distributed tqdm)
        bar = (
            tqdm_ray.tqdm(desc=f"epoch {state['epoch'] + 1}", total=config["shard_size"] // micro)
            if rank == 0
            else None
        )
        for batch in shard.iter_torch_batches(
            batch_size=micro, drop_last=True, local_shuffle_buffer_size=buffer, local_shuffle_seed=epoch_seed
        ):
            x, y, days = trim_padding(
                batch["inputs"].to(device), batch["targets"].to(device), batch["target_days"].to(device)
            )  # (B, width) each
            days = days if added_days is not None else None
            candidates = criterion.sample_candidates(y)
            loss, _ = criterion(ds_engine(x, y, candidates, days, added_days), y, candidates)
            ds_engine.backward(loss)
            ds_engine.step()
            losses.append(loss.item())
            n_seq += len(x)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        ndcg = validation_ndcg(
            ds_engine.module,
            arrays["valid_inputs"],
            arrays["valid_targets"],
            arrays["valid_days"],
            arrays["added_days"],
        )
        state["epoch"] += 1
        improved = ndcg > state["best"]
        state["best"], state["bad_epochs"] = (
            (ndcg, 0) if improved else (state["best"], state["bad_epochs"] + 1)
        )
        metrics = {
            "epoch": state["epoch"],
            "resumed_from": resumed_from,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "val_ndcg10": ndcg,
            "best_val_ndcg10": state["best"],
            "seq_per_s_worker": n_seq / seconds if seconds else 0.0,
            "epoch_s": seconds,
            "peak_rss_mb": engine.peak_rss_mb(),
        }
        state["history"].append(metrics)
        engine.report(ds_engine, metrics, state)


# -------------------------------------------------------------------------------------------- driver


def train(
    job: JobConfig,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    init_from: Path | None = None,
) -> tuple[Path, dict]:
    """Prepare data from Feast, fit with Ray Train + DeepSpeed, export the best epoch. -> (export dir, run info)
    init_from: an export whose weights start the run where the shapes agree (warm_start; `vlmrec refresh`)."""
    import ray

    from vlmrec.raycluster import init_ray

    ws = Workspace(job.workdir)
    t0 = time.perf_counter()
    data = prepare_data(ws, job, model_cfg.max_len, model_cfg.is_content)
    if len(data.inputs) == 0 or len(data.valid_inputs) == 0:
        raise ValueError(f"{ws.events}: too few events for training and validation (split {job.split})")
    model_cfg = _fit_vocabulary(model_cfg, data)
    record_teacher(ws.runs / job.name, data.teacher_id)
    prepare_s = time.perf_counter() - t0
    init_ray()
    # Shuffled here once, then per epoch by each worker's local shuffle buffer (as large as its shard): a
    # global random_shuffle would need Ray Data tasks, which wait forever for a CPU when the training
    # workers hold them all.
    order = np.random.default_rng(train_cfg.seed).permutation(len(data.inputs))
    dataset = ray.data.from_items(
        [
            {"inputs": data.inputs[i], "targets": data.targets[i], "target_days": data.target_days[i]}
            for i in order
        ]
    )
    # Arrays that grow with the catalogue and the users go through the object store (one copy per node,
    # read without copying); the loop config carries configs and that one reference.
    arrays = {
        "teacher": data.items.teacher_matrix() if model_cfg.is_content else None,
        "item_ids": np.concatenate([[-1], data.items.item_ids]),
        "target_counts": np.bincount(data.targets[data.targets > 0], minlength=model_cfg.n_items + 1),
        "held_out": data.held_out,
        "added_days": data.added_days,
        "valid_inputs": data.valid_inputs,
        "valid_targets": data.valid_targets,
        "valid_days": data.valid_days,
    }
    loop_config = {
        "model": model_cfg.to_dict(),
        "loss": loss_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "job": job.to_dict(),
        "ds": engine.ds_config(
            job.engine(),
            train_cfg.batch_size,
            train_cfg.lr,
            train_cfg.weight_decay,
            grad_clip=train_cfg.grad_clip,
        ),
        "arrays": ray.put(arrays),
        "shard_size": -(-len(order) // job.num_workers),
        "init_from": None if init_from is None else str(Path(init_from).absolute()),
    }
    warm = None  # what the warm start copies (each worker does the same before its first epoch)
    if init_from is not None:
        fresh = SeqRec(model_cfg, teacher=arrays["teacher"], item_ids=arrays["item_ids"])
        warm = {
            "from": str(init_from),
            **warm_start(fresh, SeqRec.from_pretrained(Path(init_from) / "model")),
        }
    t0 = time.perf_counter()
    result = engine.fit(
        train_loop_per_worker, loop_config, {"train": dataset}, ws.runs / job.name, job.engine(), "val_ndcg10"
    )
    fit_s = time.perf_counter() - t0
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_ndcg10"])
    model = load_checkpoint_model(best_ckpt, model_cfg, data)
    fusion = None
    if train_cfg.tune_fusion:
        model, fusion = choose_fusion(
            model, data.valid_inputs, data.valid_targets, data.valid_days, data.added_days
        )
    history = [m for _, m in result.best_checkpoints]
    info = {
        "name": job.name,
        "teacher_id": data.teacher_id,
        "feature_service": "student_v1",
        "split": job.split_config().to_dict(),
        "configs": {
            "model": model.cfg.to_dict(),
            "loss": loss_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "job": job.to_dict(),
        },
        "data": {
            "train_events": len(data.train_events),
            # the newest event the run learnt from: `vlmrec refresh` scores it only on events after this
            "trained_until": _iso(data.train_events["event_timestamp"].max())
            if len(data.train_events)
            else None,
            "train_examples": len(data.inputs),
            "valid_queries": len(data.valid_inputs),
            "items": data.items.n_items,
            "held_out_items": len(data.held_out),
        },
        "best": best_metrics,
        "fusion_val_ndcg10": fusion,
        "last": result.metrics,
        "kept_checkpoints": history,
        "timing_s": {"prepare": round(prepare_s, 2), "fit": round(fit_s, 2)},
        "warm_start": warm,
    }
    export_dir = export(ws, job, model, data, info)
    return export_dir, info


def record_teacher(run_dir: Path, teacher_id: str) -> None:
    """Write the run's teacher id beside its checkpoints, or refuse when the run (a re-run resumes its
    checkpoints) was started on vectors of another teacher: its weights live in that other space."""
    marker = run_dir / "teacher.json"
    if marker.exists():
        recorded = json.loads(marker.read_text())["teacher_id"]
        if recorded != teacher_id:
            raise ValueError(
                f"teacher mismatch: run {run_dir.name!r} was trained on teacher {recorded!r} but the item "
                f"embeddings now hold {teacher_id!r} (re-embedded since?); a re-run would resume the old "
                f"space: train under a new --name, or delete {run_dir}"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"teacher_id": teacher_id}))


def _fit_vocabulary(model_cfg: ModelConfig, data: TrainingData) -> ModelConfig:
    """The vocabulary and teacher size come from the data, not from flags."""
    dim = data.items.teacher.shape[1] if model_cfg.is_content else 0
    return dataclasses.replace(model_cfg, n_items=data.items.n_items, teacher_dim=dim)


def _iso(ts) -> str:
    """A time as ISO 8601 UTC (naive = UTC)."""
    t = pd.Timestamp(ts)
    return (t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")).isoformat()


def load_checkpoint_model(checkpoint, model_cfg: ModelConfig, data: TrainingData) -> SeqRec:
    """A DeepSpeed checkpoint (any ZeRO stage) -> the fp32 SeqRec."""
    model = SeqRec(
        model_cfg,
        teacher=data.items.teacher_matrix() if model_cfg.is_content else None,
        item_ids=np.concatenate([[-1], data.items.item_ids]),
    )
    state = engine.fp32_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def item_vector_table(model: SeqRec, items: ItemTable, teacher_id: str) -> pa.Table:
    """item_id -> vector in the model's item space, for every vocabulary item (what the index loads)."""
    with torch.no_grad():
        vectors = model.item_vectors()[1:].float().numpy()  # (n, d), row k = items.item_ids[k]
    return pa.table(
        {
            "item_id": pa.array(items.item_ids, pa.int64()),
            "vector": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32())),
            "teacher_id": pa.array([teacher_id] * len(items.item_ids), pa.string()),
        }
    )


def export(ws: Workspace, job: JobConfig, model: SeqRec, data: TrainingData, info: dict) -> Path:
    """Write the export folder next to its final place, then swap it in: never half-written."""
    final = ws.runs / job.name / "export"
    with staged_dir(final) as tmp:
        model.save_pretrained(tmp / "model")
        vectors = item_vector_table(model, data.items, data.teacher_id)
        atomic_write_parquet(vectors, tmp / "item_vectors.parquet")
        popular = popular_items(data.train_events, job.popular_k, job.popular_half_life_days)
        (tmp / "popular.json").write_text(json.dumps(popular))
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return final


# ----------------------------------------------------------------------------------------------- CLI


# The default student: what `vlmrec train` trains in a content space when these flags are not given (the
# config benchmarks/cold.py chose on validation; docs/BENCHMARKS.md, "New products"). The id baseline
# (--item-space id) keeps the plain SASRec's defaults.
STUDENT_DEFAULTS = {
    "use_id_embedding": True,  # the hybrid ...
    "id_dropout": 0.5,  # ... with id dropout: content alone ranks half the items of every batch
    "negative_pool": "trained",  # items nobody clicked are never pushed away
    "item_age": True,  # how long the item has been in the catalogue at the request's time, on the item side
    "tune_fusion": True,  # the last clicks' item vectors in the query, weight chosen on validation
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    unset = dict.fromkeys(STUDENT_DEFAULTS)  # None: resolved by resolve_defaults()
    JobConfig.add_arguments(parser)
    for cls, extra in ((ModelConfig, {"n_items": 0}), (LossConfig, {}), (TrainConfig, {"epochs": 30})):
        cls.add_arguments(parser, **extra, **{k: v for k, v in unset.items() if k in _defaults(cls)})
    parser.add_argument(
        "--fusion-only",
        action="store_true",
        help="no training: choose the export's fusion on validation again",
    )


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Flags of STUDENT_DEFAULTS left unset: the default student's value in a content space, the dataclass
    default for the id baseline."""
    out = argparse.Namespace(**vars(args))
    for name, value in STUDENT_DEFAULTS.items():
        if getattr(out, name, None) is None:
            plain = next(d[name] for d in map(_defaults, (ModelConfig, LossConfig, TrainConfig)) if name in d)
            setattr(out, name, value if args.item_space != "id" else plain)
    return out


def run(args: argparse.Namespace) -> tuple[Path, dict]:
    args = resolve_defaults(args)
    job = JobConfig.from_args(args)
    if getattr(args, "fusion_only", False):
        export_dir, info = refit_fusion(job)
        m = info["configs"]["model"]
        print(
            f"train: {job.name}: fusion weight {m['fusion_weight']:g} over the last {m['fusion_last']} clicks"
        )
        return export_dir, info
    model_cfg = ModelConfig.from_args(args, n_items=1, teacher_dim=0 if args.item_space == "id" else 1)
    export_dir, info = train(job, model_cfg, LossConfig.from_args(args), TrainConfig.from_args(args))
    best = info["best"]
    print(
        f"train: {job.name}: best epoch {best['epoch']} val NDCG@10 {best['val_ndcg10']:.4f}; "
        f"{info['data']['train_examples']} examples; exported to {export_dir}"
    )
    return export_dir, info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
