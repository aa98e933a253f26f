"""The losses of teacher tuning over in-batch pairs: SigLIP's pairwise sigmoid (learnable temperature and
bias) and symmetric InfoNCE (pytorch-metric-learning) as the ablation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SIGLIP_INIT_LOG_T = math.log(10.0)  # SigLIP (Zhai et al. 2023): t' = log 10, so t = exp(t') = 10 at start
SIGLIP_INIT_BIAS = -10.0  # and b = -10: the many negatives start near sigma(-10), no big initial correction


def sigmoid_pair_loss(
    x: Tensor, y: Tensor, log_t: Tensor, bias: Tensor, labels: Tensor | None = None
) -> Tensor:
    """SigLIP's pairwise sigmoid loss: every (x_i, y_j) is its own binary problem.

    -1/B * sum_ij log sigmoid(z_ij * (exp(log_t) * x_i.y_j + bias)), z_ij = +1 for positives, -1 otherwise.
    x, y (B, D) unit rows; labels (B, B) bool positives (default: the diagonal); log_t, bias scalars
    (learnable). Normalised by B as in the paper, so the loss scale does not grow with the negatives.
    """
    if labels is None:
        labels = torch.eye(len(x), dtype=torch.bool, device=x.device)
    logits = x @ y.T * log_t.exp() + bias  # (B, B)
    z = labels.to(logits.dtype) * 2.0 - 1.0
    return -F.logsigmoid(z * logits).sum() / len(x)


def infonce_pair_loss(x: Tensor, y: Tensor, temperature: float, labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (pytorch-metric-learning's NTXentLoss) over the same in-batch pairs: x -> y and
    y -> x, each positive against the row's negatives; labels (B, B) bool as for `sigmoid_pair_loss`.
    y may carry K extra rows (random negatives, labels (B, B + K)): they join the x -> y direction only."""
    from pytorch_metric_learning.losses import NTXentLoss

    if labels is None:
        labels = torch.eye(len(x), dtype=torch.bool, device=x.device)
    ntxent = NTXentLoss(temperature=temperature)
    n = len(x)

    def one_way(anchors: Tensor, refs: Tensor, pos: Tensor) -> Tensor:
        a1, p = torch.nonzero(pos, as_tuple=True)
        a2, neg = torch.nonzero(~pos, as_tuple=True)
        return ntxent(anchors, indices_tuple=(a1, p, a2, neg), ref_emb=refs)

    return 0.5 * (one_way(x, y, labels) + one_way(y[:n], x, labels[:, :n].T))
