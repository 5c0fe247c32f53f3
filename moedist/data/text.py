"""Item text as HM4SR's (and UniSRec's) authors build it (spec 1.1, ``txt_extractor.py``).

``item_text(title, categories, brand)`` gives e.g. ``"Title. Video Games PC Games. Brand. "``:
each non-empty field cleaned by :func:`clean_text` and followed by one space.
"""
from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

# A cleaned field this long (or longer) is dropped (becomes ''), as in the authors' code.
MAX_FIELD_CHARS = 2000

_REMOVE = str.maketrans({'"': None, "\n": None, "\r": None, "\t": " "})


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is pd.NA or value is pd.NaT


def clean_text(value: Any) -> str:
    """Clean one text field the way spec 1.1 describes.

    - ``None`` / NaN / ``pd.NA`` -> ``''``;
    - a list is a category field: a list of paths (``[['A', 'B'], ...]``) gives its *first*
      path space-joined, a single flat path (``['A', 'B']``) gives that path space-joined;
    - HTML entities are unescaped; ``"``, ``\\n`` and ``\\r`` are removed; ``\\t`` becomes a space;
    - trailing dots are stripped and exactly one ``.`` is appended;
    - a result of 2000 characters or more becomes ``''``.

    A field with no content left (empty, whitespace or dots only) gives ``''`` rather than a
    lone ``"."``.
    """
    if _is_missing(value):
        return ""
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        first = value[0]
        path = first if isinstance(first, (list, tuple)) else value
        text = " ".join(str(x) for x in path if not _is_missing(x))
    else:
        text = str(value)
    text = html.unescape(text).translate(_REMOVE).rstrip(".")
    if not text.strip():
        return ""
    text += "."
    if len(text) >= MAX_FIELD_CHARS:
        return ""
    return text


def item_text(title: Any, categories: Any, brand: Any) -> str:
    """Title, then the first category path (space-joined), then brand; each non-empty field
    cleaned and followed by a space (``"Title. Cat1 Cat2. Brand. "``); ``''`` if none."""
    parts = []
    for value in (title, categories, brand):
        cleaned = clean_text(value)
        if cleaned:
            parts.append(cleaned + " ")
    return "".join(parts)
