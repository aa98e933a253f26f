"""The `vlmrec` command: one subcommand per stage, each a thin shell over a `python -m` module.

vlmrec [--log-level INFO] [--log-format text|json] [--version] STAGE ...
vlmrec ingest | embed | features | train | tune | evaluate | tune-mix | index | serve | replay | report | refresh | ui | demo

A stage's result goes to stdout; logs (levels, timestamps) to stderr, as JSON lines with --log-format json
(or VLMREC_LOG_FORMAT=json, what the Kubernetes jobs set) for a cluster's log collector.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("vlmrec.ingest", "read events + catalogue, write the Feast sources and click sequences"),
    "embed": ("teacher.embed", "embed the catalogue with the teacher (Ray Data)"),
    "features": ("vlmrec.features", "feast apply + materialize into the online store"),
    "train": ("training.train", "train the student (Ray Train + DeepSpeed) and export it"),
    "tune": ("teacher.tune.cli", "fine-tune the teacher on catalogue and click pairs (LoRA, LiT)"),
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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("vlmrec")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, when one is logged)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


OUR_LOGGERS = ("vlmrec", "engine", "teacher", "training", "serving", "index", "ui")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Logs to stderr as text or JSON lines: vlmrec's own at `level`, the libraries' (Feast, Ray, httpx...)
    from WARNING up, or everything with DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level == "DEBUG" else "WARNING")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the named stage's module is imported (so `vlmrec --help` stays fast)."""
    parser = argparse.ArgumentParser(prog="vlmrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vlmrec {version()}")
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="INFO", help="logs at this level and above"
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("VLMREC_LOG_FORMAT", "text"),
        help="stderr logs as text or JSON lines (default: env VLMREC_LOG_FORMAT, else text)",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == stage:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if a in STAGES), None)
    args = build_parser(stage).parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        importlib.import_module(args._module).run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: a clear message, never a traceback
        print(f"vlmrec {args.stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
