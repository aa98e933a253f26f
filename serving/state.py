"""What one Producer config loads: every producer's source, the feature store, the catalogue's ids, the Mixer's
default weights. Loaded whole, then swapped in (vlmrec/lease.py): requests keep the state they started with.

    current = Current(load_state(ProducerConfig(workdir="W")), State.close, "model")
    with current.use() as s: s.sources["student"], s.store, s.known_item(42)
    await readiness(s, deps)                     # /readyz's body and whether it is ready
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq

from index.search import Index
from serving.calls import Deps, describe
from serving.config import ProducerConfig
from serving.experiments import Arm, Experiment, default_traffic_keys
from serving.loading import load_sources, read_mix_weights
from serving.online import open_online, read_sequences
from serving.sources import ModelSource, Source

log = logging.getLogger("ray.serve")

DEFAULT_SEQUENCE_LEN = 50  # N of /v1/events when no model is loaded to say (ingest's default --max-len)


class State:
    """Every producer's source (and why the missing ones are), the feature store, known item ids."""

    def __init__(
        self, config: ProducerConfig, sources: dict[str, Source], missing: dict[str, str], store
    ) -> None:
        ws = config.workspace
        self.config, self.sources, self.missing, self.store = config, sources, missing, store
        self.models = [s for s in sources.values() if isinstance(s, ModelSource)]
        # N of /v1/events: the longest input a loaded model reads (each model keeps its own last max_len)
        self.sequence_len = config.sequence_len or max(
            (m.max_len for m in self.models), default=DEFAULT_SEQUENCE_LEN
        )
        catalogue = (
            pq.read_table(ws.items, columns=["item_id"]).column(0).to_numpy()
            if ws.items.exists()
            else np.zeros(0, np.int64)
        )
        self.catalogue_ids = np.unique(catalogue.astype(np.int64))  # sorted: known ids for /v1/events
        self.mix_weights = read_mix_weights(config.mix_path)  # /v1/mix's default blend (None: equal)
        self.experiment = Experiment.from_dict(config.experiment) if config.experiment else None

    def route(self, request) -> tuple[str, str | None]:
        """(the sources key that answers a request, its experiment arm): a request naming its producer
        gets that producer, outside any experiment; the others are the experiment's (their user's arm)
        or the deployment's default producer's."""
        if request.producer is not None:
            return request.producer, None
        if self.experiment is None or self.experiment.kind != "candidates":
            return self.config.producer, None
        arm = self.experiment.assign(int(request.user_id))
        return arm.key, arm.name

    def mix_arm(self, request) -> Arm | None:
        """A Mixer experiment's arm for a /v1/mix request that gives neither quotas nor weights (its weights
        are the default blend); None otherwise."""
        if self.experiment is None or self.experiment.kind != "mix" or request.quotas or request.weights:
            return None
        return self.experiment.assign(int(request.user_id))

    @property
    def default(self) -> Source:
        return self.sources[self.config.producer]

    def indexes(self) -> list[Index]:
        return [s.index for s in self.sources.values() if s.index is not None]

    def known_item(self, item_id: int) -> bool:
        """In the catalogue or a model vocabulary (items added to an index later: see serving/events.py)."""
        if any(m.vocab.index_of([item_id])[0] > 0 for m in self.models):
            return True
        pos = np.searchsorted(self.catalogue_ids, item_id)
        return bool(pos < len(self.catalogue_ids) and self.catalogue_ids[pos] == item_id)

    def warm_up(self) -> None:
        """One online read before serving (the sources warmed up when loaded): the first request is not
        the one that pays for Feast's registry load. A feature store that is down now only logs (requests
        fall back until it answers)."""
        try:
            read_sequences(self.store, [0])
        except Exception as exc:
            log.warning("feature store not readable at load: %r", exc)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def load_state(config: ProducerConfig) -> State:
    """Load every producer (serving/loading.py: the default one must load, siblings may be missing), open
    the feature store. Refuses a model index built from another teacher's vectors, of another dimension,
    or with the wrong distance."""
    sources, missing = load_sources(config)
    try:
        state = State(config, sources, missing, open_online(config.workspace))
        state.warm_up()
        return state
    except BaseException:
        for source in sources.values():
            source.close()
        raise


async def readiness(s: State, deps: Deps) -> dict:
    """/readyz: each producer's readiness (its index answers a 1-NN probe within search_timeout_s), and the
    replica's: the default producer ready and the feature store readable (`reasons` empty)."""
    cfg = s.config
    producers = {name: {"ready": False, "reason": why} for name, why in s.missing.items()}
    for name, source in s.sources.items():
        reason = None
        if source.index is not None:
            probe = np.eye(1, source.index.dim, dtype=np.float32)  # (1, D)
            try:
                await deps.call("search", source.index.search_batch, probe, 1, timeout=cfg.search_timeout_s)
            except Exception as exc:
                reason = f"index: {describe(exc)}"
        producers[name] = {
            "ready": reason is None,
            "model_version": source.model_version,
            "index_version": None if source.index is None else source.index.version,
            "reason": reason,
        }
        cache = getattr(source, "cache", None)
        if cache is not None:  # a model producer's user vectors kept by input: how often they were reused
            producers[name]["vector_cache"] = {
                "entries": len(cache),
                "hits": cache.hits,
                "misses": cache.misses,
            }
    # the default producer, and every arm of an experiment (default traffic goes to them), must answer
    serving = default_traffic_keys(cfg.producer, s.experiment)
    reasons = [
        why if name == cfg.producer else f"{name}: {why}"  # an arm's reason names it
        for name in serving
        if (why := producers[name]["reason"])
    ]
    try:
        await deps.call("features", read_sequences, s.store, [0], timeout=cfg.feature_timeout_s)
    except Exception as exc:
        reasons.append(f"feature store: {describe(exc)}")
    default = producers[cfg.producer]
    return {
        "ready": not reasons,
        "producer": cfg.producer,
        "model_version": default.get("model_version"),
        "index_version": default.get("index_version"),
        "reasons": reasons,
        "producers": {n: producers[n] for n in sorted(producers)},
    }
