"""Training losses for SeqRec, all computed at every non-padding position (all-position training).

Content spaces (frozen / whitened / adapter):
  distill_weight * (1 - cos(state, next item's fixed content vector))     (adapter: the frozen teacher)
+ contrastive_weight * sampled softmax over cosine / temperature: the next item's vector against in-batch
  targets (a random subset past max_in_batch_negatives) and n uniformly sampled catalogue items, with logQ
  correction.
Id space (dot products): full-softmax cross-entropy over all ids ("ce"); the same softmax over the
in-batch / sampled pool ("sampled": the cheap CE of gSASRec and "Turning Dross into Gold", logQ-corrected
like the content loss, no temperature); or the SASRec paper's BCE with one negative per position ("bce").

The corrected sampled softmax is written in torch, not with pytorch-metric-learning: pml's NTXentLoss /
InfoNCE compute the logits inside and take no per-candidate offset, so logQ cannot be expressed there.
Without logQ and sampled negatives it is exactly pml's NTXentLoss with ref_emb (a test checks that).
For several workers, gather candidate vectors and their log q across ranks before calling it.

    criterion = SeqRecLoss(LossConfig(), model.cfg, target_counts(examples, n_items))
    cand = criterion.sample_candidates(targets)
    loss, parts = criterion(model(seq, targets, cand), targets, cand)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import LossConfig, ModelConfig
from training.model import SeqRecOutput


def distillation_loss(states: Tensor, targets: Tensor) -> Tensor:
    """Mean of 1 - cos(state, target) over rows. (P, D), (P, D) -> ()"""
    return (1.0 - F.cosine_similarity(states, targets, dim=-1)).mean()


def sampled_softmax_loss(
    users: Tensor,
    positives: Tensor,
    positive_items: Tensor,
    negatives: Tensor,
    negative_items: Tensor,
    temperature: float,
    positive_log_q: Tensor | None = None,
    negative_log_q: Tensor | None = None,
    cosine: bool = True,
    positive_bias: Tensor | None = None,
    negative_bias: Tensor | None = None,
) -> Tensor:
    """InfoNCE of each user row against its positive and a shared negative pool.

    users (P, D), positives (P, D); negatives (C, D) with item ids (C,): a negative equal to the row's
    positive item is masked out. Logits are cosine / temperature (rows normalised here), or plain dot
    products / temperature with cosine=False. log q (log expected sampling counts) is subtracted from every
    logit, positive included (Yi et al. RecSys'19; TF's sampled_softmax_loss). positive_bias (P,) and
    negative_bias (P, C) are added to the scores before the temperature (the item-age score).
    """
    if cosine:
        users, positives, negatives = (F.normalize(t, dim=-1) for t in (users, positives, negatives))
    pos = (users * positives).sum(-1, keepdim=True)  # (P, 1)
    neg = users @ negatives.T  # (P, C)
    if positive_bias is not None:
        pos = pos + positive_bias.unsqueeze(-1)
    if negative_bias is not None:
        neg = neg + negative_bias
    pos, neg = pos / temperature, neg / temperature
    if positive_log_q is not None:
        pos = pos - positive_log_q.unsqueeze(-1)
    if negative_log_q is not None:
        neg = neg - negative_log_q.unsqueeze(0)
    neg = neg.masked_fill(negative_items.unsqueeze(0) == positive_items.unsqueeze(-1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1)  # (P, 1 + C); the positive is column 0
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def full_softmax_ce(users: Tensor, item_table: Tensor, targets: Tensor, bias: Tensor | None = None) -> Tensor:
    """Cross-entropy over every item: users (P, d) @ item_table (n + 1, d).T (+ bias (P, n + 1)), column 0
    (padding) masked; targets (P,) in 1..n."""
    logits = users @ item_table.T  # (P, n + 1)
    if bias is not None:
        logits = logits + bias
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


def bce_one_negative(users: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
    """The SASRec paper's loss: -log sigma(u.p) - log(1 - sigma(u.n)), one negative per position."""
    pos = (users * positives).sum(-1)  # (P,)
    neg = (users * negatives).sum(-1)  # (P,)
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )


class SeqRecLoss(nn.Module):
    """The configured loss. `target_counts` (n_items + 1,): training target counts, the popularity q
    of the logQ correction (add-one smoothed); None = uniform. `held_out` (model indices): items that did
    not exist in the training period (a launch split's launched items), never drawn as negatives."""

    def __init__(
        self,
        cfg: LossConfig,
        model_cfg: ModelConfig,
        target_counts: np.ndarray | Tensor | None = None,
        held_out: np.ndarray | Tensor | None = None,
    ):
        super().__init__()
        self.cfg, self.item_space, self.n_items = cfg, model_cfg.item_space, model_cfg.n_items
        counts = (
            torch.ones(self.n_items + 1)
            if target_counts is None
            else torch.as_tensor(target_counts).double() + 1
        )
        if counts.shape != (self.n_items + 1,):
            raise ValueError(f"target_counts must have shape ({self.n_items + 1},)")
        counts[0] = 0
        self.register_buffer("popularity", (counts / counts.sum()).float())  # (n + 1,) q of in-batch targets
        # The uniform negatives' pool (1-based indices): all items, or the training targets only (counts are
        # add-one smoothed, so a target has count > 1); no targets known: all items.
        in_pool = counts > (1 if cfg.negative_pool == "trained" else 0)
        if held_out is not None:
            in_pool[torch.as_tensor(held_out, dtype=torch.long)] = False
        pool = torch.arange(self.n_items + 1)[in_pool]
        self.register_buffer("pool", pool if len(pool) else torch.arange(1, self.n_items + 1))

    def sample_candidates(self, targets: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The indices whose vectors the loss needs besides the targets: (C,) int64.
        id/ce: all indices; id/bce: one uniform negative per non-pad target (not equal to it);
        content and id/sampled: unique in-batch targets (if enabled; a random max_in_batch_negatives of
        them when there are more), then n_sampled_negatives drawn uniformly from the negative pool (or all
        indices if -1)."""
        dev = targets.device
        all_items = torch.arange(self.n_items + 1, device=dev)
        if self.item_space == "id" and self.cfg.id_loss != "sampled":
            if self.cfg.id_loss == "ce":
                return all_items
            t = targets[targets > 0]
            neg = torch.randint(1, self.n_items + 1, t.shape, device=dev, generator=generator)
            clash = neg == t  # resample once by shifting; the shift stays uniform over the others
            shift = torch.randint(1, max(self.n_items, 2), t.shape, device=dev, generator=generator)
            return torch.where(clash, (neg - 1 + shift) % self.n_items + 1, neg)
        if self.cfg.n_sampled_negatives < 0:
            return all_items[1:]
        parts = []
        if self.cfg.in_batch_negatives:
            distinct = torch.unique(targets[targets > 0])
            cap = self.cfg.max_in_batch_negatives
            if 0 < cap < len(distinct):  # draws nothing below the cap: those batches stay as uncapped
                distinct = distinct[torch.randperm(len(distinct), device=dev, generator=generator)[:cap]]
            parts.append(distinct)
        if self.cfg.n_sampled_negatives > 0:
            draw = torch.randint(
                0, len(self.pool), (self.cfg.n_sampled_negatives,), device=dev, generator=generator
            )
            parts.append(self.pool[draw])
        return torch.cat(parts) if parts else all_items[:0]

    def log_q(self, items: Tensor, n_positions: int, n_distinct: int | None = None) -> Tensor:
        """log of the expected number of times `items` appear among a batch's negatives:
        n_positions * q(item) from in-batch targets (times the share of the n_distinct targets the cap
        keeps) + n_sampled / |pool| from uniform sampling (items in the pool: every candidate and target
        is)."""
        expected = torch.zeros(items.shape, device=items.device)
        if self.cfg.in_batch_negatives:
            cap = self.cfg.max_in_batch_negatives
            kept = min(1.0, cap / n_distinct) if cap > 0 and n_distinct else 1.0
            expected = expected + n_positions * kept * self.popularity[items]
        if self.cfg.n_sampled_negatives > 0:
            expected = expected + self.cfg.n_sampled_negatives / len(self.pool)
        return expected.log()

    def forward(
        self, out: SeqRecOutput, targets: Tensor, candidates: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """-> (total loss, its detached parts)."""
        mask = targets > 0  # (B, T)
        users = out.states[mask]  # (P, out_dim)
        t = targets[mask]  # (P,)
        use_q = self.cfg.logq_correction and self.cfg.n_sampled_negatives >= 0
        capped = use_q and self.cfg.in_batch_negatives and self.cfg.max_in_batch_negatives > 0
        n_distinct = len(torch.unique(t)) if capped else None  # the share the cap kept enters log q only then
        biases = {"positive_bias": out.target_bias, "negative_bias": out.candidate_bias}
        if self.item_space == "id":
            if self.cfg.id_loss == "ce":
                loss = full_softmax_ce(users, out.candidate_vectors, t, out.candidate_bias)
            elif self.cfg.id_loss == "bce":
                if out.target_bias is not None:
                    raise ValueError("item_age is not implemented for id_loss='bce': use 'sampled' or 'ce'")
                loss = bce_one_negative(users, out.target_vectors, out.candidate_vectors)
            else:
                loss = sampled_softmax_loss(
                    users,
                    out.target_vectors,
                    t,
                    out.candidate_vectors,
                    candidates,
                    1.0,
                    self.log_q(t, len(t), n_distinct) if use_q else None,
                    self.log_q(candidates, len(t), n_distinct) if use_q else None,
                    cosine=False,
                    **biases,
                )
            return loss, {self.cfg.id_loss: loss.detach()}

        parts: dict[str, Tensor] = {}
        loss = users.new_zeros(())
        if self.cfg.distill_weight:
            parts["distill"] = distillation_loss(users, out.distill_targets)
            loss = loss + self.cfg.distill_weight * parts["distill"]
        if self.cfg.contrastive_weight:
            parts["contrastive"] = sampled_softmax_loss(
                users,
                out.target_vectors,
                t,
                out.candidate_vectors,
                candidates,
                self.cfg.temperature,
                self.log_q(t, len(t), n_distinct) if use_q else None,
                self.log_q(candidates, len(t), n_distinct) if use_q else None,
                **biases,
            )
            loss = loss + self.cfg.contrastive_weight * parts["contrastive"]
        return loss, {k: v.detach() for k, v in parts.items()}
