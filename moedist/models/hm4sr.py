"""HM4SR: Hierarchical time-aware Mixture of experts for multi-modal Sequential Recommendation.

Zhang et al., WWW'25 (``shared/reference/papers/HM4SR_WWW2025.md``); this file follows the
code-level spec ``shared/reference/MODELS_SPEC.md`` Part 1 and gotchas G-HM-*.

Pipeline for a batch of histories ``item_seq [B, L]`` with timestamps ``time_seq [B, L]``
(``M`` = number of modalities, id first; ``d`` = hidden size):

1. initial item representations: ID embedding, and a Linear projection of each frozen
   content feature (text, image); + the same position embedding on every modality;
2. Interactive MoE: experts Linear(M·d → M·d) on the concatenation, one softmax gate per
   modality reading that modality, output block m scaled by α_m, added as a residual;
3. Temporal MoE: gate on [interval embedding; absolute cosine time embedding], experts are
   vectors w_i ∈ R^{M·d} applied element-wise, no residual;
4. per modality: LayerNorm → Dropout → own post-LN Transformer (causal + padding mask) →
   hidden state at the last real position H^m;
5. scores over all N item ids: Σ_m H^m · C_mᵀ, with C_m the *raw* candidate representations
   (ID embedding / projected feature; no position, no MoE).

Training loss: CE + λ_idcl·IDCL + λ_cp·CP + λ_pcl·PCL (spec 1.5).

Launch: built by the trainer from a YAML config (``moedist train --model hm4sr ...``); it only
needs ``calculate_loss`` / ``full_sort_predict`` (docs/contracts.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedist.errors import ConfigError
from moedist.models.common import (
    Dropout,
    check_config,
    dropout,
    dropout_mask_source,
    fast_cpu_dropout,
    modality_table,
)
from moedist.moe import DenseGate, LinearExperts, expert_load, routing_entropy

MODALITIES = ("id", "text", "image")


class _ItemFeatures(Protocol):
    features: dict[str, Tensor]
    mask: dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class HM4SRConfig:
    """HM4SR hyperparameters. Defaults = the authors' Games config (spec 1.0)."""

    hidden_size: int = 64  # d
    n_layers: int = 2  # Transformer layers per modality
    n_heads: int = 2
    inner_size: int = 256  # FFN width
    hidden_dropout_prob: float = 0.5
    attn_dropout_prob: float = 0.5
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # std of the N(0, σ²) init (spec 1.4)
    max_seq_len: int = 50  # L: rows of the position embedding
    k1: int = 4  # Interactive-MoE experts
    k2: int = 4  # Temporal-MoE experts
    mu: float = 100.0  # interval scale: bucket = floor(mu * log2(Δseconds + 1))
    freq: float = 10000.0  # absolute-time encoding base
    tau_idcl: float = 0.2  # IDCL temperature
    beta_pcl: float = 0.3  # PCL placeholder ratio: floor(beta * len) positions per sequence
    tau_pcl: float = 1.0  # PCL temperature
    lambda_cp: float = 1.0
    lambda_idcl: float = 1.0
    lambda_pcl: float = 1.0  # the authors' `phcl_weight`
    # Interactive-MoE α for (id, text, image). The paper gives no initial value; the authors'
    # code starts at (0, 1, 1), so the ID stream gets no cross-modal input at first (G-HM-4).
    alpha_init: tuple[float, float, float] = (0.0, 1.0, 1.0)
    # Paper: trainable temporal experts. False = the authors' code: frozen N(0, 0.1²) vectors
    # (a Python list there, here a buffer), G-HM-1.
    temporal_experts_trainable: bool = True
    temporal_expert_init_std: float = 0.1
    # CP loss indexing (G-HM-18): "intended" = BCE over every category of every non-pad input
    # item; "authors" = the released code's element [b, l] of the [B·L, C] score matrix.
    cp_indexing: Literal["intended", "authors"] = "intended"
    # Absolute time embedding: True = code form cos((a·t + c) / freq^{j/d}) (spec 1.3 step 4,
    # reproduces the reference numbers); False = paper Eq. 13 form cos(a·t / freq^{j/d} + c).
    # Identical at init (c = 0); they differ in how the bias is scaled during training.
    absolute_time_bias_inside: bool = True
    # Interval buckets from exact int64 seconds (False) or, as the authors' RecBole pipeline,
    # from times stored as float32 (True: 64 s resolution around 2^30 s). Identical on
    # day-granular data (Amazon); on MovieLens' second timestamps it moves many buckets.
    time_float32: bool = False
    # Ablations (paper §5.3). Without the Temporal MoE there are no time embeddings, so PCL is
    # off too (as in the paper's "-TMoE" variant); PCL also needs a text or image modality.
    use_imoe: bool = True
    use_tmoe: bool = True
    use_cp: bool = True
    use_idcl: bool = True
    use_pcl: bool = True
    modalities: tuple[str, ...] = MODALITIES  # any subset containing "id", e.g. ("id", "text")
    # Expert parallelism: the Interactive-MoE experts are sharded over groups of ep_size ranks
    # (dense gating: every token visits every expert, moe/dispatch.py). 1 = replicated. The
    # Temporal-MoE experts always stay replicated (see TemporalMoE). Needs torch.distributed
    # with a world size divisible by ep_size; k1 need not be divisible (uneven split).
    ep_size: int = 1

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.alpha_init = tuple(float(a) for a in self.alpha_init)  # type: ignore[assignment]
        if "id" not in self.modalities:
            raise ConfigError(f"hm4sr.modalities must contain 'id', got {self.modalities}")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"hm4sr.modalities must be distinct names from {MODALITIES}, got {self.modalities}")
        if len(self.alpha_init) != 3:
            raise ConfigError(f"hm4sr.alpha_init needs 3 values (id, text, image), got {self.alpha_init}")
        check_config(
            "hm4sr", self, positive_ints=("hidden_size", "n_heads", "inner_size", "max_seq_len"),
            nonneg_ints=("n_layers",), probs=("hidden_dropout_prob", "attn_dropout_prob"),
            positive=("mu", "freq", "tau_idcl", "tau_pcl"),
            nonneg=("lambda_cp", "lambda_idcl", "lambda_pcl", "layer_norm_eps", "initializer_range",
                    "temporal_expert_init_std"),
        )
        if not all(math.isfinite(a) for a in self.alpha_init):
            raise ConfigError(f"hm4sr.alpha_init must be finite numbers, got {self.alpha_init}")
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"hm4sr.hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}")
        if self.cp_indexing not in ("intended", "authors"):
            raise ConfigError(f"hm4sr.cp_indexing must be 'intended' or 'authors', got {self.cp_indexing!r}")
        if not 0.0 <= self.beta_pcl <= 1.0:
            raise ConfigError(f"hm4sr.beta_pcl must be in [0, 1], got {self.beta_pcl}")
        if self.k1 < 1 or self.k2 < 1:
            raise ConfigError(f"hm4sr.k1/k2 must be >= 1, got {self.k1}/{self.k2}")
        if self.ep_size < 1:
            raise ConfigError(f"hm4sr.ep_size must be >= 1, got {self.ep_size}")

    @property
    def ordered_modalities(self) -> tuple[str, ...]:
        """Modalities in canonical order (id, text, image): fixes the concat layout."""
        return tuple(m for m in MODALITIES if m in self.modalities)


# --------------------------------------------------------------------------------------------
# Transformer (RecBole / BERT style, post-LN), shared with SASRec
# --------------------------------------------------------------------------------------------


def causal_padding_mask(item_seq: Tensor) -> Tensor:
    """Additive attention mask ``[B, 1, L, L]``: 0 = attend, −10000 = blocked.

    Key j is visible to query i iff j ≤ i and item j is not padding. −10000 rather than −inf,
    as in RecBole (G-HM-7): a fully blocked row then stays finite.
    """
    B, L = item_seq.shape
    keep = (item_seq != 0)[:, None, None, :]  # (B, 1, 1, L) keys
    causal = torch.ones(L, L, dtype=torch.bool, device=item_seq.device).tril()  # (L, L)
    keep = keep & causal  # (B, 1, L, L)
    zero = torch.zeros((), dtype=torch.float32, device=item_seq.device)
    return torch.where(keep, zero, zero - 10000.0)


def gather_last(hidden: Tensor, item_seq_len: Tensor) -> Tensor:
    """Hidden state at each sequence's last real position: ``[B, L, d] -> [B, d]``."""
    idx = (item_seq_len - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, idx).squeeze(1)


# CPU attention with dropout: sequences per block (0 = the whole batch at once;
# benchmarks/bench_train.py compares the two)
ATTN_BLOCK_SEQS = 64


class _BlockedAttention(torch.autograd.Function):
    """``Dropout(softmax(q·kᵀ/√(d/h) + mask)) · v`` for ``q, k, v [B, h, L, d/h]`` and an additive
    ``mask [B or 1, 1, L, L]``, ``ATTN_BLOCK_SEQS`` sequences at a time (CPU training).

    Nothing ``[B, h, L, L]`` is stored: the dropout mask is drawn up front in compact form
    (:func:`~moedist.models.common.dropout_mask_source`: the random bits at p = 0.5), and the
    backward recomputes each block's scores, softmax and mask from q, k and the mask source.
    The ordinary form keeps three ``[B, h, L, L]`` float tensors per layer for its backward
    (softmax output, dropout mask, dropped probabilities: 60 MB for HM4SR's batch), and its
    memory traffic. Same random stream, so the same values as that form."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, p: float, block: int) -> Tensor:
        B, h, L, _ = q.shape
        per_seq = h * L * L
        source = dropout_mask_source(B * per_seq, p, q.dtype, q.device)
        out = q.new_empty(B, h, L, v.shape[-1])
        for s in range(0, B, block):
            e = min(B, s + block)
            probs = _BlockedAttention._probs(q, k, mask, s, e)
            keep = source(s * per_seq, e * per_seq).view(e - s, h, L, L)
            torch.matmul(probs.mul_(keep), v[s:e], out=out[s:e])
        ctx.save_for_backward(q, k, v, mask)
        ctx.source, ctx.block = source, block
        return out

    @staticmethod
    def _probs(q: Tensor, k: Tensor, mask: Tensor, s: int, e: int) -> Tensor:
        scores = (q[s:e] @ k[s:e].transpose(-1, -2)).div_(math.sqrt(q.shape[-1]))
        return torch.softmax(scores.add_(mask[s:e] if mask.shape[0] > 1 else mask), dim=-1)

    @staticmethod
    def backward(ctx, g: Tensor):
        q, k, v, mask = ctx.saved_tensors
        B, h, L, _ = q.shape
        per_seq = h * L * L
        gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for s in range(0, B, ctx.block):
            e = min(B, s + ctx.block)
            probs = _BlockedAttention._probs(q, k, mask, s, e)  # recomputed
            keep = ctx.source(s * per_seq, e * per_seq).view(e - s, h, L, L)
            gs = g[s:e]
            torch.matmul((probs * keep).transpose(-1, -2), gs, out=gv[s:e])
            grad_probs = (gs @ v[s:e].transpose(-1, -2)).mul_(keep)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).div_(math.sqrt(q.shape[-1]))
            torch.matmul(grad_scores, k[s:e], out=gq[s:e])
            torch.matmul(grad_scores.transpose(-1, -2), q[s:e], out=gk[s:e])
        return gq, gk, gv, None, None, None


class MultiHeadAttention(nn.Module):
    """Self-attention with post-LN residual: ``LN(x + Dropout(Dense(Attn(x))))``."""

    def __init__(self, *, hidden_size: int, n_heads: int, attn_dropout_prob: float,
                 hidden_dropout_prob: float, layer_norm_eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout_prob = attn_dropout_prob
        self.out_dropout = Dropout(hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        B, L, d = x.shape

        def heads(t: Tensor) -> Tensor:  # (B, L, d) -> (B, h, L, d/h)
            return t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        p = self.attn_dropout_prob if self.training else 0.0
        if p > 0.0 and fast_cpu_dropout(q):
            # CPU training: SDPA with dropout runs the unfused math path with a bernoulli_ mask;
            # the same computation with the cheaper mask, block by block (storing no
            # [B, h, L, L]), or in one pass over the batch (the form _BlockedAttention reproduces)
            if ATTN_BLOCK_SEQS > 0 and p < 1.0:
                ctx = _BlockedAttention.apply(q, k, v, attn_mask.to(q.dtype), p, ATTN_BLOCK_SEQS)  # (B, h, L, d/h)
            else:
                probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + attn_mask.to(q.dtype), dim=-1)
                ctx = dropout(probs, p, True) @ v  # ctx: (B, h, L, d/h)
        else:
            # softmax(q·kᵀ/√(d/h) + mask) → dropout → ·v, fused. The mask must match q's dtype
            # (bf16 under autocast).
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=p)  # (B, h, L, d/h)
        ctx = ctx.transpose(1, 2).reshape(B, L, d)
        return self.layer_norm(self.out_dropout(self.dense(ctx)) + x)


# CPU: the feed-forward network runs over blocks of this many rows (0 = one ordinary pass;
# benchmarks/bench_train.py compares the two)
FFN_BLOCK_ROWS = 2048


class _BlockedFFN(torch.autograd.Function):
    """``W2 · GELU_erf(W1 x + b1) + b2`` on ``x [n, d]``, ``FFN_BLOCK_ROWS`` rows at a time.

    The ``[n, inner]`` intermediate (for HM4SR's batch, 51,200 × 256 floats, 52 MB, and as much
    again after the GELU) is never stored whole: each block's stays in cache, and the backward
    recomputes it block by block instead of reading it back from memory. On a memory-bound CPU
    that recompute is cheaper than the traffic it saves: one HM4SR feed-forward (forward and
    backward, two threads) takes about 65 ms instead of 118, and a training step keeps ~100 MB
    less per layer. Forward values equal the ordinary pass; the weight gradients are summed
    block by block (float rounding)."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, rows: int) -> Tensor:
        out = x.new_empty(x.shape[0], w2.shape[0])
        for s in range(0, x.shape[0], rows):
            a = F.gelu(torch.addmm(b1, x[s : s + rows], w1.t()), approximate="none")
            torch.addmm(b2, a, w2.t(), out=out[s : s + rows])
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w1, b1, w2 = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        gx = torch.empty_like(x) if need_x else None
        gw1, gb1, gw2 = torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2)
        for s in range(0, x.shape[0], ctx.rows):
            xc, gc = x[s : s + ctx.rows], g[s : s + ctx.rows]
            h = torch.addmm(b1, xc, w1.t())  # (rows, inner), recomputed
            gw2.addmm_(gc.t(), F.gelu(h, approximate="none"))
            gh = torch.ops.aten.gelu_backward(gc @ w2, h, approximate="none")  # (rows, inner)
            gw1.addmm_(gh.t(), xc)
            gb1 += gh.sum(0)
            if need_x:
                torch.mm(gh, w1, out=gx[s : s + ctx.rows])
        return gx, gw1, gb1, gw2, g.sum(0), None


class FeedForward(nn.Module):
    """``LN(x + Dropout(W2 · GELU_erf(W1 x)))``; on CPU over blocks of rows (:class:`_BlockedFFN`)."""

    def __init__(self, *, hidden_size: int, inner_size: int, hidden_dropout_prob: float, layer_norm_eps: float):
        super().__init__()
        self.dense_1 = nn.Linear(hidden_size, inner_size)
        self.dense_2 = nn.Linear(inner_size, hidden_size)
        self.dropout = Dropout(hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and FFN_BLOCK_ROWS > 0 and x.dtype == self.dense_1.weight.dtype:
            flat = x.reshape(-1, x.shape[-1])
            h = _BlockedFFN.apply(flat, self.dense_1.weight, self.dense_1.bias, self.dense_2.weight,
                                  self.dense_2.bias, FFN_BLOCK_ROWS).view(x.shape)
        else:
            h = self.dense_2(F.gelu(self.dense_1(x), approximate="none"))  # erf GELU, as RecBole
        return self.layer_norm(self.dropout(h) + x)


class TransformerLayer(nn.Module):
    def __init__(self, *, hidden_size: int, n_heads: int, inner_size: int, hidden_dropout_prob: float,
                 attn_dropout_prob: float, layer_norm_eps: float):
        super().__init__()
        self.attention = MultiHeadAttention(
            hidden_size=hidden_size, n_heads=n_heads, attn_dropout_prob=attn_dropout_prob,
            hidden_dropout_prob=hidden_dropout_prob, layer_norm_eps=layer_norm_eps,
        )
        self.feed_forward = FeedForward(
            hidden_size=hidden_size, inner_size=inner_size, hidden_dropout_prob=hidden_dropout_prob,
            layer_norm_eps=layer_norm_eps,
        )

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        return self.feed_forward(self.attention(x, attn_mask))


class TransformerEncoder(nn.Module):
    """Stack of post-LN BERT layers (RecBole ``TransformerEncoder``); returns the last layer's
    output ``[B, L, d]`` (no final LayerNorm)."""

    def __init__(self, *, n_layers: int, hidden_size: int, n_heads: int, inner_size: int,
                 hidden_dropout_prob: float, attn_dropout_prob: float, layer_norm_eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(
                hidden_size=hidden_size, n_heads=n_heads, inner_size=inner_size,
                hidden_dropout_prob=hidden_dropout_prob, attn_dropout_prob=attn_dropout_prob,
                layer_norm_eps=layer_norm_eps,
            )
            for _ in range(n_layers)
        )

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


def init_bert_weights(module: nn.Module, std: float) -> None:
    """RecBole ``_init_weights``: Linear/Embedding weight ~ N(0, std²), Linear bias 0, LN (1, 0).
    Applied to one module (use with ``Module.apply``)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Time features
# --------------------------------------------------------------------------------------------


def _sequence_mask(time_seq: Tensor, item_seq_len_or_mask: Tensor) -> Tensor:
    if item_seq_len_or_mask.dtype == torch.bool and item_seq_len_or_mask.shape == time_seq.shape:
        return item_seq_len_or_mask
    positions = torch.arange(time_seq.shape[1], device=time_seq.device)
    return positions[None, :] < item_seq_len_or_mask.view(-1, 1)


def interval_bucket(time_seq: Tensor, item_seq_len_or_mask: Tensor, mu: float, *, float32_times: bool = False) -> Tensor:
    """Interval-embedding index ``[B, L]`` int64: ``floor(mu · log2(t_i − t_{i−1} + 1))``.

    time_seq: ``[B, L]`` int64 Unix seconds (0 at pads); item_seq_len_or_mask: ``[B]`` lengths
    or a bool ``[B, L]`` mask of real positions.

    Position 0 gets 0 (no previous item), and so do pads and any Δ < 0: in the authors' code
    the first pad's Δ = 0 − t_last is negative and log2 gives NaN (G-HM-2); pads never reach
    the output, so 0 is safe. Δ is computed exactly in int64 and the log in float64 (the
    authors use float32; identical on day-granular data). Δ = 0 → 0, Δ = 1 day → 1639.

    ``float32_times=True`` reproduces the authors' pipeline instead: RecBole stores the time
    field as float32, so times are first rounded to float32 (64-second steps around 2^30 s,
    exact for whole days) and the gap and its log are taken in float32. On second-granular
    data such as MovieLens this moves many buckets (small gaps collapse to 0 or 64 s).
    """
    mask = _sequence_mask(time_seq, item_seq_len_or_mask)
    if float32_times:
        t = time_seq.to(torch.float32)
        delta = t[:, 1:] - t[:, :-1]  # (B, L-1), float32 as RecBole
        log_gap = torch.log2(delta.clamp_min(0) + 1.0)
    else:
        delta = time_seq[:, 1:] - time_seq[:, :-1]  # (B, L-1), int64, exact
        log_gap = torch.log2(delta.clamp_min(0).to(torch.float64) + 1.0)
    real = mask[:, 1:] & mask[:, :-1] & (delta >= 0)
    bucket = torch.floor(mu * log_gap).to(torch.int64)
    bucket = torch.where(real, bucket, torch.zeros_like(bucket))
    # position 0 from time_seq's shape, not bucket[:, :1]: with L = 1 bucket is [B, 0]
    first = torch.zeros(time_seq.shape[0], 1, dtype=torch.int64, device=time_seq.device)
    return torch.cat([first, bucket], dim=1)  # (B, L)


def interval_table_size(max_interval_seconds: int, mu: float) -> int:
    """Rows of the interval embedding: ``int(mu · log2(Δmax + 1)) + 1`` (2871 on Games)."""
    return int(mu * math.log2(max(int(max_interval_seconds), 0) + 1)) + 1


class TemporalMoE(nn.Module):
    """Temporal MoE (spec 1.3 steps 4–5): ``x_temp = u ⊙ Σ_i g'_i w_i``, g' = softmax gate on
    the time embedding r = [interval embedding; absolute cosine embedding] ``[B, L, 2d]``.

    Never expert-parallel, whatever ``ep_size``: the experts are k2 vectors of size M·d applied
    element-wise, so mixing the *vectors* first (``g @ W``, k2·M·d numbers) is far cheaper than
    sending ``B·L·M·d`` activations to other ranks and back, and sharding them saves no memory
    worth having. They are ordinary data-parallel parameters."""

    def __init__(self, *, hidden_size: int, num_modalities: int, num_experts: int, n_intervals: int,
                 mu: float, freq: float, bias_inside: bool, experts_trainable: bool, expert_init_std: float,
                 float32_times: bool = False):
        super().__init__()
        d = hidden_size
        self.mu = mu
        self.float32_times = float32_times
        self.bias_inside = bias_inside
        self.gate = DenseGate(in_features=2 * d, num_experts=num_experts)
        self.absolute_w = nn.Linear(1, d)  # (a_j, c_j) of the cosine encoding
        self.time_embedding = nn.Embedding(n_intervals, d)
        # inv_freq_j = freq^(-j/d), j = 0..d-1 (float32, as the authors).
        inv_freq = 1.0 / torch.pow(torch.tensor(float(freq)), torch.arange(d, dtype=torch.float32) / d)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        experts = torch.randn(num_experts, num_modalities * d) * expert_init_std  # w_i: (k2, M·d)
        if experts_trainable:
            self.experts = nn.Parameter(experts)
        else:
            # The authors' experts are never optimised (G-HM-1). Persistent buffer so that a
            # checkpoint restores the same random vectors in a new process.
            self.register_buffer("experts", experts)

    def absolute_embedding(self, time_seq: Tensor) -> Tensor:
        """``[B, L] -> [B, L, d]``: cos of the raw Unix seconds, in float32 (G-HM-3).

        t ≈ 1.3e9 makes a·t ≈ 1e7, so reduced precision (bf16/fp16 autocast) would turn this
        into noise: autocast is switched off here."""
        with torch.autocast(device_type=time_seq.device.type, enabled=False):
            t = time_seq.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
            w, c = self.absolute_w.weight.float(), self.absolute_w.bias.float()
            if self.bias_inside:  # code: cos((a t + c) · inv_freq)
                return torch.cos(F.linear(t, w, c) * self.inv_freq)
            return torch.cos(F.linear(t, w) * self.inv_freq + c)  # paper Eq. 13

    def time_features(self, time_seq: Tensor, seq_mask: Tensor) -> Tensor:
        """r = [r1 (interval); r2 (absolute)] ``[B, L, 2d]``."""
        idx = interval_bucket(time_seq, seq_mask, self.mu, float32_times=self.float32_times)
        # Gaps beyond the table (longer than the dataset's Δmax) share the last row.
        idx = idx.clamp_max(self.time_embedding.num_embeddings - 1)
        r1 = self.time_embedding(idx)
        r2 = self.absolute_embedding(time_seq).to(r1.dtype)
        return torch.cat([r1, r2], dim=-1)

    def forward(self, u: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """u: ``[B, L, M·d]``, r: ``[B, L, 2d]`` -> (x_temp ``[B, L, M·d]``, gate ``[B, L, k2]``)."""
        g = self.gate(r).weights  # g: (B, L, k2)
        # Σ_i g_i (u ⊙ w_i) = u ⊙ (Σ_i g_i w_i): one matmul over experts, no loop.
        return u * (g @ self.experts.to(g.dtype)), g


# CPU, ep_size 1: the Interactive MoE's experts and combination run over blocks of this many
# tokens (0 = one pass; benchmarks/bench_train.py compares the two)
IMOE_BLOCK_ROWS = 2048


class _BlockedInteractiveMoE(torch.autograd.Function):
    """``x[n, m] = Σ_i g[n, m, i] · (v[n] W_i + b_i)[block m]`` for ``v [N, M·d]``, experts
    ``W [k1, M·d, M·d]``, ``b [k1, M·d]`` and gates ``g [N, M, k1]``; returns ``[N, M, d]``.

    Over blocks of ``IMOE_BLOCK_ROWS`` tokens: one product against all experts at once (bias
    included), the weighted sum in cache, and the backward recomputes the block's expert
    outputs. The one-pass form stores every expert's output on every token (``[N, k1, M·d]``,
    105 MB for HM4SR's batch with two modalities) and permuted copies of it for the einsum."""

    @staticmethod
    def _side_by_side(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Every expert side by side: ``W [M·d, k1·M·d]``, ``b [k1·M·d]``."""
        E, D, _ = weight.shape
        return weight.permute(1, 0, 2).reshape(D, E * D), bias.reshape(E * D)

    @staticmethod
    def forward(ctx, v: Tensor, weight: Tensor, bias: Tensor, g: Tensor, rows: int) -> Tensor:
        E, D, _ = weight.shape
        N, M = g.shape[0], g.shape[1]
        w_cat, b_cat = _BlockedInteractiveMoE._side_by_side(weight, bias)
        x = v.new_empty(N, M, D // M)
        for s in range(0, N, rows):
            o = torch.addmm(b_cat, v[s : s + rows], w_cat).view(-1, E, M, D // M)  # (rows, k1, M, d)
            gb = g[s : s + rows]
            xb = torch.mul(o[:, 0], gb[:, :, 0:1], out=x[s : s + rows])
            for i in range(1, E):
                xb.addcmul_(o[:, i], gb[:, :, i : i + 1])
        ctx.save_for_backward(v, weight, bias, g)
        ctx.rows = rows
        return x

    @staticmethod
    def backward(ctx, gx: Tensor):
        v, weight, bias, g = ctx.saved_tensors
        E, D, _ = weight.shape
        N, M = g.shape[0], g.shape[1]
        w_cat, b_cat = _BlockedInteractiveMoE._side_by_side(weight, bias)
        gw = torch.zeros_like(w_cat)
        gbias = torch.zeros_like(b_cat)
        gv = torch.empty_like(v) if ctx.needs_input_grad[0] else None
        gg = torch.empty_like(g) if ctx.needs_input_grad[3] else None
        for s in range(0, N, ctx.rows):
            vb, gb, gxb = v[s : s + ctx.rows], g[s : s + ctx.rows], gx[s : s + ctx.rows]
            o = torch.addmm(b_cat, vb, w_cat).view(-1, E, M, D // M)  # recomputed
            go = torch.empty_like(o)
            for i in range(E):
                torch.mul(gxb, gb[:, :, i : i + 1], out=go[:, i])  # dL/do_i = g_i · dL/dx
                if gg is not None:
                    torch.sum(o[:, i] * gxb, dim=-1, out=gg[s : s + ctx.rows, :, i])  # dL/dg_i = <o_i, dL/dx>
            go = go.view(-1, E * D)
            gw.addmm_(vb.t(), go)
            gbias += go.sum(0)
            if gv is not None:
                torch.mm(go, w_cat.t(), out=gv[s : s + ctx.rows])
        gweight = gw.view(D, E, D).permute(1, 0, 2).contiguous()
        return gv, gweight, gbias.view(E, D), gg, None


class InteractiveMoE(nn.Module):
    """Interactive MoE (spec 1.3 step 3): shared experts Linear(M·d → M·d) on v = [e_1; …; e_M];
    modality m reads block m of each expert's output with its own gate softmax(Gate_m(e_m)),
    scaled by α_m: ``x_m = α_m Σ_i g^m_i · o_i[S_m]``."""

    def __init__(self, *, hidden_size: int, num_modalities: int, num_experts: int, alpha_init: list[float],
                 ep_size: int = 1):
        super().__init__()
        self.num_modalities = num_modalities
        self.gates = nn.ModuleList(
            DenseGate(in_features=hidden_size, num_experts=num_experts) for _ in range(num_modalities)
        )
        # All k1 experts in one einsum; PyTorch-default Linear init as in the authors' code,
        # where these modules are built after `self.apply(_init_weights)` (G-HM-4). With
        # ep_size > 1 each rank holds a slice and every token visits every expert (the gates
        # are dense): the output below is [B, L, k1, M·d] either way.
        self.experts = LinearExperts(
            num_experts=num_experts, in_features=num_modalities * hidden_size,
            out_features=num_modalities * hidden_size, ep_size=ep_size,
        )
        self.alpha = nn.Parameter(torch.tensor(alpha_init, dtype=torch.float32))

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """e: ``[B, L, M, d]`` -> (x_inter ``[B, L, M, d]``, gates ``[B, L, M, k1]``)."""
        B, L, M, d = e.shape
        g = torch.stack([gate(e[:, :, m]).weights for m, gate in enumerate(self.gates)], dim=2)  # (B, L, M, k1)
        ex = self.experts
        if (e.device.type == "cpu" and IMOE_BLOCK_ROWS > 0 and ex.ep_size == 1 and ex.bias is not None
                and e.dtype == ex.weight.dtype == g.dtype):
            x = _BlockedInteractiveMoE.apply(e.reshape(B * L, M * d), ex.weight, ex.bias, g.reshape(B * L, M, -1),
                                             IMOE_BLOCK_ROWS).view(B, L, M, d)
        else:
            o = ex(e.reshape(B, L, M * d)).view(B, L, ex.num_global_experts, M, d)  # o: (B, L, k1, M, d)
            x = torch.einsum("blmk,blkmd->blmd", g, o)
        return x * self.alpha.to(x.dtype).view(1, 1, M, 1), g


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def contrastive_same_target_zeroed(a: Tensor, b: Tensor, target: Tensor, tau: float) -> Tensor:
    """UniSRec-style InfoNCE used by IDCL and PCL (G-HM-8), mean over the batch.

    s_ij = cos(a_i, b_j)/τ; for j ≠ i with target_j == target_i the logit is set to 0 (not
    removed: it still adds exp(0) = 1 to the denominator); the diagonal is the positive and
    stays in the denominator. loss_i = −s_ii + log Σ_j exp(s̃_ij). In float32 whatever the
    inputs' dtype.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    s = a @ b.T / tau  # s: (B, B)
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    same = (target[:, None] == target[None, :]) & ~eye
    s_masked = s.masked_fill(same, 0.0)
    return (torch.logsumexp(s_masked, dim=1) - s.diagonal()).mean()


class HM4SR(nn.Module):
    """HM4SR. ``n_items`` = N = number of item ids *including* the padding row 0 (so scores are
    ``[B, N]`` and feature tables have N rows); ``n_users`` is unused (kept for the common
    constructor). ``item_features`` holds ``features[m] [N, D_m]`` for each content modality in
    ``config.modalities``; ``item_categories`` a multi-hot ``[N, C]`` table (None disables CP);
    ``max_interval_seconds`` sizes the interval table (the dataset manifest's value).
    """

    def __init__(
        self,
        config: HM4SRConfig,
        *,
        n_items: int,
        n_users: int,
        item_features: _ItemFeatures | None = None,
        item_categories: Tensor | None = None,
        max_interval_seconds: int,
    ):
        super().__init__()
        cfg = self.config = config
        d = cfg.hidden_size
        self.n_items = n_items
        self.modalities = cfg.ordered_modalities
        self.content_modalities = tuple(m for m in self.modalities if m != "id")
        M = len(self.modalities)

        # Frozen content features: buffers, so they get no gradient, are not in parameters()
        # and move with .to(device). Not persistent: they are data, reloaded from the shards.
        feat_dims: dict[str, int] = {}
        for m in self.content_modalities:
            table, _ = modality_table(item_features, m, n_items, owner="hm4sr", modalities=self.modalities)
            feat_dims[m] = table.shape[1]
            self.register_buffer(f"feat_{m}", table.clone(), persistent=False)

        # Components whose input the dataset does not have: a clear error, not a model that
        # silently trains them on constants.
        if cfg.use_tmoe and int(max_interval_seconds) <= 1:
            raise ConfigError(
                f"hm4sr.use_tmoe=true but the longest gap between consecutive interactions in this dataset is "
                f"{int(max_interval_seconds)} s: its timestamps give the order, not the time (e.g. `--source "
                f"atomic-seq`, whose timestamps are positions 0, 1, 2, ...), so the Temporal MoE (and PCL, which "
                f"works on its output) would learn from nothing; set hm4sr.use_tmoe=false"
            )
        if cfg.use_cp and item_categories is not None and item_categories.shape[0] > 1 \
                and not bool((item_categories[1:] != 0).any()):
            raise ConfigError(
                "hm4sr.use_cp=true but no item has a category (the dataset's items.parquet has empty "
                "`categories`, e.g. `--source atomic-seq`), so the category-prediction loss would only teach "
                "the model that nothing has a category; set hm4sr.use_cp=false"
            )

        # ---- modules that the authors initialise with N(0, 0.02²) (built before L62) ----
        self.item_embedding = nn.Embedding(n_items, d, padding_idx=0)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, d)
        encoder_kw = dict(
            n_layers=cfg.n_layers, hidden_size=d, n_heads=cfg.n_heads, inner_size=cfg.inner_size,
            hidden_dropout_prob=cfg.hidden_dropout_prob, attn_dropout_prob=cfg.attn_dropout_prob,
            layer_norm_eps=cfg.layer_norm_eps,
        )
        self.encoders = nn.ModuleDict({m: TransformerEncoder(**encoder_kw) for m in self.modalities})
        self.layer_norms = nn.ModuleDict({m: nn.LayerNorm(d, eps=cfg.layer_norm_eps) for m in self.modalities})
        self.projections = nn.ModuleDict({m: nn.Linear(feat_dims[m], d) for m in self.content_modalities})
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.temporal_moe: TemporalMoE | None = None
        if cfg.use_tmoe:
            self.temporal_moe = TemporalMoE(
                hidden_size=d, num_modalities=M, num_experts=cfg.k2,
                n_intervals=interval_table_size(max_interval_seconds, cfg.mu), mu=cfg.mu, freq=cfg.freq,
                bias_inside=cfg.absolute_time_bias_inside, experts_trainable=cfg.temporal_experts_trainable,
                expert_init_std=cfg.temporal_expert_init_std, float32_times=cfg.time_float32,
            )
        # The item-embedding pad row is drawn too (random, not zero; padding_idx still blocks
        # its gradient: G-HM-5). The temporal expert vectors keep their own N(0, 0.1²).
        for module in [self.item_embedding, self.position_embedding, self.encoders, self.layer_norms,
                       self.projections, self.temporal_moe]:
            if module is not None:
                module.apply(lambda mod: init_bert_weights(mod, cfg.initializer_range))

        # ---- modules built after the authors' init: PyTorch default init (G-HM-4) ----
        self.use_cp = cfg.use_cp and item_categories is not None
        if self.use_cp:
            cats = item_categories.detach().to(torch.float32)
            if cats.shape[0] != n_items:
                raise ConfigError(f"item_categories has {cats.shape[0]} rows, expected n_items={n_items}")
            self.register_buffer("item_categories", cats.clone(), persistent=False)
            self.cat_linear = nn.Linear(M * d, cats.shape[1])
        self.interactive_moe: InteractiveMoE | None = None
        if cfg.use_imoe:
            alpha = [cfg.alpha_init[MODALITIES.index(m)] for m in self.modalities]
            self.interactive_moe = InteractiveMoE(
                hidden_size=d, num_modalities=M, num_experts=cfg.k1, alpha_init=alpha, ep_size=cfg.ep_size
            )
        # PCL needs the time embeddings (Temporal MoE) and at least one content modality.
        self.use_pcl = cfg.use_pcl and cfg.use_tmoe and bool(self.content_modalities)
        if self.use_pcl:
            self.placeholders = nn.ModuleDict({m: nn.Linear(2 * d, d) for m in self.content_modalities})
        self.use_idcl = cfg.use_idcl
        self._last_gates: dict = {}

    # ---- representations ----------------------------------------------------------------

    def candidate_tables(self) -> dict[str, Tensor]:
        """Raw item representations C_m ``[N, d]`` per modality: ID embedding, projected
        features. Used for scoring, for the sequence inputs and for CP (G-HM-6)."""
        tables = {"id": self.item_embedding.weight}
        for m in self.content_modalities:
            proj = self.projections[m]
            # frozen features stay float32 buffers; bf16 training (DeepSpeed casts parameters
            # only) feeds them in the projection's dtype
            tables[m] = proj(getattr(self, f"feat_{m}").to(proj.weight.dtype))
        return {m: tables[m] for m in self.modalities}

    def _check_batch(self, item_seq: Tensor) -> None:
        if item_seq.shape[1] > self.config.max_seq_len:
            raise ValueError(f"item_seq has length {item_seq.shape[1]} > max_seq_len={self.config.max_seq_len}")

    def _forward(self, item_seq: Tensor, item_seq_len: Tensor, time_seq: Tensor) -> dict:
        """Shared forward. Returns candidate tables, x_temp ``[B, L, M, d]`` (pre-LN), time
        features r ``[B, L, 2d]`` (or None), hidden states H ``[B, M, d]`` and the mask."""
        self._check_batch(item_seq)
        B, L = item_seq.shape
        seq_mask = item_seq != 0  # (B, L) real positions
        tables = self.candidate_tables()
        pos = self.position_embedding.weight[:L]  # (L, d), the same for every modality
        e = torch.stack([tables[m][item_seq] + pos for m in self.modalities], dim=2)  # e: (B, L, M, d)

        # gate outputs kept for moe_stats(), which computes the statistics when they are logged
        gates: dict = {"mask": seq_mask}
        if self.interactive_moe is not None:
            x_inter, g_inter = self.interactive_moe(e)
            e = e + x_inter  # residual (spec step 3)
            gates["imoe"] = g_inter.detach()
            gates["alpha"] = self.interactive_moe.alpha.detach().clone()  # no .item(): no sync

        r = None
        if self.temporal_moe is not None:
            r = self.temporal_moe.time_features(time_seq, seq_mask)  # (B, L, 2d)
            x_temp, g_temp = self.temporal_moe(e.flatten(2), r)
            x_temp = x_temp.view_as(e)  # no residual (Eq. 16)
            gates["tmoe"] = g_temp.detach()
        else:
            x_temp = e
        self._last_gates = gates

        attn_mask = causal_padding_mask(item_seq)
        hidden = torch.stack(
            [self._encode(m, x_temp[:, :, i], attn_mask, item_seq_len) for i, m in enumerate(self.modalities)], dim=1
        )  # hidden: (B, M, d)
        return {"tables": tables, "x_temp": x_temp, "r": r, "hidden": hidden,
                "seq_mask": seq_mask, "attn_mask": attn_mask}

    def _encode(self, m: str, x: Tensor, attn_mask: Tensor, item_seq_len: Tensor) -> Tensor:
        """LN_m → Dropout → Transformer_m → last real position: ``[B, L, d] -> [B, d]``."""
        h = self.encoders[m](self.dropout(self.layer_norms[m](x)), attn_mask)
        return gather_last(h, item_seq_len)

    @staticmethod
    def _scores(hidden: Tensor, tables: dict[str, Tensor]) -> Tensor:
        """Σ_m H^m · C_mᵀ as one matmul over the concatenated modalities: ``[B, N]``, in
        float32 whatever the model's dtype (under bf16 the CE over all items and the ranking
        need float32 scores: bf16 rounds ~7-nat logits to 1/32 and ties many items)."""
        cand = torch.cat(list(tables.values()), dim=-1)  # (N, M·d)
        return hidden.flatten(1).float() @ cand.float().T

    # ---- contract -------------------------------------------------------------------------

    def full_sort_predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Scores over all N item ids incl. pad 0 (the evaluator masks it): ``[B, N]``."""
        out = self._forward(batch["item_seq"], batch["item_seq_len"], batch["time_seq"])
        return self._scores(out["hidden"], out["tables"])

    def calculate_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        item_seq, item_seq_len, target = batch["item_seq"], batch["item_seq_len"], batch["target"]
        out = self._forward(item_seq, item_seq_len, batch["time_seq"])
        tables, hidden = out["tables"], out["hidden"]
        cfg = self.config
        parts: dict[str, Tensor] = {}
        # CE over all N ids, pad 0 included (G-HM-5).
        parts["ce"] = F.cross_entropy(self._scores(hidden, tables), target)
        loss = parts["ce"]
        if self.use_idcl:
            parts["idcl"] = self.idcl_loss(hidden[:, 0], target)
            loss = loss + cfg.lambda_idcl * parts["idcl"]
        if self.use_cp:
            parts["cp"] = self.cp_loss(item_seq, tables)
            loss = loss + cfg.lambda_cp * parts["cp"]
        if self.use_pcl:
            parts["pcl"] = self.pcl_loss(out, item_seq_len, target)
            loss = loss + cfg.lambda_pcl * parts["pcl"]
        return loss, {k: v.detach() for k, v in parts.items()}

    def moe_stats(self) -> dict:
        """Last forward's per-expert gate means and loads (over real positions; dense gates
        route every token to every expert, so load is 1), the routing entropies
        (:func:`~moedist.moe.routing_entropy`) and the α values."""
        gates = self._last_gates
        if not gates:
            return {}
        stats: dict = {}
        mask = gates["mask"]
        if "imoe" in gates:
            for i, m in enumerate(self.modalities):
                g = gates["imoe"][:, :, i]
                stats[f"imoe/{m}/load"], stats[f"imoe/{m}/gate_mean"] = expert_load(g, mask=mask)
                stats[f"imoe/{m}/entropy"] = routing_entropy(g, mask=mask)
                stats[f"imoe/{m}/alpha"] = gates["alpha"][i]
        if "tmoe" in gates:
            stats["tmoe/load"], stats["tmoe/gate_mean"] = expert_load(gates["tmoe"], mask=mask)
            stats["tmoe/entropy"] = routing_entropy(gates["tmoe"], mask=mask)
        return stats

    # ---- auxiliary losses -----------------------------------------------------------------

    def idcl_loss(self, h_id: Tensor, target: Tensor) -> Tensor:
        """IDCL (spec 1.5): H^id against the raw ID embeddings of the batch's targets, τ_idcl."""
        return contrastive_same_target_zeroed(h_id, self.item_embedding(target), target, self.config.tau_idcl)

    def cp_loss(self, item_seq: Tensor, tables: dict[str, Tensor]) -> Tensor:
        """CP: BCE of cat_linear([C_id; C_txt; C_img]) against the multi-hot categories.

        "intended": every category of every non-pad *input* item (targets excluded,
        duplicates kept), mean over items × categories. "authors": G-HM-18, the element
        [b, l] of the ``[B·L, C]`` score matrix for each non-pad (b, l): flat row b, class l.
        """
        cand = torch.cat(list(tables.values()), dim=-1)  # (N, M·d)
        if self.config.cp_indexing == "intended":
            items = item_seq[item_seq != 0]  # (n_v,)
            logits = self.cat_linear(cand[items])  # (n_v, C)
            return F.binary_cross_entropy_with_logits(logits.float(), self.item_categories[items].float())
        rows, cols = torch.nonzero(item_seq != 0, as_tuple=True)
        n_cat = self.item_categories.shape[1]
        if int(cols.max()) >= n_cat:
            raise ValueError(
                f"cp_indexing='authors' reads class l for position l, but a sequence has position "
                f"{int(cols.max())} >= {n_cat} categories (the authors' code crashes here too)"
            )
        items = item_seq.flatten()[rows]  # flat row b of the [B·L, C] matrix is item_seq.flat[b]
        logits = self.cat_linear(cand[items]).gather(1, cols[:, None]).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits.float(), self.item_categories[items, cols].float())

    def placeholder_mask(self, item_seq_len: Tensor, seq_len: int) -> Tensor:
        """Bool ``[B, L]``: floor(β·len_b) positions per row, uniform without replacement over
        the real positions [0, len_b) (the last one included). Vectorised: random keys, +inf at
        pads, keep each row's floor(β·len) smallest."""
        B = item_seq_len.shape[0]
        device = item_seq_len.device
        positions = torch.arange(seq_len, device=device)
        real = positions[None, :] < item_seq_len[:, None]
        # float32 product, as the authors' `floor(item_seq_len * beta)`.
        num = torch.floor(item_seq_len.to(torch.float32) * self.config.beta_pcl).to(torch.int64)
        keys = torch.rand(B, seq_len, device=device).masked_fill(~real, float("inf"))
        rank = keys.argsort(dim=1).argsort(dim=1)  # rank of each position within its row
        return rank < num[:, None]

    def pcl_loss(self, out: dict, item_seq_len: Tensor, target: Tensor) -> Tensor:
        """PCL (spec 1.5, G-HM-9): for text/image, replace x_temp at the placeholder positions
        with placeholder_m(r), re-encode with the same LN/encoder (fresh dropout) and contrast
        with the original H^m (τ_pcl). Mean over the content modalities."""
        x_temp, r, hidden = out["x_temp"], out["r"], out["hidden"]
        chosen = self.placeholder_mask(item_seq_len, x_temp.shape[1]).unsqueeze(-1)  # (B, L, 1)
        losses = []
        for i, m in enumerate(self.modalities):
            if m == "id":
                continue
            x_aug = torch.where(chosen, self.placeholders[m](r), x_temp[:, :, i])  # (B, L, d)
            h_aug = self._encode(m, x_aug, out["attn_mask"], item_seq_len)
            losses.append(contrastive_same_target_zeroed(hidden[:, i], h_aug, target, self.config.tau_pcl))
        return torch.stack(losses).mean()
