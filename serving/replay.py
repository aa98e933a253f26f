"""`vlmrec replay`: a dataset's held-out events through a live Producer, in time order, as live traffic.

    vlmrec features --workdir W --until <the cut>        # the online store as of the split's cut
    vlmrec serve ...                                     # with an experiment of two arms (docs/API.md)
    vlmrec replay --workdir W --url http://127.0.0.1:8000 --max-events 5000 --rate 50
    vlmrec report --workdir W --out reports/replay     # per-arm figures from that traffic

For each held-out event (the events after the split's cut, `vlmrec/split.py`, oldest first): ask
/v1/candidates for its user (k, no producer: the deployment's experiment decides the arm), then post the
event to /v1/events with the answer's request_id and the item's position in it (none when it was not
shown). The event is posted at the replay's time, not the dataset's (the Producer bounds event times to
now), so exposures and events keep the dataset's order. Bounded (`--max-events`), paced (`--rate` events/s,
0 = as fast as answers come), stoppable (Ctrl-C or SIGTERM: the event in flight finishes, then a summary).
A refused or failed call is counted, not retried; a --url where no ready Producer answers /readyz ends the
command before the first event. The online store must hold the users' clicks as of the cut
(`vlmrec features --until`): else a held-out event is already a stored click, excluded from answers.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from vlmrec.split import SplitConfig, after_cut
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace


@dataclass(frozen=True)
class ReplayConfig(SplitConfig):
    workdir: str = str(DEFAULT_WORKDIR)
    url: str = "http://127.0.0.1:8000"
    k: int = 100
    max_events: int = 1000  # at most this many held-out events (the oldest first)
    rate: float = 0.0  # events per second; 0 = as fast as the Producer answers
    event_type: str = "click"  # the type posted for every event; "dataset" keeps each event's own
    timeout_s: float = 30.0
    # a parquet of events to stream instead (user_id, item_id, event_timestamp, event_type?): traffic the
    # workspace has never seen, e.g. the days after what was ingested (`vlmrec refresh` then folds it in)
    events: str | None = None


def held_out_events(ws: Workspace, cfg: SplitConfig, limit: int, source: str | None = None):
    """The split's events after the cut (or every event of `source`), oldest first, at most `limit`."""
    if source is not None:
        events = pq.read_table(source).to_pandas()
        if "event_type" not in events:
            events["event_type"] = "click"
        return events.sort_values("event_timestamp", kind="stable").head(limit).reset_index(drop=True)
    events = pq.read_table(ws.events).to_pandas()
    return after_cut(events, cfg).head(limit)


def replay(cfg: ReplayConfig, stop=lambda: False) -> dict:
    """Stream the held-out events through the Producer at cfg.url; stop() True ends it after an event."""
    import httpx

    try:
        http = httpx.Client(base_url=cfg.url, timeout=cfg.timeout_s)
    except httpx.InvalidURL as err:
        raise ValueError(f"--url: {err}") from None
    with http:
        try:  # a wrong --url is an error, not a summary of failed calls
            ready = http.get("/readyz")
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise ValueError(
                f"--url: no Producer answers at {cfg.url} ({type(err).__name__}: {err})"
            ) from None
        if ready.status_code != 200:
            raise ValueError(f"--url: {cfg.url}/readyz answers {ready.status_code}: {ready.text[:300]}")
        ws = Workspace(cfg.workdir)
        events = held_out_events(ws, cfg.split_config(), cfg.max_events, cfg.events)
        outcomes: Counter[str] = Counter()
        arms: Counter[str] = Counter()
        shown = 0
        t0 = time.perf_counter()
        for n, (user, item, etype) in enumerate(
            zip(events["user_id"], events["item_id"], events["event_type"], strict=True)
        ):
            if stop():
                outcomes["stopped_early"] = 1
                break
            if cfg.rate > 0:  # pace: event n goes at t0 + n / rate
                time.sleep(max(0.0, t0 + n / cfg.rate - time.perf_counter()))
            try:
                answer = http.post("/v1/candidates", json={"user_id": int(user), "k": cfg.k})
            except httpx.HTTPError:
                outcomes["candidates_failed"] += 1
                continue
            if answer.status_code != 200:
                outcomes[f"candidates_{answer.status_code}"] += 1
                continue
            body = answer.json()
            arms[str(body.get("arm"))] += 1
            ids = [c["item_id"] for c in body["candidates"]]
            position = ids.index(int(item)) + 1 if int(item) in ids else None
            shown += position is not None
            event = {"user_id": int(user), "item_id": int(item), "request_id": body["request_id"]}
            event["event_type"] = str(etype) if cfg.event_type == "dataset" else cfg.event_type
            event |= {"position": position} if position else {}
            try:
                posted = http.post("/v1/events", json=event)
                outcomes["events_ok" if posted.status_code == 200 else f"events_{posted.status_code}"] += 1
            except httpx.HTTPError:
                outcomes["events_failed"] += 1
    seconds = time.perf_counter() - t0
    asked = sum(arms.values())
    return {
        "held_out_events": int(len(events)),
        "replayed": asked,
        "arms": dict(arms),
        "target_in_answer": shown,
        "target_in_answer_rate": shown / asked if asked else None,
        "outcomes": dict(outcomes),
        "seconds": round(seconds, 2),
        "events_per_s": round(asked / seconds, 2) if seconds else None,
        "config": cfg.to_dict(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ReplayConfig.add_arguments(parser)
    parser.add_argument("--out", default=None, help="also write the summary here (JSON)")


def run(args: argparse.Namespace) -> dict:
    cfg = ReplayConfig.from_args(args)
    if cfg.k < 1 or cfg.max_events < 1 or cfg.rate < 0 or cfg.timeout_s <= 0:
        raise ValueError("--k and --max-events must be >= 1, --rate >= 0, --timeout-s > 0")
    stopping = {"now": False}

    def ask_to_stop(signum, frame):  # finish the event in flight, then summarise
        stopping["now"] = True

    previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = replay(cfg, lambda: stopping["now"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.replay", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
