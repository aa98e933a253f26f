"""`vlmrec index build|upsert|snapshot`: build a verified index version and switch to it, add new items, or
snapshot the served collections of a Qdrant server.

    vlmrec index build  --workdir .vlmrec/sample                       # Edge, <workdir>/index
    vlmrec index build  --workdir W --run sasrec     # runs/sasrec/export -> indexes/sasrec (dot: id space)
    vlmrec index build  --workdir W --teacher        # data/item_embeddings.parquet -> indexes/teacher
    vlmrec index build  --workdir W --vectors runs/x/export/item_vectors.parquet --backend server
    vlmrec index upsert --workdir W --vectors new_vectors.parquet --items new_items.parquet
    vlmrec index snapshot --backend server --keep 3               # every alias's collection (index/snapshot.py)
    python -m index.cli build --help

The server backend reads QDRANT_URL / QDRANT_API_KEY from the environment (here, once) unless --url is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from index.config import BACKENDS, DISTANCES, IndexConfig, named_alias
from vlmrec.workspace import DEFAULT_WORKDIR, TEACHER_INDEX, Workspace

EXPORT_NAME = (
    "item_vectors.parquet"  # what training exports under runs/<name>/; the newest one is the default
)
# secrets come from the environment only; whether a copy is scanned is the searcher's setting (the Producer's
# scan_max_points, `vlmrec serve --scan-max-points`), not the version's
_NOT_FLAGS = {"api_key", "scan_max_points"}


def latest_export(ws: Workspace) -> Path:
    found = (
        # runs/<name>/export/ only: not a `.export-*` folder still being built next to it (staged_dir)
        sorted(ws.runs.glob(f"*/export/{EXPORT_NAME}"), key=lambda p: p.stat().st_mtime)
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
        if f.name == "distance":  # None: decided from the vectors (see vector_distance)
            p.add_argument(
                flag, choices=DISTANCES, default=None, help="default: dot for an id-space export, else cosine"
            )
        elif isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "backend":
            p.add_argument(flag, choices=BACKENDS, default=f.default)
        elif f.name.startswith("hnsw_"):  # None: from the collection's size
            p.add_argument(
                flag, type=int, default=None, help="default: from the collection's size (hnsw_for)"
            )
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
    snap = sub.add_parser(
        "snapshot",
        help="snapshot each aliased collection of a Qdrant server, keep the newest --keep",
        description="snapshot each aliased collection of a Qdrant server, keep the newest --keep",
    )
    snap.add_argument("--backend", choices=["server"], default="server")
    snap.add_argument("--url", default=None, help="default: env QDRANT_URL")
    snap.add_argument("--keep", type=int, default=3, help="snapshots kept per collection")
    for name, text in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
        which = p.add_mutually_exclusive_group()
        which.add_argument(
            "--run",
            default=None,
            help="a run's own index: vectors runs/RUN/export/item_vectors.parquet, folder indexes/RUN "
            "(server: alias <alias>_RUN); the student producer reads <workdir>/index (no --run)",
        )
        which.add_argument(
            "--teacher",
            action="store_true",
            help=f"the raw teacher vectors (data/item_embeddings.parquet) into indexes/{TEACHER_INDEX} "
            f"(server: alias <alias>_{TEACHER_INDEX}): what the `similar` producer searches",
        )
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
            "--index-dir",
            type=Path,
            default=None,
            help="Edge index folder (default: <workdir>/index, or indexes/<name> with --run / --teacher)",
        )
        _config_flags(p)


def index_name(args: argparse.Namespace) -> str | None:
    """The named index --run / --teacher pick (None: the default <workdir>/index)."""
    return TEACHER_INDEX if getattr(args, "teacher", False) else getattr(args, "run", None)


def vector_distance(vectors: Path) -> str:
    """dot for a training export of the id space (its run.json says so), else cosine."""
    run_json = Path(vectors).parent / "run.json"
    if run_json.exists():
        space = json.loads(run_json.read_text()).get("configs", {}).get("model", {}).get("item_space")
        if space == "id":
            return "dot"
    return "cosine"


def default_vectors(args: argparse.Namespace, ws: Workspace) -> Path:
    if args.vectors:
        return args.vectors
    if args.teacher:
        return ws.need(ws.embeddings, "embed")
    if args.run:
        return ws.export(args.run) / EXPORT_NAME
    return latest_export(ws)


def config_from_args(args: argparse.Namespace, vectors: Path | None = None) -> IndexConfig:
    values = {f.name: getattr(args, f.name) for f in fields(IndexConfig) if f.name not in _NOT_FLAGS}
    values["url"] = values["url"] or os.environ.get("QDRANT_URL")
    values["distance"] = values["distance"] or (vector_distance(vectors) if vectors else "cosine")
    name = index_name(args)
    if name and values["alias"] == IndexConfig.alias:
        values["alias"] = named_alias(name)
    return IndexConfig(**values, api_key=os.environ.get("QDRANT_API_KEY"))


def run(args: argparse.Namespace) -> None:
    from index.build import build_index, upsert_items, workspace_teacher_id

    if args.index_command == "snapshot":
        from index.snapshot import snapshot_aliases
        from index.store import make_client

        url = args.url or os.environ.get("QDRANT_URL")
        if not url:
            raise ValueError("index snapshot needs --url or QDRANT_URL (a Qdrant server)")
        config = IndexConfig(backend="server", url=url, api_key=os.environ.get("QDRANT_API_KEY"))
        for r in snapshot_aliases(make_client(config), args.keep):
            print(
                f"index snapshot: {r.alias} -> {r.collection}: {r.created}; deleted {list(r.deleted) or 'none'}"
            )
        return
    config = config_from_args(args)  # the settings are refused before any file is read
    ws = Workspace(args.workdir)
    name = index_name(args)
    index_dir = args.index_dir or (ws.named_index(name) if name else ws.index)
    items = args.items or ws.items
    for flag, path in (("--vectors", args.vectors), ("--items", args.items)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no such file {path}")
    ws.need(Path(items), "ingest")
    if args.index_command == "build":
        vectors = default_vectors(args, ws)
        config = config_from_args(args, vectors)
        source = f"{ws.embeddings} (what new items are embedded with)"
        v = build_index(
            vectors, items, index_dir, config, teacher_id=workspace_teacher_id(ws), teacher_source=source
        )
        print(
            f"index build: {v.name} ({v.backend}, {config.distance}) {v.count} items, dim {v.dim}, "
            f"teacher {v.teacher_id}, "
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
