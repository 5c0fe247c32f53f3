"""Raw data sources: each turns raw files into a :class:`~moedist.data.schema.RawSource`.

``load_source(kind, path, **opts)`` dispatches on the source kind:

- ``"amazon2014"``, ``"amazon2018"``, ``"amazon2023"``: :func:`load_amazon` with that version;
- ``"amazon"``: the same, version detected from the fields / file names;
- ``"atomic"``: RecBole atomic files (:func:`load_atomic` for a ``.inter`` file,
  :func:`load_atomic_dir` for a folder);
- ``"atomic-seq"``: a folder of RecBole pre-split sequential benchmark files
  (``<name>.train/valid/test.inter`` + ``.item2index`` / ``.user2index`` / ``.text``, as
  UniSRec publishes Amazon data; :func:`load_atomic_seq`; order only, no timestamps);
- ``"auto"``: :func:`detect_source` first.

``path`` is a file or a folder. Options: ``meta_path`` (Amazon metadata file; for atomic
sources, the ``.item`` file, also ``item_path``), ``image_root``, ``on_bad_line``
(``"error"`` | ``"skip"``) and ``progress`` (``progress(lines_read_so_far)``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from moedist.data.schema import RawSource
from moedist.data.sources.amazon import (
    detect_amazon_version,
    find_amazon_files,
    find_meta_beside,
    load_amazon,
)
from moedist.data.sources.atomic import find_atomic_files, load_atomic, load_atomic_dir
from moedist.data.sources.atomic_seq import is_seq_dir, load_atomic_seq
from moedist.errors import ConfigError, DataError

SOURCE_KINDS = ("amazon", "amazon2014", "amazon2018", "amazon2023", "atomic", "atomic-seq", "auto")

__all__ = [
    "SOURCE_KINDS",
    "detect_source",
    "load_amazon",
    "load_atomic",
    "load_atomic_dir",
    "load_atomic_seq",
    "load_source",
]

_AMAZON_FILE_RE = re.compile(r"\.(json|jsonl)(\.gz)?$", re.IGNORECASE)


def detect_source(path: str | Path) -> str:
    """The source kind of a file or folder: ``"atomic"`` (a ``<name>.inter`` file),
    ``"atomic-seq"`` (a folder of ``<name>.train/valid/test.inter`` benchmark files), else
    ``"amazon2014"`` / ``"amazon2018"`` / ``"amazon2023"`` (``*.json[l][.gz]`` files, the
    version from their fields and names). Raises DataError when it cannot tell."""
    p = Path(path)
    if p.is_file():
        if p.name.endswith(".inter"):
            return "atomic"
        if _AMAZON_FILE_RE.search(p.name):
            return "amazon" + detect_amazon_version(p, find_meta_beside(p))
        raise DataError("cannot tell the source format from this file name (.inter or .json[l][.gz] expected)", path=p)
    if not p.is_dir():
        raise DataError("no such file or directory", path=p)
    try:
        names = [e.name for e in os.scandir(p) if e.is_file() and not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list directory: {e.strerror or e}", path=p) from None
    if any(n.endswith(".inter") for n in names):
        try:
            find_atomic_files(p)
            return "atomic"
        except DataError:
            pass
        if is_seq_dir(p):
            return "atomic-seq"
    if any(_AMAZON_FILE_RE.search(n) for n in names):
        reviews, meta = find_amazon_files(p)
        return "amazon" + detect_amazon_version(reviews, meta)
    raise DataError(
        "cannot tell the source format of this directory (expected <name>.inter, <name>.train.inter benchmark "
        "files or Amazon *.json[l][.gz] files)",
        path=p,
    )


def load_source(kind: str, path: str | Path, **opts) -> RawSource:
    """Load ``path`` as a source of the given kind (see the module docstring)."""
    k = str(kind).strip().lower()
    if k not in SOURCE_KINDS:
        raise ConfigError(f"unknown source kind {kind!r} (expected one of {', '.join(SOURCE_KINDS)})")
    if k == "auto":
        k = detect_source(path)
    opts = dict(opts)
    if k.startswith("amazon"):
        meta = opts.pop("meta_path", None)
        version = k.removeprefix("amazon") or opts.pop("version", None)
        opts.pop("version", None)
        return load_amazon(path, meta, version=version, **opts)
    if k == "atomic-seq":
        for unused in ("meta_path", "item_path", "version"):
            if opts.pop(unused, None) is not None:
                raise ConfigError(f"{unused} does not apply to atomic-seq sources (their files are found by name)")
        return load_atomic_seq(path, **opts)
    item = opts.pop("item_path", None)
    meta = opts.pop("meta_path", None)
    item = item if item is not None else meta
    p = Path(path)
    if p.is_dir():
        return load_atomic_dir(p, item_path=item, **opts)
    return load_atomic(p, item, **opts)
