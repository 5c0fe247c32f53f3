"""Gates, balance losses and load statistics for Mixture-of-Experts layers.

A gate maps a token's gate input to combine weights over ``E`` experts:

- :class:`DenseGate`: softmax over all experts (HM4SR's Interactive and Temporal MoEs).
- :class:`TopKGate`: keep the top-k *logits*, softmax over those k only (renormalised), zero
  elsewhere (MAMEX's modality adapters, spec 3.2 / G-MX-2).

Both return a :class:`GateOutput` that also carries the *dense* softmax over all experts,
because balance losses are computed on it even for sparse gates (spec 3.2, A3).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BalanceDirection = Literal["paper", "code"]

# Widest last dimension that :func:`softmax` computes along a transposed view on CPU.
SMALL_SOFTMAX_MAX = 8


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last dimension, as ``F.softmax(x, dim=-1)``.

    On CPU, a last dimension of a gate's few experts or a fusion's few modalities (at most
    ``SMALL_SOFTMAX_MAX``) is normalised along a transposed view instead: the last-dimension
    kernel vectorises along each row, and for 2-8 columns it costs 5-20x more (forward and
    backward) than normalising every row at once. Same values up to float rounding (the
    exponential is evaluated by another vector routine); the result is contiguous."""
    if x.device.type == "cpu" and x.dim() >= 2 and x.shape[-1] <= SMALL_SOFTMAX_MAX:
        return F.softmax(x.movedim(-1, 0), dim=0).movedim(0, -1).contiguous()
    return F.softmax(x, dim=-1)


@dataclass
class GateOutput:
    """What a gate computed for a batch of tokens (``...`` = any leading token dims).

    weights:  ``[..., E]`` combine weights; rows sum to 1. For top-k gates exactly the kept
              experts are nonzero.
    probs:    ``[..., E]`` dense softmax over *all* experts (what balance losses read).
    logits:   ``[..., E]`` gate logits (with noise added, if any, in training mode).
    topk_idx: ``[..., k]`` indices of the kept experts (descending logit), None for dense gates.
    """

    weights: Tensor
    probs: Tensor
    logits: Tensor
    topk_idx: Tensor | None = None


class MoEAux:
    """Auxiliary outputs of a MoE layer, over *global* expert indices.

    balance_loss: scalar tensor (0 when the layer has no balance loss).
    load:         ``[E]`` fraction of tokens routed to each expert (nonzero combine weight).
    gate_mean:    ``[E]`` mean dense gate probability per expert.
    entropy:      scalar, :func:`routing_entropy` of the dense gate probabilities.

    The three statistics are for logging and are computed on first access from the detached
    gate outputs kept here (:func:`expert_load`, :func:`routing_entropy`), so a training step
    whose statistics nobody reads does not pay for them.
    """

    def __init__(self, balance_loss: Tensor, *, weights: Tensor, probs: Tensor, mask: Tensor | None = None):
        self.balance_loss = balance_loss
        self._weights = weights.detach()
        self._probs = probs.detach()
        self._mask = None if mask is None else mask.detach()
        # (Σ_t p_t [E], n [1]) when the layer leaves its balance loss to the caller
        self.balance_sums: tuple[Tensor, Tensor] | None = None

    def detached(self) -> "MoEAux":
        """The same statistics without the autograd graph of ``balance_loss`` (to keep for logging)."""
        return MoEAux(self.balance_loss.detach(), weights=self._weights, probs=self._probs, mask=self._mask)

    def map_tokens(self, fn) -> "MoEAux":
        """The statistics over other tokens: ``fn`` maps each kept ``[T, ...]`` gate output
        (weights, probs, mask) to its new rows, e.g. gathering every rank's tokens."""
        mask = None if self._mask is None else fn(self._mask)
        return MoEAux(self.balance_loss, weights=fn(self._weights), probs=fn(self._probs), mask=mask)

    @functools.cached_property
    def _load_and_gate_mean(self) -> tuple[Tensor, Tensor]:
        return expert_load(self._weights, probs=self._probs, mask=self._mask)

    @property
    def load(self) -> Tensor:
        return self._load_and_gate_mean[0]

    @property
    def gate_mean(self) -> Tensor:
        return self._load_and_gate_mean[1]

    @functools.cached_property
    def entropy(self) -> Tensor:
        return routing_entropy(self._probs, mask=self._mask)


class DenseGate(nn.Module):
    """Softmax gate: ``weights = probs = softmax(W x + b)`` over all experts.

    Optional Gaussian noise (``noise_std > 0``) is added to the logits in training mode only,
    so evaluation is deterministic.
    """

    def __init__(self, *, in_features: int, num_experts: int, noise_std: float = 0.0, bias: bool = True):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.noise_std = float(noise_std)
        self.proj = nn.Linear(in_features, num_experts, bias=bias)

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.proj(x)  # logits: (..., E)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits

    def forward(self, x: Tensor) -> GateOutput:
        logits = self._logits(x)
        probs = softmax(logits)
        return GateOutput(weights=probs, probs=probs, logits=logits, topk_idx=None)


class TopKGate(DenseGate):
    """Sparse top-k gate: softmax over the k largest logits only, zeros elsewhere.

    ``probs`` is still the dense softmax over all ``E`` logits, for the balance loss.
    """

    def __init__(
        self, *, in_features: int, num_experts: int, k: int, noise_std: float = 0.0, bias: bool = True
    ):
        super().__init__(in_features=in_features, num_experts=num_experts, noise_std=noise_std, bias=bias)
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        self.k = k

    def forward(self, x: Tensor) -> GateOutput:
        logits = self._logits(x)  # logits: (..., E)
        top_logits, topk_idx = logits.topk(self.k, dim=-1)  # (..., k)
        # Renormalise over the kept experts only (spec A2): softmax of the selected logits.
        top_w = softmax(top_logits)
        weights = torch.zeros_like(logits).scatter(-1, topk_idx, top_w)  # (..., E)
        probs = softmax(logits)
        return GateOutput(weights=weights, probs=probs, logits=logits, topk_idx=topk_idx)


def kl_balance_loss(mean_probs: Tensor, *, direction: BalanceDirection = "paper", eps: float = 1e-9) -> Tensor:
    """KL divergence between the mean gate distribution ``p̄`` ``[..., E]`` and uniform ``U``.

    - ``direction="paper"``: ``KL(p̄ ‖ U) = Σ_e p̄_e (log p̄_e − log 1/E)`` — the notation of
      MAMEX Eq. 4 / Eq. 7.
    - ``direction="code"``: ``KL(U ‖ p̄) = Σ_e (1/E)(log 1/E − log p̄_e)`` — what the MAMEX
      authors' ``F.kl_div(p̄.log(), U, reduction='sum')`` computes (spec 3.2, A4). It punishes
      a nearly dead expert much harder (→ ∞ as p̄_e → 0).

    Both are 0 iff ``p̄`` is uniform. ``p̄`` is clamped to ``eps`` so a dead expert gives a large
    finite loss instead of inf/NaN. Sums over the last dim (returns ``[...]``, scalar for ``[E]``).
    """
    num_experts = mean_probs.shape[-1]
    log_u = -math.log(num_experts)
    p = mean_probs.clamp_min(eps)
    if direction == "paper":
        return (p * (p.log() - log_u)).sum(-1)
    if direction == "code":
        return ((log_u - p.log()) / num_experts).sum(-1)
    raise ValueError(f"direction must be 'paper' or 'code', got {direction!r}")


def balance_token_sums(probs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(Σ_t p_t [E], n [1])`` over the (unmasked) tokens of dense gate probabilities ``probs
    [..., E]``, in float32 and differentiable: what a balance loss needs, in a form that adds
    up across ranks holding different tokens of one set."""
    p = probs.reshape(-1, probs.shape[-1]).float()  # (T, E)
    keep = token_weights(mask, p)  # (T, 1)
    return (p * keep).sum(0), keep.sum().view(1)


def balance_from_sums(total: Tensor, n: Tensor, *, direction: BalanceDirection = "paper") -> Tensor:
    """:func:`kl_balance_loss` of the mean gate distribution ``total / n``; 0 with no tokens
    (no balance signal rather than KL(0 ‖ U))."""
    loss = kl_balance_loss(total / n.clamp_min(1.0), direction=direction)
    return torch.where(n.reshape(()) > 0, loss, torch.zeros_like(loss))


def expert_load(
    weights: Tensor, *, probs: Tensor | None = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-expert routing statistics over tokens, for logging (no gradient).

    weights: ``[..., E]`` combine weights; an expert is "routed to" where its weight is nonzero.
    probs:   optional ``[..., E]`` dense gate probabilities for ``gate_mean`` (default: ``weights``).
    mask:    optional bool ``[...]``: only these tokens count (e.g. drop padded positions).

    Returns ``(load [E], gate_mean [E])``: fraction of tokens routed to each expert, and the
    mean gate probability per expert. With no tokens both are zeros.
    """
    num_experts = weights.shape[-1]
    with torch.no_grad():
        w = weights.detach().reshape(-1, num_experts)  # w: (T, E)
        p = (probs if probs is not None else weights).detach().reshape(-1, num_experts).to(torch.float32)
        keep = token_weights(mask, w)  # (T, 1)
        # Masked sums instead of boolean indexing: no host-device sync on GPU.
        n = keep.sum().clamp_min(1.0)
        load = ((w != 0).to(torch.float32) * keep).sum(0) / n
        gate_mean = (p * keep).sum(0) / n
    return load, gate_mean


def routing_entropy(probs: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """How much a gate tells tokens apart (no gradient): the mean over tokens of the
    normalised entropy ``H(p_t) / log E`` of each token's dense gate distribution ``p_t``.

    1 means every token gets the uniform distribution: the gate does not route at all, and a
    top-k choice is then decided by near-zero logit differences. 0 means every token goes to
    one expert with certainty. ``load`` and ``gate_mean`` cannot show this: they average over
    tokens, and the balance losses hold those averages at uniform however sharp the per-token
    routing is. With one expert, or no tokens, the result is 0.
    """
    num_experts = probs.shape[-1]
    with torch.no_grad():
        p = probs.detach().reshape(-1, num_experts).to(torch.float32)
        if num_experts < 2:
            return p.new_zeros(())
        h = -(p * p.clamp_min(1e-12).log()).sum(-1, keepdim=True) / math.log(num_experts)  # (T, 1)
        keep = token_weights(mask, p)
        return (h * keep).sum() / keep.sum().clamp_min(1.0)


def token_weights(mask: Tensor | None, flat: Tensor) -> Tensor:
    """``[T, 1]`` float32 weights (1 = token counts) for ``flat [T, E]`` from an optional mask."""
    if mask is None:
        return torch.ones(flat.shape[0], 1, dtype=torch.float32, device=flat.device)
    return mask.reshape(-1, 1).to(device=flat.device, dtype=torch.float32)
