"""Which weights a teacher loads and what they are called: a tuned folder's teacher.json, a QLoRA base's
4-bit arguments, the pins remote code must carry, and `model_id`, the name stored beside every vector.

    model_id(config, "/models/siglip")  # "siglip:/models/siglip@<sha256 of the weight files, 12 hex>"
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from teacher.encoders import TeacherConfig

TUNED_FILE = "teacher.json"  # in a tuned teacher's folder (vlmrec tune): base id, adapter digest, teacher id


def tuned_info(folder: Path) -> dict | None:
    """A tuned teacher folder's teacher.json, or None for an untuned folder."""
    file = Path(folder) / TUNED_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def require_cuda_for_4bit() -> None:
    """QLoRA's 4-bit NF4 base needs bitsandbytes' CUDA kernels: a clear error here, before anything loads."""
    if not torch.cuda.is_available():
        raise ValueError(
            "QLoRA (4-bit NF4 base through bitsandbytes) needs a CUDA device, and torch sees none here; "
            "tune with plain LoRA (drop --qlora), or run on a GPU worker (--use-gpu)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError("QLoRA needs bitsandbytes: pip install 'vlmrec[qlora]'") from err


def load_kwargs(config: TeacherConfig) -> dict:
    """from_pretrained arguments: a 4-bit NF4 base (double quantisation, bf16 compute) for QLoRA."""
    if not config.load_in_4bit:
        return {}
    require_cuda_for_4bit()
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": quant, "device_map": {"": config.device}}


def on_device(model: Any, config: TeacherConfig) -> Any:
    """Eval mode on config.device (a 4-bit model is placed by from_pretrained's device_map already)."""
    return (model if config.load_in_4bit else model.to(config.device)).eval()


def check_remote_code_pins(path: str, revision: str | None, code_revision: str | None) -> None:
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


def model_id(config: TeacherConfig, path: str, revision: str | None = None, label: str | None = None) -> str:
    """Names the weights: "<name>:<label or path>@" then the revision for a hub id, or the first 12 hex of
    the sha256 of the weight files for a local folder."""
    revision, label = revision or config.revision, label or path
    if Path(path).is_dir():
        digest = weights_digest(Path(path))
        tuned = tuned_info(Path(path))
        if tuned is None:
            return f"{config.name}:{label}@{digest}"
        # A tuned teacher is named by its base and adapter (teacher.json), checked against the weights here.
        if tuned["teacher"] != config.name:
            raise ValueError(f"{path}: a tuned {tuned['teacher']!r} teacher, loaded as {config.name!r}")
        if tuned["weights_digest"] != digest:
            raise ValueError(
                f"{path}: weight files (digest {digest}) are not the ones {TUNED_FILE} names "
                f"({tuned['weights_digest']}); re-export the tuned teacher"
            )
        return str(tuned["teacher_id"])
    if revision is None:
        raise ValueError(
            f"hub id {path!r} needs a pinned revision (a commit hash) so model_id names its weights"
        )
    return f"{config.name}:{label}@{revision}"


def weights_digest(folder: Path) -> str:
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
