"""`vlmrec tune` (also `python -m teacher.tune.cli`): adapt the teacher to the catalogue and the click log
before embedding with it, on the shared engine (Ray Train + DeepSpeed, engine/).

    vlmrec tune --workdir W --name minilm-co --pairs co-engagement              # LoRA on minilm, sigmoid loss
    vlmrec tune --workdir W --name minilm-nce --pairs co-engagement --loss infonce      # the loss ablation
    vlmrec tune --workdir W --name siglip-it --teacher siglip --teacher-path /models/siglip --pairs both
    vlmrec tune --workdir W --name lit --method lit --pairs image-title       # a new image tower, minilm locked
    vlmrec embed --workdir W --teacher W/runs/minilm-co/export                # re-embed with the tuned teacher
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m teacher.tune.cli ...

Pairs (teacher/pairs.py) come only from events before the temporal cut the student is evaluated at, and
from the catalogue as it was then: co-engagement (two items one user clicked close together: both sides
are item vectors, image and text fused as `vlmrec embed` fuses them) and image-title (an item's image
against its text). Loss: SigLIP's pairwise sigmoid with a learnable temperature and bias (t' = log 10,
b = -10 at start), or symmetric InfoNCE from pytorch-metric-learning on the same pairs (the ablation).

Methods:
  lora  LoRA adapters (peft; rank, alpha, dropout, target modules from flags) on the teacher; --qlora loads
        the base in 4-bit NF4 through bitsandbytes (CUDA only). The base weights are never modified.
  lit   the teacher's text tower locked (its vectors computed once here) and a small ViT image tower
        (teacher/image_tower.py, random init) trained into its space, for catalogues without VLM weights.

A re-run of the same --name resumes from its latest checkpoint. Export, <workdir>/runs/<name>/export/:
  adapter/   (lora) the peft adapter (safetensors + adapter_config.json)
  model/     the merged teacher (safetensors, tokenizer, image processor) or (lit) the image tower, and
             teacher.json: base id, adapter digest, teacher id = "<base id>+lora@<adapter digest>"
  run.json   configs, pair counts, per-epoch history, cost (time, pairs/s, peak RSS, trainable/total params)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from engine import EngineConfig
from teacher.image_tower import ImageTowerConfig
from teacher.pairs import PairConfig
from teacher.tune.config import AdapterConfig, TuneConfig
from teacher.tune.loop import tune


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
    parser = argparse.ArgumentParser(prog="python -m teacher.tune.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
