"""Pieces every model shares."""
from __future__ import annotations

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
