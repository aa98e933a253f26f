"""The producers one Producer deployment serves and how each ranks, apart from Ray Serve (how they are
found, checked and loaded: serving/loading.py).

    student  the distilled SeqRec export (runs/<run>/export) + its index (<workdir>/index, cosine)
    sasrec   the behavioural SASRec export (an id-space run, runs/<sasrec_run>/export) + its own
             dot-product index (indexes/<sasrec_run>): id embeddings are scored by the dot product
    similar  teacher nearest neighbours of the user's last N distinct clicks, in an index of the RAW teacher
             vectors (indexes/teacher, built from data/item_embeddings.parquet). Not the student's index:
             its default item space (adapter) is learned, so its neighbours are not the teacher's; a
             teacher index also holds every embedded item (cold ones too) and does not move when a student
             is retrained. Score of an item: its best cosine to any of those clicks.
    popular  recency-weighted popularity of the events table (data/events.parquet; weight 0.5 ** (age /
             half life), age from the newest event counted), filtered per request (category, available)

All four answer the same request with the same response (serving/producer.py). Fallbacks: student / sasrec
fall back to their export's popular.json, similar to the `popular` ranking.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from index.search import Hit, Index
from serving.asks import Ask, Ranked
from serving.calls import Deps, Unavailable, ms_since
from serving.config import ProducerConfig
from serving.vector_cache import VectorCache
from training.data import ItemTable, ModelInputs, build_inputs, trim_padding
from training.item_age import bucket_ranges
from training.model import SeqRec


class PopularItem(NamedTuple):
    item_id: int
    score: float
    category: str | None
    available: bool


def popular_candidates(
    popular: Sequence[PopularItem], k: int, exclude: set[int], filters: dict | None
) -> list[tuple[int, float]]:
    """The first k popular items not excluded that match the filters (as the index would: category any-of,
    available equal; an item without a category never matches a category filter)."""
    filters = filters or {}
    cat = filters.get("category")
    cats = None if cat is None else ({cat} if isinstance(cat, str) else set(cat))
    avail = filters.get("available")
    out = []
    for p in popular:
        if p.item_id in exclude or (cats is not None and p.category not in cats):
            continue
        if avail is not None and p.available != avail:
            continue
        out.append((p.item_id, p.score))
        if len(out) == k:
            break
    return out


def popular_row(popular: Sequence[PopularItem], ask: Ask, i: int, fallback: str | None) -> Ranked:
    """Row i of a call answered from a popular ranking (its k, seen items and filters), marked `fallback`."""
    return Ranked(popular_candidates(popular, ask.ks[i], ask.seen[i], ask.filters[i]), fallback)


# ---------------------------------------------------------------------------------------------- sources


@dataclass(eq=False)
class ModelSource:
    """student or sasrec: a SeqRec export (its own config rebuilds it) and the index of its item space."""

    name: str
    model: SeqRec
    index: Index
    model_version: str  # <run>@<12 hex of the weights>
    fallback: list[PopularItem]  # the export's popular.json
    cache: VectorCache = field(default_factory=lambda: VectorCache(0))  # user vectors by model input
    vocab: ItemTable = field(init=False)
    max_len: int = field(init=False)
    _live: tuple[tuple, frozenset[int], bool] | None = field(default=None, init=False)  # live_buckets' count

    def __post_init__(self) -> None:
        self.vocab = ItemTable(self.model.item_ids[1:].cpu().numpy())
        self.max_len = self.model.cfg.max_len

    def user_vectors(self, ids: np.ndarray) -> np.ndarray:
        """(B, max_len) model input -> (B, D) user vectors: a row seen before (the same clicks, the same
        model) from `cache`, the others by the model (`forward`)."""
        return self.cache.vectors(ids, self.forward)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """(B, max_len) model input -> (B, D) user vectors by the model. Left padding is trimmed (the model's
        output does not depend on it): rows go in groups of similar length (`length_groups`), each as wide
        as its longest, so one long history does not make a batch of short ones pay its width."""
        out = np.empty((len(ids), self.model.cfg.out_dim), np.float32)
        with torch.inference_mode():
            for rows in length_groups((ids > 0).sum(1)):
                (group,) = trim_padding(ids[rows])
                out[rows] = self.model.user_vector(torch.as_tensor(group)).float().numpy()
        return out

    @property
    def item_age(self) -> bool:
        return self.model.cfg.item_age

    def age_queries(self, request_days: float) -> list[tuple[float, dict[str, float] | None]]:
        """Item-age models: one (score added, created_at range in epoch seconds) per age bucket at the
        request time that holds any item (`live_buckets`; the range None when one bucket holds every
        item). A search per bucket, each hit's score plus its bucket's, merged (`merge_age`), is the exact
        top-k of the model's own scores (user . item + age score; training.item_age)."""
        bias = self.model.age_bias.detach().cpu().numpy()
        live, whole = self.live_buckets(request_days)
        return [
            (float(bias[b]), None if whole else _seconds(rng))
            for b, rng in sorted(bucket_ranges(request_days).items())
            if live is None or b in live
        ]

    def live_buckets(self, request_days: float) -> tuple[frozenset[int] | None, bool]:
        """The age buckets any indexed item falls in at some time of the request's minute, and whether one
        bucket holds them all; counted once a minute and again whenever the index changes
        (`Index.changes`). (None, False): search every bucket, the index cannot tell. A bucket is counted
        over the union of its ranges across the minute, so one called empty is empty at every time of it,
        and a lone live bucket that counts every point holds each of them all minute."""
        changes = self.index.changes
        if changes is None:
            return None, False
        minute = math.floor(request_days * MINUTES_PER_DAY)
        key = (changes, minute)
        cached = self._live
        if cached is None or cached[0] != key:
            start, end = (
                bucket_ranges(minute / MINUTES_PER_DAY),
                bucket_ranges((minute + 1) / MINUTES_PER_DAY),
            )
            counts = {
                b: self.index.count({"created_at": _seconds(_lower(start[b]) | _upper(end[b]))})
                for b in start
            }
            live = frozenset(b for b, n in counts.items() if n > 0)
            whole = len(live) == 1 and counts[next(iter(live))] == self.index.count()
            self._live = cached = (key, live, whole)
        return cached[1], cached[2]

    @staticmethod
    def merge_age(hits: Sequence[Sequence[Hit]], biases: Sequence[float], k: int) -> list[Hit]:
        """One hit list per age bucket (disjoint items) -> the k best by score + the bucket's score."""
        scored = [(item, s + b) for result, b in zip(hits, biases, strict=True) for item, s in result]
        return sorted(scored, key=lambda h: -h[1])[:k]

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        excludes: Sequence[Sequence[int]],
        filters: Sequence[dict | None],
        request_days: float,
    ) -> list[list[Hit]]:
        """The model's top k per user vector (B, D), as the Producer serves it: one batched index search;
        for an item-age model one search per (user, age bucket) with a created_at range, merged."""
        if not self.item_age:
            return self.index.search_batch(vectors, k, excludes, filters)
        buckets = self.age_queries(request_days)
        n = len(buckets)
        found = self.index.search_batch(
            np.repeat(vectors, n, axis=0),
            k,
            [e for e in excludes for _ in buckets],
            [f if rng is None else {**(f or {}), "created_at": rng} for f in filters for _, rng in buckets],
        )
        biases = [b for b, _ in buckets]
        return [self.merge_age(found[r * n : (r + 1) * n], biases, k) for r in range(len(vectors))]

    def inputs(self, ask: Ask, rows: Sequence[int]) -> ModelInputs:
        """The model input of `rows`: training's `build_inputs` over each row's clicks (stored + recent)."""
        return build_inputs([ask.seqs[i] for i in rows], self.vocab, self.max_len)

    async def rank(
        self, deps: Deps, cfg: ProducerConfig, ask: Ask, rows: Sequence[int]
    ) -> dict[int, Ranked | Unavailable]:
        """One forward for every personalised row, one batched search; the others fall back."""
        inputs = self.inputs(ask, rows)
        out: dict[int, Ranked | Unavailable] = {}
        personal: list[int] = []  # positions in rows
        for j, i in enumerate(rows):
            recent = np.asarray(ask.recents[i], np.int64)
            unknown_recent = [int(x) for x in recent[self.vocab.index_of(recent) == 0]]
            if unknown_recent:
                ask.warnings[i].append(
                    f"recent_item_ids: {len(unknown_recent)} ids unknown to the model were ignored: "
                    f"{unknown_recent[:20]}"
                )
            n_stored_unknown = int(inputs.n_unknown[j]) - len(unknown_recent)
            if n_stored_unknown > 0:
                ask.warnings[i].append(f"{n_stored_unknown} stored clicks unknown to the model were ignored")
            fallback = ask.fallback(i, bool(inputs.ids[j].any()))
            if fallback is None:
                personal.append(j)
            else:
                out[i] = popular_row(self.fallback, ask, i, fallback)
        if not personal:
            return out
        vectors, model_ms = await deps.forward(self.name, self.user_vectors, inputs.ids[personal])
        chosen = [rows[j] for j in personal]
        t0 = time.perf_counter()
        try:
            found = await deps.search(
                self.name,
                self.search,
                vectors,
                max(ask.ks[i] for i in chosen),
                [sorted(ask.seen[i]) for i in chosen],
                [ask.filters[i] for i in chosen],
                cfg.scoring_days(),
                timeout=cfg.search_timeout_s,
            )
        except Unavailable as exc:
            return out | dict.fromkeys(chosen, exc)
        search_ms = ms_since(t0)
        for n, i in enumerate(chosen):
            out[i] = Ranked(found[n][: ask.ks[i]], None, model_ms, search_ms)
        return out

    def warm_up(self) -> None:
        self.forward(np.zeros((1, self.max_len), np.int64))
        self.index.search_batch(np.eye(1, self.index.dim, dtype=np.float32), 1)

    def close(self) -> None:
        self.index.close()


MINUTES_PER_DAY = 1440


def _seconds(days_range: dict[str, float]) -> dict[str, float]:
    """A created_at range in training.item_age days -> the index payload's epoch seconds."""
    return {op: v * 86400.0 for op, v in days_range.items()}


def _lower(rng: dict[str, float]) -> dict[str, float]:
    return {op: v for op, v in rng.items() if op in ("gt", "gte")}


def _upper(rng: dict[str, float]) -> dict[str, float]:
    return {op: v for op, v in rng.items() if op in ("lt", "lte")}


def length_groups(lengths: np.ndarray, ratio: float = 1.5, floor: int = 16) -> list[np.ndarray]:
    """Row indices grouped by sequence length: sorted, a new group when a length passes `ratio` x the
    group's shortest (lengths up to `floor` are one group). Attention costs a row the square of its group's
    width, so similar lengths together cost little more than each alone, and groups stay few."""
    order = np.argsort(lengths, kind="stable")
    groups: list[list[int]] = []
    start = None
    for i in order:
        n = int(lengths[i])
        if start is None or n > max(start * ratio, floor):
            groups.append([])
            start = n
        groups[-1].append(int(i))
    return [np.asarray(g) for g in groups]


def last_distinct(sequence: Sequence[int], n: int) -> list[int]:
    """The last `n` distinct item ids of a click sequence (oldest first in), most recent first."""
    out: list[int] = []
    for item in reversed(sequence):
        if int(item) not in out:
            out.append(int(item))
            if len(out) == n:
                break
    return out


@dataclass(eq=False)
class SimilarSource:
    """Teacher nearest neighbours of the last `last_n` distinct clicks (an index of raw teacher vectors)."""

    index: Index
    last_n: int
    fallback: list[PopularItem]  # the `popular` ranking (empty when that is missing too)
    name: str = "similar"

    @property
    def model_version(self) -> str:
        return f"teacher:{self.index.teacher_id}"

    def last_clicks(self, sequence: Sequence[int]) -> list[int]:
        return last_distinct(sequence, self.last_n)

    async def rank(
        self, deps: Deps, cfg: ProducerConfig, ask: Ask, rows: Sequence[int]
    ) -> dict[int, Ranked | Unavailable]:
        """The teacher vectors of each row's last N distinct clicks (one lookup), then one recommend query per
        row (best-score strategy: each item scored by its best cosine to one of the clicks), all in one batch;
        rows without a known click fall back."""
        out: dict[int, Ranked | Unavailable] = {}
        clicks = {i: self.last_clicks(ask.seqs[i]) if ask.stored is not None else [] for i in rows}
        wanted = sorted({c for i in rows for c in clicks[i]})
        t0 = time.perf_counter()
        vectors: dict[int, np.ndarray] = {}
        if wanted:
            try:
                vectors = await deps.search(
                    self.name, self.index.get_vectors, wanted, timeout=cfg.search_timeout_s
                )
            except Unavailable as exc:  # rows with clicks need the index; the others fall back as always
                return {
                    i: exc if clicks[i] else popular_row(self.fallback, ask, i, ask.fallback(i, False))
                    for i in rows
                }
        known: dict[int, list[int]] = {}  # personalised rows -> their clicks in the index
        for i in rows:
            mine = [c for c in clicks[i] if c in vectors]
            unknown = [c for c in clicks[i] if c not in vectors]
            if unknown:
                ask.warnings[i].append(
                    f"{len(unknown)} of the last {len(clicks[i])} clicks are not in the teacher index: "
                    f"{unknown[:20]}"
                )
            fallback = ask.fallback(i, bool(mine))
            if fallback is None:
                known[i] = mine
            else:
                out[i] = popular_row(self.fallback, ask, i, fallback)
        if not known:
            return out
        chosen = list(known)
        try:
            found = await deps.search(
                self.name,
                self.index.recommend_batch,
                [np.stack([vectors[c] for c in known[i]]) for i in chosen],  # (m_i, D) each
                max(ask.ks[i] for i in chosen),
                [sorted(ask.seen[i]) for i in chosen],
                [ask.filters[i] for i in chosen],
                timeout=cfg.search_timeout_s,
            )
        except Unavailable as exc:
            return out | dict.fromkeys(chosen, exc)
        search_ms = ms_since(t0)
        for n, i in enumerate(chosen):
            out[i] = Ranked(found[n][: ask.ks[i]], None, 0.0, search_ms)
        return out

    def warm_up(self) -> None:
        self.index.search_batch(np.eye(1, self.index.dim, dtype=np.float32), 1)

    def close(self) -> None:
        self.index.close()


@dataclass(eq=False)
class PopularSource:
    """Recency-weighted popularity of the events table, computed at load (reconfigure reloads it)."""

    items: list[PopularItem]
    model_version: str  # popular@<12 hex of the events file, half-life and cut>
    name: str = "popular"
    index: None = None

    async def rank(
        self, deps: Deps, cfg: ProducerConfig, ask: Ask, rows: Sequence[int]
    ) -> dict[int, Ranked | Unavailable]:
        """The ranking itself, filtered; personal only in what it excludes (seen items)."""
        fallback = "feature_store_unavailable" if ask.stored is None else None
        return {i: popular_row(self.items, ask, i, fallback) for i in rows}

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


Source = ModelSource | SimilarSource | PopularSource
