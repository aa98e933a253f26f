"""A replay of MovieLens-small's test period through the live Producer with two arms, and its report.

    python benchmarks/replay.py --workdir .vlmrec/ml --student-run student-hybrid-age-fusion \
        --sasrec-run sasrec --max-events 4000 --out benchmarks/results/replay.json

The workspace must hold both exports (benchmarks/cold.py trains them). Steps: the online store is
materialized as of the split's cut (`vlmrec features --until`); the sasrec index is built if missing; the
Producer starts with an experiment of two arms, `student` and `sasrec`, half the users each; `vlmrec replay`
streams the first --max-events held-out events (candidates for the event's user, then the event with the
answer's request_id); `vlmrec report` joins exposures and events per arm. The exposure and event logs of
earlier runs in the workspace are moved aside first (to <workdir>/replay-previous/). At the end the online
store is materialized over everything again. `exposure_log_p99_ratio` is the c32 figure of the same
commit's benchmarks/producer.py run (benchmarks/results/producer.json), copied here with its source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from vlmrec.workspace import Workspace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".vlmrec/ml")
    p.add_argument("--student-run", default="student-hybrid-age-fusion")
    p.add_argument("--sasrec-run", default="sasrec")
    p.add_argument("--max-events", type=int, default=4000)
    p.add_argument("--k", type=int, default=100, help="candidates per answer")
    p.add_argument("--hit-k", type=int, default=10, help="hit rate of the next event in the first k")
    p.add_argument("--port", type=int, default=8770)
    p.add_argument("--out", default="benchmarks/results/replay.json")
    args = p.parse_args()

    from serving.cli import start, stop
    from serving.config import ProducerConfig
    from serving.replay import ReplayConfig, replay
    from serving.report import ReportConfig, markdown, plot, report
    from vlmrec.split import SplitConfig, train_events

    ws = Workspace(args.workdir)
    vlmrec = str(Path(sys.executable).with_name("vlmrec"))
    seconds: dict[str, float] = {}
    loadavg = {"start": [round(x, 2) for x in os.getloadavg()]}

    def sh(name: str, cmd: list[str]) -> None:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds[name] = round(time.perf_counter() - t0, 1)

    events = pq.read_table(ws.events).to_pandas()
    cut = train_events(events, SplitConfig()).event_timestamp.max()
    previous = ws.root / "replay-previous"
    for folder in (ws.exposures, ws.events_log):
        if folder.exists():
            target = previous / f"{folder.name}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(folder), target)
    sh("features until the cut", [vlmrec, "features", "--workdir", args.workdir, "--until", cut.isoformat()])
    if not (ws.named_index(args.sasrec_run) / "CURRENT").exists():
        sh("sasrec index", [vlmrec, "index", "build", "--workdir", args.workdir, "--run", args.sasrec_run])
    student_index = ws.root / "bench-index" / args.student_run
    if not (student_index / "CURRENT").exists():
        vectors = ws.runs / args.student_run / "export" / "item_vectors.parquet"
        sh("student index", [vlmrec, "index", "build", "--workdir", args.workdir, "--index-dir",
                             str(student_index), "--vectors", str(vectors)])  # fmt: skip
    experiment = {
        "name": "replay-student-vs-sasrec",
        "arms": [
            {"name": "student", "producer": "student", "share": 0.5},
            {"name": "sasrec", "producer": "sasrec", "share": 0.5},
        ],
    }
    config = ProducerConfig(
        workdir=args.workdir,
        run=args.student_run,
        index_dir=str(student_index),
        sasrec_run=args.sasrec_run,
        experiment=experiment,
    )
    try:
        base = start(config, port=args.port, access_log=False)
        t0 = time.perf_counter()
        summary = replay(ReplayConfig(workdir=args.workdir, url=base, k=args.k, max_events=args.max_events))
        seconds["replay"] = round(time.perf_counter() - t0, 1)
        time.sleep(3)  # the logs' writers flush every second
    finally:
        stop()
    sh("features over everything again", [vlmrec, "features", "--workdir", args.workdir])
    r = report(ReportConfig(args.workdir, k=args.hit_k, bootstrap=1000))
    out = Path(args.out)
    plot(r, out.with_suffix(".png"))
    producer = json.loads(Path("benchmarks/results/producer.json").read_text())
    log_cost = producer.get("exposure_log", {}).get("c32", {})
    loadavg["end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "command": " ".join(["python", "benchmarks/replay.py", *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "arms": {
            name: {
                "hit_rate": a["hit_rate"],
                "ci95": a["ci95"]["hit_rate"],
                "exposures": a["requests"],
                "clicks": a["clicks"],
                "users": a["users"],
                "ctr_per_request": a["ctr_per_request"],
                "ctr_per_request_ci95": a["ci95"]["ctr_per_request"],
                "cold_share": a["cold_share"],
                "coverage": a["coverage"],
                "model_versions": a["model_versions"],
            }
            for name, a in r["arms"].items()
        },
        "srm_p": r["srm_p"],
        "exposure_log_p99_ratio": log_cost.get("p99_ratio"),
        "exposure_log_source": f"benchmarks/results/producer.json exposure_log.c32 (commit {producer.get('commit')})",
        "hit_k": args.hit_k,
        "k": args.k,
        "cut": cut.isoformat(),
        "replay": {k: v for k, v in summary.items() if k != "config"},
        "report": {k: v for k, v in r.items() if k not in ("arms",)},
        "seconds": seconds,
        "load_average": loadavg,
    }
    out.write_text(json.dumps(result, indent=2, default=float))
    print(markdown(r))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
