"""Configs for the student: one small frozen dataclass per component, defaults in code with their reason.

Every config round-trips through JSON (`to_dict` / `from_dict`), so a checkpoint carries the config that
rebuilds it. `add_arguments` / `from_args` build CLI flags from the fields (benchmarks, drivers).

    cfg = ModelConfig(n_items=9742, teacher_dim=384, item_space="adapter")
    ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from engine.config import _Config, at_least

ItemSpace = Literal["frozen", "whitened", "adapter", "id"]
IdLoss = Literal["ce", "sampled", "bce"]
NegativePool = Literal["catalogue", "trained"]


@dataclass(frozen=True)
class ModelConfig(_Config):
    """The student's shape. Indices 1..n_items are the training vocabulary; 0 is padding.

    item_space is the space user vectors are compared in (and the index holds):
      frozen    the teacher vectors themselves (L2-normalised)
      whitened  teacher vectors centred and ZCA-whitened with statistics of the training items, L2-normalised
      adapter   teacher + a small residual MLP of it, L2-normalised (works for any teacher vector)
      id        the behavioural SASRec baseline: one id embedding table, input and output, dot product
    """

    n_items: int  # number of items in the training vocabulary (tables have n_items + 1 rows, row 0 = padding)
    teacher_dim: int = 0  # teacher vector size; 0 only for item_space="id"
    item_space: ItemSpace = "adapter"  # learned over frozen content beats raw frozen spaces (RESEARCH.md)
    use_id_embedding: bool = False  # hybrid: add learned id vectors for training items (new items get none)
    # hybrid, DropoutNet-style: in training each item loses its id part with this probability per batch (as
    # input and as a target / negative), so the content path alone must rank; 0 = off
    id_dropout: float = 0.0
    item_age: bool = False  # a learned score per item-age bucket (training.item_age), set at request time
    # user vector + fusion_weight * mean item vector of the last fusion_last clicks (content spaces:
    # normalised after): one query that also stays near what the user just clicked; chosen on validation
    fusion_weight: float = 0.0
    fusion_last: int = 3
    d_model: int = 64  # SASRec's 50-64 is enough at these catalogue sizes
    n_blocks: int = 2  # SASRec paper: 2 blocks
    n_heads: int = 1  # SASRec paper: one head is enough
    max_len: int = 50  # SASRec on Amazon: 50; ML-1M uses 200
    dropout: float = 0.2  # 0.2 dense data (ML), 0.5 sparse (Amazon) in the paper
    norm_first: bool = True  # pre-LN blocks, pmixer/SASRec.pytorch's default; False = post-LN
    adapter_hidden: int = 256  # hidden width of the adapter MLP
    whiten_eps: float = 1e-3  # added to covariance eigenvalues, relative to their mean: bounds noise gain

    def __post_init__(self) -> None:
        if self.item_space not in get_args(ItemSpace):
            raise ValueError(f"item_space must be one of {get_args(ItemSpace)}, got {self.item_space!r}")
        if self.item_space != "id" and self.teacher_dim <= 0:
            raise ValueError(f"item_space={self.item_space!r} needs teacher_dim > 0")
        if self.item_space == "id" and self.use_id_embedding:
            raise ValueError(
                "use_id_embedding is the hybrid of a content space; item_space='id' is ids already"
            )
        if self.id_dropout and not self.use_id_embedding:
            raise ValueError("id_dropout drops the hybrid's id part: it needs use_id_embedding")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        at_least(self, 0, "fusion_weight")
        at_least(self, 1, "fusion_last", "d_model", "n_blocks", "n_heads", "adapter_hidden")
        at_least(self, 0, "whiten_eps", strictly=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_items < 1 or self.max_len < 1:
            raise ValueError("n_items and max_len must be positive")

    @property
    def is_content(self) -> bool:
        return self.item_space != "id"

    @property
    def out_dim(self) -> int:
        """Dimension of user and item vectors (what the index holds)."""
        return self.d_model if self.item_space == "id" else self.teacher_dim


@dataclass(frozen=True)
class LossConfig(_Config):
    """Loss weights and negatives. Content spaces: distillation + corrected sampled softmax; id: id_loss.

    Ablations are configs: distill only (contrastive_weight=0), contrastive only (distill_weight=0),
    no logQ (logq_correction=False), sampled only (in_batch_negatives=False), full softmax over the
    training vocabulary (n_sampled_negatives=-1).
    """

    distill_weight: float = 1.0  # 1 - cos to the next item's content vector
    contrastive_weight: float = 1.0  # retrieval needs ranking against other items, not only closeness
    temperature: float = 0.05  # cosine logits / t; 0.05-0.1 is the usual range for normalised vectors
    in_batch_negatives: bool = True  # the batch's other targets: popular, hard, free
    # at most this many of the batch's distinct targets as negatives (a random subset, logQ-scaled): a
    # batch's targets spread over more items as the catalogue grows, and the (positions x candidates)
    # matrices with them; capped, a step costs the same at any scale. -1 = all of them
    max_in_batch_negatives: int = 1536
    n_sampled_negatives: int = 1024  # uniform from the vocabulary, shared by the batch; -1 = all items
    logq_correction: bool = True  # PinnerFormer: Recall@10 0.229 -> 0.138 without it
    # Where uniform negatives come from: every vocabulary item, or only items that are training targets
    # ("trained"): items the window never saw clicked are then never pushed away, so a content space does
    # not learn to bury new items for looking like the catalogue's unclicked tail.
    negative_pool: NegativePool = "catalogue"
    id_loss: IdLoss = "ce"  # item_space="id": full softmax beats BCE with one negative (gSASRec, RecSys'23);
    # "sampled" = the same softmax over the negatives above (cheap for big catalogues)

    def __post_init__(self) -> None:
        at_least(self, 0, "temperature", strictly=True)
        at_least(self, 0, "distill_weight", "contrastive_weight")
        if self.id_loss not in get_args(IdLoss):
            raise ValueError(f"id_loss must be one of {get_args(IdLoss)}")
        if self.negative_pool not in get_args(NegativePool):
            raise ValueError(f"negative_pool must be one of {get_args(NegativePool)}")
        if self.n_sampled_negatives < -1:
            raise ValueError("n_sampled_negatives is -1 (all items), 0 or a count")
        if self.max_in_batch_negatives == 0 or self.max_in_batch_negatives < -1:
            raise ValueError("max_in_batch_negatives is -1 (all) or a count (in_batch_negatives=False: none)")


@dataclass(frozen=True)
class TrainConfig(_Config):
    """The loop's settings (the Ray Train / DeepSpeed driver reads the same)."""

    epochs: int = 200  # an upper bound: early stopping ends runs
    batch_size: int = 128  # SASRec paper
    lr: float = 1e-3  # SASRec paper (Adam, betas 0.9/0.98)
    weight_decay: float = 0.0  # SASRec paper: no l2 on embeddings
    patience: int = 5  # evaluations without a better validation NDCG@10 before stopping
    seed: int = 0
    # examples a worker's per-epoch shuffle buffer holds as it streams its files (its whole shard if fewer)
    shuffle_window: int = 65536
    grad_clip: float = 1.0  # max global gradient norm (DeepSpeed gradient_clipping); 0: none, as the paper
    # the hybrid's id tables updated row-sparse (lazy AdamW on the rows a step touches, engine/rows.py): a
    # step's cost follows the batch, not the catalogue; their gradient is clipped on its own norm
    sparse_ids: bool = True
    tune_fusion: bool = (
        False  # after training, pick ModelConfig.fusion_weight on validation (validation.FUSION_GRID)
    )

    def __post_init__(self) -> None:
        at_least(self, 1, "epochs", "batch_size", "patience", "shuffle_window")
        at_least(self, 0, "lr", strictly=True)
        at_least(self, 0, "weight_decay", "grad_clip")
