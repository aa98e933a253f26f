"""Fuzz the Producer's OpenAPI contract against a live Producer: schemathesis cases, valid and invalid.

    make fuzz                                           # the same as:
    nice -n 5 .venv/bin/python benchmarks/fuzz.py --requests 10000 --seconds 900 --strict
    .venv/bin/python benchmarks/fuzz.py --url http://127.0.0.1:8000 --token "$VLMREC_WRITE_TOKEN"   # a running one

Without --url it starts a Producer on 127.0.0.1 (a free port) over a tiny world of its own
(tests/producer_world.py: every producer, a Feast sqlite store), with a write token, and stops it after.
Every operation of /openapi.json gets cases in turn, positive (valid by the schema) and negative (invalid
by it), until `--requests` are sent or `--seconds` pass. Each response is checked by schemathesis:
status code, content type, headers and body against the schema ("schema violations"), and counted if 5xx.
Writes JSON: requests sent, per status, 5xx count, violations (with the first examples), wall time, load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tests/ and serving/ import

TOKEN = "fuzz-write-token"  # the token of the Producer this script starts itself


def fuzz(
    base_url: str, max_requests: int, seconds: float, headers: dict | None = None, seed: int = 0
) -> dict:
    """Send up to `max_requests` schemathesis cases (or stop after `seconds`) -> counts and examples."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    session = requests.Session()
    status: Counter[str] = Counter()
    per_op: Counter[str] = Counter()
    server_errors: list[dict] = []
    violations: list[dict] = []
    n_violations = 0
    t_end = time.monotonic() + seconds
    t0 = time.perf_counter()

    def done() -> bool:
        return sum(status.values()) >= max_requests or time.monotonic() >= t_end

    def once(op, mode: GenerationMode, n: int, round_seed: int) -> None:
        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            nonlocal n_violations
            if done():
                return
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
            status[str(response.status_code)] += 1
            per_op[f"{op.label} {mode.value}"] += 1
            where = {"operation": op.label, "mode": mode.value, "status": response.status_code}
            if response.status_code >= 500:
                server_errors.append({**where, "body": response.text[:300]})
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # a check failed: the answer does not match the contract
                n_violations += 1
                if len(violations) < 20:
                    violations.append({**where, "failure": str(exc)[:600]})

        random.seed(round_seed)
        run()

    pairs = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    skipped: list[str] = []
    per_round = max(5, min(50, max_requests // len(pairs)))  # cases per operation and mode in one round
    round_no = 0
    while not done() and pairs:
        for op, mode in list(pairs):
            if done():
                break
            try:
                once(op, mode, per_round, seed + round_no)
            except Unsatisfiable:  # nothing to negate (no parameters, e.g. GET /healthz): positive only
                pairs.remove((op, mode))
                skipped.append(f"{op.label} {mode.value}")
        round_no += 1
    return {
        "requests": sum(status.values()),
        "status": dict(sorted(status.items())),
        "server_errors_5xx": len(server_errors),
        "schema_violations": n_violations,
        "server_error_examples": server_errors[:20],
        "violation_examples": violations,
        "per_operation": dict(sorted(per_op.items())),
        "operations": [op.label for op in operations],
        "not_generated": skipped,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running Producer (default: start one on a tiny world)")
    p.add_argument("--token", default=None, help="its write token, if it has one")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fuzz.json")
    p.add_argument("--strict", action="store_true", help="exit 1 on any 5xx or schema violation")
    args = p.parse_args(argv)

    started = args.url is None
    token = args.token
    if started:
        from serving.cli import start
        from tests.producer_world import free_port, write_world

        os.environ["VLMREC_WRITE_TOKEN"] = token = TOKEN  # set before Ray starts: replicas inherit it
        world = write_world(Path(tempfile.mkdtemp(prefix="vlmrec-fuzz-")))
        url = start(world.config, port=free_port(), num_cpus=2)
    else:
        url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        load_before = os.getloadavg()
        result = fuzz(url, args.requests, args.seconds, headers, args.seed)
        result["loadavg_before"] = [round(x, 2) for x in load_before]
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if started:
            from serving.cli import stop

            stop()
    result["producer"] = "started by fuzz.py on a tiny world" if started else url
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"fuzz: {result['requests']} requests in {result['wall_s']} s, "
        f"{result['server_errors_5xx']} 5xx, {result['schema_violations']} schema violations; "
        f"status {result['status']} -> {args.out}"
    )
    if args.strict and (result["server_errors_5xx"] or result["schema_violations"]):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
