"""Row-sparse updates for embedding tables kept out of DeepSpeed: a step touches only the rows its batch
used, so its cost follows the batch, not the catalogue. DeepSpeed's ZeRO has no sparse-gradient path, so
the tables are updated beside it:

    rows = RowSparseAdam([model.id_in, model.id_out], ds)    # the tables' gradients become sparse
    ds_engine = engine.initialize(model, ds, use_gpu, exclude=rows.params)
    ...
    ds_engine.backward(loss)
    rows.step()          # every rank: gather the touched rows, average, clip, lazy AdamW on those rows
    ds_engine.step()

Lazy Adam: a row's moments and weights move only in steps whose batch touched it (bias correction by the
global step, as torch's SparseAdam and TF's LazyAdam); AdamW's decoupled weight decay likewise. The tables'
gradient is clipped on its own norm at the DeepSpeed JSON's `gradient_clipping` (the dense parameters' norm
is DeepSpeed's). The moments are sharded like ZeRO-1's: rank r of w keeps those of rows r, r + w, r + 2w,
..., steps those rows, and hands their new weights to the other ranks. Weights travel in DeepSpeed's
checkpoint (the module's state dict); each rank's moments in `state_dict()`, which `engine.report` /
`engine.resume` store beside it (a resume on another number of ranks re-shards them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class RowSparseAdam:
    """Lazy AdamW over embedding tables, with the touched rows' gradients averaged across ranks and the
    moments sharded across them by row."""

    def __init__(self, tables: Sequence[nn.Embedding], ds: dict) -> None:
        if ds.get("bf16", {}).get("enabled"):
            raise ValueError("row-sparse tables are updated in fp32: bf16 would cast them (use dense tables)")
        opt = ds["optimizer"]["params"]
        for table in tables:
            table.sparse = True  # backward now yields the touched rows only
        self.params = [t.weight for t in tables]
        self.lr, self.weight_decay = float(opt["lr"]), float(opt.get("weight_decay", 0.0))
        self.betas = tuple(float(b) for b in opt.get("betas", (0.9, 0.999)))
        self.eps = float(opt.get("eps", 1e-8))
        self.max_norm = float(ds.get("gradient_clipping", 0.0))
        self.steps = 0
        self._moments: list[tuple[Tensor, Tensor]] | None = None  # own rows' (m, v), at first use

    @property
    def rank_world(self) -> tuple[int, int]:
        return _rank_world()

    def moments(self) -> list[tuple[Tensor, Tensor]]:
        """Per table, the first and second moments of the rows this rank owns: (rows owned, d) each."""
        if self._moments is None:
            rank, world = self.rank_world
            shapes = [(len(range(rank, len(p), world)), *p.shape[1:]) for p in self.params]
            self._moments = [
                (p.new_zeros(s), p.new_zeros(s)) for p, s in zip(self.params, shapes, strict=True)
            ]
        return self._moments

    @torch.no_grad()
    def step(self) -> None:
        """Average the tables' sparse gradients across ranks, clip, then every rank decays and Adam-steps the
        touched rows it owns and shares their new weights; the gradients are dropped. Every rank calls it
        once per step (it is a collective)."""
        # a table this rank's batch did not reach still joins the exchange, with no rows
        grads = [all_reduce_rows(_rows_of(p)) for p in self.params]
        scale = 1.0
        if self.max_norm > 0:
            norm = float(torch.sqrt(sum((g.values() ** 2).sum() for g in grads)))
            scale = min(1.0, self.max_norm / (norm + 1e-6))  # DeepSpeed's clip_coef
        self.steps += 1
        (beta1, beta2), rank, world = self.betas, *self.rank_world
        step_size = self.lr * math.sqrt(1 - beta2**self.steps) / (1 - beta1**self.steps)
        for p, g, (m, v) in zip(self.params, grads, self.moments(), strict=True):
            p.grad = None
            rows, values = g.indices()[0], g.values()
            owner = rows % world
            mine = owner == rank
            r, grad = rows[mine], values[mine] * scale  # scale 1.0: exact
            local = r // world
            weights = p[r]
            if self.weight_decay:
                weights *= 1.0 - self.lr * self.weight_decay
            m_new = m[local] + (grad - m[local]) * (1 - beta1)  # SparseAdam's arithmetic
            v_new = v[local] + (grad * grad - v[local]) * (1 - beta2)
            m[local], v[local] = m_new, v_new
            p[r] = weights - step_size * (m_new / (v_new.sqrt() + self.eps))
            if world > 1:
                _share_rows(p, rows, owner, rank, world)

    def state_dict(self) -> dict:
        """This rank's moments (the rows it owns) and the step count."""
        rank, world = self.rank_world
        return {"steps": self.steps, "rank": rank, "world": world, "moments": self.moments()}

    def load_state_dicts(self, shards: Iterable[dict]) -> None:
        """Restore from saved ranks' `state_dict()`s (any number of ranks): each shard's rows that this rank
        owns now. Shards are read one at a time (an iterator of loads keeps one in memory)."""
        rank, world = self.rank_world
        for shard in shards:
            self.steps = int(shard["steps"])
            for p, (m, v), (sm, sv) in zip(self.params, self.moments(), shard["moments"], strict=True):
                rows = torch.arange(shard["rank"], len(p), shard["world"], device=p.device)
                mine = rows % world == rank
                m[rows[mine] // world], v[rows[mine] // world] = sm[mine], sv[mine]


def _share_rows(p: Tensor, rows: Tensor, owner: Tensor, rank: int, world: int) -> None:
    """Every rank has stepped the touched rows it owns (`rows`, the same list on every rank): gather each
    owner's new weights into every rank's table."""
    counts = torch.bincount(owner, minlength=world).tolist()
    width = max(counts)
    mine = p[rows[owner == rank]]
    parts = [p.new_empty((width, *p.shape[1:])) for _ in range(world)]
    dist.all_gather(parts, torch.cat([mine, mine.new_zeros((width - len(mine), *p.shape[1:]))]))
    for j in range(world):
        if j != rank:
            p[rows[owner == j]] = parts[j][: counts[j]]


def _rank_world() -> tuple[int, int]:
    """(this rank, ranks) of the process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rows_of(p: Tensor) -> Tensor:
    """p's sparse gradient, or one with no rows when backward did not reach p."""
    if p.grad is not None:
        return p.grad
    no_rows = torch.zeros((1, 0), dtype=torch.long, device=p.device)
    return torch.sparse_coo_tensor(no_rows, p.new_zeros((0, *p.shape[1:])), p.shape)


def all_reduce_rows(grad: Tensor) -> Tensor:
    """A sparse (n, d) gradient -> the mean of every rank's, coalesced (one entry per touched row, in row
    order, the same on every rank). Ranks exchange only their touched rows (all_gather, which gloo and NCCL
    both have)."""
    grad, shape = grad.coalesce(), grad.shape
    _, world = _rank_world()
    if world == 1:
        return grad
    rows, values = grad.indices()[0], grad.values()
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    width = int(max(c.item() for c in counts))
    pad = width - len(rows)
    all_rows = [torch.empty(width, dtype=rows.dtype, device=rows.device) for _ in range(world)]
    all_values = [values.new_empty((width, *values.shape[1:])) for _ in range(world)]
    dist.all_gather(all_rows, torch.cat([rows, rows.new_zeros(pad)]))
    dist.all_gather(all_values, torch.cat([values, values.new_zeros((pad, *values.shape[1:]))]))
    rows = torch.cat([r[: int(c.item())] for r, c in zip(all_rows, counts, strict=True)])
    values = torch.cat([v[: int(c.item())] for v, c in zip(all_values, counts, strict=True)]) / world
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape).coalesce()
