"""Pieces every model shares."""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from moedist.errors import ConfigError


def modality_table(item_features, modality: str, n_items: int, *, owner: str, hint: str = "") -> tuple[Tensor, Tensor]:
    """The frozen ``[n_items, D]`` float32 feature table of ``modality`` and its presence mask
    ``[n_items]`` (row 0, the padding item, is never present), checked against the model.

    ``owner`` names the config section in errors (``"hm4sr"``), e.g. when the model is asked for
    a modality the extracted features do not have.
    """
    if item_features is None or modality not in item_features.features:
        raise ConfigError(
            f"{owner}.modalities includes {modality!r} but the item features have no {modality!r} table; "
            f"drop it from {owner}.modalities{hint}"
        )
    table = item_features.features[modality].detach().to(torch.float32)
    if table.dim() != 2 or table.shape[0] != n_items:
        raise ConfigError(f"item features {modality!r} have shape {tuple(table.shape)}, expected [n_items={n_items}, D]")
    mask = item_features.mask.get(modality) if getattr(item_features, "mask", None) is not None else None
    present = torch.ones(n_items, dtype=torch.bool) if mask is None else mask.detach().to(torch.bool).cpu().clone()
    present[0] = False
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
    (:func:`fair_bits`), a further 1.7-2.8x cheaper. Other devices use ``F.dropout`` (fused
    there). Reproducible under ``torch.manual_seed`` like any other draw, but not the same
    stream as ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if not fast_cpu_dropout(x):
        return torch.nn.functional.dropout(x, p, True)
    if p >= 1.0:
        return x * 0.0
    if p == 0.5 and LITTLE_ENDIAN and FAIR_BIT_DROPOUT:
        return x * fair_bits(x).mul_(2.0)  # keep with probability exactly 1/2: one random bit each
    # x · (keep / (1 − p)), as F.dropout; a multiply is ~2x cheaper than torch.where here,
    # forward and backward.
    mask = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))  # in place: no bool tensor, no copy
    return x * mask


LITTLE_ENDIAN = sys.byteorder == "little"
_SHIFTS: dict[torch.device, Tensor] = {}


def fair_bits(x: Tensor) -> Tensor:
    """Independent fair bits as a ``{0, 1}`` tensor shaped and typed like ``x``, 56 per random
    64-bit word instead of one random number per element (HM4SR's dropout 0.5, the papers'
    setting, on CPU: dropout of a ``[1024, 2, 50, 50]`` attention map in 5.7 instead of 16 ms
    on two threads).
    ``int64.random_()`` fills bits 0-62 of each word; bytes 0-6 (bits 0-55 on a little-endian
    machine) are used, each expanded into its 8 bits."""
    n = x.numel()
    shifts = _SHIFTS.get(x.device)
    if shifts is None:
        shifts = _SHIFTS[x.device] = torch.arange(8, dtype=torch.uint8, device=x.device)
    words = torch.empty((n + 55) // 56, dtype=torch.int64, device=x.device).random_()
    octets = words.view(torch.uint8).view(-1, 8)[:, :7]  # (W, 7): bits 0-55 of each word
    bits = (octets.unsqueeze(-1) >> shifts) & 1  # (W, 7, 8)
    return bits.reshape(-1)[:n].view(x.shape).to(x.dtype)


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
