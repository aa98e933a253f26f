"""Evaluation math: ranks, HR/NDCG/MRR with per-event and per-user averages and a bootstrap interval, the
sampled protocol of the SASRec paper, and the two splits (leave-one-out, temporal).

Ranks are 0-based. Ties are PESSIMISTIC: rank = number of non-excluded other candidates whose score is not
strictly below the target's (greater, equal, or NaN). A constant or broken scorer therefore gets the worst
rank, never the best, and the target's column position does not matter (the pmixer #43 trap, where a
double argsort silently assumed the target at index 0, cannot happen). The target is never excluded.

    ranks = full_ranks(users, items, targets, exclude=histories)      # full catalogue (what serving does)
    metrics_from_ranks(ranks, users=query_users)["micro"]["NDCG@10"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from training.data import user_sequences

KS = (5, 10, 20, 50, 100)


def _exclusion_pairs(exclude, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of excluded cells from a (Q, N) bool mask or per-row column lists."""
    if exclude is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if isinstance(exclude, Tensor | np.ndarray) and np.asarray(exclude).dtype == np.bool_:
        rows, cols = np.nonzero(np.asarray(exclude))
        return rows.astype(np.int64), cols.astype(np.int64)
    if len(exclude) != n_rows:
        raise ValueError(f"exclude has {len(exclude)} rows for {n_rows} queries")
    rows = np.repeat(np.arange(n_rows), [len(e) for e in exclude])
    cols = (
        np.concatenate([np.asarray(e, np.int64).reshape(-1) for e in exclude])
        if len(rows)
        else np.zeros(0, np.int64)
    )
    return rows.astype(np.int64), cols


def rank_of_target(
    scores: Tensor | np.ndarray,
    target: Tensor | np.ndarray | Sequence[int],
    exclude: Tensor | np.ndarray | Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """0-based pessimistic rank of scores[q, target[q]] among row q's non-excluded columns.

    scores (Q, N); target (Q,) column indices; exclude: a (Q, N) bool mask or per-row column lists
    (e.g. the history's items; duplicates fine). The target column is never excluded. -> (Q,) int64
    """
    s = torch.as_tensor(scores).float()
    tgt = torch.as_tensor(np.asarray(target), dtype=torch.long)
    rows = torch.arange(len(s))
    t_score = s[rows, tgt].unsqueeze(1)  # (Q, 1)
    ahead = (
        s.shape[1] - torch.count_nonzero(s < t_score, dim=1) - 1
    )  # not strictly below (NaN too), minus self
    r, c = _exclusion_pairs(exclude, len(s))
    if len(r):
        pairs = np.unique(np.stack([r, c], 1), axis=0)  # (E, 2) each excluded cell once
        pairs = pairs[pairs[:, 1] != tgt.numpy()[pairs[:, 0]]]  # the target is never excluded
        pr, pc = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
        excluded_ahead = ~(s[pr, pc] < t_score[pr, 0])  # (E,) excluded cells that were counted
        ahead = ahead - torch.bincount(pr[excluded_ahead], minlength=len(s))
    return ahead.numpy().astype(np.int64)


def full_ranks(
    user_vectors: Tensor,
    item_vectors: Tensor,
    targets: np.ndarray,
    exclude: Sequence[np.ndarray] | None = None,
    always_exclude: Sequence[int] = (0,),
    chunk: int = 1024,
) -> np.ndarray:
    """Full-catalogue ranks: user_vectors (Q, d) against item_vectors (N, d) by dot product (cosine for
    normalised vectors). targets (Q,) item rows; exclude per-query rows (the history); always_exclude rows
    excluded for everyone (row 0 = padding). -> (Q,) int64"""
    out = []
    always = np.asarray(always_exclude, np.int64)
    for a in range(0, len(user_vectors), chunk):
        with torch.no_grad():
            s = (user_vectors[a : a + chunk] @ item_vectors.T).cpu()  # (q, N)
        ex = (
            [always] * len(s)
            if exclude is None
            else [np.concatenate([always, e]) for e in exclude[a : a + chunk]]
        )
        out.append(rank_of_target(s, targets[a : a + chunk], ex))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def sample_negatives(
    touched: Sequence[np.ndarray], n_items: int, n: int = 100, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The SASRec paper's protocol: per query, n items drawn uniformly without replacement from 1..n_items
    minus the items the user ever touched. -> (Q, n) int64"""
    rng = rng or np.random.default_rng(0)
    out = np.zeros((len(touched), n), np.int64)
    for q, seen in enumerate(touched):
        seen = np.asarray(seen, np.int64)
        if n_items - len(np.unique(seen[(seen >= 1) & (seen <= n_items)])) < n:
            raise ValueError(f"query {q}: fewer than {n} untouched items")
        picked = np.zeros(0, np.int64)
        while len(picked) < n:
            draw = rng.integers(1, n_items + 1, size=2 * n + len(seen))
            draw = draw[~np.isin(draw, seen)]
            both = np.concatenate([picked, draw])
            _, first = np.unique(both, return_index=True)
            picked = both[np.sort(first)]
        out[q] = picked[:n]
    return out


def sampled_candidates(
    targets: np.ndarray,
    touched: Sequence[np.ndarray],
    n_items: int,
    n: int = 100,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(Q, 1 + n) candidate items per query, the target in column 0; rank with rank_of_target(scores, 0s)."""
    return np.concatenate(
        [np.asarray(targets, np.int64)[:, None], sample_negatives(touched, n_items, n, rng)], axis=1
    )


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """(Q,) per-query NDCG@k of 0-based ranks with one target: 1 / log2(rank + 2) inside k, else 0."""
    ranks = np.asarray(ranks, np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def metrics_from_ranks(
    ranks: np.ndarray,
    ks: Sequence[int] = KS,
    users: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """HR@K (= Recall@K with one target), NDCG@K (1 / log2(rank + 2) inside K), MRR (1 / (rank + 1)).

    micro: the mean over queries (events); macro: the mean over users of their own means;
    micro_ci95: 2.5 / 97.5 percentiles of micro over n_bootstrap resamples of USERS (with all their queries).
    users (Q,) is the user of each query (None: every query its own user).
    """
    ranks = np.asarray(ranks, np.float64)
    users = np.arange(len(ranks)) if users is None else np.asarray(users)
    values = {}
    for k in ks:
        values[f"HR@{k}"] = (ranks < k).astype(np.float64)
        values[f"NDCG@{k}"] = ndcg_at(ranks, k)
    values["MRR"] = 1.0 / (ranks + 1.0)
    _, u = np.unique(users, return_inverse=True)
    n_users = int(u.max()) + 1 if len(u) else 0
    count = np.bincount(u, minlength=n_users).astype(np.float64)  # (U,)
    sums = {name: np.bincount(u, weights=v, minlength=n_users) for name, v in values.items()}  # (U,) each
    result = {
        "n_queries": len(ranks),
        "n_users": n_users,
        "micro": {name: float(v.mean()) if len(v) else float("nan") for name, v in values.items()},
        "macro": {name: float((s / count).mean()) if n_users else float("nan") for name, s in sums.items()},
    }
    if n_bootstrap and n_users:
        rng = np.random.default_rng(seed)
        boots = {name: [] for name in values}
        for a in range(0, n_bootstrap, 100):
            w = rng.multinomial(
                n_users, np.full(n_users, 1.0 / n_users), size=min(100, n_bootstrap - a)
            )  # (b, U)
            denom = w @ count
            for name, s in sums.items():
                boots[name].append((w @ s) / denom)
        result["micro_ci95"] = {
            name: [
                float(np.percentile(np.concatenate(b), 2.5)),
                float(np.percentile(np.concatenate(b), 97.5)),
            ]
            for name, b in boots.items()
        }
    return result


@dataclass(frozen=True, eq=False)  # holds arrays: equality is identity
class Queries:
    """Evaluation queries: predict `targets[q]` from `histories[q]` (raw item ids, oldest first)."""

    user_ids: np.ndarray  # (Q,) int64
    histories: list[np.ndarray]  # Q arrays of raw item ids, oldest first, never empty
    targets: np.ndarray  # (Q,) int64 raw item ids
    cold: np.ndarray  # (Q,) bool: the target has no training event
    times: np.ndarray  # (Q,) the target event's timestamp (the request time a Producer would see)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True, eq=False)  # holds arrays: equality is identity
class Split:
    train: pd.DataFrame  # the events models are fit on
    valid: Queries | None
    test: Queries
    n_skipped_empty_history: int  # test events dropped because the user had no earlier event


def _queries(
    users: list[int], histories: list[np.ndarray], targets: list[int], train_items: np.ndarray, times: list
) -> Queries:
    t = np.asarray(targets, np.int64)
    return Queries(np.asarray(users, np.int64), histories, t, ~np.isin(t, train_items), np.asarray(times))


def leave_one_out(events: pd.DataFrame) -> Split:
    """SASRec's split: per user (time order) the last event is the test target, the second-last the
    validation target, the rest is train. Users with fewer than 3 events are all train and never queried."""
    users, seqs = user_sequences(events)
    raw_users, ts = events["user_id"].to_numpy(np.int64), events["event_timestamp"].to_numpy()
    ts = ts[np.lexsort((np.arange(len(ts)), ts, raw_users))]  # user_sequences' order
    times = np.split(ts, np.cumsum([len(s) for s in seqs])[:-1]) if len(seqs) else []
    train_parts, v, t = [], ([], [], [], []), ([], [], [], [])
    for u, s, when in zip(users, seqs, times, strict=True):
        if len(s) < 3:
            train_parts.append((u, s))
            continue
        train_parts.append((u, s[:-2]))
        for part, hist, target, time in ((v, s[:-2], s[-2], when[-2]), (t, s[:-1], s[-1], when[-1])):
            part[0].append(u)
            part[1].append(hist)
            part[2].append(target)
            part[3].append(time)
    train = pd.DataFrame(
        {
            "user_id": np.concatenate([np.full(len(s), u) for u, s in train_parts]).astype(np.int64),
            "item_id": np.concatenate([s for _, s in train_parts]).astype(np.int64),
            "event_timestamp": np.concatenate([np.arange(len(s)) for _, s in train_parts]).astype(np.int64),
        }
    )
    items = train["item_id"].unique()
    return Split(train, _queries(*v[:3], items, v[3]), _queries(*t[:3], items, t[3]), 0)


def temporal_split(events: pd.DataFrame, train_fraction: float = 0.8, cut: int | None = None) -> Split:
    """Global time cut: events sorted by time (ties keep frame order), the first floor(train_fraction * N)
    (or `cut`) are train. Every later event is a test query whose history is ALL the user's earlier events (train and
    earlier test); a query with an empty history is skipped and counted. For validation, split `train`
    again. `train` keeps the frame's columns and order of time."""
    order = np.argsort(events["event_timestamp"].to_numpy(), kind="stable")
    ordered = events.iloc[order].reset_index(drop=True)
    cut = int(np.floor(train_fraction * len(ordered))) if cut is None else cut
    train = ordered.iloc[:cut].reset_index(drop=True)
    users = ordered["user_id"].to_numpy(np.int64)
    items = ordered["item_id"].to_numpy(np.int64)
    by_user = np.lexsort((np.arange(len(users)), users))  # global time order inside each user
    stamps = ordered["event_timestamp"].to_numpy()
    q_users, q_hist, q_targets, q_times, skipped = [], [], [], [], 0
    for idx in np.split(by_user, np.flatnonzero(np.diff(users[by_user])) + 1) if len(users) else []:
        seq = items[idx]
        for k in np.flatnonzero(idx >= cut):
            if k == 0:
                skipped += 1
                continue
            q_users.append(users[idx[k]])
            q_hist.append(seq[:k])
            q_targets.append(seq[k])
            q_times.append(stamps[idx[k]])
    test = _queries(q_users, q_hist, q_targets, train["item_id"].unique(), q_times)
    return Split(train, None, test, skipped)
