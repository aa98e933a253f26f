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
is DeepSpeed's). Weights travel in DeepSpeed's checkpoint (the module's state dict); the moments in
`state_dict()`, which `engine.report` / `engine.resume` store beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class RowSparseAdam:
    """Lazy AdamW over embedding tables, with the touched rows' gradients averaged across ranks."""

    def __init__(self, tables: Sequence[nn.Embedding], ds: dict) -> None:
        if ds.get("bf16", {}).get("enabled"):
            raise ValueError("row-sparse tables are updated in fp32: bf16 would cast them (use dense tables)")
        opt = ds["optimizer"]["params"]
        for table in tables:
            table.sparse = True  # backward now yields the touched rows only
        self.params = [t.weight for t in tables]
        self.lr, self.weight_decay = float(opt["lr"]), float(opt.get("weight_decay", 0.0))
        self.max_norm = float(ds.get("gradient_clipping", 0.0))
        self.optimizer = torch.optim.SparseAdam(
            self.params,
            lr=self.lr,
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            eps=float(opt.get("eps", 1e-8)),
        )

    @torch.no_grad()
    def step(self) -> None:
        """Average the tables' sparse gradients across ranks, clip, decay and Adam-step the touched rows; then
        drop the gradients. Every rank calls it once per step (it is a collective)."""
        # a table this rank's batch did not reach still joins the exchange, with no rows
        grads = [all_reduce_rows(_rows_of(p)) for p in self.params]
        if self.max_norm > 0:
            norm = float(torch.sqrt(sum((g.values() ** 2).sum() for g in grads)))
            scale = min(1.0, self.max_norm / (norm + 1e-6))  # DeepSpeed's clip_coef
            grads = [g * scale for g in grads] if scale < 1.0 else grads
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
            if self.weight_decay:
                p[g.indices()[0]] *= 1.0 - self.lr * self.weight_decay
        self.optimizer.step()
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def _rows_of(p: Tensor) -> Tensor:
    """p's sparse gradient, or one with no rows when backward did not reach p."""
    if p.grad is not None:
        return p.grad
    no_rows = torch.zeros((1, 0), dtype=torch.long, device=p.device)
    return torch.sparse_coo_tensor(no_rows, p.new_zeros((0, *p.shape[1:])), p.shape)


def all_reduce_rows(grad: Tensor) -> Tensor:
    """A sparse (n, d) gradient -> the mean of every rank's, coalesced (one entry per touched row). Ranks
    exchange only their touched rows (all_gather, which gloo and NCCL both have)."""
    grad, shape = grad.coalesce(), grad.shape
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
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
