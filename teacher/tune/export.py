"""The tuned teacher's export, <workdir>/runs/<name>/export/: the peft adapter and the merged teacher (lora)
or the image tower (lit), its preprocessing, and teacher.json with the tuned teacher's id."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch

from teacher.encoders import Teacher, TeacherConfig, load_teacher
from teacher.tune.config import TuneConfig
from teacher.tune.model import LitPairs, LoraPairs, PairScorer
from teacher.weights import TUNED_FILE, weights_digest
from vlmrec.workspace import Workspace, staged_dir


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
        "weights_digest": weights_digest(folder / "model"),
    }
    (folder / "model" / TUNED_FILE).write_text(json.dumps(tuned, indent=2))
    return tuned


def _export_lit(folder: Path, model: LitPairs, tcfg: TeacherConfig, text_id: str) -> dict:
    model.tower.save_pretrained(folder / "model")
    digest = weights_digest(folder / "model")
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
