"""`vlmrec index build|upsert`: build a verified index version and switch to it, or add new items.

    vlmrec index build  --workdir .vlmrec/sample                       # Edge, <workdir>/index
    vlmrec index build  --workdir W --vectors runs/x/export/item_vectors.parquet --backend server
    vlmrec index upsert --workdir W --vectors new_vectors.parquet --items new_items.parquet
    python -m index.cli build --help

The server backend reads QDRANT_URL / QDRANT_API_KEY from the environment (here, once) unless --url is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from index.config import BACKENDS, IndexConfig
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace

EXPORT_NAME = (
    "item_vectors.parquet"  # what training exports under runs/<name>/; the newest one is the default
)
_NOT_FLAGS = {"api_key"}  # secrets come from the environment only


def latest_export(ws: Workspace) -> Path:
    found = (
        sorted(ws.runs.glob(f"*/**/{EXPORT_NAME}"), key=lambda p: p.stat().st_mtime)
        if ws.runs.is_dir()
        else []
    )
    if not found:
        raise FileNotFoundError(f"no training export ({EXPORT_NAME}) under {ws.runs}: pass --vectors")
    return found[-1]


def _config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per IndexConfig field, defaults from the dataclass."""
    for f in fields(IndexConfig):
        if f.name in _NOT_FLAGS or f.default is MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "backend":
            p.add_argument(flag, choices=BACKENDS, default=f.default)
        else:
            kind = str if f.default is None else type(f.default)
            shown = "env QDRANT_URL" if f.name == "url" else f.default
            p.add_argument(flag, type=kind, default=f.default, help=f"default: {shown}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    commands = {
        "build": "build a new version from the item vector table, verify it, switch to it",
        "upsert": "add or replace items in the current version (cold start), no rebuild",
    }
    for name, text in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
        p.add_argument(
            "--vectors",
            type=Path,
            default=None,
            required=name == "upsert",
            help=f"item vector table (build default: the newest runs/*/**/{EXPORT_NAME})",
        )
        p.add_argument(
            "--items", type=Path, default=None, help="catalogue (default: <workdir>/data/items.parquet)"
        )
        p.add_argument(
            "--index-dir", type=Path, default=None, help="Edge index folder (default: <workdir>/index)"
        )
        _config_flags(p)


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    values = {f.name: getattr(args, f.name) for f in fields(IndexConfig) if f.name not in _NOT_FLAGS}
    values["url"] = values["url"] or os.environ.get("QDRANT_URL")
    return IndexConfig(**values, api_key=os.environ.get("QDRANT_API_KEY"))


def run(args: argparse.Namespace) -> None:
    from index.build import build_index, upsert_items, workspace_teacher_id

    config = config_from_args(args)
    ws = Workspace(args.workdir)
    index_dir = args.index_dir or ws.index
    items = args.items or ws.items
    if args.index_command == "build":
        vectors = args.vectors or latest_export(ws)
        source = f"{ws.embeddings} (what new items are embedded with)"
        v = build_index(
            vectors, items, index_dir, config, teacher_id=workspace_teacher_id(ws), teacher_source=source
        )
        print(
            f"index build: {v.name} ({v.backend}) {v.count} items, dim {v.dim}, teacher {v.teacher_id}, "
            f"{v.seconds:.1f} s -> {v.location}\n  verify: {v.verify}\n  dropped: {list(v.dropped) or 'none'}"
        )
    else:
        n = upsert_items(args.vectors, items, index_dir, config)
        where = index_dir if config.backend == "edge" else f"alias {config.alias}"
        print(f"index upsert: {n} items into the current version ({where})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m index.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"index {args.index_command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
