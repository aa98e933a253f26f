"""`vlmrec train` (also `python -m training.train`): the student's training job, Ray Train + DeepSpeed.

    vlmrec train --workdir .vlmrec/sample --name student --item-space adapter       # local Ray, 2 CPU workers
    ray start --head && ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m training.train --workdir $PWD/.vlmrec/sample --name student        # unchanged on a cluster

Data flows one way: the split's events -> example files built by Ray tasks (training/examples.py: each
target's history is its user's clicks before it, a point-in-time join on the event log) -> each worker
streams its equal share of the files (training/example_files.py `stream_batches`); the vocabulary, teacher
matrix and validation rows reach the workers through the object store. Each worker runs
`train_loop_per_worker`: DeepSpeed (ZeRO JSON in engine/zero.json; gloo on CPU, NCCL on GPU), validation
NDCG@10 every epoch, a DeepSpeed checkpoint reported to Ray Train, early stopping. A re-run with the same name
(or a restarted worker, FailureConfig) resumes from the latest checkpoint. A last Ray task (`finish_run`)
chooses the fusion and exports one folder,
`<workdir>/runs/<name>/export/`; the driver holds configs, counts and references, never the data:

    model/               model.safetensors + config.json (SeqRec.from_pretrained rebuilds it)
    item_vectors.parquet item_id, vector (the chosen item space), teacher_id: what the index loads
    popular.json         recency-weighted popular items: the fallback for unknown users
    run.json             every config, the teacher id, data counts, the per-epoch history
    (runs/<name>/examples/ train/ and valid/ example files, rebuilt by each run)

`prepare_data` is the same examples in memory from Feast's point-in-time join over the per-event sequence
snapshots (`vlmrec ingest --sequences snapshots`): the reference the files are tested against.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
from engine.config import at_least
from engine.rows import RowSparseAdam
from training.config import LossConfig, ModelConfig, TrainConfig
from training.data import ItemTable, trim_padding
from training.example_files import stream_batches, worker_rows
from training.examples import Shards, build_examples, example_queries, load_items, windows
from training.item_age import added_days
from training.model import SeqRec, warm_start
from training.validation import choose_fusion, validation_ndcg
from vlmrec.split import SplitConfig, held_out_items, learnable_events, split_validation
from vlmrec.workspace import Workspace, atomic_write_parquet, check_name, staged_dir


@dataclass(frozen=True)
class JobConfig(SplitConfig):
    """Where and how the job runs, and on which split (SplitConfig's fields first; not what it learns)."""

    workdir: str = ".vlmrec/sample"
    name: str = "student"  # the run folder <workdir>/runs/<name>; the same name resumes
    num_workers: int = 2  # Ray Train workers (data parallel)
    use_gpu: bool = False  # NCCL + one GPU per worker when True
    # bf16: the forward and the loss under bfloat16 autocast (train_epoch); weights, id tables, teacher vectors
    # and the optimizer stay fp32 (DeepSpeed's bf16 casts the weights, which the student's fp32 buffers and
    # row-sparse tables do not take)
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_config: str = str(
        engine.ZERO_CONFIG
    )  # the DeepSpeed JSON; batch size, lr and precision from configs
    max_failures: int = 2  # worker failures Ray Train recovers from (resuming from the latest checkpoint)
    popular_k: int = 1000  # length of the popular-items fallback list
    popular_half_life_days: float = 7.0  # recency weighting of popularity
    # validation NDCG@10 on at most this many queries (0: all), a sample fixed by the queries' content: its
    # full ranking costs queries x items every epoch
    max_valid_queries: int = 10_000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_name(self.name, "name")
        if self.max_valid_queries < 0:
            raise ValueError(f"max_valid_queries must be >= 0 (0: all), got {self.max_valid_queries}")
        at_least(self, 1, "popular_k")
        at_least(self, 0, "popular_half_life_days", strictly=True)
        self.engine()  # its own checks

    def engine(self) -> engine.EngineConfig:
        """The fields that say where and how the job runs, for the shared engine."""
        return engine.EngineConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            precision="fp32",  # DeepSpeed's: the job's precision is autocast in its loop
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


def prepare_data(ws: Workspace, job: JobConfig, max_len: int, need_teacher: bool = True) -> TrainingData:
    """Everything the workers need, in memory, with sequences read from Feast by point-in-time join: the
    reference the example files are tested against. Needs the per-event snapshots (`vlmrec ingest
    --sequences snapshots`). Launched items (a launch split) are removed from the examples' input
    sequences as well as from the targets."""
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
            f"re-run `vlmrec ingest --sequences snapshots --max-len {max_len}` or use --max-len {kept}"
        )
    if len(held_out_raw):  # the snapshots hold every click; a launched item's were never made
        hist = [np.asarray(h, np.int64)[~np.isin(h, held_out_raw)] for h in hist]
    w = windows(hist, queries, valid, train, items, max_len)
    return TrainingData(
        items=items,
        teacher_id=teacher_id,
        train_events=train,
        held_out=items.index_of(held_out_raw),
        inputs=w.inputs,
        targets=w.targets,
        target_days=w.target_days,
        valid_inputs=w.valid_inputs,
        valid_targets=w.valid_targets,
        valid_days=w.valid_days,
        added_days=added_days(pq.read_table(ws.items).to_pandas(), items, train, held_out_raw),
    )


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
    arrays = validation_arrays(ws, job, model.cfg)
    model, scores = choose_fusion(
        model, arrays["valid_inputs"], arrays["valid_targets"], arrays["valid_days"], arrays["added_days"]
    )
    info["configs"]["model"] = model.cfg.to_dict()
    info["fusion_val_ndcg10"] = scores
    with staged_dir(export) as tmp:
        shutil.copytree(export, tmp, dirs_exist_ok=True)
        (tmp / "model" / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}, indent=2))
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return export, info


def validation_arrays(ws: Workspace, job: JobConfig, model_cfg: ModelConfig) -> dict:
    """The job's validation rows (valid_inputs, valid_targets, valid_days) and item ages (added_days), the
    same the training job validated on: its example build, in a folder removed after."""
    import tempfile

    import ray

    ws.runs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ws.runs, prefix=".validation-") as tmp:
        shards, _ = job_examples(ws, job, model_cfg, Path(tmp) / "examples")
        return ray.get(shards.arrays)


def job_examples(
    ws: Workspace, job: JobConfig, model_cfg: ModelConfig, out: Path, seed: int = 0
) -> tuple[Shards, ModelConfig]:
    """The job's example build (training/examples.py) for its split, the model's input length and the popular
    list, under `out`: the training job's, its validation rows' and benchmarks/gpu_epoch.py's.
    -> (the shards, model_cfg with the data's n_items and teacher_dim)."""
    shards = build_examples(
        ws, job.split_config(), model_cfg.max_len, model_cfg.is_content, out,
        popular_k=job.popular_k, half_life_days=job.popular_half_life_days, seed=seed,
        max_valid=job.max_valid_queries,
    )  # fmt: skip
    sized = dataclasses.replace(
        model_cfg, n_items=shards.n_items, teacher_dim=shards.teacher_dim if model_cfg.is_content else 0
    )
    return shards, sized


def epoch_seed_of(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, epochs over its share of the example files, validation,
    checkpoints."""
    import ray.train
    from ray.experimental import tqdm_ray

    train_cfg = TrainConfig.from_dict(config["train"])
    job = JobConfig.from_dict(config["job"])
    rank = ray.train.get_context().get_world_rank()
    arrays = ray.get(config["arrays"])  # the vocabulary, loss and validation arrays, from the object store
    ds_engine, criterion, rows, added_days = worker_state(config, arrays, rank)
    # resume: a re-run of the same name, or Ray restarting a failed worker group
    state = engine.resume(ds_engine, {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": []}, rows=rows)
    resumed_from = state["epoch"]  # 0 for a fresh run

    micro = config["ds"]["train_micro_batch_size_per_gpu"]
    world = ray.train.get_context().get_world_size()
    pieces = worker_rows(config["examples"], rank, world)  # this worker's equal share of the example files
    steps = (config["n_train"] // world) // micro  # the same on every worker: each holds at least that share
    while state["epoch"] < train_cfg.epochs and state["bad_epochs"] < train_cfg.patience:
        # Every draw of an epoch (file order, shuffle, dropout, negatives) comes from (seed, epoch, rank): an
        # epoch that a failure interrupted is replayed exactly from the checkpoint before it.
        epoch_seed = epoch_seed_of(train_cfg.seed, state["epoch"], rank)
        torch.manual_seed(epoch_seed)
        t0 = time.perf_counter()
        # rank 0's progress through its share, drawn by the driver (Ray's distributed tqdm)
        bar = tqdm_ray.tqdm(desc=f"epoch {state['epoch'] + 1}", total=steps) if rank == 0 else None
        batches = stream_batches(pieces, micro, train_cfg.shuffle_window, epoch_seed)
        n_seq, losses = train_epoch(
            ds_engine, criterion, rows, batches, steps, added_days, job.precision == "bf16",
            None if bar is None else bar.update,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        ndcg = validation_ndcg(
            ds_engine.module,
            arrays["valid_inputs"],
            arrays["valid_targets"],
            arrays["valid_days"],
            arrays["added_days"],
            rank,
            world,
        )  # each worker ranks its share of the queries
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
        engine.report(ds_engine, metrics, state, rows=rows)


def worker_state(config: dict, arrays: dict, rank: int) -> tuple:
    """A worker's model, loss and optimizers from the job's loop config and arrays: the model seeded by
    rank (the same weights on every rank after DeepSpeed's sync), warm-started where `init_from` says, wrapped
    in the DeepSpeed engine (the id tables stepped row-sparse beside it). Ray Train's worker and
    benchmarks/gpu_epoch.py (one device, no Ray) call it. -> (ds_engine, criterion, rows, added_days)."""
    from training.losses import SeqRecLoss

    model_cfg = ModelConfig.from_dict(config["model"])
    train_cfg = TrainConfig.from_dict(config["train"])
    job = JobConfig.from_dict(config["job"])
    torch.manual_seed(train_cfg.seed + rank)
    model = SeqRec(model_cfg, teacher=arrays["teacher"], item_ids=arrays["item_ids"])
    if config["init_from"]:  # a checkpoint of this run (engine.resume) still wins
        warm_start(model, SeqRec.from_pretrained(Path(config["init_from"]) / "model"))
    criterion = SeqRecLoss(
        LossConfig.from_dict(config["loss"]), model_cfg, arrays["target_counts"], arrays["held_out"]
    )
    tables = model.id_tables() if train_cfg.sparse_ids else []
    rows = RowSparseAdam(tables, config["ds"]) if tables else None  # stepped beside DeepSpeed
    ds_engine = engine.initialize(model, config["ds"], job.use_gpu, exclude=rows.params if rows else ())
    device = ds_engine.device
    added_days = torch.as_tensor(arrays["added_days"], device=device) if model_cfg.item_age else None
    return ds_engine, criterion.to(device), rows, added_days


def train_epoch(
    ds_engine, criterion, rows, batches, steps: int, added_days, bf16: bool = False, on_step=None
) -> tuple[int, list]:
    """`steps` training steps over `batches` (stream_batches' dicts) on the engine's device: inputs trimmed of
    left padding, sampled candidates, the loss, DeepSpeed's backward and step (and the row-sparse tables').
    bf16: the forward and the loss under bfloat16 autocast (weights and gradients stay fp32).
    on_step(1) after each step (a progress bar). -> (sequences seen, per-step losses)."""
    device = ds_engine.device
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    n_seq, losses = 0, []
    ds_engine.train()
    for batch in itertools.islice(batches, steps):
        x, y, days = trim_padding(
            torch.from_numpy(batch["inputs"]).to(device).long(),
            torch.from_numpy(batch["targets"]).to(device).long(),
            torch.from_numpy(batch["target_days"]).to(device),
        )  # (B, width) each
        days = days if added_days is not None else None
        candidates = criterion.sample_candidates(y)
        with autocast:
            loss, _ = criterion(ds_engine(x, y, candidates, days, added_days), y, candidates)
        ds_engine.backward(loss)
        if rows is not None:
            rows.step()
        ds_engine.step()
        losses.append(loss.item())
        n_seq += len(x)
        if on_step is not None:
            on_step(1)
    return n_seq, losses


# -------------------------------------------------------------------------------------------- driver


def train(
    job: JobConfig,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    init_from: Path | None = None,
) -> tuple[Path, dict]:
    """Build the examples as Ray work, fit with Ray Train + DeepSpeed on them, export the best epoch in a Ray
    task. -> (export dir, run info). The driver holds configs, counts and references, never the data.
    init_from: an export whose weights start the run where the shapes agree (warm_start; `vlmrec refresh`)."""
    import ray

    ws = Workspace(job.workdir)
    ws.need(ws.events, "ingest")  # before Ray starts
    if model_cfg.is_content:
        ws.need(ws.embeddings, "embed")
    t0 = time.perf_counter()
    shards, model_cfg = job_examples(ws, job, model_cfg, ws.runs / job.name / "examples", train_cfg.seed)
    if shards.n_train == 0 or shards.n_valid == 0:
        raise ValueError(f"{ws.events}: too few events for training and validation (split {job.split})")
    record_teacher(ws.runs / job.name, shards.teacher_id)
    prepare_s = time.perf_counter() - t0
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
        # the vocabulary, teacher matrix, counts and validation rows: one object-store reference
        "arrays": shards.arrays,
        "examples": shards.train,  # the example files: each worker streams its share of them
        "n_train": shards.n_train,
        "init_from": None if init_from is None else str(Path(init_from).absolute()),
    }
    t0 = time.perf_counter()
    result = engine.fit(
        train_loop_per_worker, loop_config, {}, ws.runs / job.name, job.engine(), "val_ndcg10"
    )
    fit_s = time.perf_counter() - t0
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_ndcg10"])
    info = {
        "name": job.name,
        "teacher_id": shards.teacher_id,
        "feature_service": "student_v1",
        "split": job.split_config().to_dict(),
        "configs": {
            "model": model_cfg.to_dict(),
            "loss": loss_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "job": job.to_dict(),
        },
        "data": {
            "train_events": shards.learnable_events,
            # the newest event the run learnt from: `vlmrec refresh` scores it only on events after this
            "trained_until": None if shards.trained_until is None else _iso(shards.trained_until),
            "train_examples": shards.n_train,
            "valid_queries": shards.n_valid,
            "valid_queries_used": shards.n_valid_used,  # validation NDCG@10's sample (--max-valid-queries)
            "items": shards.n_items,
            "held_out_items": shards.held_out_items,
            "stages": shards.stages,
        },
        "best": best_metrics,
        "fusion_val_ndcg10": None,
        "last": result.metrics,
        "kept_checkpoints": [m for _, m in result.best_checkpoints],
        "timing_s": {"prepare": round(prepare_s, 2), "fit": round(fit_s, 2)},
        "warm_start": None,
    }
    finish = ray.remote(num_cpus=1, max_calls=1)(finish_run)
    info = ray.get(
        finish.remote(str(ws.root), job, best_ckpt, model_cfg, train_cfg, shards.arrays, info, init_from)
    )
    return ws.runs / job.name / "export", info


def finish_run(
    ws_root: str,
    job: JobConfig,
    checkpoint,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    arrays: dict,
    info: dict,
    init_from: Path | None,
) -> dict:
    """The run's last step, a Ray task beside the data: the best checkpoint's model, its fusion chosen on
    validation (tune_fusion), the export written; what a warm start copied is recorded. -> the run info."""
    items = ItemTable(
        arrays["item_ids"][1:], arrays["teacher"][1:] if arrays["teacher"] is not None else None
    )
    model = load_checkpoint_model(checkpoint, model_cfg, items)
    if train_cfg.tune_fusion:
        model, info["fusion_val_ndcg10"] = choose_fusion(
            model, arrays["valid_inputs"], arrays["valid_targets"], arrays["valid_days"], arrays["added_days"]
        )
        info["configs"]["model"] = model.cfg.to_dict()
    if init_from is not None:
        fresh = SeqRec(model_cfg, teacher=arrays["teacher"], item_ids=arrays["item_ids"])
        info["warm_start"] = {
            "from": str(init_from),
            **warm_start(fresh, SeqRec.from_pretrained(Path(init_from) / "model")),
        }
    info["data"]["stages"]["finish"] = {"worker_peak_rss_mb": round(engine.peak_rss_mb(), 1)}
    export(Workspace(ws_root), job, model, items, info["teacher_id"], arrays["popular"], info)
    return info


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


def _iso(ts) -> str:
    """A time as ISO 8601 UTC (naive = UTC)."""
    t = pd.Timestamp(ts)
    return (t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")).isoformat()


def load_checkpoint_model(checkpoint, model_cfg: ModelConfig, items: ItemTable) -> SeqRec:
    """A DeepSpeed checkpoint (any ZeRO stage) -> the fp32 SeqRec over the vocabulary `items`."""
    model = SeqRec(
        model_cfg,
        teacher=items.teacher_matrix() if model_cfg.is_content else None,
        item_ids=np.concatenate([[-1], items.item_ids]),
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


def export(
    ws: Workspace,
    job: JobConfig,
    model: SeqRec,
    items: ItemTable,
    teacher_id: str | None,
    popular: list,
    info: dict,
) -> Path:
    """Write the export folder next to its final place, then swap it in: never half-written."""
    final = ws.runs / job.name / "export"
    with staged_dir(final) as tmp:
        model.save_pretrained(tmp / "model")
        atomic_write_parquet(item_vector_table(model, items, teacher_id), tmp / "item_vectors.parquet")
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
    skip = ("n_items", "teacher_dim")  # from the data: the item table and the teacher's vectors
    for cls, extra in ((ModelConfig, {"skip": skip}), (LossConfig, {}), (TrainConfig, {"epochs": 30})):
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
