"""How a Producer replica finds, checks and loads its producers (their ranking: serving/sources.py).

    check_sources(ProducerConfig(workdir="W"))                 # vlmrec serve's preflight, before Ray starts
    sources, missing = load_sources(ProducerConfig(workdir="W"))   # {name: source}, {name: why absent}

Each producer's files come from one table (`_files`): a model export (runs/<run>/export), its index (Edge:
the folder's CURRENT), the teacher index, the events table. A missing one is named with the command that
builds it; an export and an index that do not agree (teacher, dimension, distance) are refused by one
check (`check_pair`), on the model and the index's version before Ray starts and on the loaded model and the
open index in the replica. The default producer must load; a sibling that does not is named in `missing`.
The Mixer's default weights (`read_mix_weights`: <workdir>/mix.json, what `vlmrec tune-mix` chose) load here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from index.config import IndexConfig, named_alias
from index.search import Index, open_index
from index.store import VersionInfo, read_current
from serving.config import PRODUCERS, ProducerConfig
from serving.experiments import Experiment, default_traffic_keys
from serving.sources import ModelSource, PopularItem, PopularSource, SimilarSource, Source
from serving.vector_cache import VectorCache
from training.config import ModelConfig
from training.model import CONFIG_FILE, WEIGHTS_FILE, SeqRec
from vlmrec.schema import teacher_of

log = logging.getLogger("ray.serve")


def with_metadata(rows: Sequence[dict], catalogue: Path, vectors: Path | None) -> list[PopularItem]:
    """[{item_id, score}] joined with the category (items.parquet) and availability (the vector table's
    optional `available`, else True, as the index builder assumes): what filters on popular items need."""
    if not rows:
        return []
    ids = [int(r["item_id"]) for r in rows]
    category: dict[int, str | None] = {}
    if catalogue.exists():
        items = pq.read_table(catalogue, columns=["item_id", "category"]).to_pandas()
        items = items[items["item_id"].isin(ids)]
        category = dict(zip(items["item_id"].astype(int), items["category"], strict=True))
    available: dict[int, bool] = {}
    if vectors is not None and vectors.exists() and "available" in pq.read_schema(vectors).names:
        vt = pq.read_table(vectors, columns=["item_id", "available"]).to_pandas()
        vt = vt[vt["item_id"].isin(ids)]
        available = dict(
            zip(vt["item_id"].astype(int), vt["available"].fillna(True).astype(bool), strict=True)
        )
    return [
        PopularItem(i, float(r["score"]), _str_or_none(category.get(i)), available.get(i, True))
        for i, r in zip(ids, rows, strict=True)
    ]


def read_popular(export: Path, catalogue: Path, vectors: Path) -> list[PopularItem]:
    """An export's popular.json (its training events' popularity) with category and availability."""
    path = export / "popular.json"
    return with_metadata(json.loads(path.read_text()) if path.exists() else [], catalogue, vectors)


def _str_or_none(v) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def index_config(cfg: ProducerConfig, name: str | None = None) -> IndexConfig:
    """Search settings: IndexConfig's defaults but the config's hnsw_ef and scan_max_points. On a server the
    student searches cfg.index_alias and a named index (sasrec, teacher) the alias `items_<name>` (what
    `vlmrec index build --run NAME` / `--teacher` make). The api key comes from this replica's environment
    (QDRANT_API_KEY), never from user_config."""
    if cfg.index_backend == "server":
        alias = cfg.index_alias if name is None else named_alias(name)
        return IndexConfig(
            backend="server",
            url=cfg.index_url,
            api_key=os.environ.get("QDRANT_API_KEY"),
            alias=alias,
            hnsw_ef=cfg.hnsw_ef,
        )
    return IndexConfig(hnsw_ef=cfg.hnsw_ef, scan_max_points=cfg.scan_max_points)


def _open(cfg: ProducerConfig, folder: Path, name: str | None) -> Index:
    where = cfg.index_url if cfg.index_backend == "server" else folder
    return open_index(where, index_config(cfg, name))


def check_export_teacher(export: Path, run_info: dict) -> None:
    """The export's item table must hold the vectors of the teacher its run.json names."""
    vectors = export / "item_vectors.parquet"
    if not vectors.exists():
        return
    held = teacher_of(vectors)
    if held != run_info.get("teacher_id"):
        raise ValueError(
            f"teacher mismatch: {export / 'run.json'} names teacher {run_info.get('teacher_id')!r} but "
            f"{vectors} holds vectors of {held!r}; re-export the run (vlmrec train) instead of mixing files"
        )


def check_pair(export: Path, run: str, run_info: dict, model_cfg: ModelConfig, version) -> None:
    """An export and the index version it is served with (an open Index, or a VersionInfo with the same
    fields: an Edge folder's CURRENT, what a server alias names) agree: the same teacher, dimension and
    distance."""
    if version.teacher_id != run_info.get("teacher_id"):
        raise ValueError(
            f"teacher mismatch: the export {export} was trained on {run_info.get('teacher_id')!r} but "
            f"the index version {version.version} holds {version.teacher_id!r} vectors; build the index "
            f"from this export (vlmrec index build --vectors {export / 'item_vectors.parquet'})"
        )
    if version.dim != model_cfg.out_dim:
        raise ValueError(f"dimension mismatch: model out_dim {model_cfg.out_dim}, index dim {version.dim}")
    want = "dot" if model_cfg.item_space == "id" else "cosine"
    if version.distance != want:
        raise ValueError(
            f"distance mismatch: the {model_cfg.item_space}-space export {export} needs a {want} index, "
            f"version {version.version} is {version.distance}; rebuild it (vlmrec index build --run {run})"
        )


def train_command(cfg: ProducerConfig, run: str) -> str:
    return f"vlmrec train --workdir {cfg.workspace.root} --name {run}"


def load_model(export: Path, command: str) -> SeqRec:
    """The export's model. ValueError naming its folder (and `command`, which makes it) when it does not
    load: a truncated or corrupt weights file, tensors that do not fit its config, a config not JSON."""
    from safetensors import SafetensorError

    folder = export / "model"
    try:
        return SeqRec.from_pretrained(folder)
    except (SafetensorError, RuntimeError, ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"the model at {folder} does not load ({type(exc).__name__}: {first}): run `{command}`"
        ) from exc


def server_version(cfg: ProducerConfig, name: str | None) -> VersionInfo:
    """The version a server alias names now (the student's cfg.index_alias, else items_<name>), read and
    the client closed. ValueError naming the url when no Qdrant server answers there."""
    from qdrant_client.http.exceptions import ApiException
    from urllib3.exceptions import LocationValueError

    try:
        index = _open(cfg, Path(), name)
    except (ApiException, LocationValueError) as exc:
        raise ValueError(
            f"no Qdrant server answers at {cfg.index_url} (--index-url, or QDRANT_URL): {exc}"
        ) from exc
    try:
        return index.info
    finally:
        index.close()


def load_model_source(name: str, run: str, export: Path, index: Index, cfg: ProducerConfig) -> ModelSource:
    """A SeqRec export + an open index, checked against each other. Closes nothing: the caller owns index."""
    run_info = json.loads((export / "run.json").read_text())
    check_export_teacher(export, run_info)
    model = load_model(export, train_command(cfg, run)).serving()
    check_pair(export, run, run_info, model.cfg, index)
    digest = hashlib.sha256((export / "model" / WEIGHTS_FILE).read_bytes()).hexdigest()
    fallback = read_popular(export, cfg.workspace.items, export / "item_vectors.parquet")
    return ModelSource(name, model, index, f"{run}@{digest[:12]}", fallback, VectorCache(cfg.vector_cache))


def popular_ranking(events: Path, half_life_days: float, until=None) -> list[dict]:
    """Every item of the events table by recency-weighted popularity (training/popular.py's popular_items, the same
    weighting the exports' popular.json use), events at or after `until` left out."""
    from training.popular import popular_items

    table = pq.read_table(events, columns=["item_id", "event_timestamp"]).to_pandas()
    if until is not None:
        table = table[table["event_timestamp"] < until]
    if table.empty:
        return []
    return popular_items(table, table["item_id"].nunique(), half_life_days)


def load_popular(cfg: ProducerConfig) -> PopularSource:
    ws = cfg.workspace
    rows = popular_ranking(ws.events, cfg.popular_half_life_days, cfg.popular_until_ts)
    h = hashlib.sha256(ws.events.read_bytes())
    h.update(f"{cfg.popular_half_life_days}|{cfg.popular_until}".encode())
    return PopularSource(with_metadata(rows, ws.items, None), f"popular@{h.hexdigest()[:12]}")


def read_mix_weights(path: Path) -> dict[str, float] | None:
    """The default weights `vlmrec tune-mix` chose on validation (<workdir>/mix.json), None when absent.
    A file that is not such weights is an error naming it (a replica must not serve a guessed blend)."""
    if not path.exists():
        return None
    try:
        weights = json.loads(path.read_text())["weights"]
        clean = {str(p): float(w) for p, w in weights.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path}: not a mix file with 'weights' ({exc!r}); re-run `vlmrec tune-mix`"
        ) from None
    unknown = sorted(set(clean) - set(PRODUCERS))
    if unknown or not all(math.isfinite(w) and w >= 0 for w in clean.values()) or sum(clean.values()) <= 0:
        raise ValueError(f"{path}: weights must be >= 0 over {PRODUCERS}, not all 0; got {weights}")
    return clean


def _require(path: Path, what: str, command: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}: run `{command}`")


@dataclass(frozen=True)
class _ModelRun:
    """Where a model producer's export and index are: student, sasrec, or an experiment arm's run."""

    producer: str  # student / sasrec
    run: str
    export: Path
    folder: Path  # the Edge index folder
    index_name: str | None  # the server index's name (None: the run's default alias)

    def files(self, cfg: ProducerConfig) -> list[tuple[Path, str, str]]:
        """(path, what, the command that builds it) of each file loading needs."""
        ws = cfg.workspace
        train = train_command(cfg, self.run)
        build = f"vlmrec index build --workdir {ws.root}" + (f" --run {self.run}" if self.index_name else "")
        out = [
            (self.export / "run.json", f"{self.producer} export", train),
            (self.export / "model" / CONFIG_FILE, f"{self.producer} model", train),
            (self.export / "model" / WEIGHTS_FILE, f"{self.producer} model weights", train),
        ]
        if cfg.index_backend == "edge":
            out.append((self.folder / "CURRENT", f"{self.producer} index", build))
        return out

    def check(self, cfg: ProducerConfig) -> None:
        """Its files found: the model loads, and it and the index's current version (Edge: the folder's
        CURRENT; a server: what its alias names) agree, as load_model_source checks them in the replica."""
        run_info = json.loads((self.export / "run.json").read_text())
        check_export_teacher(self.export, run_info)
        model = load_model(self.export, train_command(cfg, self.run))
        if cfg.index_backend == "edge":
            version = read_current(self.folder)
        else:
            version = server_version(cfg, self.index_name)
        check_pair(self.export, self.run, run_info, model.cfg, version)


def _model_runs(cfg: ProducerConfig, experiment: Experiment | None) -> dict[str, _ModelRun]:
    """Every model producer's run, by its State.sources key."""
    ws = cfg.workspace
    runs = {
        "student": _ModelRun("student", cfg.run, cfg.export_dir, cfg.index_path, None),
        "sasrec": _ModelRun(
            "sasrec", cfg.sasrec_run, cfg.sasrec_export_dir, cfg.sasrec_index_path, cfg.sasrec_run
        ),
    }
    for arm in experiment.arms if experiment else ():  # another run of student / sasrec, its own index
        if arm.run is not None:
            runs[arm.key] = _ModelRun(
                arm.producer, arm.run, ws.runs / arm.run / "export", ws.named_index(arm.run), arm.run
            )
    return runs


def _files(cfg: ProducerConfig, key: str, runs: dict[str, _ModelRun]) -> list[tuple[Path, str, str]]:
    """(path, what, the command that builds it) of each file the producer `key` needs."""
    ws = cfg.workspace
    if key in runs:
        return runs[key].files(cfg)
    if key == "similar" and cfg.index_backend == "edge":
        build = f"vlmrec index build --workdir {ws.root} --teacher"
        return [(cfg.similar_index_path / "CURRENT", "teacher index", build)]
    if key == "popular":
        return [(ws.events, "events table", f"vlmrec ingest --workdir {ws.root}")]
    return []


def check_sources(cfg: ProducerConfig) -> None:
    """Every file the producers that must load (the default one, a producer experiment's arms) need is
    there (else FileNotFoundError naming it and the command that builds it), each model loads and agrees
    with its index, and a server answers (else ValueError): what `vlmrec serve` checks before it deploys, so
    a wrong workdir, run, file or index is its error line, not a replica's failure in Serve's logs."""
    experiment = Experiment.from_dict(cfg.experiment) if cfg.experiment else None
    runs = _model_runs(cfg, experiment)
    for key in default_traffic_keys(cfg.producer, experiment):
        for path, what, command in _files(cfg, key, runs):
            _require(path, what, command)
        if key in runs:
            runs[key].check(cfg)
        elif key == "similar" and cfg.index_backend == "server":
            server_version(cfg, "teacher")


def load_sources(cfg: ProducerConfig) -> tuple[dict[str, Source], dict[str, str]]:
    """Load every producer. -> ({name: source}, {name: why it is missing}). The default producer
    (cfg.producer) must load: its error is raised (a bad config); a sibling's is recorded."""
    sources, missing = {}, {}
    opened: list[Index] = []
    experiment = Experiment.from_dict(cfg.experiment) if cfg.experiment else None
    runs = _model_runs(cfg, experiment)

    def model(key: str) -> ModelSource:
        r = runs[key]
        index = _open(cfg, r.folder, r.index_name)
        opened.append(index)
        return load_model_source(r.producer, r.run, r.export, index, cfg)

    def similar() -> SimilarSource:
        index = _open(cfg, cfg.similar_index_path, "teacher")
        opened.append(index)
        popular = sources.get("popular")
        return SimilarSource(index, cfg.similar_last_n, popular.items if popular else [])

    loaders = {
        "popular": lambda: load_popular(cfg),  # first: similar falls back to its ranking
        "student": lambda: model("student"),
        "sasrec": lambda: model("sasrec"),
        "similar": similar,
    }
    assert set(loaders) == set(PRODUCERS)
    loaders |= {key: lambda key=key: model(key) for key in runs if key not in loaders}  # experiment arms
    required = set(default_traffic_keys(cfg.producer, experiment))  # these must load
    try:
        for name, load in loaders.items():
            n_open = len(opened)
            try:
                for path, what, command in _files(cfg, name, runs):
                    _require(path, what, command)
                source = load()
                source.warm_up()
                sources[name] = source
            except Exception as exc:
                for index in opened[n_open:]:
                    index.close()
                del opened[n_open:]
                if name in required:
                    raise
                # our own messages say what is missing and the command that builds it; anything else
                # (a corrupt file, a library error) is named by type only: the replica log has the rest
                why = str(exc) if isinstance(exc, (FileNotFoundError, ValueError)) else type(exc).__name__
                missing[name] = f"{name} is not available: {why}"
                log.warning("producer %s not loaded: %s", name, exc)
    except BaseException:
        for index in opened:
            index.close()
        raise
    return sources, missing
