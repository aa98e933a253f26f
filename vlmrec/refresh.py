"""`vlmrec refresh`: the daily loop in one command: logged events in, retrain, gate, new index, hot swap.

    vlmrec refresh --workdir .vlmrec/sample                      # the Producer `vlmrec serve` runs (serve.json)
    vlmrec refresh --workdir W --window-days 1 --margin 0.02     # score on the last day; 2% worse is refused
    vlmrec refresh --workdir W --swap none                       # train and score only, swap nothing
    vlmrec refresh --workdir /workspace --swap rayservice/vlmrec-producer   # Kubernetes (k8s/base/refresh.yaml)

Steps, each result in <workdir>/refresh/<new run>.json:
1. fold the events the Producer logged (`vlmrec ingest --logged`) into the events and click sequences;
2. the window: the newest `window_days` of events that the serving run never learnt from (after its
   run.json's trained_until); fewer than `min_queries` queries there: no decision, nothing changes;
3. train a new run with the serving run's own configs on every event before the window (warm-started
   from the serving export's weights where the shapes agree: `warm_start`);
4. score both on the window's queries (full ranking, NDCG@10 with 95% bootstrap intervals over users);
   promote only if new >= serving x (1 - margin);
5. build the new run's own index version (Edge: indexes/<run>; server: alias items_<run>), load the new
   Producer state once here (the config a replica will get must load), then change the Producer's
   user_config (run + index) in one step: Serve reconfigures every live replica in place;
6. wait until /readyz names the new run, and write the decision.
The online store needs nothing: the Producer wrote every logged click there as it came.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from engine.config import _Config, at_least
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace, check_name

log = logging.getLogger("vlmrec.refresh")


@dataclass(frozen=True)
class RefreshConfig(_Config):
    workdir: str = str(DEFAULT_WORKDIR)
    name: str | None = None  # the new run; None = <serving run without its stamp>-<UTC yyyymmddHHMMSS>
    window_days: float = 7.0  # the newest events both versions are scored on
    margin: float = 0.02  # promote when new NDCG@10 >= serving's x (1 - margin); 1 = whatever loads
    min_queries: int = 50  # fewer window queries than this: no decision
    swap: str = "serve"  # "serve" (<workdir>/serve.json), "rayservice/<name>" (in-cluster) or "none"
    namespace: str | None = None  # rayservice: default the pod's own namespace
    epochs: int | None = None  # None: the serving run's own cap (early stopping ends it)
    warm_start: bool = True  # start from the serving export's weights where the shapes agree
    timeout_s: float = 600.0  # the swap: how long the new version may take to answer everywhere

    def __post_init__(self) -> None:
        at_least(self, 0, "window_days", "timeout_s", strictly=True)
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
        if self.min_queries < 1:
            raise ValueError(f"min_queries must be >= 1, got {self.min_queries}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.name is not None:
            check_name(self.name, "name")


def refresh(cfg: RefreshConfig) -> dict:
    """Run the loop once; returns the decision (also written to <workdir>/refresh/<new run>.json)."""
    from serving.config import ProducerConfig
    from serving.rollout import rollout_target, wait_serving
    from vlmrec.fold import fold_logged

    ws = Workspace(Path(cfg.workdir))
    target = None if cfg.swap == "none" else rollout_target(cfg.swap, ws.root, cfg.namespace)
    user_config = target.user_config() if target else ProducerConfig(workdir=str(ws.root)).to_dict()
    producer = ProducerConfig.from_dict(user_config)
    if not (producer.export_dir / "run.json").exists():
        raise FileNotFoundError(f"the serving run {producer.run!r} has no export ({producer.export_dir})")
    serving_run = json.loads((producer.export_dir / "run.json").read_text())
    t0 = time.perf_counter()
    out: dict = {"serving_run": producer.run, "config": cfg.to_dict(), "started": _now()}
    out["folded"] = fold_logged(ws)
    log.info("1/6 folded the logged events: %s", out["folded"])

    cut = window_start(ws, serving_run, cfg.window_days)
    new = cfg.name or f"{re.sub(r'-[0-9]{14}$', '', producer.run)}-{datetime.now(UTC):%Y%m%d%H%M%S}"
    out |= {"new_run": new, "window_start": cut}
    data = gate_data(ws, cut)
    out["window_queries"] = int(len(data.targets))
    out["window_skipped_no_history"] = int(data.n_skipped)  # a user's first event: nothing to ask with
    log.info("2/6 window: %d queries after %s (serving %s)", len(data.targets), cut, producer.run)
    if len(data.targets) < cfg.min_queries:
        out["decision"] = (
            f"skipped: {len(data.targets)} queries after {cut} (< min_queries {cfg.min_queries})"
        )
        return _finish(ws, out, t0, name=f"skipped-{datetime.now(UTC):%Y%m%d%H%M%S}")

    export, info = retrain(ws, serving_run, producer.export_dir, new, cut, cfg)
    out["trained"] = {"best": info["best"], "data": info["data"], "warm_start": info.get("warm_start")}
    log.info("3/6 trained %s: best epoch %s", new, info["best"].get("epoch"))
    out["gate"] = gate(data, producer.export_dir, export, cfg.margin)
    log.info("4/6 gate: %s", out["gate"]["reason"])
    if not out["gate"]["promote"]:
        out["decision"] = "kept: " + out["gate"]["reason"]
        return _finish(ws, out, t0, name=new)

    new_config = promote_config(ws, producer, new)
    out["index"] = build_run_index(ws, producer, new)
    preflight(new_config)
    log.info("5/6 index %s built; the new state loads", out["index"]["name"])
    if target is None:
        out["decision"] = "promotable; not swapped (--swap none)"
        out["user_config"] = new_config.to_dict()
        return _finish(ws, out, t0, name=new)
    target.apply(new_config.to_dict())
    out["swap"] = {"target": cfg.swap, "polls": wait_serving(target.url(), f"{new}@", cfg.timeout_s)}
    out["decision"] = f"promoted: {new} serves (was {producer.run})"
    log.info("6/6 %s", out["decision"])
    return _finish(ws, out, t0, name=new)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _finish(ws: Workspace, out: dict, t0: float, name: str) -> dict:
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["finished"] = _now()
    path = ws.root / "refresh" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    out["report"] = str(path)
    return out


def window_start(ws: Workspace, serving_run: dict, window_days: float) -> str:
    """The first time of the gate's window: the newest event minus window_days, and never before the
    serving run's last training event (it must not be scored on what it learnt)."""
    ts = pq.read_table(ws.events, columns=["event_timestamp"]).column(0).to_pandas()
    start = pd.Timestamp(ts.max()) - pd.Timedelta(days=window_days)
    trained_until = serving_run.get("data", {}).get("trained_until")
    if trained_until is not None:
        start = max(start, pd.Timestamp(trained_until) + pd.Timedelta(microseconds=1))
    return start.tz_convert("UTC").isoformat()


def gate_data(ws: Workspace, cut: str):
    from training.evaluate import load_eval_data
    from vlmrec.split import SplitConfig

    return load_eval_data(ws, SplitConfig(split="temporal", cut_time=cut))


def retrain(
    ws: Workspace, serving_run: dict, serving_export: Path, new: str, cut: str, cfg: RefreshConfig
) -> tuple[Path, dict]:
    """A new run with the serving run's configs on every event before the window."""
    from training.config import LossConfig, ModelConfig, TrainConfig
    from training.train import JobConfig, train

    configs = serving_run.get("configs") or {}
    missing = {"job", "model", "loss", "train"} - set(configs)
    if missing:
        raise ValueError(f"the serving run's run.json has no configs {sorted(missing)}: retrain it by hand")
    job_cfg = {k: v for k, v in configs["job"].items() if k != "zero_config"}  # this install's DeepSpeed JSON
    job = JobConfig.from_dict(
        {**job_cfg, "workdir": str(ws.root), "name": new}
        | {"split": "temporal", "cut_time": cut, "cold": "natural"}
    )
    train_cfg = TrainConfig.from_dict(configs["train"])
    if cfg.epochs is not None:
        train_cfg = replace(train_cfg, epochs=cfg.epochs)
    model_cfg = ModelConfig.from_dict(configs["model"])
    if train_cfg.tune_fusion:  # chosen again on the new validation set, after training
        model_cfg = replace(model_cfg, fusion_weight=0.0)
    init = serving_export if cfg.warm_start else None
    return train(job, model_cfg, LossConfig.from_dict(configs["loss"]), train_cfg, init_from=init)


def gate(data, serving_export: Path, new_export: Path, margin: float) -> dict:
    """Both versions on the window's queries (full ranking). The serving export may know fewer items than
    the catalogue holds now (items added since): it scores only its own, as it did while serving."""
    from training.evaluate import evaluate_scorer, export_scorer

    figures = {}
    for name, export in (("serving", serving_export), ("new", new_export)):
        score = export_scorer(export, data.items, data.added_days, foreign_vocabulary=name == "serving")
        m = evaluate_scorer(score, data, "full")["all"]
        figures[name] = {k: m["micro"][k] for k in ("NDCG@10", "HR@10")}
        figures[name] |= {"NDCG@10_ci95": m.get("micro_ci95", {}).get("NDCG@10"), "queries": m["n_queries"]}
    promote, reason = decide(figures["serving"]["NDCG@10"], figures["new"]["NDCG@10"], margin)
    return {"promote": promote, "reason": reason, "margin": margin, "figures": figures}


def decide(serving: float, new: float, margin: float) -> tuple[bool, str]:
    """Promote when the new version's NDCG@10 is at least the serving one's x (1 - margin)."""
    promote = bool(new >= serving * (1 - margin))
    return (
        promote,
        f"new NDCG@10 {new:.4f} {'>=' if promote else '<'} serving {serving:.4f} x (1 - {margin:g})",
    )


def promote_config(ws: Workspace, producer, new: str):
    """The Producer config that serves `new`: its run and its own index, everything else unchanged."""
    from index.config import named_alias

    if producer.index_backend == "edge":
        return replace(producer, run=new, model_path=None, index_dir=str(ws.named_index(new).absolute()))
    return replace(producer, run=new, model_path=None, index_alias=named_alias(new))


def build_run_index(ws: Workspace, producer, new: str) -> dict:
    """The new run's index version (verified before it is switched to), on the Producer's backend."""
    import os

    from index.build import build_index, workspace_teacher_id
    from index.cli import EXPORT_NAME, vector_distance
    from index.config import IndexConfig, named_alias

    vectors = ws.runs / new / "export" / EXPORT_NAME
    config = IndexConfig(
        backend=producer.index_backend,
        url=producer.index_url,
        api_key=os.environ.get("QDRANT_API_KEY"),
        alias=named_alias(new),
        distance=vector_distance(vectors),
    )
    v = build_index(vectors, ws.items, ws.named_index(new), config, teacher_id=workspace_teacher_id(ws))
    return {"name": v.name, "count": v.count, "location": str(v.location), "seconds": round(v.seconds, 1)}


def preflight(config) -> None:
    """Load the state a replica will get, once, here: a config that cannot load is never rolled out."""
    from serving.state import load_state

    load_state(config).close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    RefreshConfig.add_arguments(parser)  # one flag per field: --window-days, --margin, --swap, ...


def run(args: argparse.Namespace) -> dict:
    out = refresh(RefreshConfig.from_args(args))
    print(f"refresh: {out['decision']} ({out['seconds']} s); {out['report']}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmrec.refresh", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as err:
        print(f"refresh: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
