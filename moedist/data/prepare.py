"""Raw source -> canonical prepared tables (see ``docs/contracts.md``).

Pipeline: optional (user, item) de-duplication -> iterative k-core to a fixed point ->
chronological order with stable ties -> id maps (0 = padding) -> both split protocols:

* leave-one-out by time (HM4SR): each user's last interaction is ``test``, the one before
  ``valid``, the rest ``train``;
* cold-start items (MAMEX / MILK, spec Part 3): items are split 8:1:1 at random (seeded);
  every interaction of a validation or test item is removed from training.

Outputs are written into a temporary directory and renamed into place only when complete,
so a failed or interrupted run never leaves half-written tables and never replaces a
previous good output. Re-running on the same inputs and options is a no-op.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd

from moedist import __version__
from moedist.data.schema import RawSource
from moedist.errors import DataError
from moedist.io import fsync_path, sha256_file, temp_dir

# 2: the fingerprint covers the source kind, name, input location, image folder and bad-line
#    policy; "inputs" lists the files actually read; sub-second times order interactions.
PREPARE_FORMAT = 2
MANIFEST = "dataset.json"


@dataclass
class PrepareOptions:
    kcore: int = 5  # users and items keep >= kcore interactions (iterated to a fixed point)
    dedup: bool = False  # keep only the first (chronological) interaction of each (user, item)
    cold_valid_frac: float = 0.1  # fraction of items that are validation cold items
    cold_test_frac: float = 0.1  # fraction of items that are test cold items
    split_seed: int = 2025  # seed of the cold-item split

    def validate(self) -> None:
        if self.kcore < 1:
            raise DataError(f"kcore must be >= 1, got {self.kcore}")
        for name in ("cold_valid_frac", "cold_test_frac"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise DataError(f"{name} must be in [0, 1), got {v}")
        if self.cold_valid_frac + self.cold_test_frac >= 1.0:
            raise DataError("cold_valid_frac + cold_test_frac must be < 1")


# ----------------------------------------------------------------------------- steps


def _time_order(df: pd.DataFrame) -> list[str]:
    """Sort keys of chronological order: whole seconds, sub-second fraction, file order."""
    return [c for c in ("timestamp", "time_frac", "file_order") if c in df]


def dedup_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the first interaction of each (user, item) pair in chronological order."""
    order = df.sort_values(_time_order(df), kind="mergesort")
    kept = order.drop_duplicates(["user_id", "item_id"], keep="first")
    return df.loc[df.index.isin(kept.index)]


def kcore_filter(df: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Drop users and items with fewer than ``k`` interactions, repeatedly, until stable.

    Returns the filtered frame (original row order) and the number of passes it took.
    """
    passes = 0
    while True:
        passes += 1
        user_n = df.groupby("user_id", sort=False)["item_id"].transform("size")
        item_n = df.groupby("item_id", sort=False)["user_id"].transform("size")
        keep = (user_n >= k) & (item_n >= k)
        if keep.all():
            return df, passes
        df = df.loc[keep]
        if df.empty:
            return df, passes


def max_consecutive_gap(df: pd.DataFrame) -> int:
    """Largest gap in seconds between consecutive interactions of one user.

    HM4SR sizes its interval-embedding table from this, computed on the raw file before
    k-core filtering (spec 1.1 step 4).
    """
    if df.empty:
        return 0
    s = df.sort_values(["user_id", *_time_order(df)], kind="mergesort")
    ts = s["timestamp"].to_numpy(np.int64)
    same_user = s["user_id"].to_numpy()[1:] == s["user_id"].to_numpy()[:-1]
    gaps = np.diff(ts)[same_user]
    return int(gaps.max()) if gaps.size else 0


def cold_item_split(n_items: int, *, valid_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Split labels (``train``/``valid``/``test``) for items 1..n_items, shape ``[n_items]``.

    A seeded permutation: the first ``round(test_frac*n)`` items are test, the next
    ``round(valid_frac*n)`` validation, the rest warm (MILK's "new item" protocol, 8:1:1).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_items)
    n_test = int(round(test_frac * n_items))
    n_valid = int(round(valid_frac * n_items))
    labels = np.full(n_items, "train", dtype=object)
    labels[perm[:n_test]] = "test"
    labels[perm[n_test : n_test + n_valid]] = "valid"
    return labels


def leave_one_out_labels(seq_pos: np.ndarray, user_len: np.ndarray) -> np.ndarray:
    """``test`` for each user's last interaction, ``valid`` for the one before, else ``train``.

    Users with 2 interactions get train + test; a single interaction stays in train.
    """
    labels = np.full(seq_pos.shape[0], "train", dtype=object)
    labels[(seq_pos == user_len - 1) & (user_len >= 2)] = "test"
    labels[(seq_pos == user_len - 2) & (user_len >= 3)] = "valid"
    return labels


# ----------------------------------------------------------------------------- pipeline



def _abs(path: str | Path) -> str:
    """An absolute, normalised path (``.`` and ``..`` removed), symlinks not followed."""
    return os.path.abspath(os.fspath(path))


def _fingerprint(raw_files: list[str], options: PrepareOptions, identity: dict | None = None,
                 hashes: dict[str, str] | None = None) -> str:
    """Identity of a preparation: input file names and contents + options + what else shapes
    the output (``identity``: source kind, name, input location, image folder, bad-line
    policy; JSON-serialisable) + output format."""
    hashes = {} if hashes is None else hashes
    h = hashlib.sha256()
    head = {"format": PREPARE_FORMAT, "options": dataclasses.asdict(options), "identity": identity or {}}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for f in sorted({_abs(f) for f in raw_files}):
        h.update(Path(f).name.encode())
        h.update(_sha(f, hashes).encode())
    return h.hexdigest()


def _sha(path: str, hashes: dict[str, str]) -> str:
    """sha256 of ``path``, computed once per preparation (``hashes`` caches by absolute path)."""
    key = _abs(path)
    if key not in hashes:
        try:
            hashes[key] = sha256_file(key)
        except OSError as e:
            raise DataError(f"cannot read input file: {e.strerror or e}", path=path) from None
    return hashes[key]


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, path)
    fsync_path(path)


_STATS_KEYS = (
    "users", "items", "interactions", "sparsity", "avg_actions_per_user", "avg_actions_per_item",
    "items_with_image", "items_without_metadata", "kcore", "kcore_passes", "raw_interactions",
    "duplicates_removed",
)
_LOO_KEYS = ("train_samples", "valid_users", "test_users")
_COLD_KEYS = tuple(f"{s}_{w}" for w in ("items", "interactions") for s in ("train", "valid", "test"))


def validate_manifest(meta, path: str | Path) -> dict:
    """``meta`` if it has the shape of a prepared dataset's manifest, else a DataError naming
    ``path`` and the first thing wrong."""
    if not isinstance(meta, dict):
        raise DataError(f"not a moedist dataset manifest: expected a JSON object, found {type(meta).__name__}", path=path)
    if "format" not in meta:
        raise DataError("not a moedist dataset manifest: no 'format' key", path=path)
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise DataError("damaged manifest: 'files' must map table names to sha256 digests; re-run `moedist data prepare`", path=path)
    bad = [k for k in files if Path(k).name != k or k in ("", ".", "..", MANIFEST)]
    if bad:
        raise DataError(f"damaged manifest: 'files' names {bad[0]!r}, not a table of this folder", path=path)
    stats = meta.get("stats")
    if not isinstance(stats, dict):
        raise DataError("damaged manifest: no 'stats' object; re-run `moedist data prepare`", path=path)
    for section, keys in ((None, _STATS_KEYS), ("loo", _LOO_KEYS), ("cold", _COLD_KEYS)):
        d = stats if section is None else stats.get(section)
        where = "stats" if section is None else f"stats.{section}"
        if not isinstance(d, dict):
            raise DataError(f"damaged manifest: no '{where}' object; re-run `moedist data prepare`", path=path)
        missing = [k for k in keys if k not in d]
        if missing:
            raise DataError(f"damaged manifest: '{where}' lacks {missing[0]!r}; re-run `moedist data prepare`", path=path)
    return meta


def _read_manifest(out_dir: Path) -> dict | None:
    """The validated manifest of ``out_dir``, or None if there is none or it is damaged."""
    try:
        return validate_manifest(json.loads((out_dir / MANIFEST).read_text()), out_dir / MANIFEST)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, DataError):
        return None


def _tables_intact(out_dir: Path, meta: dict) -> bool:
    """Every table the manifest lists is there with the sha256 it was written with."""
    if not meta["files"]:
        return False
    for name, digest in meta["files"].items():
        try:
            if sha256_file(out_dir / name) != digest:
                return False
        except OSError:
            return False
    return True


def is_complete(out_dir: str | Path) -> bool:
    """``out_dir`` holds a prepared dataset whose manifest is intact and whose tables all
    match the sha256 the manifest records (a truncated or damaged table is not complete)."""
    out_dir = Path(out_dir)
    meta = _read_manifest(out_dir)
    return meta is not None and _tables_intact(out_dir, meta)


def _is_dataset_dir(path: Path) -> bool:
    """``path`` holds a moedist ``dataset.json`` (a JSON object with a ``format`` key)."""
    try:
        meta = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(meta, dict) and "format" in meta


def check_out_dir(out_dir: str | Path, inputs: list[str | Path] | tuple = ()) -> None:
    """Refuse (DataError naming the folder) an output folder that preparing would wrongly
    replace: the current directory or one above it, a folder holding any of ``inputs``, a
    file, or an existing folder that is neither empty nor a prepared dataset (no moedist
    ``dataset.json``). Preparing replaces the whole folder, so anything else in it would be
    deleted."""
    out = Path(_abs(out_dir))
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise DataError(
            "refusing to write the prepared dataset here: the output folder is the current directory or one "
            "above it, and preparing replaces the whole folder; choose a new folder (e.g. data/prepared/<name>)",
            path=out_dir,
        )
    for f in inputs:
        if f is None:
            continue
        fr = Path(_abs(f)).resolve()
        if fr == real or real in fr.parents:
            what = "is the input" if fr == real else f"holds the input {f}"
            raise DataError(
                f"refusing to write the prepared dataset here: the output path {what}, and preparing "
                "replaces the whole folder; choose a new folder",
                path=out_dir,
            )
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise DataError("the output path exists and is not a folder; choose a new folder", path=out_dir)
    try:
        empty = next(os.scandir(out), None) is None
    except OSError as e:
        raise DataError(f"cannot list the output folder: {e.strerror or e}", path=out_dir) from None
    if not empty and not _is_dataset_dir(out):
        raise DataError(
            f"refusing to replace this folder: it is not empty and holds no moedist {MANIFEST} (not a prepared "
            "dataset), and preparing replaces the whole folder; choose a new or empty folder",
            path=out_dir,
        )


def prepare_dataset(
    source: RawSource | Callable[[], RawSource],
    out_dir: str | Path,
    *,
    options: PrepareOptions | None = None,
    raw_files: list[str] | None = None,
    identity: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Prepare ``source`` into ``out_dir`` and return the manifest (``dataset.json``).

    ``source`` may be a callable: when ``raw_files`` (the input files it will read) are given
    and ``out_dir`` already holds the output of those exact files, ``identity`` and options
    (with intact tables and unchanged recorded inputs), nothing is parsed at all.
    ``identity`` (JSON-serialisable) holds whatever else shapes the output: source kind,
    name, image folder, bad-line policy. ``out_dir`` is refused before anything is read if
    replacing it could delete anything but a prepared dataset (:func:`check_out_dir`).
    """
    options = options or PrepareOptions()
    options.validate()
    log = log or (lambda msg: None)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, raw_files or [])
    hashes: dict[str, str] = {}

    def up_to_date(files: list[str]) -> dict | None:
        if not files:
            return None
        meta = _read_manifest(out_dir)
        if meta is None:
            return None
        try:
            if meta.get("fingerprint") != _fingerprint(files, options, identity, hashes):
                return None
        except DataError:  # an input is missing or unreadable: the reader will say so
            return None
        inputs = meta.get("inputs")
        if not isinstance(inputs, dict) or not inputs:
            return None
        for f, digest in inputs.items():  # the files the previous run actually read
            try:
                if _sha(f, hashes) != digest:
                    return None
            except DataError:
                return None
        if not _tables_intact(out_dir, meta):
            log(f"{out_dir}: a table does not match its recorded sha256; preparing again")
            return None
        meta["reused"] = True
        log(f"{out_dir} is up to date (same inputs and options); nothing to do")
        return meta

    if raw_files and (meta := up_to_date(raw_files)):
        return meta
    t0 = time.time()
    raw = source() if callable(source) else source
    check_out_dir(out_dir, raw.files)
    files = sorted({_abs(f) for f in [*(raw_files or []), *raw.files]})
    if files and sorted({_abs(f) for f in raw_files or []}) != files and (meta := up_to_date(files)):
        return meta

    tables, stats = build_tables(raw, options, log=log)
    manifest = {
        "format": PREPARE_FORMAT,
        "name": raw.name,
        "source": (identity or {}).get("source"),
        "moedist_version": __version__,
        "fingerprint": _fingerprint(files, options, identity, hashes) if files else None,
        "identity": identity or {},
        # the files read (and any named by the caller): a re-run checks them all again
        "inputs": {f: _sha(f, hashes) for f in files},
        "options": dataclasses.asdict(options),
        "skipped_lines": dict(raw.skipped),
        "max_interval_seconds": stats.pop("max_interval_seconds"),
        "stats": stats,
        "files": {},
    }
    _publish(tables, manifest, out_dir)
    manifest["reused"] = False
    manifest["seconds"] = round(time.time() - t0, 3)
    return manifest


def build_tables(raw: RawSource, options: PrepareOptions, *, log=lambda m: None) -> tuple[dict[str, pd.DataFrame], dict]:
    inter = raw.interactions.reset_index(drop=True).copy()
    if inter.empty:
        raise DataError(f"source {raw.name!r} has no interactions", path=(raw.files[0] if raw.files else None))
    inter["file_order"] = np.arange(len(inter), dtype=np.int64)
    # sub-second part of the source's time: orders interactions within one second (the
    # tables store whole seconds); hand-built sources may leave it out
    if "time_frac" in inter:
        inter["time_frac"] = inter["time_frac"].astype(np.float64).fillna(0.0)
    else:
        inter["time_frac"] = 0.0
    n_raw = len(inter)
    max_gap = max_consecutive_gap(inter)

    n_dups = 0
    if options.dedup:
        before = len(inter)
        inter = dedup_interactions(inter)
        n_dups = before - len(inter)
        log(f"de-duplication removed {n_dups} repeated (user, item) interactions")

    inter, passes = kcore_filter(inter, options.kcore)
    if inter.empty:
        raise DataError(
            f"no interactions left after {options.kcore}-core filtering of {n_raw} interactions "
            f"(source {raw.name!r}); lower kcore or check the input",
            path=(raw.files[0] if raw.files else None),
        )
    log(f"{options.kcore}-core: {n_raw} -> {len(inter)} interactions in {passes} passes")

    # id maps, 0 reserved for padding; sorted raw ids make the maps independent of file order
    users = np.sort(inter["user_id"].astype(str).unique())
    items = np.sort(inter["item_id"].astype(str).unique())
    user_idx = pd.Series(np.arange(1, len(users) + 1, dtype=np.int64), index=users)
    item_idx = pd.Series(np.arange(1, len(items) + 1, dtype=np.int64), index=items)
    inter["user_idx"] = user_idx.loc[inter["user_id"].astype(str).to_numpy()].to_numpy()
    inter["item_idx"] = item_idx.loc[inter["item_id"].astype(str).to_numpy()].to_numpy()

    # chronological order per user (to the source's full precision); mergesort is stable,
    # so same-time ties keep file order
    inter = inter.sort_values(["user_idx", "timestamp", "time_frac", "file_order"], kind="mergesort").reset_index(drop=True)
    inter["seq_pos"] = inter.groupby("user_idx", sort=False).cumcount().astype(np.int64)
    user_len = inter.groupby("user_idx", sort=False)["item_idx"].transform("size").to_numpy(np.int64)
    inter["loo_split"] = leave_one_out_labels(inter["seq_pos"].to_numpy(np.int64), user_len)

    cold = cold_item_split(len(items), valid_frac=options.cold_valid_frac, test_frac=options.cold_test_frac, seed=options.split_seed)
    inter["cold_split"] = cold[inter["item_idx"].to_numpy() - 1]

    # items table: metadata where present, empty text otherwise
    meta = raw.items.drop_duplicates("item_id", keep="first").set_index("item_id")
    item_df = pd.DataFrame({"item_idx": item_idx.to_numpy(), "item_id": items})
    joined = meta.reindex(items)
    n_no_meta = int(joined["text"].isna().sum()) if "text" in joined else len(items)
    for col in ("title", "brand", "text", "image"):
        item_df[col] = joined[col].astype("string").to_numpy() if col in joined else pd.array([pd.NA] * len(items), dtype="string")
    item_df["text"] = item_df["text"].fillna("")
    cats = joined["categories"].tolist() if "categories" in joined else [None] * len(items)
    item_df["categories"] = [list(c) if isinstance(c, (list, tuple)) else [] for c in cats]
    item_df["cold_split"] = cold

    user_df = pd.DataFrame({"user_idx": user_idx.to_numpy(), "user_id": users})
    inter_out = inter[["user_idx", "item_idx", "timestamp", "rating", "seq_pos", "loo_split", "cold_split"]].copy()
    inter_out["timestamp"] = inter_out["timestamp"].astype(np.int64)
    inter_out["rating"] = inter_out["rating"].astype(np.float64)
    for col in ("loo_split", "cold_split"):
        inter_out[col] = inter_out[col].astype(str)
    item_df["cold_split"] = item_df["cold_split"].astype(str)

    n_u, n_i, n = len(users), len(items), len(inter_out)
    seq_len = user_len[inter["seq_pos"].to_numpy() == 0]
    stats = {
        "raw_interactions": n_raw,
        "duplicates_removed": n_dups,
        "kcore": options.kcore,
        "kcore_passes": passes,
        "users": n_u,
        "items": n_i,
        "interactions": n,
        "sparsity": 1.0 - n / (n_u * n_i),
        "avg_actions_per_user": n / n_u,
        "avg_actions_per_item": n / n_i,
        "max_seq_len": int(seq_len.max()),
        "items_without_metadata": n_no_meta,
        "items_with_image": int(item_df["image"].notna().sum()),
        "time_range": [int(inter_out["timestamp"].min()), int(inter_out["timestamp"].max())],
        "loo": {
            # training samples are all prefixes with targets i_2..i_{n-2} (spec 1.2)
            "train_samples": int(np.maximum(seq_len - 3, 0).sum()),
            "valid_users": int((inter_out["loo_split"] == "valid").sum()),
            "test_users": int((inter_out["loo_split"] == "test").sum()),
        },
        "cold": {
            f"{s}_items": int((cold == s).sum()) for s in ("train", "valid", "test")
        }
        | {f"{s}_interactions": int((inter_out["cold_split"] == s).sum()) for s in ("train", "valid", "test")},
        "max_interval_seconds": max_gap,
    }
    tables = {"interactions.parquet": inter_out, "items.parquet": item_df, "users.parquet": user_df}
    return tables, stats


CARRIED_OVER = "features"  # kept when a dataset folder is prepared again


def _publish(tables: dict[str, pd.DataFrame], manifest: dict, out_dir: Path) -> None:
    """Write all tables + manifest to a temp dir beside ``out_dir`` (each file and the folder
    fsynced), then swap it in. ``out_dir`` is checked again just before it is replaced.

    An earlier dataset's ``features/`` folder moves into the new one: its shards and image
    download cache may have taken hours, and they stay safe to keep (extraction compares its
    fingerprint, which holds the items' content, and rebuilds what changed; training refuses
    features made for other items)."""
    out_dir = Path(_abs(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, prefix=f".{out_dir.name}.tmp-")
    try:
        for name, df in tables.items():
            _write_parquet(df, tmp / name)
            manifest["files"][name] = sha256_file(tmp / name)
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        check_out_dir(out_dir)  # still empty or a prepared dataset
        if os.path.lexists(out_dir):
            holder = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            old = holder / "previous"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)  # put the previous output back
                shutil.rmtree(holder, ignore_errors=True)
                raise
            fsync_path(out_dir.parent)
            kept = old / CARRIED_OVER
            if kept.is_dir() and not kept.is_symlink():
                os.replace(kept, out_dir / CARRIED_OVER)
                fsync_path(out_dir)
            shutil.rmtree(holder, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
            fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataError("not a prepared dataset (no dataset.json); run `moedist data prepare` first", path=data_dir)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"manifest is not valid JSON ({e.msg})", path=path, line=e.lineno) from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"cannot read manifest ({type(e).__name__}: {e})", path=path) from None
    return validate_manifest(meta, path)


SplitProtocol = Literal["loo", "cold"]
