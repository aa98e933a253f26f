"""`vlmrec tune` (also `python -m training.tune_teacher`): adapt the teacher to the catalogue and the click log
before embedding with it, on the student's engine (Ray Train + DeepSpeed, training/engine.py).

    vlmrec tune --workdir W --name minilm-co --pairs co-engagement              # LoRA on minilm, sigmoid loss
    vlmrec tune --workdir W --name minilm-nce --pairs co-engagement --loss infonce      # the loss ablation
    vlmrec tune --workdir W --name siglip-it --teacher siglip --teacher-path /models/siglip --pairs both
    vlmrec tune --workdir W --name lit --method lit --pairs image-title       # a new image tower, minilm locked
    vlmrec embed --workdir W --teacher W/runs/minilm-co/export                # re-embed with the tuned teacher
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m training.tune_teacher ...

Pairs (training/pairs.py) come only from events before the temporal cut the student is evaluated at, and
from the catalogue as it was then: co-engagement (two items one user clicked close together: both sides
are item vectors, image and text fused as `vlmrec embed` fuses them) and image-title (an item's image
against its text). Loss: SigLIP's pairwise sigmoid with a learnable temperature and bias (t' = log 10,
b = -10 at start), or symmetric InfoNCE from pytorch-metric-learning on the same pairs (the ablation).

Methods:
  lora  LoRA adapters (peft; rank, alpha, dropout, target modules from flags) on the teacher; --qlora loads
        the base in 4-bit NF4 through bitsandbytes (CUDA only). The base weights are never modified.
  lit   the teacher's text tower locked (its vectors computed once here) and a small ViT image tower
        (vlmrec/image_tower.py, random init) trained into its space, for catalogues without VLM weights.

A re-run of the same --name resumes from its latest checkpoint. Export, <workdir>/runs/<name>/export/:
  adapter/   (lora) the peft adapter (safetensors + adapter_config.json)
  model/     the merged teacher (safetensors, tokenizer, image processor) or (lit) the image tower, and
             teacher.json: base id, adapter digest, teacher id = "<base id>+lora@<adapter digest>"
  run.json   configs, pair counts, per-epoch history, cost (time, pairs/s, peak RSS, trainable/total params)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import nn

from training import engine
from training.config import _Config
from training.engine import EngineConfig
from training.losses import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_T, infonce_pair_loss, sigmoid_pair_loss
from training.pairs import CO, IMAGE_TITLE, PairConfig, mine_pairs, pair_labels
from vlmrec.image_tower import ImageTower, ImageTowerConfig
from vlmrec.teacher import (
    TUNED_FILE,
    Teacher,
    TeacherConfig,
    _weights_digest,
    item_features,
    item_text,
    load_teacher,
    require_cuda_for_4bit,
    resolve_teacher,
)
from vlmrec.workspace import Workspace, staged_dir

# LoRA targets when --target-modules is empty: the attention projections of each teacher's towers.
DEFAULT_TARGETS = {
    "minilm": "query,value",  # BERT self-attention
    "siglip": "q_proj,v_proj",  # SigLIP text and vision attention
    "jina-clip-v2": "Wqkv,q_proj,v_proj",  # XLM-R (fused qkv) + EVA vision; not checked on the real weights
}


@dataclass(frozen=True)
class TuneConfig(_Config):
    """What the tuning learns, from which teacher, for how long."""

    workdir: str = ".vlmrec/sample"
    name: str = "teacher"  # the run folder <workdir>/runs/<name>; the same name resumes
    teacher: str = "minilm"  # minilm | siglip | jina-clip-v2, or a tuned teacher's folder
    teacher_path: str | None = None  # model folder or hub id (siglip, jina-clip-v2)
    teacher_revision: str | None = None  # pinned commit for a hub id
    method: Literal["lora", "lit"] = "lora"
    loss: Literal["sigmoid", "infonce"] = "sigmoid"  # SigLIP's; InfoNCE (pml NTXentLoss) is the ablation
    infonce_temperature: float = 0.05  # fixed, as pml's NTXentLoss takes it; 0.05-0.1 is the usual range
    text_field: Literal["item", "title"] = "item"  # the text of image-title pairs: what embed uses, or title
    epochs: int = 2  # LoRA moves a pretrained space: a few passes; early epochs are where it helps most
    batch_size: int = 64  # pairs per step across workers; each rank sees batch_size / workers in-batch pairs
    # LoRA's usual 1e-4..5e-4; on MovieLens the gentler move kept more (item-to-item nDCG@10 0.0194 at 1e-4,
    # 0.0175 at 5e-4, frozen 0.0224: docs/BENCHMARKS.md). A LiT tower from scratch wants more (1e-3).
    lr: float = 1e-4
    # The sigmoid loss's temperature and bias start at the paper's from-scratch values (t = 10, b = -10),
    # far from what a pretrained space needs; at the model's lr a short fine-tune never moves them (they
    # stayed at 10.08 / -9.99 on MovieLens) and the positives' pull alone contracts the space. Their own lr:
    logit_lr: float = 0.05  # 0 = the model's lr
    # In-batch negatives are drawn as often as items are clicked: popular items are pushed away from
    # everything and the long tail drifts in (PinnerFormer: in-batch negatives alone lost 27% Recall@10).
    # Mixed negative sampling adds uniformly drawn catalogue items as negatives, per rank and step:
    random_negatives: int = 32  # MovieLens: item-to-item nDCG@10 0.0150 -> 0.0175; costs 2.6x the time
    weight_decay: float = 0.0
    max_length: int = 32  # text tokens while tuning: MovieLens title + genres fit; CPU cost grows with it
    image_weight: float = (
        0.5  # item = normalise(w * image + (1 - w) * text), as `vlmrec embed --image-weight`
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.max_length < 1:
            raise ValueError("epochs >= 1, batch_size >= 2 (in-batch negatives), lr > 0, max_length >= 1")
        if self.infonce_temperature <= 0 or self.logit_lr < 0 or self.random_negatives < 0:
            raise ValueError("infonce_temperature must be > 0, logit_lr and random_negatives >= 0")


@dataclass(frozen=True)
class AdapterConfig(_Config):
    """LoRA / QLoRA (peft)."""

    lora_rank: int = 8  # r: 8 is peft's and the LoRA paper's common choice for attention projections
    lora_alpha: int = 16  # scaling alpha / r = 2
    lora_dropout: float = 0.1
    target_modules: str = ""  # comma-separated module names; "" = DEFAULT_TARGETS[teacher]
    qlora: bool = False  # 4-bit NF4 base through bitsandbytes: CUDA only

    def targets(self, teacher: str) -> list[str]:
        return [t.strip() for t in (self.target_modules or DEFAULT_TARGETS[teacher]).split(",") if t.strip()]


# ------------------------------------------------------------------------------------------ models


class PairScorer(nn.Module):
    """Encodes both sides of a batch of pairs; holds the loss's learnable temperature and bias."""

    def __init__(self, cfg: TuneConfig, device: str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        # shape (1,), not (): DeepSpeed's initial broadcast views every parameter as bytes. On the encoder's
        # device from the start: a 4-bit (QLoRA) encoder is placed at load and never moved as a whole.
        self.log_t = nn.Parameter(torch.tensor([SIGLIP_INIT_LOG_T], device=device))
        self.bias = nn.Parameter(torch.tensor([SIGLIP_INIT_BIAS], device=device))

    def param_groups(self) -> list[dict]:
        """Optimizer groups: the encoder's trainable weights at the run's lr, temperature and bias at logit_lr."""
        scalars = [self.log_t, self.bias]
        rest = [p for p in self.parameters() if p.requires_grad and all(p is not s for s in scalars)]
        if not self.cfg.logit_lr:
            return [{"params": rest + scalars}]
        return [{"params": rest}, {"params": scalars, "lr": self.cfg.logit_lr}]

    def loss(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "sigmoid":
            return sigmoid_pair_loss(x, y, self.log_t, self.bias, labels)
        return infonce_pair_loss(x, y, self.cfg.infonce_temperature, labels)


class LoraPairs(PairScorer):
    """The teacher with LoRA adapters (its `model` wrapped by peft in place, the base frozen)."""

    def __init__(self, cfg: TuneConfig, teacher: Teacher, adapter: AdapterConfig) -> None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        super().__init__(cfg, teacher.config.device)
        if adapter.qlora:
            teacher.model = prepare_model_for_kbit_training(teacher.model, use_gradient_checkpointing=False)
        lora = LoraConfig(
            r=adapter.lora_rank,
            lora_alpha=adapter.lora_alpha,
            lora_dropout=adapter.lora_dropout,
            target_modules=adapter.targets(teacher.config.name),
        )
        teacher.model = get_peft_model(teacher.model, lora)
        self.encoder = teacher.model  # registered: DeepSpeed sees the adapters (and the frozen base)
        self.teacher = teacher

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x, y (B, D): co-engagement rows item(a), item(b); image-title rows image(a), text(a)."""
        kind = batch["kind"]
        xs, ys, rows = [], [], []
        co = np.flatnonzero(kind == CO)
        if len(co):
            a_text, a_image = [batch["a_text"][i] for i in co], [batch["a_image"][i] for i in co]
            b_text, b_image = [batch["b_text"][i] for i in co], [batch["b_image"][i] for i in co]
            xs.append(item_features(self.teacher, a_text, a_image))
            ys.append(item_features(self.teacher, b_text, b_image))
            rows.append(co)
        it = np.flatnonzero(kind == IMAGE_TITLE)
        if len(it):
            images = [batch["a_image"][i] for i in it]
            if any(im is None for im in images):
                raise ValueError("an image-title pair lost its image (unreadable file): re-run ingest")
            xs.append(self.teacher.image_features(self.teacher.pixel_values(images)))
            ys.append(self.teacher.text_features([batch["a_pair_text"][i] for i in it]))
            rows.append(it)
        inverse = torch.as_tensor(np.argsort(np.concatenate(rows)))  # back to the batch's row order
        x, y = torch.cat(xs)[inverse], torch.cat(ys)[inverse]
        if len(batch.get("extra", ())):  # random negatives, encoded like the batch's y side
            if len(co):
                e = item_features(self.teacher, batch["extra_text"], batch["extra_image"])
            else:
                e = self.teacher.text_features(batch["extra_pair_text"])
            y = torch.cat([y, e])
        return x, y


class LitPairs(PairScorer):
    """LiT: a new image tower against locked text vectors (computed once by the driver)."""

    def __init__(self, cfg: TuneConfig, tower: ImageTowerConfig) -> None:
        super().__init__(cfg)
        self.tower = ImageTower(tower)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["a_image"]
        if any(im is None for im in images):
            raise ValueError("an image-title pair lost its image (unreadable file): re-run ingest")
        y = torch.as_tensor(batch["a_text_vector"])
        if len(batch.get("extra", ())):  # random negatives: their locked text vectors
            y = torch.cat([y, torch.as_tensor(batch["extra_text_vector"])])
        return self.tower(self.tower.pixel_values(images)), y


def teacher_config(cfg: TuneConfig, qlora: bool = False, device: str = "cpu") -> TeacherConfig:
    name, path = resolve_teacher(cfg.teacher, cfg.teacher_path)
    return TeacherConfig(
        name=name,
        path=path,
        revision=cfg.teacher_revision,
        max_length=cfg.max_length,
        image_weight=cfg.image_weight,
        batch_size=cfg.batch_size,
        device=device,
        load_in_4bit=qlora,
    )


def build_model(config: dict, device: str = "cpu", qlora: bool | None = None) -> PairScorer:
    """The trainable module from a loop config (workers and the driver build the same one)."""
    cfg = TuneConfig.from_dict(config["tune"])
    torch.manual_seed(cfg.seed)  # the same initial adapters / tower on every rank
    if cfg.method == "lit":
        return LitPairs(cfg, ImageTowerConfig(**config["tower"])).to(device)
    adapter = AdapterConfig.from_dict(config["adapter"])
    use_4bit = adapter.qlora if qlora is None else qlora
    return LoraPairs(cfg, load_teacher(teacher_config(cfg, use_4bit, device)), adapter)


# ------------------------------------------------------------------------------------------- workers


class ItemLookup:
    """Pair rows -> the model's inputs: texts, images (loaded here), locked text vectors (lit)."""

    def __init__(self, config: dict) -> None:
        self.texts, self.pair_texts = config["item_texts"], config["pair_texts"]
        self.uris, self.text_vectors = config["image_uris"], config["text_vectors"]
        self.with_images = config["with_images"]
        self.negative_rows = config["negative_rows"]  # rows random negatives are drawn from

    def random_rows(self, k: int, rng: np.random.Generator) -> np.ndarray:
        return (
            self.negative_rows[rng.integers(0, len(self.negative_rows), k)] if k else self.negative_rows[:0]
        )

    def image(self, row: int):
        """The item's RGB image, or None (no image, unreadable, or a text-only teacher)."""
        from vlmrec.embed import _load_image

        return _load_image(self.uris[row]) if self.with_images else None

    def batch(self, a: np.ndarray, b: np.ndarray, kind: np.ndarray, extra: np.ndarray | None = None) -> dict:
        """The inputs of pairs (a, b, kind) and of `extra` item rows (random negatives)."""
        image = self.image
        extra = np.zeros(0, np.int64) if extra is None else extra
        out = {
            "kind": kind,
            "a": a,
            "b": b,
            "a_text": [self.texts[r] for r in a],
            "b_text": [self.texts[r] for r in b],
            "a_pair_text": [self.pair_texts[r] for r in a],
            "a_image": [image(r) for r in a],
            "b_image": [image(r) if k == CO else None for r, k in zip(b, kind, strict=True)],
        }
        if self.text_vectors is not None:
            out["a_text_vector"] = self.text_vectors[a]
        if len(extra):
            out["extra"] = extra
            out["extra_text"] = [self.texts[r] for r in extra]
            out["extra_pair_text"] = [self.pair_texts[r] for r in extra]
            out["extra_image"] = [image(r) for r in extra] if (kind == CO).any() else [None] * len(extra)
            if self.text_vectors is not None:
                out["extra_text_vector"] = self.text_vectors[extra]
        return out


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


# -------------------------------------------------------------------------------------------- driver


def _check(cfg: TuneConfig, pairs: PairConfig, adapter: AdapterConfig, eng: EngineConfig) -> TeacherConfig:
    """Refuse what cannot work before anything loads."""
    if adapter.qlora:
        if cfg.method != "lora":
            raise ValueError("--qlora: QLoRA is a LoRA method; --method lit trains a new tower in full")
        if not eng.use_gpu:
            raise ValueError("--qlora needs --use-gpu: bitsandbytes' 4-bit NF4 kernels run on CUDA only")
        require_cuda_for_4bit()
    tcfg = teacher_config(cfg)
    if cfg.method == "lit" and pairs.pairs != "image-title":
        raise ValueError(f"--pairs {pairs.pairs}: --method lit learns an image tower from image-title pairs")
    if cfg.method == "lora" and pairs.pairs != "co-engagement" and tcfg.name in ("minilm",):
        raise ValueError(f"--pairs {pairs.pairs}: teacher {tcfg.name!r} is text-only; use co-engagement")
    if cfg.method == "lora" and tcfg.name == "lit":
        raise ValueError("--teacher: a lit teacher is tuned with --method lit, not LoRA")
    return tcfg


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
    tcfg = _check(cfg, pairs_cfg, adapter, eng)
    ws = Workspace(cfg.workdir)
    for path in (ws.events, ws.items):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `vlmrec ingest --workdir {ws.root}`")
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


def export(
    ws: Workspace,
    cfg: TuneConfig,
    tcfg: TeacherConfig,
    model: PairScorer,
    base: Teacher,
    info: dict,
    probe_texts: list[str],
) -> Path:
    """Write adapter/, model/ (+ teacher.json) and run.json next to their final place, then swap them in."""
    final = ws.runs / cfg.name / "export"
    with staged_dir(final) as tmp:
        if isinstance(model, LoraPairs):
            tuned = _export_lora(tmp, model, tcfg, base.model_id)
            with torch.inference_mode():  # the merged export must embed like the trained adapter
                merged = load_teacher(dataclasses.replace(tcfg, path=str(tmp / "model"), load_in_4bit=False))
                diff = (
                    (merged.text_features(probe_texts) - model.teacher.text_features(probe_texts)).abs().max()
                )
            info["merge_max_abs_diff"] = float(diff)
            if diff > 1e-4:
                raise RuntimeError(f"the merged model embeds {float(diff):.2e} away from the adapter's model")
        else:
            tuned = _export_lit(tmp, model, tcfg, base.model_id)
        info["teacher_id"] = tuned["teacher_id"]
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return final


def _export_lora(folder: Path, model: LoraPairs, tcfg: TeacherConfig, base_id: str) -> dict:
    """adapter/ from the trained model; model/ = a FRESH base with that adapter merged (the base on disk and
    the adapter's own base stay untouched)."""
    from peft import PeftModel

    model.encoder.save_pretrained(folder / "adapter")  # adapter_model.safetensors + adapter_config.json
    fresh = load_teacher(dataclasses.replace(tcfg, load_in_4bit=False))
    merged = PeftModel.from_pretrained(fresh.model, folder / "adapter").merge_and_unload()
    merged.save_pretrained(folder / "model")
    _save_preprocessing(fresh, tcfg, folder / "model")
    digest = _file_digest(folder / "adapter" / "adapter_model.safetensors")
    tuned = {
        "teacher": tcfg.name,
        "method": "lora",
        "base_id": base_id,
        "adapter_digest": digest,
        "teacher_id": f"{base_id}+lora@{digest}",
        "weights_digest": _weights_digest(folder / "model"),
    }
    (folder / "model" / TUNED_FILE).write_text(json.dumps(tuned, indent=2))
    return tuned


def _export_lit(folder: Path, model: LitPairs, tcfg: TeacherConfig, text_id: str) -> dict:
    model.tower.save_pretrained(folder / "model")
    digest = _weights_digest(folder / "model")
    skip = ("batch_size", "device", "load_in_4bit")  # how to run it, not which weights
    text_teacher = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in skip}
    tuned = {
        "teacher": "lit",
        "method": "lit",
        "base_id": text_id,
        "text_teacher": text_teacher,
        "text_teacher_id": text_id,
        "adapter_digest": digest,
        "teacher_id": f"lit:{text_id}+vit@{digest}",
        "weights_digest": digest,
    }
    (folder / "model" / TUNED_FILE).write_text(json.dumps(tuned, indent=2))
    return tuned


def _save_preprocessing(teacher: Teacher, tcfg: TeacherConfig, folder: Path) -> None:
    """What the merged folder needs besides weights to load as the same teacher: tokenizer, image processor,
    and for remote-code models the code and processor files of the base folder."""
    if hasattr(teacher, "tokenizer"):
        teacher.tokenizer.save_pretrained(folder)
    if hasattr(teacher, "image_processor"):
        teacher.image_processor.save_pretrained(folder)
    if tcfg.name == "jina-clip-v2":
        src = Path(tcfg.path) if tcfg.path and Path(tcfg.path).is_dir() else None
        if src is None:
            from huggingface_hub import snapshot_download

            src = Path(
                snapshot_download(
                    tcfg.path, revision=tcfg.revision, allow_patterns=["*.py", "*.json", "*.txt", "*.model"]
                )
            )
        for f in src.iterdir():
            if (
                f.is_file()
                and f.suffix in (".py", ".json", ".txt", ".model")
                and not (folder / f.name).exists()
            ):
                shutil.copy2(f, folder / f.name)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    TuneConfig.add_arguments(parser)
    PairConfig.add_arguments(parser)
    AdapterConfig.add_arguments(parser)
    EngineConfig.add_arguments(parser)
    for f in dataclasses.fields(ImageTowerConfig):  # --lit-* flags: the image tower of --method lit
        if f.name != "out_dim":  # set from the text teacher
            parser.add_argument(
                "--lit-" + f.name.replace("_", "-"),
                dest="lit_" + f.name,
                type=type(f.default),
                default=f.default,
            )


def run(args: argparse.Namespace) -> tuple[Path, dict]:
    tower = ImageTowerConfig(
        **{
            f.name: getattr(args, "lit_" + f.name)
            for f in dataclasses.fields(ImageTowerConfig)
            if f.name != "out_dim"
        }
    )
    export_dir, info = tune(
        TuneConfig.from_args(args),
        PairConfig.from_args(args),
        AdapterConfig.from_args(args),
        tower,
        EngineConfig.from_args(args),
    )
    best, cost = info["best"], info["cost"]
    print(
        f"tune: {info['name']}: best epoch {best['epoch']} val loss {best['val_loss']:.4f} "
        f"(acc {best['val_acc']:.3f}); {cost['pairs_per_s']:.1f} pairs/s, trainable "
        f"{cost['trainable_params']:,} of {cost['total_params']:,} params; teacher {info['teacher_id']}; "
        f"exported to {export_dir}"
    )
    return export_dir, info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.tune_teacher", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
