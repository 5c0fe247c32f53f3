"""``moedist data prepare`` as a function: a typed config in, a prepared directory out."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from moedist.data.prepare import PrepareOptions, check_out_dir, prepare_dataset
from moedist.errors import ConfigError

SourceKind = Literal["synthetic", "amazon", "amazon2014", "amazon2018", "amazon2023", "atomic", "atomic-seq"]

DEFAULT_DATA_ROOT = Path("data")


@dataclass
class DataConfig:
    source: SourceKind = "synthetic"  # where interactions come from
    input: str | None = None  # raw file/dir (amazon: reviews file or folder; atomic: folder or .inter file)
    meta: str | None = None  # amazon metadata file (found beside the reviews file when omitted)
    image_root: str | None = None  # folder with <item_id>/<image> files (local images)
    out: str | None = None  # prepared output dir (default: data/prepared/<name>); must be new, empty or a prepared dataset
    name: str | None = None  # dataset name (default: from the input)
    size: str = "small"  # synthetic: tiny | small | medium | large
    seed: int = 2025  # synthetic generator seed
    kcore: int = 5  # iterative k-core threshold for users and items
    dedup: bool = False  # drop repeated (user, item) interactions (keep the first)
    cold_valid_frac: float = 0.1  # cold-start split: fraction of items in validation
    cold_test_frac: float = 0.1  # cold-start split: fraction of items in test
    split_seed: int = 2025  # seed of the cold-start item split
    on_bad_line: Literal["error", "skip"] = "error"  # malformed input lines: fail, or skip and count

    def dataset_name(self) -> str:
        if self.name:
            return self.name
        if self.source == "synthetic":
            return f"synthetic-{self.size}-{self.seed}"
        if self.input is None:
            raise ConfigError(f"data.input is required for source {self.source!r}")
        p = Path(self.input)
        stem = p.name
        for suffix in (".gz", ".json", ".jsonl", ".inter"):
            stem = stem.removesuffix(suffix)
        return stem.removeprefix("reviews_").removesuffix("_5") or "dataset"

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else DEFAULT_DATA_ROOT / "prepared" / self.dataset_name()


def raw_synthetic_dir(cfg: DataConfig) -> Path:
    return DEFAULT_DATA_ROOT / "raw" / cfg.dataset_name() if cfg.out is None else Path(cfg.out).parent / f"{Path(cfg.out).name}-raw"


def prepare(cfg: DataConfig, *, log: Callable[[str], None] | None = None, progress=None) -> dict:
    """Run the whole preparation for ``cfg``; returns the manifest of the prepared dataset."""
    from moedist.data import sources

    log = log or (lambda m: None)
    options = PrepareOptions(
        kcore=cfg.kcore,
        dedup=cfg.dedup,
        cold_valid_frac=cfg.cold_valid_frac,
        cold_test_frac=cfg.cold_test_frac,
        split_seed=cfg.split_seed,
    )
    out_dir = cfg.out_dir()
    kind = cfg.source
    if kind == "synthetic":
        input_path: Path = raw_synthetic_dir(cfg)
    else:
        if cfg.input is None:
            raise ConfigError(f"data.input is required for source {cfg.source!r} (the raw file or folder)")
        input_path = Path(cfg.input)
        if not input_path.exists():
            raise ConfigError(f"data.input: {input_path} does not exist")
    # before anything is generated or read: never replace a folder that is not a dataset
    check_out_dir(out_dir, [input_path, cfg.meta, cfg.image_root])
    if kind == "synthetic":
        from moedist.data.sources.synthetic import generate_synthetic

        log(f"generating synthetic raw data ({cfg.size}, seed {cfg.seed}) in {input_path}")
        generate_synthetic(input_path, size=cfg.size, seed=cfg.seed, progress=progress)
        kind = "amazon2018"

    opts: dict = {"on_bad_line": cfg.on_bad_line, "progress": progress}
    if cfg.meta:
        opts["meta_path"] = cfg.meta
    if cfg.image_root:
        opts["image_root"] = cfg.image_root
    name = cfg.dataset_name()
    base = input_path if input_path.is_dir() else input_path.parent
    identity = {
        "source": cfg.source,
        "reader": kind,
        "name": name,
        # local image paths in the tables are absolute, resolved against the input folder
        "input_dir": str(base.resolve()),
        "on_bad_line": cfg.on_bad_line,
        "image_root": image_root_identity(cfg.image_root),
    }
    if kind == "atomic-seq":
        from moedist.data.sources.atomic_seq import READER_VERSION

        identity["reader_version"] = READER_VERSION

    def load():
        log(f"reading {kind} source {input_path}")
        raw = sources.load_source(kind, input_path, **opts)
        raw.name = name
        raw.items["image"] = resolve_image_paths(raw.items["image"], base)
        return raw

    return prepare_dataset(load, out_dir, options=options, raw_files=_input_files(kind, input_path, cfg.meta),
                           identity=identity, log=log)


def _input_files(kind: str, input_path: Path, meta: str | None) -> list[str] | None:
    """The files the ``kind`` reader will read for ``input_path`` (found with the same
    look-ups the readers use), hashed to make re-runs no-ops; None when they cannot be told
    (the reader then reports why, and the files it did read are hashed after parsing)."""
    from moedist.data.sources.amazon import find_amazon_files, find_meta_beside
    from moedist.data.sources.atomic import find_atomic_files
    from moedist.data.sources.atomic_seq import find_seq_files
    from moedist.errors import DataError

    try:
        if kind.startswith("amazon"):
            if input_path.is_dir():
                reviews, found = find_amazon_files(input_path)
            else:
                reviews, found = input_path, find_meta_beside(input_path)
            files = [reviews, Path(meta) if meta else found]
        elif kind == "atomic-seq":
            files = list(find_seq_files(input_path).values())
        elif kind == "atomic":
            if input_path.is_dir():
                inter, item = find_atomic_files(input_path)
            else:
                cand = input_path.with_suffix(".item")
                inter, item = input_path, (cand if cand.is_file() else None)
            files = [inter, Path(meta) if meta else item]
        else:
            return None
    except DataError:
        return None
    return sorted({str(f) for f in files if f is not None})


def image_root_identity(image_root: str | None) -> dict | None:
    """What of ``image_root`` shapes the prepared items: its absolute path (stored in the
    tables) and a digest of its listing (``<item_id>/<file>`` names and sizes), cheap to
    take and changed by any added, removed or replaced image."""
    from moedist.errors import DataError

    if not image_root:
        return None
    root = Path(image_root)
    if not root.is_dir():
        raise DataError("image_root is not a directory", path=root)
    h = hashlib.sha256()
    n = 0
    try:
        for sub in sorted(os.scandir(root), key=lambda e: e.name):
            if not sub.is_dir():
                continue
            try:
                entries = sorted(os.scandir(sub.path), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.is_file():
                    h.update(f"{sub.name}/{e.name}\t{e.stat().st_size}\n".encode("utf-8", "surrogateescape"))
                    n += 1
    except OSError as e:
        raise DataError(f"cannot list image folder: {e.strerror or e}", path=root) from None
    return {"path": str(root.resolve()), "files": n, "listing_sha256": h.hexdigest()}


def resolve_image_paths(images, base: Path):
    """Relative local image paths (as in the synthetic metadata) become absolute, resolved
    against the raw data folder, so prepared tables work from any working directory."""
    import pandas as pd

    def fix(v):
        if v is None or v is pd.NA or (isinstance(v, float) and v != v):
            return v
        s = str(v)
        if "://" in s or Path(s).is_absolute():
            return s
        return str((base / s).resolve())

    return images.map(fix).astype("string")
