"""`vlmrec serve`: run the Producer on Ray Serve until Ctrl-C.

    vlmrec serve                                    # what `make demo` built: .vlmrec/sample, 127.0.0.1:8000
    vlmrec serve --workdir .vlmrec/movielens --run student --port 8080 --replicas 2
    vlmrec serve --workdir W --sasrec-run sasrec --popular-half-life-days 3 --mix-budget-ms 100
    QDRANT_URL=http://qdrant:6333 vlmrec serve --index-backend server

    from serving.cli import start, stop             # non-blocking, for the demo and tests
    url = start(ProducerConfig(workdir="W"), port=8123); ...; stop()

The environment is read here, once: QDRANT_URL (when --index-backend server and no --index-url) and
RAY_ADDRESS (vlmrec.raycluster: a running cluster, else a local one).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

from index.config import BACKENDS
from serving.config import PRODUCERS, REQUEST_TIMEOUT_S, ProducerConfig
from vlmrec.ports import check_port
from vlmrec.workspace import DEFAULT_WORKDIR

APP_NAME = "vlmrec-producer"


def start(
    config: ProducerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    num_cpus: int | None = None,
    access_log: bool = True,
) -> str:
    """Start Ray (if needed) and Serve's HTTP proxy on host:port, deploy the Producer, wait until it is
    running. Returns the base url. Relative paths in `config` are made absolute here (replicas may run
    elsewhere). access_log=False: no log line per request (benchmarks). The applied config is written to
    <workdir>/serve.json: `vlmrec refresh` changes its user_config and deploys it again (in place)."""
    from serving.loading import check_sources
    from vlmrec.raycluster import init_ray

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    check_port(host, port, free=False)
    absolute = {
        name: str(Path(getattr(config, name)).absolute())
        for name in ("workdir", "model_path", "index_dir", "sasrec_index_dir", "similar_index_dir")
        if getattr(config, name)
    }
    if config.exposure_path and "://" not in config.exposure_path:  # "" = off; a URI stays as it is
        absolute["exposure_path"] = str(Path(config.exposure_path).absolute())
    config = replace(config, **absolute)
    check_sources(config)  # a wrong workdir or run: this error, not a replica's failure in Serve's logs
    init_ray(num_cpus=num_cpus)
    applied = serve_config(config, host, port, replicas, access_log)
    deploy(applied)
    write_serve_config(applied, config.workspace.serve_config)
    return f"http://{host}:{port}"


def serve_config(
    config: ProducerConfig, host: str, port: int, replicas: int = 1, access_log: bool = True
) -> dict:
    """The Producer as a `serve deploy` config, the shape of the RayService's serveConfigV2
    (k8s/base/producer-rayservice.yaml): Serve imports serving.producer:app and hands user_config to
    Producer.reconfigure()."""
    return {
        "http_options": {"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serving.producer:app",
                "logging_config": {"enable_access_log": access_log},
                "deployments": [
                    {"name": "Producer", "num_replicas": replicas, "user_config": config.to_dict()}
                ],
            }
        ],
    }


def producer_user_config(applied: dict) -> dict:
    """The Producer's user_config in a `serve deploy` config."""
    return _producer(applied)["user_config"]


def _producer(applied: dict) -> dict:
    """The Producer's deployment in a `serve deploy` config."""
    (app,) = (a for a in applied["applications"] if a["name"] == APP_NAME)
    (producer,) = (d for d in app["deployments"] if d["name"] == "Producer")
    return producer


def deploy(applied: dict, timeout_s: float = 600.0) -> None:
    """Apply a `serve deploy` config to this Ray cluster's Serve (started if needed; what `serve deploy`
    and KubeRay send to the dashboard) and wait until the application runs. Declarative, so a config that
    changes only user_config (or num_replicas) is applied in place: Serve calls Producer.reconfigure() on
    each live replica, which loads the new state beside the old one and swaps it; no replica restarts and
    no request fails. NotDeployed (a ValueError: the CLI's error line) with what failed in the replicas (a
    corrupt index, a store that does not open; Serve's log holds the traceback) when the application does not
    start, or when live replicas could not load the new user_config: they serve on with the one before
    (Producer.reconfigure), and that config is deployed again, so a replica Serve restarts later gets it."""
    from ray import serve
    from ray.serve.context import _get_global_client  # the client `serve deploy`'s REST handler uses
    from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

    schema = ServeDeploySchema.model_validate(applied)
    serve.start(http_options=applied["http_options"])
    client = _get_global_client()
    running = ServeInstanceDetails(**client.get_serve_details()).applications.get(APP_NAME)
    before = running.deployed_app_config if running and running.status == "RUNNING" else None
    client.deploy_apps(schema)
    try:
        client._wait_for_application_running(APP_NAME, timeout_s=int(timeout_s))
    except RuntimeError as exc:
        raise NotDeployed(f"the Producer did not start: {replica_error(str(exc))}") from None
    refused = update_errors(applied) if running is not None else set()  # new replicas raise instead
    if refused:
        if before is not None:
            client.deploy_apps(schema.model_copy(update={"applications": [before]}))
            client._wait_for_application_running(APP_NAME, timeout_s=int(timeout_s))
        raise NotDeployed(f"the Producer kept its previous config: {'; '.join(sorted(refused))}")


class NotDeployed(ValueError):
    """The application did not reach RUNNING."""


def update_errors(applied: dict) -> set[str]:
    """What the Producer's replicas say of the config update they could not apply (Producer.update_error),
    asked of a few replicas per replica (Serve's handle picks one per call; a bad update fails them all)."""
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    calls = [handle.update_error.remote() for _ in range(4 * _producer(applied).get("num_replicas", 1))]
    return {error for call in calls if (error := call.result(timeout_s=30))}


def replica_error(fallback: str) -> str:
    """The last line of each failed deployment's message (Serve's: the replica's traceback, whose last line
    is the exception), else `fallback`."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    lines = [
        (d.message.strip().splitlines() or [""])[-1]
        for d in (app.deployments.values() if app else ())
        if d.message and d.status.value in ("DEPLOY_FAILED", "UNHEALTHY")
    ]
    return "; ".join(lines) or fallback


def write_serve_config(applied: dict, path: Path) -> None:
    """Write the applied config beside the workspace (build new, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(applied, indent=2))
    tmp.replace(path)


def stop() -> None:
    """Remove every Serve application and the HTTP proxy (Ray itself stays up)."""
    from ray import serve

    serve.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ProducerConfig()
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="the workspace folder")
    parser.add_argument("--run", default=d.run, help="serve <workdir>/runs/<run>/export")
    parser.add_argument("--model-path", default=None, help="an export folder (default: from --run)")
    parser.add_argument("--index-dir", default=None, help="Edge index folder (default: <workdir>/index)")
    parser.add_argument("--index-backend", choices=BACKENDS, default=d.index_backend)
    parser.add_argument("--index-url", default=None, help="server backend (default: env QDRANT_URL)")
    parser.add_argument(
        "--index-alias", default=d.index_alias, help="server backend: the Qdrant alias searched"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--replicas", type=int, default=1, help="Producer replicas (each holds a model + index copy)"
    )
    parser.add_argument("--default-k", type=int, default=d.default_k)
    parser.add_argument(
        "--producer", choices=PRODUCERS, default=d.producer, help="the producer a request naming none gets"
    )
    parser.add_argument(
        "--sasrec-run", default=d.sasrec_run, help="the id-space run served as `sasrec` (indexes/<run>)"
    )
    parser.add_argument("--similar-last-n", type=int, default=d.similar_last_n)
    parser.add_argument("--popular-half-life-days", type=float, default=d.popular_half_life_days)
    parser.add_argument(
        "--popular-until", default=None, help="`popular` counts events before this ISO time (backtests)"
    )
    parser.add_argument("--mix-budget-ms", type=float, default=d.mix_budget_ms)
    parser.add_argument(
        "--scoring-time", default=None, help="item-age models score age at this ISO time, not now (replays)"
    )
    parser.add_argument(
        "--hnsw-ef", type=int, default=None, help="the search beam (default: chosen from the index's size)"
    )
    parser.add_argument(
        "--scan-max-points",
        type=int,
        default=d.scan_max_points,
        help="an index of at most this many items is searched exactly by one matrix product; 0: its graph",
    )


def config_from_args(args: argparse.Namespace) -> ProducerConfig:
    url = args.index_url or (os.environ.get("QDRANT_URL") if args.index_backend == "server" else None)
    return ProducerConfig(
        workdir=str(args.workdir),
        run=args.run,
        model_path=args.model_path,
        index_dir=args.index_dir,
        index_backend=args.index_backend,
        index_url=url,
        index_alias=args.index_alias,
        default_k=args.default_k,
        producer=args.producer,
        sasrec_run=args.sasrec_run,
        similar_last_n=args.similar_last_n,
        popular_half_life_days=args.popular_half_life_days,
        popular_until=args.popular_until,
        mix_budget_ms=args.mix_budget_ms,
        scoring_time=args.scoring_time,
        hnsw_ef=args.hnsw_ef,
        scan_max_points=args.scan_max_points,
    )


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    # a Ray of this command's own holds no port yet; a running cluster's Serve may hold this one (a redeploy)
    check_port(args.host, args.port, free=not os.environ.get("RAY_ADDRESS"))
    url = start(config, args.host, args.port, args.replicas)
    print(
        f"serve: Producer at {url} (default producer {config.producer!r}; POST /v1/candidates, /v1/mix, "
        "/docs); Ctrl-C stops",
        flush=True,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        print("serve: stopped", flush=True)
