"""``moedist data prepare`` as a function: a typed config in, a prepared directory out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from moedist.data.prepare import PrepareOptions, prepare_dataset
from moedist.errors import ConfigError

SourceKind = Literal["synthetic", "amazon", "amazon2014", "amazon2018", "amazon2023", "atomic", "atomic-seq"]

DEFAULT_DATA_ROOT = Path("data")


@dataclass
class DataConfig:
    source: SourceKind = "synthetic"  # where interactions come from
    input: str | None = None  # raw file/dir (amazon: reviews file or folder; atomic: folder or .inter file)
    meta: str | None = None  # amazon metadata file (found beside the reviews file when omitted)
    image_root: str | None = None  # folder with <item_id>/<image> files (local images)
    out: str | None = None  # prepared output dir (default: data/prepared/<name>)
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
        from moedist.data.sources.synthetic import generate_synthetic

        raw_dir = raw_synthetic_dir(cfg)
        log(f"generating synthetic raw data ({cfg.size}, seed {cfg.seed}) in {raw_dir}")
        generate_synthetic(raw_dir, size=cfg.size, seed=cfg.seed, progress=progress)
        input_path: Path = raw_dir
        kind = "amazon2018"
    else:
        if cfg.input is None:
            raise ConfigError(f"data.input is required for source {cfg.source!r} (the raw file or folder)")
        input_path = Path(cfg.input)
        if not input_path.exists():
            raise ConfigError(f"data.input: {input_path} does not exist")

    opts: dict = {"on_bad_line": cfg.on_bad_line, "progress": progress}
    if cfg.meta:
        opts["meta_path"] = cfg.meta
    if cfg.image_root:
        opts["image_root"] = cfg.image_root
    name = cfg.dataset_name()

    def load():
        log(f"reading {kind} source {input_path}")
        raw = sources.load_source(kind, input_path, **opts)
        raw.name = name
        base = input_path if input_path.is_dir() else input_path.parent
        raw.items["image"] = resolve_image_paths(raw.items["image"], base)
        return raw

    return prepare_dataset(load, out_dir, options=options, raw_files=_input_files(input_path, cfg.meta), log=log)


def _input_files(input_path: Path, meta: str | None) -> list[str]:
    """Files whose contents identify the preparation (hashed to make re-runs no-ops):
    the input file (and metadata file), or every data file directly inside an input folder."""
    if input_path.is_dir():
        files = sorted(
            str(p) for p in input_path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix not in {".jpg", ".jpeg", ".png", ".txt", ".md"}
        )
    else:
        files = [str(input_path)]
        siblings = [input_path.parent / input_path.name.replace("reviews_", "meta_").replace("_5.", ".")]
        siblings.append(input_path.parent / ("meta_" + input_path.name.replace("_5.", ".")))
        siblings.append(input_path.with_suffix(".item"))
        files += [str(p) for p in siblings if p.is_file() and p != input_path]
    if meta:
        files.append(str(meta))
    return sorted(set(files))


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
