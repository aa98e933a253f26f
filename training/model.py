"""SeqRec: the one student model. A SASRec encoder over a user's clicks whose output lives in an item space.

    model = SeqRec(ModelConfig(n_items=n, teacher_dim=D, item_space="adapter"), teacher=table.teacher_matrix())
    users = model.user_vector(torch.as_tensor(build_inputs(seqs, table, 50).ids))   # (B, D), L2-normalised
    items = model.item_vectors()                    # (n + 1, D), row 0 = padding (zero): what the index holds
    new = model.item_vectors_for(teacher_of_new)    # (m, D) for items outside the training vocabulary
    model.save_pretrained("runs/x/model"); SeqRec.from_pretrained("runs/x/model")

Encoder (as SASRec / pmixer's SASRec.pytorch): item input embedding x sqrt(d) + learned position, dropout,
n causal self-attention blocks (pre-LN by default), final LayerNorm, a head to out_dim. Positions count from
the END of the sequence (last click = 1), and padding is masked as keys and zeroed as outputs, so the
output for a sequence does not depend on how much left padding it has (batches may be trimmed).

Item spaces (ModelConfig.item_space): content spaces compare L2-normalised user and item vectors (cosine);
"id" is the behavioural SASRec with a shared input/output id embedding and dot-product scores.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from training.config import ModelConfig
from training.item_age import N_AGE_BUCKETS, age_bucket

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class SeqRecOutput(NamedTuple):
    """What one forward pass returns; the losses are pure functions of it (DeepSpeed-friendly)."""

    states: Tensor  # (B, T, out_dim) every position; L2-normalised in content spaces; 0 at padding
    target_vectors: Tensor | None  # (P, out_dim) item vectors of targets[targets > 0] (row-major order)
    distill_targets: Tensor | None  # (P, out_dim) fixed content vectors of the same targets (content spaces)
    candidate_vectors: Tensor | None  # (C, out_dim) item vectors of `candidates`
    target_bias: Tensor | None = None  # (P,) item-age score of each target at its own time (item_age)
    candidate_bias: Tensor | None = None  # (P, C) item-age score of each candidate at each target's time


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor, allowed: Tensor, last_only: bool = False) -> Tensor:
        """(B, T, D); allowed (B, 1, T, T) True = may attend -> (B, T, D), or (B, 1, D) for the last
        position's query alone (`last_only`: what a user vector needs from the last block)."""
        B, T, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, Dh)
        if last_only:
            q, allowed = q[:, :, -1:], allowed[:, :, -1:]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, q.shape[2], D))  # (B, T or 1, D)


class Block(nn.Module):
    """One SASRec block: self-attention and a point-wise feed-forward, each with residual and LayerNorm.
    Dropout as in the paper: on attention weights and inside the feed-forward, none on the attention output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_first = cfg.norm_first
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.attn = CausalSelfAttention(d, cfg.n_heads, cfg.dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, d), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: Tensor, allowed: Tensor, last_only: bool = False) -> Tensor:
        """(B, T, d) -> (B, T, d), or (B, 1, d): the last position only (keys and values still see all)."""
        here = x[:, -1:] if last_only else x
        if self.norm_first:
            x = here + self.attn(self.attn_norm(x), allowed, last_only)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(here + self.attn(x, allowed, last_only))
        return self.ffn_norm(x + self.ffn(x))


class _FewRowLookup(torch.autograd.Function):
    """weights[index] for a short (R,) weights vector and a large index, whose backward is one weighted
    bincount. The backward of advanced indexing, when millions of positions share a few rows, adds up one
    row's positions one after another on CUDA (the whole of a training step's GPU time) and is several times
    slower on CPU too."""

    @staticmethod
    def forward(ctx, weights: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows, ctx.dtype = weights.shape[0], weights.dtype
        return weights[index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        sums = torch.bincount(index.reshape(-1), grad.reshape(-1).float(), minlength=ctx.rows)
        return sums.to(ctx.dtype), None


class SeqRec(nn.Module):
    """SASRec student. `teacher` (n_items + 1, D) aligned with indices (row 0 padding) is required for content
    spaces; `item_ids` (n_items + 1,) raw ids of the indices travel with the checkpoint (row 0 = -1)."""

    def __init__(
        self,
        cfg: ModelConfig,
        teacher: Tensor | np.ndarray | None = None,
        item_ids: Tensor | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_items + 1, cfg.d_model
        ids = (
            torch.cat([torch.tensor([-1]), torch.arange(1, n)])
            if item_ids is None
            else torch.as_tensor(item_ids)
        )
        if ids.shape != (n,):
            raise ValueError(f"item_ids must have shape ({n},), got {tuple(ids.shape)}")
        self.register_buffer("item_ids", ids.to(torch.int64))  # (n + 1,)

        self.pos_emb = nn.Embedding(cfg.max_len + 1, d, padding_idx=0)  # position 1 = the last click
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)

        if cfg.item_space == "id":
            if teacher is not None:
                raise ValueError("item_space='id' takes no teacher vectors")
            self.id_emb = nn.Embedding(n, d, padding_idx=0)  # input and output (SASRec shares them)
            self.head = nn.Identity()
        else:
            if teacher is None:
                raise ValueError(f"item_space={cfg.item_space!r} needs the teacher matrix")
            with warnings.catch_warnings():  # an object-store array is read-only: no copy, nothing writes it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                teacher = torch.as_tensor(teacher, dtype=torch.float32)
            if teacher.shape != (n, cfg.teacher_dim):
                raise ValueError(
                    f"teacher must be ({n}, {cfg.teacher_dim}) with row 0 = padding, got {tuple(teacher.shape)}"
                )
            if teacher[0].any():  # else used as given: a worker's copy is the object store's, never written
                teacher = teacher.clone()
                teacher[0] = 0.0
            # data, not weights: out of the state dict, so no checkpoint stores it and no load writes into it
            # (save_pretrained adds it to the export)
            self.register_buffer("teacher", teacher, persistent=False)  # (n + 1, D)
            if cfg.item_space == "whitened":
                mean, matrix = fit_whitening(teacher[1:], cfg.whiten_eps)
                self.register_buffer("white_mean", mean)  # (D,)
                self.register_buffer("white_matrix", matrix)  # (D, D)
            if cfg.item_space == "adapter":
                self.adapter = nn.Sequential(
                    nn.Linear(cfg.teacher_dim, cfg.adapter_hidden),
                    nn.GELU(),
                    nn.Linear(cfg.adapter_hidden, cfg.teacher_dim),
                )
            self.in_proj = nn.Linear(cfg.teacher_dim, d)
            self.head = nn.Linear(d, cfg.out_dim)
            if cfg.use_id_embedding:
                self.id_in = nn.Embedding(n, d, padding_idx=0)  # hybrid: learned id part of the input
                self.id_out = nn.Embedding(n, cfg.out_dim, padding_idx=0)  # and of the item vector
        if cfg.item_age:
            self.age_bias = nn.Parameter(torch.zeros(N_AGE_BUCKETS))  # score added per age bucket
        self._init_weights()
        self._inputs: Tensor | None = None  # serving(): every item's content input, computed once

    def _init_weights(self) -> None:
        # pmixer/SASRec.pytorch: xavier-normal for every matrix; it matters for the id baseline.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.pos_emb.weight[0] = 0.0
            if self.cfg.item_space == "id":
                self.id_emb.weight[0] = 0.0
            if self.cfg.item_space == "adapter":  # starts as the identity: the frozen teacher space
                nn.init.zeros_(self.adapter[-1].weight)
                nn.init.zeros_(self.adapter[-1].bias)
            if self.cfg.use_id_embedding:  # the hybrid starts as the pure content model
                nn.init.zeros_(self.id_in.weight)
                nn.init.zeros_(self.id_out.weight)

    # ---- item space ----------------------------------------------------------------------------------

    def content_vectors(self, teacher_vectors: Tensor) -> Tensor:
        """Fixed (unlearned) content vectors: the input to the encoder and the distillation target.
        frozen/adapter: the normalised teacher vector; whitened: the normalised whitened one. (..., D)"""
        v = F.normalize(teacher_vectors, dim=-1)
        if self.cfg.item_space == "whitened":
            v = F.normalize((v - self.white_mean) @ self.white_matrix, dim=-1)
        return v

    def item_vectors_for(
        self, teacher_vectors: Tensor, index: Tensor | None = None, id_keep: Tensor | None = None
    ) -> Tensor:
        """Item vectors from teacher vectors alone (any item, also new ones). (..., D) -> (..., out_dim).
        `index` (...,) adds the hybrid's id part for training items (0 = none); `id_keep` (n + 1,) 0/1
        drops it per item (id dropout in training)."""
        if self.cfg.item_space == "id":
            raise ValueError("item_space='id' has no content: items outside the vocabulary get no vector")
        v = self.content_vectors(teacher_vectors)
        if self.cfg.item_space == "adapter":
            v = v + self.adapter(v)
        if self.cfg.use_id_embedding and index is not None:
            v = v + self._id_part(self.id_out, index, id_keep)
        return F.normalize(v, dim=-1)

    @staticmethod
    def _id_part(table: nn.Embedding, index: Tensor, id_keep: Tensor | None) -> Tensor:
        part = table(index)  # (..., d)
        return part if id_keep is None else part * id_keep[index].unsqueeze(-1)

    def id_tables(self) -> list[nn.Embedding]:
        """The hybrid's learned id tables (one row per vocabulary item; none for other models): a training
        step touches only its batch's rows of them (engine.rows.RowSparseAdam)."""
        return [self.id_in, self.id_out] if self.cfg.is_content and self.cfg.use_id_embedding else []

    def item_vectors_at(self, index: Tensor, id_keep: Tensor | None = None) -> Tensor:
        """Item vectors of training-vocabulary indices. (...,) -> (..., out_dim)"""
        if self.cfg.item_space == "id":
            return self.id_emb(index)
        return self.item_vectors_for(self.teacher[index], index, id_keep)

    def item_vectors(self, teacher: Tensor | None = None) -> Tensor:
        """None: the training vocabulary's vectors, (n_items + 1, out_dim), row 0 (padding) zero.
        A teacher matrix (m, D): `item_vectors_for` it (no id part)."""
        if teacher is not None:
            return self.item_vectors_for(teacher)
        # slice by slice into one matrix: a million items' intermediate vectors (the teacher rows, the
        # adapter's) never coexist, and the matrix itself exists once
        n, out = self.cfg.n_items + 1, None
        for a in range(0, n, ITEM_SLICE):
            v = self.item_vectors_at(torch.arange(a, min(a + ITEM_SLICE, n), device=self.item_ids.device))
            out = v.new_empty((n, v.shape[-1])) if out is None else out
            out[a : a + len(v)] = v
        out[0] = 0.0
        return out

    # ---- encoder -------------------------------------------------------------------------------------

    def serving(self) -> SeqRec:
        """Eval mode, with every item's content input computed once for all requests (the same function of
        the weights, looked up instead of recomputed per position). For a model whose weights no longer
        change (serving, evaluation); train() drops it."""
        self.eval()
        if self.cfg.item_space != "id":
            with torch.no_grad():
                self._inputs = self.in_proj(self.content_vectors(self.teacher))  # (n + 1, d)
        return self

    def train(self, mode: bool = True) -> SeqRec:
        if mode:
            self._inputs = None
        return super().train(mode)

    def _embed(self, seq: Tensor, id_keep: Tensor | None = None) -> Tensor:
        if self.cfg.item_space == "id":
            x = self.id_emb(seq)  # (B, T, d)
        else:
            if self._inputs is not None and not self.training:
                x = self._inputs[seq]  # serving(): the same rows, computed once
            else:
                x = self.in_proj(self.content_vectors(self.teacher[seq]))  # (B, T, d)
            if self.cfg.use_id_embedding:
                x = x + self._id_part(self.id_in, seq, id_keep)
        return x * math.sqrt(self.cfg.d_model)

    def encode(self, seq: Tensor, id_keep: Tensor | None = None, last_only: bool = False) -> Tensor:
        """(B, T) left-padded indices, T <= max_len -> (B, T, out_dim) the prediction at every position;
        `last_only`: (B, 1, out_dim), the last position's alone (the last block computes no other query)."""
        B, T = seq.shape
        if T > self.cfg.max_len:
            raise ValueError(
                f"sequence length {T} > max_len {self.cfg.max_len}: build inputs with build_inputs"
            )
        real = seq > 0  # (B, T)
        pos = real.flip(1).cumsum(1).flip(1) * real  # (B, T) last click = 1, padding = 0
        x = self.emb_dropout(self._embed(seq, id_keep) + self.pos_emb(pos)) * real.unsqueeze(-1)  # (B, T, d)
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)
        allowed = (causal & (real.unsqueeze(1) | eye)).unsqueeze(1)  # (B, 1, T, T) padding attends to itself
        for n, block in enumerate(self.blocks, 1):
            x = block(x, allowed, last_only and n == len(self.blocks))  # (B, T, d), or (B, 1, d) last
            x = x * real[:, -x.shape[1] :].unsqueeze(-1)
        h = self.head(self.final_norm(x))  # (B, T or 1, out_dim)
        if self.cfg.is_content:
            h = F.normalize(h, dim=-1)
        return h * real[:, -h.shape[1] :].unsqueeze(-1)

    def user_vector(self, seq: Tensor) -> Tensor:
        """(B, T) -> (B, out_dim) the prediction after the last click, fused with the last clicks' item
        vectors when cfg.fusion_weight > 0 (what serving and evaluation query with). All padding gives 0."""
        h = self.encode(seq, last_only=True)[:, -1]  # (B, out_dim)
        if not self.cfg.fusion_weight:
            return h
        recent = seq[:, -self.cfg.fusion_last :]  # (B, m) left-padded: the last m clicks, 0 = none
        real = (recent > 0).unsqueeze(-1).to(h.dtype)  # (B, m, 1)
        mean = (self.item_vectors_at(recent) * real).sum(1) / real.sum(1).clamp(min=1)  # (B, out_dim)
        u = h + self.cfg.fusion_weight * mean
        return F.normalize(u, dim=-1) * (h.norm(dim=-1, keepdim=True) > 0) if self.cfg.is_content else u

    def age_scores(self, request_days: Tensor, added_days: Tensor) -> Tensor:
        """Item-age scores: request_days (...,) times against added_days (C,) -> (..., C); zeros without
        item_age. Days are training.item_age's units; added_days +inf = no event yet."""
        if not self.cfg.item_age:
            return torch.zeros((*request_days.shape, added_days.shape[-1]), device=added_days.device)
        return self.age_bias_of(age_bucket(request_days.unsqueeze(-1), added_days))

    def age_bias_of(self, buckets: Tensor) -> Tensor:
        """The age score of each bucket id, (...) -> (...): self.age_bias[buckets] with a histogram for its
        backward (_FewRowLookup)."""
        return _FewRowLookup.apply(self.age_bias, buckets)

    def scores(
        self,
        seq: Tensor,
        request_days: Tensor | None = None,
        added_days: Tensor | None = None,
        items: Tensor | None = None,
    ) -> Tensor:
        """(B, T) -> (B, n_items + 1) what the model ranks the vocabulary by: user . item, plus the item-age
        score at each row's request time (request_days (B,), added_days (n_items + 1,)) when item_age.
        items: item_vectors() computed once by a caller scoring many batches with the same weights."""
        items = self.item_vectors() if items is None else items
        s = self.user_vector(seq) @ items.T  # (B, n + 1)
        if self.cfg.item_age:
            if request_days is None or added_days is None:
                raise ValueError("an item_age model scores at a request time: pass request_days, added_days")
            s = s + self.age_scores(request_days, added_days)
        return s

    def forward(
        self,
        seq: Tensor,
        targets: Tensor | None = None,
        candidates: Tensor | None = None,
        target_days: Tensor | None = None,
        added_days: Tensor | None = None,
    ) -> SeqRecOutput:
        """seq (B, T); targets (B, T) next items (0 = none); candidates (C,) indices to score against;
        item_age: target_days (B, T) each target's time, added_days (n_items + 1,) first event times."""
        id_keep = None
        if self.training and self.cfg.id_dropout:  # one draw per batch: an item is id-less everywhere in it
            id_keep = (torch.rand(self.cfg.n_items + 1, device=seq.device) >= self.cfg.id_dropout).float()
        states = self.encode(seq, id_keep)  # (B, T, out_dim)
        target_vectors = distill = cand = t_bias = c_bias = None
        if targets is not None:
            mask = targets > 0
            t = targets[mask]  # (P,)
            target_vectors = self.item_vectors_at(t, id_keep)  # (P, out_dim)
            if self.cfg.is_content:
                distill = self.content_vectors(self.teacher[t])  # (P, D)
            if self.cfg.item_age:
                if target_days is None or added_days is None:
                    raise ValueError("item_age trains on target times: pass target_days and added_days")
                days = target_days[mask]  # (P,)
                t_bias = self.age_bias_of(age_bucket(days, added_days[t]))  # (P,)
                if candidates is not None:
                    c_bias = self.age_scores(days, added_days[candidates])  # (P, C)
        if candidates is not None:
            cand = self.item_vectors_at(candidates, id_keep)  # (C, out_dim)
        return SeqRecOutput(states, target_vectors, distill, cand, t_bias, c_bias)

    # ---- checkpoints ---------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Write model.safetensors (weights and buffers: teacher, whitening, raw item ids) + config.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {**self.state_dict(), **({"teacher": self.teacher} if self.cfg.is_content else {})}
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(state, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps({"model": self.cfg.to_dict()}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> SeqRec:
        """Rebuild a saved model from its own config and tensors, in eval mode."""
        path = Path(path)
        cfg = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["model"])
        state = load_file(str(path / WEIGHTS_FILE), device=str(device))
        model = cls(cfg, teacher=state.pop("teacher", None), item_ids=state["item_ids"])
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()


def fit_whitening(x: Tensor, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """ZCA whitening of rows x (n, D): mean (D,) and W (D, D) with (x - mean) @ W of identity covariance.
    eps is added to the eigenvalues relative to their mean, so near-null directions (n < D) stay bounded."""
    x = F.normalize(x.double(), dim=-1)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=0)
    evals = evals + eps * evals.mean() + 1e-12
    matrix = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return mean.float(), matrix.float()


ITEM_SLICE = 65_536  # item_vectors() computes the vocabulary this many rows at a time
ITEM_ROWS = ("id_emb.weight", "id_in.weight", "id_out.weight")  # one row per vocabulary item (0 = padding)


def warm_start(model: SeqRec, source: SeqRec) -> dict:
    """Copy `source`'s weights into `model` where they fit: every parameter of the same name and shape, and
    the per-item rows of items both vocabularies hold (matched by item id; new items keep their fresh
    rows). Buffers (the vocabulary, teacher vectors) stay the new data's. -> {copied, items_matched, skipped}"""
    mine, theirs = model.state_dict(), source.state_dict()
    params = {name for name, _ in model.named_parameters()}
    copied, skipped = [], []
    new_ids, old_ids = model.item_ids.numpy(), source.item_ids.numpy()
    where = {int(i): r for r, i in enumerate(old_ids) if r > 0}
    rows = np.array([[r, where[int(i)]] for r, i in enumerate(new_ids) if r > 0 and int(i) in where])
    with torch.no_grad():
        for name in sorted(params):
            if name not in theirs:
                skipped.append(name)
            elif name in ITEM_ROWS and theirs[name].shape[1:] == mine[name].shape[1:] and len(rows):
                mine[name][torch.as_tensor(rows[:, 0])] = theirs[name][torch.as_tensor(rows[:, 1])]
                copied.append(name)
            elif theirs[name].shape == mine[name].shape and name not in ITEM_ROWS:
                mine[name].copy_(theirs[name])
                copied.append(name)
            else:
                skipped.append(name)
    return {"copied": len(copied), "items_matched": int(len(rows)), "skipped": skipped}
