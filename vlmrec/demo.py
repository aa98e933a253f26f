"""`vlmrec demo` (what `make demo` runs): every stage end to end on one dataset, printing what each made.

    vlmrec demo                                                  # the built-in sample data
    vlmrec demo --format movielens --data ../shared/data/movielens-small --workdir .vlmrec/movielens

ingest -> embed -> features -> train the student and a short behavioural SASRec (Ray Train + DeepSpeed)
-> evaluate -> the Mixer's weights on validation (mix.json) -> index (Qdrant Edge: the student's, the SASRec's own, the raw teacher vectors') -> start the
Producer (Ray Serve on 127.0.0.1) -> push one click -> query three users over HTTP -> print their recent
clicks and candidates with titles, scores and latency, each producer's top 5 and the Mixer's blend -> shut
down, or with --ui (`make demo UI=1`) start the demo page too and keep both until Ctrl-C. Each stage is the
same module function its own subcommand runs; the demo only chains them.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from teacher import embed
from vlmrec import features, ingest
from vlmrec.workspace import Workspace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ingest.add_arguments(parser)
    parser.set_defaults(format="sample")
    parser.add_argument("--teacher", default="minilm", help="minilm | siglip | jina-clip-v2")
    parser.add_argument("--teacher-path", default=None)
    parser.add_argument("--online-store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument(
        "--epochs", type=int, default=15, help="student training epochs (early stopping may end sooner)"
    )
    parser.add_argument(
        "--sasrec-epochs",
        type=int,
        default=10,
        help="epochs of the behavioural SASRec (id space, run `sasrec`): short, it is the baseline producer",
    )
    parser.add_argument("--port", type=int, default=8000, help="the Producer's port on 127.0.0.1")
    parser.add_argument("--users", type=int, default=3, help="how many users to query at the end")
    parser.add_argument(
        "--ui", action="store_true", help="start the demo page too; keep it and the Producer until Ctrl-C"
    )
    parser.add_argument("--ui-port", type=int, default=8501, help="the demo page's port on 127.0.0.1")
    parser.add_argument(
        "--images-dir", default=None, help="the page's images as <item_id>.png|jpg (default: image_uri)"
    )


def _stage(name: str, fn: Callable[[], object]) -> object:
    print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
    t0 = time.perf_counter()
    out = fn()
    print(f"--- {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def _train(workdir: Path, name: str, epochs: int, max_len: int, *extra: str):
    from training import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = ["--workdir", str(workdir), "--name", name, "--epochs", str(epochs), *extra]
    args = parser.parse_args(argv)
    args.max_len = min(args.max_len, max_len)
    return train.run(args)


def _evaluate(workdir: Path):
    from training import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    argv = ["--workdir", str(workdir), "--runs", "student", "sasrec", "--name", "demo"]
    return evaluate.run(parser.parse_args(argv))


def _tune_mix(workdir: Path):
    """The Mixer's default weights on validation (<workdir>/mix.json, read by the Producer)."""
    from serving import tune_mix

    parser = argparse.ArgumentParser()
    tune_mix.add_arguments(parser)
    return tune_mix.run(parser.parse_args(["--workdir", str(workdir)]))


def _index(workdir: Path):
    """The student's index (<workdir>/index), the SASRec's own (indexes/sasrec, dot product) and the raw
    teacher vectors' (indexes/teacher, for `similar`)."""
    from index import cli as index_cli

    parser = argparse.ArgumentParser()
    index_cli.add_arguments(parser)
    vectors = Workspace(workdir).runs / "student" / "export" / "item_vectors.parquet"
    index_cli.run(parser.parse_args(["build", "--workdir", str(workdir), "--vectors", str(vectors)]))
    index_cli.run(parser.parse_args(["build", "--workdir", str(workdir), "--run", "sasrec"]))
    index_cli.run(parser.parse_args(["build", "--workdir", str(workdir), "--teacher"]))


def _compare(http, user: int, titles) -> None:
    """Each producer's top 5 for one user, then the Mixer's blend with its sources."""
    from serving.config import PRODUCERS

    print(f"\nuser {user}, producer by producer (top 5):")
    for p in PRODUCERS:
        t0 = time.perf_counter()
        body = http.post("/v1/candidates", json={"user_id": int(user), "k": 5, "producer": p}).json()
        ms = 1000 * (time.perf_counter() - t0)
        shown = "; ".join(str(titles.get(c["item_id"], c["item_id"])) for c in body.get("candidates", []))
        print(f"  {p:>8} ({ms:3.0f} ms, fallback {body.get('fallback')}): {shown or body.get('message')}")
    t0 = time.perf_counter()
    body = http.post("/v1/mix", json={"user_id": int(user), "k": 8}).json()
    ms = 1000 * (time.perf_counter() - t0)
    print(f"  mixed, equal weights ({ms:.0f} ms):")
    for c in body.get("candidates", []):
        sources = ", ".join(f"{p} #{r}" for p, r in c["ranks"].items())
        print(f"    {c['rank']:>2}. {titles.get(c['item_id'], c['item_id'])}  [{sources}]")
    for w in body.get("warnings", []):
        print(f"    warning: {w}")


def _serve_and_query(
    workdir: Path, port: int, n_users: int, ui: bool = False, ui_port: int = 8501, images_dir=None
) -> dict:
    import httpx

    from serving import cli as serving_cli
    from serving.config import ProducerConfig
    from ui.config import UIConfig

    ws = Workspace(workdir)
    titles = pq.read_table(ws.items, columns=["item_id", "title"]).to_pandas().set_index("item_id")["title"]
    events = pq.read_table(ws.events, columns=["user_id", "item_id"]).to_pandas()
    users = events["user_id"].value_counts().index[:n_users].tolist()
    store = features.open_store(ws)  # for printing each user's recent clicks
    # a dataset's clicks are history: item age is scored at its last event, as when they happened
    last = pq.read_table(ws.events, columns=["event_timestamp"]).column(0).to_pandas().max()
    base = serving_cli.start(ProducerConfig(workdir=str(workdir), scoring_time=last.isoformat()), port=port)
    print(f"item age scored at the data's last event, {last.isoformat()}", flush=True)
    report: dict = {"url": base, "users": {}}
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            ready = http.get("/readyz")
            print(f"Producer at {base}: /readyz {ready.status_code}")
            clicked = int(events[events.user_id == users[0]]["item_id"].iloc[0])
            t0 = time.perf_counter()
            pushed = http.post("/v1/events", json={"user_id": int(users[0]), "item_id": clicked})
            print(
                f"pushed a click: user {users[0]} -> item {clicked} ({titles.get(clicked, '?')}): "
                f"HTTP {pushed.status_code} in {1000 * (time.perf_counter() - t0):.0f} ms"
            )
            for user in users:
                t0 = time.perf_counter()
                resp = http.post("/v1/candidates", json={"user_id": int(user), "k": 10})
                ms = 1000 * (time.perf_counter() - t0)
                body = resp.json()
                recent = features.online_sequences(store, [int(user)])[int(user)][-5:]
                print(
                    f"\nuser {user}: HTTP {resp.status_code} in {ms:.0f} ms (server stages {body.get('timings_ms')})"
                )
                print("  recent clicks: " + "; ".join(str(titles.get(i, i)) for i in recent))
                for c in body.get("candidates", [])[:10]:
                    print(f"  {c['rank']:>3}. {c['score']:.3f}  {titles.get(c['item_id'], c['item_id'])}")
                if body.get("fallback") or body.get("warnings"):
                    print(f"  fallback: {body.get('fallback')}  warnings: {body.get('warnings')}")
                report["users"][int(user)] = {
                    "status": resp.status_code,
                    "ms": ms,
                    "n": len(body.get("candidates", [])),
                }
            _compare(http, users[0], titles)
        page = UIConfig(
            api_url=base,
            workdir=str(Path(workdir).absolute()),
            images_dir=str(Path(images_dir).absolute()) if images_dir else None,
            port=ui_port,
        )
        if ui:
            from ui import cli as ui_cli

            proc = ui_cli.start(page, quiet=True)
            print(f"\ndemo page: {page.page_url}  (Producer {base}); Ctrl-C stops both", flush=True)
            try:
                ui_cli.wait_for_interrupt()
            finally:
                ui_cli.stop(proc)
                print("demo page: stopped", flush=True)
        else:
            images = f" --images-dir {images_dir}" if images_dir else ""
            print(
                f"\ndemo page: `make demo UI=1` (or `vlmrec serve --workdir {workdir} --scoring-time "
                f"{last.isoformat()}` and "
                f"`vlmrec ui --workdir {workdir}{images}`), then open {page.page_url}"
            )
    finally:
        serving_cli.stop()
    return report


def check(args: argparse.Namespace) -> None:
    """What would fail minutes in (a training's epochs, the Producer's or the page's port, the users to
    query), refused before the first stage, by the same checks the stages apply."""
    from training.config import TrainConfig
    from vlmrec.ports import check_port

    for flag, epochs in (("--epochs", args.epochs), ("--sasrec-epochs", args.sasrec_epochs)):
        try:
            TrainConfig(epochs=epochs)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
    if args.users < 1:
        raise ValueError(f"--users must be >= 1, got {args.users}")
    # a running cluster's Serve may hold the port already (the demo then redeploys there, as `vlmrec serve`)
    check_port("127.0.0.1", args.port, free=not os.environ.get("RAY_ADDRESS"))
    if args.ui:
        check_port("127.0.0.1", args.ui_port, free=True, flag="--ui-port")


def run(args: argparse.Namespace) -> dict:
    check(args)
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
    t0 = time.perf_counter()
    report = {
        "ingest": _stage("ingest", lambda: ingest.run(args)).to_dict(),
        "embed": _stage("embed", lambda: embed.run(embed_args)),
        "features": _stage("features", lambda: features.run(feature_args)),
    }
    _stage("train", lambda: _train(workdir, "student", args.epochs, args.max_len))
    # the sample has ~300 training sequences: smaller batches and a higher lr give the id model enough
    # steps to learn in a few epochs (here: val NDCG@10 0.047 after 10 epochs at batch 32, lr 5e-3; the
    # defaults, batch 128 = 3 steps an epoch, stopped early at 0.011, as good as popular items)
    sasrec = ("--item-space", "id", "--batch-size", "32", "--lr", "0.005", "--patience", "3")
    _stage("train sasrec", lambda: _train(workdir, "sasrec", args.sasrec_epochs, args.max_len, *sasrec))
    _stage("evaluate", lambda: _evaluate(workdir))
    _stage("tune mix", lambda: _tune_mix(workdir))
    _stage("index", lambda: _index(workdir))
    print(f"\ndemo: pipeline done in {time.perf_counter() - t0:.0f}s; workspace {workdir.absolute()}")
    report["serve"] = _stage(
        "serve + query",
        lambda: _serve_and_query(workdir, args.port, args.users, args.ui, args.ui_port, args.images_dir),
    )
    print(f"serve it again with: vlmrec serve --workdir {workdir} --scoring-time <the data's last event>")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmrec.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
