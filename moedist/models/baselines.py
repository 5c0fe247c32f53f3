"""Baselines under the same contracts as the main models (docs/contracts.md).

- :class:`SASRec`: ID-only self-attentive sequential recommender (Kang & McAuley, ICDM'18),
  RecBole form: item + position embedding → LN → Dropout → post-LN Transformer → last
  position → dot product with every item embedding; full-softmax CE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from moedist.errors import ConfigError
from moedist.models.common import Dropout, bpr_and_reg, check_config, modality_table
from moedist.models.hm4sr import TransformerEncoder, causal_padding_mask, gather_last, init_bert_weights


@dataclass
class SASRecConfig:
    """SASRec hyperparameters; defaults match HM4SR's encoder (spec 1.0) for a fair baseline."""

    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    hidden_dropout_prob: float = 0.5
    attn_dropout_prob: float = 0.5
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_seq_len: int = 50

    def __post_init__(self) -> None:
        check_config(
            "sasrec", self, positive_ints=("hidden_size", "n_heads", "inner_size", "max_seq_len"),
            nonneg_ints=("n_layers",), probs=("hidden_dropout_prob", "attn_dropout_prob"),
            nonneg=("layer_norm_eps", "initializer_range"),
        )
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"sasrec.hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}")


class SASRec(nn.Module):
    """SASRec over item ids only. ``n_items`` = N including the padding row 0; scores are
    ``[B, N]``. ``item_features``, ``item_categories`` and ``max_interval_seconds`` are
    accepted for a uniform constructor and ignored."""

    def __init__(
        self,
        config: SASRecConfig,
        *,
        n_items: int,
        n_users: int,
        item_features: object | None = None,
        item_categories: Tensor | None = None,
        max_interval_seconds: int | None = None,
    ):
        super().__init__()
        cfg = self.config = config
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items, cfg.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.encoder = TransformerEncoder(
            n_layers=cfg.n_layers, hidden_size=cfg.hidden_size, n_heads=cfg.n_heads, inner_size=cfg.inner_size,
            hidden_dropout_prob=cfg.hidden_dropout_prob, attn_dropout_prob=cfg.attn_dropout_prob,
            layer_norm_eps=cfg.layer_norm_eps,
        )
        self.apply(lambda m: init_bert_weights(m, cfg.initializer_range))

    def forward(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """Sequence representation at the last real position: ``[B, L] -> [B, d]``."""
        L = item_seq.shape[1]
        if L > self.config.max_seq_len:
            raise ValueError(f"item_seq has length {L} > max_seq_len={self.config.max_seq_len}")
        x = self.item_embedding(item_seq) + self.position_embedding.weight[:L]  # x: (B, L, d)
        h = self.encoder(self.dropout(self.layer_norm(x)), causal_padding_mask(item_seq))
        return gather_last(h, item_seq_len)

    def full_sort_predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Scores over all N ids incl. pad 0 (the evaluator masks it): ``[B, N]``, float32
        whatever the model's dtype (the CE over all items and the ranking need it under bf16)."""
        return self.forward(batch["item_seq"], batch["item_seq_len"]).float() @ self.item_embedding.weight.float().T

    def calculate_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(self.full_sort_predict(batch), batch["target"])
        return ce, {"ce": ce.detach()}

    def moe_stats(self) -> dict:
        return {}


# --- sequential baselines above, cold-start/popularity baselines below ---
#
# - Popularity: scores = training interaction counts per item; both protocols.
# - ContentMapping: DropoutNet-style content → embedding MLP with free user embeddings and
#   BPR, under MAMEX's batch contract (user, pos_item, neg_item); the "no MoE, no fusion
#   gate" reference point for MAMEX.

import torch  # noqa: E402  (kept in this half so the sequential half stays untouched)


@dataclass
class PopularityConfig:
    """Popularity has no hyperparameters; the dataclass keeps the common constructor."""


class Popularity(nn.Module):
    """Most-popular recommender: every user gets the same row of training counts.

    ``n_items`` = N including the padding row 0 (inferred from ``counts`` when omitted).
    Give either ``counts [N]`` directly or ``train_items`` (item ids of the training
    interactions, fitted with :meth:`fit`): LOO — the training part of each sequence;
    cold start — the warm interactions, so every cold item scores 0 and all candidates
    tie, which the evaluator's pessimistic tie policy turns into a floor, as it should.
    Nothing to optimise: ``calculate_loss`` returns a constant 0 and the model has no
    parameters (``trainable = False``; the counts are a persistent buffer).
    """

    trainable = False

    def __init__(
        self,
        config: PopularityConfig | None = None,
        *,
        n_items: int | None = None,
        n_users: int = 0,
        item_features: object | None = None,
        counts: Tensor | None = None,
        train_items: Tensor | None = None,
    ):
        super().__init__()
        self.config = config if config is not None else PopularityConfig()
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.float32).flatten()
            if n_items is not None and counts.numel() != n_items:
                raise ValueError(f"counts has {counts.numel()} rows, expected n_items={n_items}")
            n_items = counts.numel()
        if n_items is None:
            raise ValueError("Popularity needs n_items or counts")
        self.n_items = n_items
        # persistent: the counts *are* the model, so they belong in checkpoints
        self.register_buffer("counts", torch.zeros(n_items, dtype=torch.float32))
        if counts is not None:
            self.counts.copy_(counts)
            self.counts[0] = 0.0  # padding is never an interaction
        if train_items is not None:
            self.fit(train_items)

    @torch.no_grad()
    def fit(self, item_ids: Tensor) -> "Popularity":
        """Set ``counts[i]`` = occurrences of ``i`` in ``item_ids`` (any shape; 0 = padding,
        never counted)."""
        ids = torch.as_tensor(item_ids, dtype=torch.long).flatten()
        ids = ids[ids != 0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_items):
            raise ValueError(f"item ids must be in [0, {self.n_items}), got {int(ids.min())}..{int(ids.max())}")
        counts = torch.bincount(ids.cpu(), minlength=self.n_items).to(torch.float32)
        self.counts.copy_(counts.to(self.counts.device))
        return self

    def full_sort_predict(self, batch: dict[str, Tensor]) -> Tensor:
        """The same count row for every user: ``[B, N]`` (B from ``user``, else ``item_seq``)."""
        ref = batch["user"] if "user" in batch else batch["item_seq"]
        return self.counts.unsqueeze(0).expand(ref.shape[0], -1)

    def calculate_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        zero = self.counts.new_zeros(())
        return zero, {}

    def moe_stats(self) -> dict:
        return {}


@dataclass
class ContentMappingConfig:
    """DropoutNet-style content baseline (defaults mirror MAMEX where they overlap)."""

    embed_dim: int = 128  # d, as MAMEX
    hidden_dim: int = 256  # width of the content MLP's hidden layer
    dropout: float = 0.1  # dropout on the MLP's hidden layer
    # DropoutNet's input dropout, per modality: during training each (item, modality) is
    # dropped (features and mask input zeroed) with this probability, so the mapping
    # learns to cope with items that lack a modality
    modality_dropout: float = 0.0
    reg_coeff: float = 1e-6  # on the batch's squared embedding norms, as MAMEX
    user_init_std: float = 0.1
    modalities: tuple[str, ...] = ("image", "text")

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"content.modalities must be non-empty and unique, got {self.modalities!r}")
        for name in ("dropout", "modality_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"content.{name} must be in [0, 1), got {v}")
        check_config("content", self, positive_ints=("embed_dim", "hidden_dim"), nonneg=("reg_coeff", "user_init_std"))


class ContentMapping(nn.Module):
    """Item embedding = MLP([ĥ_1; …; ĥ_M; mask]) with ĥ_m the L2-normalised feature of
    modality m (zeros if the item lacks it) and ``mask [M]`` its presence bits; user = free
    embedding ~ N(0, std²); score = dot product; BPR loss.

    ``n_items`` = N and ``n_users`` = user rows, both including the padding row 0.
    """

    def __init__(
        self, config: ContentMappingConfig, *, n_items: int, n_users: int, item_features: object | None
    ):
        super().__init__()
        cfg = self.config = config
        self.n_items = n_items
        feats, masks = [], []
        for m in cfg.modalities:
            table, present = modality_table(item_features, m, n_items, owner="content", modalities=cfg.modalities)
            feats.append(F.normalize(table, dim=-1) * present[:, None])
            masks.append(present)
        # one frozen [N, Σ D_m] input table and its [N, M] presence bits (non-persistent:
        # data, not weights)
        self.register_buffer("content", torch.cat(feats, dim=1), persistent=False)
        self.register_buffer("present", torch.stack(masks, dim=1), persistent=False)
        self.register_buffer(
            "modality_slices",
            torch.tensor([t.shape[1] for t in feats]).cumsum(0),
            persistent=False,
        )
        in_dim = self.content.shape[1] + len(cfg.modalities)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, cfg.embed_dim),
        )
        self.user_embedding = nn.Embedding(n_users, cfg.embed_dim)
        nn.init.normal_(self.user_embedding.weight, std=cfg.user_init_std)

    def item_embeddings(self, items: Tensor | None = None) -> Tensor:
        """``[len(items), d]`` (all N rows when ``items`` is None). Padding row 0 maps to
        the MLP of a zero input, which is harmless: the evaluator never ranks it."""
        x = self.content if items is None else self.content[items]  # (n, Σ D_m)
        x = x.to(self.mlp[0].weight.dtype)  # float32 buffer; the MLP may run in bf16
        present = self.present if items is None else self.present[items]  # (n, M)
        p = self.config.modality_dropout
        if self.training and p > 0:
            present = present & (torch.rand(present.shape, device=present.device) >= p)
            widths = torch.diff(self.modality_slices, prepend=self.modality_slices.new_zeros(1))
            x = x * present.repeat_interleave(widths, dim=1, output_size=x.shape[1])
        return self.mlp(torch.cat([x, present.to(x.dtype)], dim=1))  # (n, d)

    def calculate_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """BPR on ``user``, ``pos_item``, ``neg_item`` ``[B]`` (+ reg, as MAMEX)."""
        e_u = self.user_embedding(batch["user"])  # (B, d)
        e_i = self.item_embeddings(batch["pos_item"])  # (B, d)
        e_j = self.item_embeddings(batch["neg_item"])  # (B, d)
        bpr, reg = bpr_and_reg(e_u, e_i, e_j)  # mean softplus(s_uj − s_ui); mean of squared norms
        return bpr + self.config.reg_coeff * reg, {"bpr": bpr.detach(), "reg": reg.detach()}

    def full_sort_predict(self, batch: dict[str, Tensor]) -> Tensor:
        """``batch["user"] [B]`` -> scores over all N items ``[B, N]`` (float32 for the ranking)."""
        return self.user_embedding(batch["user"]).float() @ self.item_embeddings().float().T

    def moe_stats(self) -> dict:
        return {}
