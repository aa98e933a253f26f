"""What teacher tuning learns and how (frozen configs saved in its run.json), and the checks that refuse
a combination that cannot work before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine import EngineConfig
from engine.config import _Config, at_least
from teacher.encoders import TeacherConfig, resolve_teacher
from teacher.pairs import PairConfig
from teacher.weights import require_cuda_for_4bit
from vlmrec.workspace import check_name

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
    # LoRA's usual 1e-4..5e-4; on MovieLens the gentler move kept more (docs/BENCHMARKS.md, "Does tuning
    # the teacher help?"). A LiT tower from scratch wants more (1e-3).
    lr: float = 1e-4
    # The sigmoid loss's temperature and bias start at the paper's from-scratch values (t = 10, b = -10),
    # far from what a pretrained space needs; at the model's lr a short fine-tune barely moves them
    # (docs/BENCHMARKS.md) and the positives' pull alone contracts the space. Their own lr:
    logit_lr: float = 0.05  # 0 = the model's lr
    # In-batch negatives are drawn as often as items are clicked: popular items are pushed away from
    # everything and the long tail drifts in (PinnerFormer's finding). Mixed negative sampling adds uniformly
    # drawn catalogue items as negatives, per rank and step (its gain and cost: docs/BENCHMARKS.md):
    random_negatives: int = 32
    weight_decay: float = 0.0
    max_length: int = 32  # text tokens while tuning: MovieLens title + genres fit; CPU cost grows with it
    image_weight: float = (
        0.5  # item = normalise(w * image + (1 - w) * text), as `vlmrec embed --image-weight`
    )
    seed: int = 0

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        at_least(self, 1, "epochs", "max_length")
        at_least(self, 2, "batch_size")  # in-batch negatives
        at_least(self, 0, "lr", "infonce_temperature", strictly=True)
        at_least(self, 0, "logit_lr", "random_negatives")


@dataclass(frozen=True)
class AdapterConfig(_Config):
    """LoRA / QLoRA (peft)."""

    lora_rank: int = 8  # r: 8 is peft's and the LoRA paper's common choice for attention projections
    lora_alpha: int = 16  # scaling alpha / r = 2
    lora_dropout: float = 0.1
    target_modules: str = ""  # comma-separated module names; "" = DEFAULT_TARGETS[teacher]
    qlora: bool = False  # 4-bit NF4 base through bitsandbytes: CUDA only

    def __post_init__(self) -> None:
        at_least(self, 1, "lora_rank", "lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def targets(self, teacher: str) -> list[str]:
        return [t.strip() for t in (self.target_modules or DEFAULT_TARGETS[teacher]).split(",") if t.strip()]


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


def check_configs(
    cfg: TuneConfig, pairs: PairConfig, adapter: AdapterConfig, eng: EngineConfig
) -> TeacherConfig:
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
