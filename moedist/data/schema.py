"""Table schemas shared by the data sources and the preparation pipeline.

A *source* (``moedist.data.sources.*``) turns raw files into a :class:`RawSource`: two pandas
DataFrames with raw string ids, in input-file order. ``moedist.data.prepare`` turns a
RawSource into the canonical prepared tables described in ``docs/contracts.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

# Raw interactions, one row per review/rating, in the order of the input file (the order
# breaks same-timestamp ties, so it must be preserved: spec G-HM-14).
RAW_INTERACTION_COLUMNS = {
    "user_id": "string",
    "item_id": "string",
    "timestamp": "int64",  # Unix seconds, >= 0
    "rating": "float64",  # NaN where the source has none
    # Sub-second part of the source's timestamp, in [0, 1): orders interactions within one
    # second (``timestamp`` is floored to whole seconds). Optional for hand-built sources
    # (missing = 0); the output tables store only ``timestamp``.
    "time_frac": "float64",
}

# Raw items, one row per item that has metadata. Items that appear in interactions but not
# here are kept with empty text (the pipeline reports how many).
RAW_ITEM_COLUMNS = {
    "item_id": "string",
    "title": "string",  # may be <NA>
    "brand": "string",  # may be <NA>
    "categories": "object",  # list[str]: the item's first category path, root first ([] if none)
    "image": "string",  # local path or URL of the item's first image, <NA> if none
    "text": "string",  # title + category path + brand, cleaned (moedist.data.text.item_text)
}

# Canonical prepared tables (see docs/contracts.md).
SPLITS = ("train", "valid", "test")


@dataclass
class RawSource:
    """What every source loader returns."""

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    files: list[str] = field(default_factory=list)  # input files read (hashed into the manifest)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of skipped lines
