"""`vlmrec ui`: the demo page (Streamlit) on 127.0.0.1:8501 until Ctrl-C, talking to a running Producer.

    vlmrec serve --workdir .vlmrec/movielens &                        # the Producer (127.0.0.1:8000)
    vlmrec ui --workdir .vlmrec/movielens --images-dir ../shared/data/movielens-small/posters

    from ui.cli import start, stop                                    # non-blocking, for the demo and tests
    proc = start(UIConfig(api_url=url, workdir="W", port=8502)); ...; stop(proc)

The page runs as `python -m streamlit run ui/page.py` in its own process, its config in VLMREC_UI.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ui.config import ENV, UIConfig
from vlmrec.ports import check_port
from vlmrec.workspace import DEFAULT_WORKDIR

PAGE = Path(__file__).with_name("page.py")
READY_TIMEOUT_S = 60.0  # Streamlit's own start (imports) is a few seconds; a busy box takes longer


def command(cfg: UIConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(PAGE),
        "--server.address",
        cfg.host,
        "--server.port",
        str(cfg.port),
        "--server.headless",
        "true",  # no browser opened, no e-mail prompt
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",  # no "Deploy" button or developer menu on a demo
        "--global.developmentMode",
        "false",
    ]


def start(cfg: UIConfig, quiet: bool = False) -> subprocess.Popen:
    """Start the page's process and wait until Streamlit answers its health check. Raises RuntimeError
    (and stops the process) when it exits or does not answer within READY_TIMEOUT_S."""
    import httpx

    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise ValueError("streamlit is not installed: pip install 'vlmrec[ui]'") from None
    env = {**os.environ, ENV: cfg.to_json(), "PYTHONPATH": _repo_path()}
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(command(cfg), env=env, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the page exited with code {proc.returncode} (is port {cfg.port} free?)")
        try:
            if httpx.get(f"{cfg.page_url}/_stcore/health", timeout=1.0).text == "ok":
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"the page did not answer at {cfg.page_url} within {READY_TIMEOUT_S:.0f} s")


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM the page's process group (Streamlit shuts down cleanly on it), SIGKILL after timeout_s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _repo_path() -> str:
    """The repository root first on the page's path (page.py imports ui/)."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = UIConfig()
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="catalogue and events")
    parser.add_argument("--api-url", default=d.api_url, help="the Producer")
    parser.add_argument(
        "--images-dir",
        default=None,
        help="images as <item_id>.png|jpg (e.g. ../shared/data/movielens-small/posters); "
        "default: the catalogue's image_uri",
    )
    parser.add_argument("--k", type=int, default=d.k, help="candidates per producer at first")
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)


def config_from_args(args: argparse.Namespace) -> UIConfig:
    images = str(Path(args.images_dir).absolute()) if args.images_dir else None
    return UIConfig(
        api_url=args.api_url,
        workdir=str(Path(args.workdir).absolute()),
        images_dir=images,
        k=args.k,
        host=args.host,
        port=args.port,
    )


def wait_for_interrupt() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM. Both get our own handler for the wait: a library may have
    left its own on SIGINT (Ray Train's trainer.fit() does, in `vlmrec demo`), and Ctrl-C would not stop."""
    done = threading.Event()
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(0.5):  # a timed wait: signal handlers run between waits
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    if not Path(cfg.workdir, "data", "items.parquet").exists():
        raise FileNotFoundError(f"no catalogue in {cfg.workdir}: run `vlmrec demo` or `vlmrec ingest` first")
    check_port(cfg.host, cfg.port, free=True)
    proc = start(cfg)
    print(f"ui: the demo page at {cfg.page_url} (Producer {cfg.api_url}); Ctrl-C stops", flush=True)
    try:
        wait_for_interrupt()
    finally:
        stop(proc)
        print("ui: stopped", flush=True)
