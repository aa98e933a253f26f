"""The trainable modules of teacher tuning: a PairScorer encodes both sides of a batch of pairs and holds the
loss's temperature and bias; LoraPairs (peft adapters on the teacher) and LitPairs (a new image tower into
the locked text teacher's space). Workers and the driver build the same one from the loop config."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from teacher.encoders import (
    Teacher,
    item_features,
    load_teacher,
)
from teacher.image_tower import ImageTower, ImageTowerConfig
from teacher.pairs import CO, IMAGE_TITLE
from teacher.tune.config import AdapterConfig, TuneConfig, teacher_config
from teacher.tune.losses import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_T, infonce_pair_loss, sigmoid_pair_loss


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


def build_model(config: dict, device: str = "cpu", qlora: bool | None = None) -> PairScorer:
    """The trainable module from a loop config (workers and the driver build the same one)."""
    cfg = TuneConfig.from_dict(config["tune"])
    torch.manual_seed(cfg.seed)  # the same initial adapters / tower on every rank
    if cfg.method == "lit":
        return LitPairs(cfg, ImageTowerConfig(**config["tower"])).to(device)
    adapter = AdapterConfig.from_dict(config["adapter"])
    use_4bit = adapter.qlora if qlora is None else qlora
    return LoraPairs(cfg, load_teacher(teacher_config(cfg, use_4bit, device)), adapter)


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
        from teacher.embed import _load_image

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
