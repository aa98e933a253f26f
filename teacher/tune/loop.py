"""The tuning loop: one Ray Train worker (`tune_loop_per_worker`: DeepSpeed engine, epochs over the
pairs, validation loss and accuracy, checkpoints) and the driver (`tune`: pairs, fit through the shared
engine, export of the best epoch)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import nn

import engine
from engine import EngineConfig
from teacher.encoders import (
    TeacherConfig,
    item_text,
    load_teacher,
)
from teacher.image_tower import ImageTowerConfig
from teacher.pairs import PairConfig, mine_pairs, pair_labels
from teacher.tune.config import AdapterConfig, TuneConfig, check_configs
from teacher.tune.export import export
from teacher.tune.model import ItemLookup, PairScorer, build_model
from vlmrec.workspace import Workspace


def _batches(pairs: dict, size: int):
    """Fixed batches in order (the same every epoch: comparable losses); a last short one if it has >= 2."""
    n = len(pairs["a"])
    for s in range(0, n, size):
        if n - s >= 2:
            yield {k: v[s : s + size] for k, v in pairs.items()}


def evaluate_pairs(
    model: PairScorer, lookup: ItemLookup, pairs: dict, size: int, rank: int, world: int
) -> dict:
    """Validation loss and in-batch accuracy (the top-scored y of each x is a positive), batches split
    across ranks and summed."""
    import torch.distributed as dist

    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * rows, correct, rows
    with torch.no_grad():
        for k, part in enumerate(_batches(pairs, size)):
            if k % world != rank:
                continue
            x, y = model(lookup.batch(part["a"], part["b"], part["kind"]))
            labels = torch.as_tensor(pair_labels(part["a"], part["b"]))
            top = (x @ y.T).argmax(dim=1)
            sums += torch.tensor(
                [
                    float(model.loss(x, y, labels)) * len(x),
                    float(labels[torch.arange(len(x)), top].sum()),
                    len(x),
                ],
                dtype=torch.float64,
            )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return {"val_loss": float(sums[0] / max(sums[2], 1)), "val_acc": float(sums[1] / max(sums[2], 1))}


def tune_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine over the trainable parameters, epochs over its shard of the
    pairs, validation, a checkpoint per epoch (frozen base weights left out)."""
    import ray.train
    import torch.distributed as dist

    cfg = TuneConfig.from_dict(config["tune"])
    eng = EngineConfig.from_dict(config["engine"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = f"cuda:{ctx.get_local_rank()}" if eng.use_gpu else "cpu"
    model = build_model(config, device)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout differs per rank
    ds_engine = engine.initialize(model, config["ds"], eng.use_gpu, model.param_groups())
    fresh = {"epoch": 0, "best": float("inf"), "start": None, "history": []}
    state = engine.resume(ds_engine, fresh, frozen_excluded=True)
    resumed_from = state["epoch"]
    lookup = ItemLookup(config)
    rng = np.random.default_rng(cfg.seed + 1000 * rank + state["epoch"])  # random negatives
    shard = ray.train.get_dataset_shard("train")
    micro = config["ds"]["train_micro_batch_size_per_gpu"]
    if state["start"] is None:  # the untuned teacher's validation figures: what tuning is measured against
        state["start"] = evaluate_pairs(ds_engine.module, lookup, config["valid"], micro, rank, world)
    while state["epoch"] < cfg.epochs:
        t0, n_pairs, losses = time.perf_counter(), 0, []
        ds_engine.train()
        for batch in shard.iter_batches(
            batch_size=micro, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=4 * micro
        ):
            a, b, kind = batch["a"], batch["b"], batch["kind"]
            extra = lookup.random_rows(cfg.random_negatives, rng)
            x, y = ds_engine(lookup.batch(a, b, kind, extra))
            loss = ds_engine.module.loss(x, y, torch.as_tensor(pair_labels(a, b, extra), device=x.device))
            ds_engine.backward(loss)
            ds_engine.step()
            losses.append(loss.item())
            n_pairs += len(a)
        seconds = time.perf_counter() - t0
        total = torch.tensor([float(n_pairs)])
        if dist.is_initialized():
            dist.all_reduce(total)
        val = evaluate_pairs(ds_engine.module, lookup, config["valid"], micro, rank, world)
        state["epoch"] += 1
        state["best"] = min(state["best"], val["val_loss"])
        metrics = {
            "epoch": state["epoch"],
            "resumed_from": resumed_from,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            **val,
            "val_loss_start": state["start"]["val_loss"],
            "val_acc_start": state["start"]["val_acc"],
            "temperature": float(ds_engine.module.log_t.exp()),
            "bias": float(ds_engine.module.bias),
            "pairs": int(total.item()),
            "pairs_per_s": float(total.item()) / seconds if seconds else 0.0,
            "epoch_s": seconds,
            "peak_rss_mb": engine.peak_rss_mb(),
        }
        state["history"].append(metrics)
        engine.report(ds_engine, metrics, state, exclude_frozen=True)


def tune(
    cfg: TuneConfig,
    pairs_cfg: PairConfig = PairConfig(),
    adapter: AdapterConfig = AdapterConfig(),
    tower: ImageTowerConfig = ImageTowerConfig(),
    eng: EngineConfig = EngineConfig(),
) -> tuple[Path, dict]:
    """Mine pairs, fit on Ray Train + DeepSpeed, export the best epoch. -> (export dir, run info)"""
    import ray

    t_start = time.perf_counter()
    tcfg = check_configs(cfg, pairs_cfg, adapter, eng)
    ws = Workspace(cfg.workdir)
    for path in (ws.events, ws.items):
        ws.need(path, "ingest")
    events = pq.read_table(ws.events).to_pandas()
    items = pq.read_table(ws.items).to_pandas()
    train_pairs, valid_pairs, counts = mine_pairs(events, items, pairs_cfg, cfg.seed)
    row_of = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    texts = [item_text(t, x) for t, x in zip(items["title"], items["text"], strict=True)]
    pair_texts = texts if cfg.text_field == "item" else items["title"].astype(str).tolist()

    if cfg.method == "lit":  # the locked text vectors are the ones `vlmrec embed` makes: its token length
        tcfg = dataclasses.replace(tcfg, max_length=TeacherConfig.max_length)
    base = load_teacher(tcfg)  # the base id, and (lit) the locked text vectors
    text_vectors = None
    if cfg.method == "lit":
        used = np.unique(row_of.loc[np.concatenate([train_pairs["a"], valid_pairs["a"]])].to_numpy())
        text_vectors = np.zeros((len(items), base.dim), np.float32)
        text_vectors[used] = base.embed_texts([pair_texts[r] for r in used])
        tower = dataclasses.replace(tower, out_dim=base.dim)

    def rows(p: pd.DataFrame) -> dict:
        return {
            "a": row_of.loc[p["a"]].to_numpy(np.int64),
            "b": row_of.loc[p["b"]].to_numpy(np.int64),
            "kind": p["kind"].to_numpy(np.int8),
        }

    train_rows = rows(train_pairs)
    # random negatives: items the catalogue held at the cut (lit: those with a locked text vector)
    held = pd.to_datetime(items["created_at"], utc=True) <= pd.Timestamp(counts["cut"])
    negative_rows = used if cfg.method == "lit" else np.flatnonzero(held.to_numpy())
    loop_config = {
        "tune": cfg.to_dict(),
        "adapter": adapter.to_dict(),
        "tower": dataclasses.asdict(tower),
        "engine": eng.to_dict(),
        "ds": engine.ds_config(eng, cfg.batch_size, cfg.lr, cfg.weight_decay),
        "item_texts": texts,
        "pair_texts": pair_texts,
        "image_uris": items["image_uri"].tolist(),
        "with_images": cfg.method == "lit" or base.supports_images,
        "text_vectors": text_vectors,
        "negative_rows": np.asarray(negative_rows, np.int64),
        "valid": rows(valid_pairs),
    }
    from vlmrec.raycluster import init_ray

    init_ray()
    dataset = ray.data.from_items(
        [{"a": a, "b": b, "kind": k} for a, b, k in zip(*train_rows.values(), strict=True)]
    )
    prepare_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    result = engine.fit(
        tune_loop_per_worker,
        loop_config,
        {"train": dataset},
        ws.runs / cfg.name,
        eng,
        "val_loss",
        order="min",
    )
    fit_s = time.perf_counter() - t0
    best_ckpt, best = min(result.best_checkpoints, key=lambda cm: cm[1]["val_loss"])
    model = build_model(loop_config, qlora=False)  # the driver rebuilds in full precision on CPU
    _load_trainable(model, engine.fp32_state_dict(best_ckpt, exclude_frozen=True))
    history = _history(result)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if cfg.method == "lit":
        total += sum(p.numel() for p in base.model.parameters())  # the locked text tower is part of it
    info = {
        "name": cfg.name,
        "base_teacher_id": base.model_id,
        "configs": {
            "tune": cfg.to_dict(),
            "pairs": pairs_cfg.to_dict(),
            "adapter": adapter.to_dict() if cfg.method == "lora" else None,
            "tower": dataclasses.asdict(tower) if cfg.method == "lit" else None,
            "engine": eng.to_dict(),
        },
        "pairs": counts,
        "best": best,
        "last": result.metrics,
        "kept_checkpoints": history,
        "cost": {
            "prepare_s": round(prepare_s, 2),
            "fit_s": round(fit_s, 2),
            "pairs_per_s": result.metrics.get("pairs_per_s"),
            "peak_rss_mb_worker": max(m.get("peak_rss_mb", 0.0) for m in history),
            "peak_rss_mb_driver": engine.peak_rss_mb(),
            "trainable_params": trainable,
            "total_params": total,
        },
    }
    export_dir = export(ws, cfg, tcfg, model, base, info, texts[:8])
    return export_dir, info


def _history(result) -> list[dict]:
    """Every epoch's reported metrics, this run's and (when resumed) the earlier runs' kept ones."""
    keys = ("epoch", "resumed_from", "loss", "val_loss", "val_acc", "val_loss_start", "val_acc_start")
    keys += ("temperature", "bias", "pairs")
    keys += ("pairs_per_s", "epoch_s", "peak_rss_mb")
    rows = {int(m["epoch"]): {k: m[k] for k in keys if k in m} for _, m in result.best_checkpoints}
    frame = result.metrics_dataframe
    if frame is not None:
        for m in frame.to_dict("records"):
            rows[int(m["epoch"])] = {k: m[k] for k in keys if k in m}
    return [rows[e] for e in sorted(rows)]


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's trainable weights (the frozen base was left out of it) and check they all came."""
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = wanted - set(state)
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable weights: {sorted(missing)[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    model.eval()
