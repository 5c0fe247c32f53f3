"""Pieces every model shares."""
from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from moedist.errors import ConfigError


def check_config(section: str, cfg, *, positive_ints=(), nonneg_ints=(), probs=(), positive=(), nonneg=()) -> None:
    """ConfigError naming ``<section>.<field>`` for the first out-of-range value of ``cfg``:
    ``positive_ints`` >= 1, ``nonneg_ints`` >= 0, ``probs`` (dropout rates) in [0, 1),
    ``positive`` finite and > 0 (temperatures, scales), ``nonneg`` finite and >= 0 (loss
    weights, standard deviations). Before any module is built: a bad value would otherwise
    crash deep inside torch, or train silently on a NaN or an inverted objective."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{section}.{name}={getattr(cfg, name)!r}: must be {what}")

    for name in positive_ints:
        need(getattr(cfg, name) >= 1, name, "an integer >= 1")
    for name in nonneg_ints:
        need(getattr(cfg, name) >= 0, name, "an integer >= 0")
    for name in probs:
        need(0.0 <= getattr(cfg, name) < 1.0, name, "a probability in [0, 1)")
    for name in positive:
        v = getattr(cfg, name)
        need(math.isfinite(v) and v > 0, name, "a finite number > 0")
    for name in nonneg:
        v = getattr(cfg, name)
        need(math.isfinite(v) and v >= 0, name, "a finite number >= 0")


def modality_table(
    item_features, modality: str, n_items: int, *, owner: str, hint: str = "", modalities=None
) -> tuple[Tensor, Tensor]:
    """The frozen ``[n_items, D]`` float32 feature table of ``modality`` and its presence mask
    ``[n_items]`` (row 0, the padding item, is never present), checked against the model.

    ``owner`` names the config section in errors (``"hm4sr"``), e.g. when the model is asked for
    a modality the extracted features do not have, or one that no item has (every row missing).
    ``modalities`` (the model's whole list) lets the error suggest the list without it.
    """
    if not hint and modalities is not None:
        have = set(getattr(item_features, "features", None) or ())
        keep = [k for k in modalities if k != modality and (k == "id" or k in have)]
        hint = f" (e.g. {owner}.modalities=[{','.join(keep)}])" if keep else ""
    if item_features is None or modality not in item_features.features:
        have = sorted(item_features.features) if item_features is not None else []
        extract = (f", or extract {modality} features (`moedist extract`) and pass that folder as features=<dir>"
                   if modality in ("text", "image") else "")
        raise ConfigError(
            f"{owner}.modalities includes {modality!r} but the item features have no {modality!r} table "
            f"(they have: {', '.join(have) or 'none'}); drop it from {owner}.modalities{hint}{extract}"
        )
    table = item_features.features[modality].detach().to(torch.float32)
    if table.dim() != 2 or table.shape[0] != n_items:
        raise ConfigError(f"item features {modality!r} have shape {tuple(table.shape)}, expected [n_items={n_items}, D]")
    mask = item_features.mask.get(modality) if getattr(item_features, "mask", None) is not None else None
    present = torch.ones(n_items, dtype=torch.bool) if mask is None else mask.detach().to(torch.bool).cpu().clone()
    present[0] = False
    if n_items > 1 and not bool(present.any()):
        # e.g. image features extracted for a dataset without images: every row is a zero
        # placeholder, so the modality would train on nothing
        raise ConfigError(
            f"{owner}.modalities includes {modality!r} but no item has {modality!r} features "
            f"(all {n_items - 1} missing in the extracted features); drop it from {owner}.modalities{hint}"
        )
    return table, present


# False = use F.dropout on CPU too (benchmarks/bench_train.py compares the two)
FAST_CPU_DROPOUT = True
# False = p = 0.5 draws a uniform number per element like other p (bench_train.py compares)
FAIR_BIT_DROPOUT = True


def fast_cpu_dropout(x: Tensor) -> bool:
    return FAST_CPU_DROPOUT and x.device.type == "cpu"


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` with a cheaper mask on CPU; identical in distribution.

    On CPU, ``F.dropout`` draws its mask with ``bernoulli_``, which costs ~3-7x a uniform draw
    plus a compare; in HM4SR (dropout 0.5 on every ``[B, L, d]`` activation and every
    ``[B, h, L, L]`` attention map) it was about a third of a CPU training step. Here the mask
    is ``U(0, 1) >= p`` and the input is multiplied by ``mask / (1 - p)``, exactly as
    ``F.dropout`` does; at ``p = 0.5`` each element's keep is one random bit
    (:func:`fair_bits`), cheaper again. Other devices use ``F.dropout`` (fused there).
    Reproducible under ``torch.manual_seed`` like any other draw, but not the same stream as
    ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if not fast_cpu_dropout(x):
        return torch.nn.functional.dropout(x, p, True)
    if p >= 1.0:
        return x * 0.0
    if _bit_mask(p):
        return x * fair_bits(x, 2.0)  # keep with probability exactly 1/2: one random bit each
    # x · (keep / (1 − p)), as F.dropout; a multiply is ~2x cheaper than torch.where here,
    # forward and backward.
    mask = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))  # in place: no bool tensor, no copy
    return x * mask


LITTLE_ENDIAN = sys.byteorder == "little"


def _bit_mask(p: float) -> bool:
    """Whether the CPU dropout mask at rate ``p`` is one random bit per element."""
    return p == 0.5 and LITTLE_ENDIAN and FAIR_BIT_DROPOUT


# (device, dtype, value) -> [256, 8] table: row b holds the 8 bits of byte b (bit 0 first) times value
_BIT_TABLES: dict[tuple, Tensor] = {}


def fair_bits(x: Tensor, value: float = 1.0) -> Tensor:
    """Independent fair bits times ``value`` (a ``{0, value}`` tensor shaped and typed like
    ``x``), 56 per random 64-bit word instead of one random number per element (HM4SR's dropout
    0.5, the papers' setting, on CPU: the mask of a ``[1024, 2, 50, 50]`` attention map in 1.9 ms
    against 8.1 ms expanding the bits with shifts, and about 16 ms for a uniform draw; one thread).
    ``int64.random_()`` fills bits 0-62 of each word; bytes 0-6 (bits 0-55 on a little-endian
    machine) are used, and each byte becomes its 8 bits (bit 0 first) by one lookup in a
    ``[256, 8]`` table, which writes the mask in ``x``'s dtype directly."""
    n = x.numel()
    words = torch.empty((n + 55) // 56, dtype=torch.int64, device=x.device).random_()
    return _expand_bits(words, 0, n, value, x.dtype).view(x.shape)


def _expand_bits(words: Tensor, a: int, b: int, value: float, dtype: torch.dtype) -> Tensor:
    """Bits ``a .. b-1`` of the random ``words`` (56 per word: bytes 0-6, bit 0 first) times
    ``value``, as a flat ``dtype`` tensor (one lookup per byte, see :func:`fair_bits`)."""
    key = (words.device, dtype, float(value))
    table = _BIT_TABLES.get(key)
    if table is None:
        byte = torch.arange(256, device=words.device).unsqueeze(-1)
        bits = (byte >> torch.arange(8, device=words.device)) & 1  # (256, 8)
        table = _BIT_TABLES[key] = (bits.to(torch.float64) * value).to(dtype)
    w0, w1 = a // 56, (b + 55) // 56
    octets = words[w0:w1].view(torch.uint8).view(-1, 8)[:, :7].reshape(-1)  # bits 0-55 of each word
    first = a - 56 * w0
    return table.index_select(0, octets.long()).view(-1)[first : first + (b - a)]


def dropout_mask_source(n: int, p: float, dtype: torch.dtype, device=None):
    """The CPU dropout mask of ``n`` elements, drawn now from the same random stream as
    ``dropout(x, p, True)`` on an ``x`` of ``n`` elements, but kept compact: the random words
    at ``p = 0.5`` (one bit per element), a bool per element otherwise. Returns
    ``mask(a, b)``: the mask values ``keep / (1 − p)`` of elements ``a .. b-1`` as a flat
    ``dtype`` tensor, the same values :func:`dropout` multiplies by. For computations that
    apply the mask block by block and recompute it in their backward (HM4SR's CPU attention)."""
    scale = 1.0 / (1.0 - p)
    if _bit_mask(p):
        words = torch.empty((n + 55) // 56, dtype=torch.int64, device=device).random_()
        return lambda a, b: _expand_bits(words, a, b, scale, dtype)
    keep = torch.rand(n, dtype=dtype, device=device) >= p  # as dropout(): U(0, 1) >= p; bool
    return lambda a, b: keep[a:b].to(dtype).mul_(scale)  # a new tensor: keep stays as drawn


class Dropout(torch.nn.Module):
    """``nn.Dropout`` using :func:`dropout` (the cheaper CPU mask)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ------------------------------------------------------------------------------ BPR


# False = BPR and reg composed from elementwise autograd ops (benchmarks/bench_train.py compares)
FUSED_BPR = True


def _composed_bpr_and_reg(e_u: Tensor, e_i: Tensor, e_j: Tensor) -> tuple[Tensor, Tensor]:
    bpr = torch.nn.functional.softplus((e_u * e_j).sum(-1) - (e_u * e_i).sum(-1)).mean()
    return bpr, (e_u.pow(2).sum(-1) + e_i.pow(2).sum(-1) + e_j.pow(2).sum(-1)).mean()


def bpr_and_reg(e_u: Tensor, e_i: Tensor, e_j: Tensor) -> tuple[Tensor, Tensor]:
    """BPR with negative sampling and its regulariser on a batch of ``[B, d]`` user, positive
    and negative embeddings: ``(mean_b softplus(s_uj − s_ui), mean_b ‖e_u‖² + ‖e_i‖² + ‖e_j‖²)``
    with ``s = <e_u, e_item>`` (``softplus(s_uj − s_ui) = −ln σ(s_ui − s_uj)``).

    The same values and gradients as composing them from elementwise ops, in a handful of
    passes over the batch instead of about twenty (a hand-written backward): on a MAMEX CPU
    step (batch 2,048, d = 128) about 1.5 ms of ~27. Reductions in float32."""
    if not FUSED_BPR:
        return _composed_bpr_and_reg(e_u, e_i, e_j)
    return _BPR.apply(e_u, e_i, e_j, None, None, None)


def bpr_and_reg_rows(e_u: Tensor, table: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bpr_and_reg` with the items gathered from ``table [N, d]`` at ``pos``/``neg``
    ``[B]`` (one gather, and one scatter-add into ``table``'s gradient)."""
    if not FUSED_BPR:
        return _composed_bpr_and_reg(e_u, table[pos], table[neg])
    return _BPR.apply(e_u, table, None, pos, neg, None)


def _wide(t: Tensor) -> Tensor:
    """16-bit floats as float32 (for sums over a batch); other dtypes unchanged, not copied."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _BPR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e_u, a, e_j, pos, neg, _unused):
        if pos is None:  # a = e_i
            e_i = a
        else:  # a = the item table
            rows = torch.cat([pos, neg])
            both = a.index_select(0, rows)  # (2B, d)
            e_i, e_j = both[: pos.shape[0]], both[pos.shape[0]:]
            ctx.rows, ctx.table_shape = rows, a.shape
        u, i, j = (_wide(t) for t in (e_u, e_i, e_j))
        b = u.shape[0]
        diff = i - j  # (B, d)
        margin = (u * diff).sum(-1)  # s_ui − s_uj, (B,)
        bpr = torch.nn.functional.softplus(-margin).mean()
        reg = sum(torch.dot(t.reshape(-1), t.reshape(-1)) for t in (u, i, j)) / max(b, 1)
        ctx.save_for_backward(u, i, j, diff, margin)
        ctx.dtypes = (e_u.dtype, a.dtype, e_j.dtype if e_j is not None else a.dtype)
        ctx.gathered = pos is not None
        return bpr, reg

    @staticmethod
    def backward(ctx, g_bpr, g_reg):
        u, i, j, diff, margin = ctx.saved_tensors
        b = max(u.shape[0], 1)
        # d bpr / d margin = −σ(−margin) / B;  d reg / d t = 2 t / B
        s = (torch.sigmoid(-margin) * (-g_bpr / b)).unsqueeze(-1)  # (B, 1)
        c = 2.0 * g_reg / b
        grad_u = torch.addcmul(u * c, diff, s).to(ctx.dtypes[0])  # d margin / d u = e_i − e_j
        if not ctx.gathered:
            grad_i = torch.addcmul(i * c, u, s).to(ctx.dtypes[1])  # d margin / d e_i = u
            grad_j = torch.addcmul(j * c, u, s, value=-1.0).to(ctx.dtypes[2])  # d margin / d e_j = −u
            return grad_u, grad_i, grad_j, None, None, None
        both = torch.empty((2 * u.shape[0], u.shape[1]), dtype=u.dtype, device=u.device)
        torch.addcmul(i * c, u, s, out=both[: u.shape[0]])
        torch.addcmul(j * c, u, s, value=-1.0, out=both[u.shape[0]:])
        grad_table = torch.zeros(ctx.table_shape, dtype=both.dtype, device=both.device)
        grad_table.index_add_(0, ctx.rows, both)
        return grad_u, grad_table.to(ctx.dtypes[1]), None, None, None, None
