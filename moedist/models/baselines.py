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
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
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
        """Scores over all N ids incl. pad 0 (the evaluator masks it): ``[B, N]``."""
        return self.forward(batch["item_seq"], batch["item_seq_len"]) @ self.item_embedding.weight.T

    def calculate_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(self.full_sort_predict(batch), batch["target"])
        return ce, {"ce": ce.detach()}

    def moe_stats(self) -> dict:
        return {}
