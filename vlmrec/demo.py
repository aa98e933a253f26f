"""`vlmrec demo` (what `make demo` runs): every stage end to end on one dataset, printing what each made.

    vlmrec demo                                                  # the built-in sample data
    vlmrec demo --format movielens --data ../shared/data/movielens-small --workdir .vlmrec/movielens

Each stage is the same module function its own subcommand runs; the demo only chains them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from vlmrec import embed, features, ingest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ingest.add_arguments(parser)
    parser.set_defaults(format="sample")
    parser.add_argument("--teacher", default="minilm", help="minilm | siglip | jina-clip-v2")
    parser.add_argument("--teacher-path", default=None)
    parser.add_argument("--online-store", choices=["sqlite", "redis"], default="sqlite")


def _stage(name: str, fn: Callable[[], object]) -> object:
    print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
    t0 = time.perf_counter()
    out = fn()
    print(f"--- {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    embed_args = argparse.Namespace(
        workdir=workdir,
        teacher=args.teacher,
        teacher_path=args.teacher_path,
        teacher_revision=None,
        dim=None,
        image_weight=0.5,
        batch_size=embed.EmbedConfig.batch_size,
        num_actors=embed.EmbedConfig.num_actors,
    )
    feature_args = argparse.Namespace(workdir=workdir, online_store=args.online_store)
    report = {
        "ingest": _stage("ingest", lambda: ingest.run(args)).to_dict(),
        "embed": _stage("embed", lambda: embed.run(embed_args)),
        "features": _stage("features", lambda: features.run(feature_args)),
    }
    print(f"\ndemo: workspace {workdir.absolute()}")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmrec.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
