"""The `vlmrec` command: one subcommand per stage, each a thin shell over a `python -m` module.

vlmrec ingest | embed | features | train | tune | evaluate | tune-mix | index | serve | replay | report | refresh | ui | demo
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("vlmrec.ingest", "read events + catalogue, write the Feast sources and click sequences"),
    "embed": ("vlmrec.embed", "embed the catalogue with the teacher (Ray Data)"),
    "features": ("vlmrec.features", "feast apply + materialize into the online store"),
    "train": ("training.train", "train the student (Ray Train + DeepSpeed) and export it"),
    "tune": ("training.tune_teacher", "fine-tune the teacher on catalogue and click pairs (LoRA, LiT)"),
    "evaluate": ("training.evaluate", "evaluate models: full ranking and sampled protocols"),
    "tune-mix": ("serving.tune_mix", "choose the Mixer's default weights on validation (writes mix.json)"),
    "replay": (
        "serving.replay",
        "stream held-out events through a live Producer (candidates, then the event)",
    ),
    "refresh": (
        "vlmrec.refresh",
        "the daily loop: logged events in, retrain, gate on the newest window, new index, hot swap",
    ),
    "report": ("serving.report", "per-arm figures from the exposure and event logs (JSON, markdown, plot)"),
    "index": ("index.cli", "build a Qdrant index version from item vectors, or upsert new items"),
    "serve": ("serving.cli", "serve the Producer (Ray Serve): POST /v1/candidates"),
    "ui": ("ui.cli", "the demo page (Streamlit): every producer's candidates side by side, clicks"),
    "demo": ("vlmrec.demo", "run every stage end to end on the sample (or your) data"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the named stage's module is imported (so `vlmrec --help` stays fast)."""
    parser = argparse.ArgumentParser(prog="vlmrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == stage:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv[0] if argv and argv[0] in STAGES else None
    args = build_parser(stage).parse_args(argv)
    try:
        importlib.import_module(args._module).run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: a clear message, never a traceback
        print(f"vlmrec {args.stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
