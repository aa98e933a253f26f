"""A small image tower for LiT ("locked-image text tuning" turned around: the TEXT tower is locked): a ViT
built from a transformers `ViTConfig` with random weights, its [CLS] state projected into a text teacher's
space and L2-normalised. No timm or torchvision (they break beside the CPU torch): images are prepared with
PIL + numpy here.

    tower = ImageTower(ImageTowerConfig(out_dim=384))
    vectors = tower(tower.pixel_values(images))          # (B, 384) unit rows
    tower.save_pretrained(folder); ImageTower.from_pretrained(folder)

Trained by `vlmrec tune --method lit`; used at embedding time by the `lit` teacher (teacher/encoders.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import at_least

if TYPE_CHECKING:
    from PIL import Image

CONFIG_FILE = "image_tower.json"
WEIGHTS_FILE = "image_tower.safetensors"


@dataclass(frozen=True)
class ImageTowerConfig:
    """A ViT small enough to train on 2 CPU cores in minutes (about 1.9 M parameters at the defaults)."""

    out_dim: int = 384  # the text teacher's width (minilm: 384)
    image_height: int = 96  # MovieLens posters are 96 x 144 at most: half their height, keeping 2:3
    image_width: int = 64
    patch_size: int = 16  # 6 x 4 = 24 patches at the defaults
    hidden_size: int = 192  # ViT-Tiny's width
    num_layers: int = 4  # ViT-Tiny has 12; 4 keeps a CPU epoch over ~8k posters to about a minute
    num_heads: int = 3  # ViT-Tiny's
    dropout: float = 0.1

    def __post_init__(self) -> None:
        at_least(self, 1, "out_dim", "image_height", "image_width", "patch_size", "hidden_size", "num_layers",
                 "num_heads")  # fmt: skip
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_height % self.patch_size or self.image_width % self.patch_size:
            raise ValueError(
                f"image size {self.image_height}x{self.image_width} is not a multiple of patch {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


class ImageTower(nn.Module):
    """ViT -> [CLS] -> linear to out_dim -> L2 norm."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        from transformers import ViTConfig, ViTModel

        super().__init__()
        self.cfg = cfg
        vit = ViTConfig(
            image_size=(cfg.image_height, cfg.image_width),
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=4 * cfg.hidden_size,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        )
        self.vit = ViTModel(vit, add_pooling_layer=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.out_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_dim) unit rows."""
        cls = self.vit(pixel_values=pixels).last_hidden_state[:, 0]  # (B, hidden), after the final LayerNorm
        return F.normalize(self.proj(cls), dim=-1)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images resized to (image_height, image_width) (bilinear, aspect not kept: posters share one),
        scaled to [-1, 1]. -> (B, 3, H, W) float32"""
        from PIL import Image as PILImage

        size = (self.cfg.image_width, self.cfg.image_height)
        out = (
            np.stack(
                [
                    np.asarray(im.convert("RGB").resize(size, PILImage.Resampling.BILINEAR), np.float32)
                    for im in images
                ]
            )
            if len(images)
            else np.zeros((0, self.cfg.image_height, self.cfg.image_width, 3), np.float32)
        )
        return torch.from_numpy((out / 127.5 - 1.0).transpose(0, 3, 1, 2).copy())

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageTower:
        from safetensors.torch import load_file

        folder = Path(folder)
        tower = cls(ImageTowerConfig(**json.loads((folder / CONFIG_FILE).read_text())))
        tower.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return tower
