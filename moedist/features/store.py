"""Item-feature shards on disk -> dense tensors (``ItemFeatures``), and the shard format itself.

A features folder (written by :mod:`moedist.features.pipeline`) holds::

    manifest.json            what is in the shards (below)
    shard-000000.tar         WebDataset shard: items 1 .. shard_size
    shard-000001.tar         items shard_size+1 .. 2*shard_size
    ...

Each shard is a plain tar (WebDataset layout). One sample per item, key = ``item_idx``
zero-padded to 9 digits, with one entry per modality and one JSON entry::

    000000001.text.npy       float32 [D_text]   (zeros if the item has no text)
    000000001.image.npy      float32 [D_image]  (zeros if the image was missing)
    000000001.meta.json      {"item_idx": 1, "item_id": "B0001", "mask": {"text": true, "image": false},
                              "missing": {"image": "http_404"}}

``.npy`` entries are written and read with ``allow_pickle=False``; nothing is ever pickled.
Tar headers are normalised (mtime 0, uid/gid 0, mode 0644), so the same features give the
same bytes and the same sha256.

``manifest.json`` keys: ``format``, ``format_version``, ``fingerprint`` (of the items table,
encoder specs and shard size: a re-run with the same inputs resumes), ``complete``,
``n_items``, ``shard_size``, ``key_digits``, ``modalities``, ``dims``, ``encoders``
(each encoder's ``describe()``), ``encoder_specs``, ``item_ids`` (``item_ids[i-1]`` is the raw
id of ``item_idx`` i), ``shards`` (``file``, ``index``, ``first_item``, ``last_item``, ``count``,
``sha256``, ``bytes``, ``missing``), ``missing`` (per modality: ``total``, ``reasons``,
``examples``), ``run`` (mode, seconds, items/s of the last run), ``items_digest`` (sha256 of
the items' ``item_id`` order and of the ``text`` / ``image`` fields that were encoded: training
checks that its dataset is the one the features were made from), ``fingerprint_inputs`` (what
the fingerprint is made of, to say what changed), ``warnings`` (e.g. a modality missing for
nearly every item). :func:`read_manifest` checks the shape of all of it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from moedist.errors import DataError
from moedist.io import atomic_write_json, sha256_file, temp_file

FORMAT = "moedist-item-features"
FORMAT_VERSION = 1
KEY_DIGITS = 9
MANIFEST = "manifest.json"
MODALITIES = ("text", "image")
# Largest .meta.json entry read from a shard (an item id and a few reasons: well under 1 KB).
MAX_META_BYTES = 1024 * 1024
# Room for a .npy header (numpy writes 128 bytes; it reads up to 10,000) besides the data.
NPY_HEADER_ROOM = 16 * 1024


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_range(index: int, shard_size: int, n_items: int) -> tuple[int, int]:
    """Inclusive ``(first_item, last_item)`` of shard ``index`` (item ids start at 1)."""
    first = index * shard_size + 1
    return first, min((index + 1) * shard_size, n_items)


def n_shards(n_items: int, shard_size: int) -> int:
    return (n_items + shard_size - 1) // shard_size



def item_key(item_idx: int) -> str:
    return f"{int(item_idx):0{KEY_DIGITS}d}"


# ----------------------------------------------------------------------------- writing


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: str | Path,
    *,
    item_idx: np.ndarray,
    item_ids: list[str],
    features: dict[str, np.ndarray],
    mask: dict[str, np.ndarray],
    missing: dict[str, list[str | None]],
) -> dict:
    """Write one shard atomically (temporary file in the same folder, fsync, ``os.replace``).

    ``features[m]`` is ``float32 [n, D_m]`` in the order of ``item_idx``. Returns
    ``{"sha256", "bytes"}`` of the written file. A crash leaves at most a ``*.tmp`` file,
    never a partial shard under the final name.
    """
    path = Path(path)
    fd, tmp = temp_file(path.parent, prefix=path.name + ".")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as raw:

            class _Hashing(io.RawIOBase):  # hash while writing: no second read of the file
                pos = 0

                def writable(self):
                    return True

                def tell(self):
                    return self.pos

                def write(self, b):
                    h.update(b)
                    self.pos += len(b)
                    return raw.write(b)

            sink = _Hashing()
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for row, idx in enumerate(item_idx):
                    key = item_key(idx)
                    for m, x in features.items():
                        _add_member(tar, f"{key}.{m}.npy", _npy_bytes(x[row]))
                    meta = {
                        "item_idx": int(idx),
                        "item_id": str(item_ids[row]),
                        "mask": {m: bool(mask[m][row]) for m in features},
                        "missing": {m: missing[m][row] for m in features if missing[m][row]},
                    }
                    _add_member(tar, f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode())
            raw.flush()
            os.fsync(raw.fileno())
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"sha256": h.hexdigest(), "bytes": size}


def write_json_atomic(path: str | Path, obj: dict) -> None:
    atomic_write_json(path, obj)


# ----------------------------------------------------------------------------- reading


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_manifest(m, path: Path) -> None:
    """The manifest's shape (types, ranges, shard entries); DataError naming the field."""

    def bad(msg: str):
        raise DataError(f"manifest is not usable: {msg}", path=path)

    if not isinstance(m, dict):
        bad(f"expected a JSON object, got a JSON {type(m).__name__}")
    if m.get("format") != FORMAT:
        raise DataError(f"not a moedist item-features manifest (format={m.get('format')!r})", path=path)
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"features format version {m.get('format_version')} is not supported (expected {FORMAT_VERSION})", path=path)
    for key in ("n_items", "shard_size"):
        if not _is_int(m.get(key)) or m[key] < 1:
            bad(f"'{key}' must be a positive integer, got {m.get(key)!r}")
    dims = m.get("dims")
    if not isinstance(dims, dict) or not all(isinstance(k, str) and _is_int(v) and v > 0 for k, v in dims.items()):
        bad(f"'dims' must map modality -> positive integer, got {dims!r}")
    if m.get("complete") and not dims:
        bad("'dims' is empty in a complete manifest")
    if "complete" in m and not isinstance(m["complete"], bool):
        bad(f"'complete' must be true or false, got {m['complete']!r}")
    for key in ("encoders", "encoder_specs", "missing"):
        if key in m and not isinstance(m[key], dict):
            bad(f"'{key}' must be an object, got {type(m[key]).__name__}")
    ids = m.get("item_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != m["n_items"]):
        bad(f"'item_ids' must be a list of n_items={m['n_items']} ids" + (f", got {len(ids)}" if isinstance(ids, list) else ""))
    shards = m.get("shards")
    if not isinstance(shards, list):
        bad(f"'shards' must be a list, got {type(shards).__name__}")
    for i, sh in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(sh, dict):
            bad(f"{where} must be an object")
        for key in ("index", "first_item", "last_item"):
            if not _is_int(sh.get(key)) or sh[key] < 0:
                bad(f"{where}.{key} must be a non-negative integer, got {sh.get(key)!r}")
        if sh.get("file") != shard_name(sh["index"]):  # also keeps paths inside the folder
            bad(f"{where}.file must be {shard_name(sh['index'])!r}, got {sh.get('file')!r}")
        if not isinstance(sh.get("sha256"), str):
            bad(f"{where}.sha256 must be a string")
        if "missing" in sh and not isinstance(sh["missing"], dict):
            bad(f"{where}.missing must be an object")


def read_manifest(features_dir: str | Path) -> dict:
    """``manifest.json`` of a features folder, checked (:class:`DataError` naming it otherwise)."""
    path = Path(features_dir) / MANIFEST
    if not path.is_file():
        raise DataError("no manifest.json: not a features folder, or the extraction never finished a shard (run `moedist extract`)", path=path)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"manifest is not valid JSON ({e})", path=path) from e
    except OSError as e:
        raise DataError(f"cannot read the manifest ({e})", path=path) from e
    _check_manifest(manifest, path)
    return manifest


def _check_member_size(member: tarfile.TarInfo, limit: int, path: Path) -> None:
    """DataError unless ``member`` is a plain (not sparse) entry of at most ``limit`` bytes: a GNU
    sparse entry of a few bytes on disk can claim gigabytes, which ``read()`` would allocate."""
    if member.sparse is not None or member.size > limit:
        kind = "sparse entry" if member.sparse is not None else "entry"
        raise DataError(f"{kind} {member.name!r} claims {member.size:,} bytes (at most {limit:,} expected); "
                        "not a shard written by moedist", path=path)


def read_shard_missing(path: str | Path) -> dict[int, dict[str, str]]:
    """``{item_idx: {modality: reason}}`` for the items of a shard with a missing modality
    (from its ``.meta.json`` entries only). Raises :class:`DataError` for an unreadable shard."""
    path = Path(path)
    out: dict[int, dict[str, str]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".meta.json"):
                    _check_member_size(member, MAX_META_BYTES, path)
                    meta = json.loads(tar.extractfile(member).read())
                    if meta.get("missing"):
                        out[int(meta["item_idx"])] = dict(meta["missing"])
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"corrupt shard ({type(e).__name__}: {e})", path=path) from e
    return out


# ----------------------------------------------------------------------------- items identity


def text_or_none(v) -> str | None:
    """``v`` as a string, or None for a missing value (None, NaN, ``pd.NA``)."""
    if v is None:
        return None
    try:
        if v != v:  # NaN / pd.NA-like missing values
            return None
    except (TypeError, ValueError):  # pd.NA raises on bool()
        return None
    return str(v)


ITEMS_DIGEST_VERSION = 1  # how items_digest hashes; a manifest's digest of another version is not compared


def items_digest(item_ids, text=None, image=None) -> dict[str, str]:
    """sha256 of the items' ``item_id`` order (and of their ``text`` / ``image`` fields when
    given), each a sequence ordered by ``item_idx``. Missing values (None / NaN) hash alike."""

    from moedist.io import sha256_strings

    def h(values, missing_as: str | None) -> str:
        vals = (text_or_none(v) for v in values)
        return sha256_strings(vals if missing_as is None else (missing_as if v is None else v for v in vals))

    out = {"version": ITEMS_DIGEST_VERSION, "item_id": h(item_ids, "")}  # the pipeline stores a missing id as ""
    if text is not None:
        out["text"] = h(text, None)
    if image is not None:
        from moedist.features.images import portable_image_ref

        # where the raw images lie on this machine is not part of what was encoded
        out["image"] = h([None if (ref := text_or_none(v)) is None else portable_image_ref(ref) for v in image], None)
    return out


def read_shard(path: str | Path, *, first_item: int, last_item: int, dims: dict[str, int]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[int, dict]]:
    """One shard -> ``(features {m: [n, D]}, mask {m: bool[n]}, meta {item_idx: meta})``, rows = first..last.

    Checks that every item of the range is there exactly once, with every modality's
    ``.npy`` of shape ``[D_m]`` float32. Raises :class:`DataError` naming the shard otherwise.
    """
    path = Path(path)
    n = last_item - first_item + 1
    feats = {m: np.zeros((n, d), np.float32) for m, d in dims.items()}
    mask = {m: np.zeros(n, bool) for m in dims}
    seen = {m: np.zeros(n, bool) for m in [*dims, "meta"]}
    metas: dict[int, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                try:
                    idx = int(key)
                except ValueError:
                    raise DataError(f"unexpected entry {member.name!r} in shard", path=path) from None
                if not first_item <= idx <= last_item:
                    raise DataError(f"item {idx} does not belong in this shard (items {first_item}..{last_item})", path=path)
                row = idx - first_item
                m = ext[: -len(".npy")] if ext.endswith(".npy") else None
                if ext != "meta.json" and m not in dims:
                    continue  # a modality not asked for: not read at all
                _check_member_size(member, MAX_META_BYTES if ext == "meta.json" else 4 * dims[m] + NPY_HEADER_ROOM, path)
                data = tar.extractfile(member).read()
                if ext == "meta.json":
                    meta = json.loads(data)
                    metas[idx] = meta
                    for m in dims:
                        mask[m][row] = bool(meta.get("mask", {}).get(m, False))
                    seen["meta"][row] = True
                    continue
                x = np.load(io.BytesIO(data), allow_pickle=False)
                if x.dtype != np.float32 or x.shape != (dims[m],):
                    raise DataError(f"item {idx}: {m} feature has shape {x.shape} {x.dtype}, manifest says [{dims[m]}] float32", path=path)
                feats[m][row] = x
                seen[m][row] = True
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt shard ({type(e).__name__}: {e})", path=path) from e
    for m, s in seen.items():
        if not s.all():
            first_missing = first_item + int(np.flatnonzero(~s)[0])
            raise DataError(f"shard lacks {int((~s).sum())} {m} entries (first: item {first_missing})", path=path)
    return feats, mask, metas


@dataclass
class ItemFeatures:
    """Frozen item features aligned with ``item_idx``: row 0 is padding (zeros, mask False).

    ``features[m]``: ``float32 Tensor [N, D_m]``, ``mask[m]``: ``bool Tensor [N]``, N = n_items + 1;
    ``encoders[m]``: the encoder's description from the manifest.
    """

    features: dict  # str -> torch.Tensor [N, D_m] float32
    mask: dict  # str -> torch.BoolTensor [N]
    encoders: dict = field(default_factory=dict)  # str -> dict
    item_ids: list | None = None  # item_ids[i] = raw id of item_idx i (index 0 = None, padding)

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(x.shape[1]) for m, x in self.features.items()}

    @property
    def n_items(self) -> int:
        return int(next(iter(self.features.values())).shape[0]) - 1 if self.features else 0

    @property
    def modalities(self) -> list[str]:
        return list(self.features)

    def to(self, device) -> "ItemFeatures":
        return ItemFeatures(
            {m: x.to(device) for m, x in self.features.items()},
            {m: x.to(device) for m, x in self.mask.items()},
            self.encoders,
            self.item_ids,
        )


def _check_items(manifest: dict, items, modalities: list[str], features_dir: Path, data_dir, mpath: Path) -> None:
    """The dataset's items (ids in item_idx order, and the encoded fields) == the manifest's."""
    import pandas as pd

    if isinstance(items, pd.DataFrame):
        df = items.sort_values("item_idx", kind="stable") if "item_idx" in items else items
        ids = df["item_id"].tolist()
        fields = {m: df[m].tolist() for m in modalities if m in df}
    else:
        ids, fields = list(items), {}
    here = f"the dataset {data_dir}" if data_dir is not None else "the dataset"
    source = manifest.get("data_dir")
    made_from = f"were extracted from {source}" if source else "were made for other items"
    redo = f"re-run `moedist extract {data_dir}`" if data_dir is not None else "re-run `moedist extract` for this dataset"
    stored = manifest.get("item_ids")
    if stored is None:
        raise DataError(f"the manifest has no item_ids, so features in {features_dir} cannot be matched with {here}; {redo}", path=mpath)
    if len(ids) != len(stored):
        raise DataError(f"features in {features_dir} are for {len(stored)} items but {here} has {len(ids)}: they {made_from}; {redo}", path=mpath)
    mine = [text_or_none(x) or "" for x in ids]
    if mine != [str(x) for x in stored]:
        i = next(k for k, (a, b) in enumerate(zip(mine, stored)) if a != str(b))
        raise DataError(
            f"features in {features_dir} {made_from}, not from {here}: item_idx {i + 1} is {mine[i]!r} in the dataset "
            f"but {stored[i]!r} in the features; {redo}",
            path=mpath,
        )
    digest = manifest.get("items_digest")
    if isinstance(digest, dict) and digest.get("version") == ITEMS_DIGEST_VERSION and fields:
        now = items_digest(ids, **{m: v for m, v in fields.items() if m in ("text", "image")})
        changed = [m for m in fields if m in digest and m in now and m != "version" and digest[m] != now[m]]
        if changed:
            raise DataError(
                f"features in {features_dir} {made_from}: the same item ids, but the items' {' and '.join(changed)} "
                f"in {here} differ from what was encoded; {redo}",
                path=mpath,
            )


def load_item_features(
    features_dir: str | Path,
    n_items: int | None = None,
    *,
    items=None,
    data_dir: str | Path | None = None,
    modalities: Iterable[str] | None = None,
    verify: bool = True,
) -> ItemFeatures:
    """Read a features folder back into :class:`ItemFeatures` (rows aligned with ``item_idx``).

    Verifies each shard's sha256 (``verify=False`` skips only that) and dims against the
    manifest, and that ``n_items`` (when given, e.g. the prepared dataset's item count)
    matches. ``items`` -- the dataset's items table (``item_idx``, ``item_id`` and the
    ``text`` / ``image`` columns) or its raw item ids in ``item_idx`` order -- must be the
    items the features were made from: the same ids in the same order, and (for manifests
    that record an ``items_digest``) the same text / image fields for the modalities loaded;
    ``data_dir`` names the dataset in the error. A missing, corrupt or incomplete shard, or a
    mismatch, raises :class:`DataError` naming it.
    """
    import torch

    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    mpath = features_dir / MANIFEST
    if not manifest.get("complete"):
        raise DataError("the extraction did not finish (manifest says complete=false); re-run `moedist extract` to resume", path=mpath)
    total = int(manifest["n_items"])
    if n_items is not None and int(n_items) != total:
        where = f" {data_dir}" if data_dir is not None else ""
        raise DataError(f"features are for {total} items but the dataset{where} has {n_items}: re-run `moedist extract` for this dataset", path=mpath)
    dims = {m: int(d) for m, d in manifest["dims"].items()}
    if modalities is not None:
        wanted = list(modalities)
        absent = [m for m in wanted if m not in dims]
        if absent:
            raise DataError(f"features have no {absent} modality (have {sorted(dims)})", path=mpath)
        dims = {m: dims[m] for m in wanted}
    if items is not None:
        _check_items(manifest, items, list(dims), features_dir, data_dir, mpath)
    feats = {m: np.zeros((total + 1, d), np.float32) for m, d in dims.items()}
    mask = {m: np.zeros(total + 1, bool) for m in dims}
    shard_size = int(manifest["shard_size"])
    expected = n_shards(total, shard_size)
    shards = sorted(manifest["shards"], key=lambda s: s["index"])
    if [s["index"] for s in shards] != list(range(expected)):
        raise DataError(f"manifest lists shards {[s['index'] for s in shards]}, expected 0..{expected - 1}", path=mpath)
    for s in shards:
        path = features_dir / s["file"]
        first, last = int(s["first_item"]), int(s["last_item"])
        if (first, last) != shard_range(s["index"], shard_size, total):
            raise DataError(f"manifest gives shard {s['file']} items {first}..{last}, inconsistent with shard_size {shard_size}", path=mpath)
        if not path.is_file():
            raise DataError(f"shard {s['file']} is missing (listed in the manifest); re-run `moedist extract` to rebuild it", path=path)
        if verify:
            digest = sha256_file(path)
            if digest != s["sha256"]:
                raise DataError(f"shard {s['file']} is corrupt: sha256 {digest[:12]}… does not match the manifest's {s['sha256'][:12]}…; re-run `moedist extract` to rebuild it", path=path)
        f, mk, _ = read_shard(path, first_item=first, last_item=last, dims=dims)
        for m in dims:
            feats[m][first : last + 1] = f[m]
            mask[m][first : last + 1] = mk[m]
    for m in dims:
        feats[m][~mask[m]] = 0.0  # masked rows are zeros by contract (row 0 included)
    ids = manifest.get("item_ids")
    return ItemFeatures(
        features={m: torch.from_numpy(x) for m, x in feats.items()},
        mask={m: torch.from_numpy(x) for m, x in mask.items()},
        encoders={m: manifest.get("encoders", {}).get(m, {}) for m in dims},
        item_ids=[None, *ids] if ids is not None else None,
    )


def write_feature_arrays(
    out_dir: str | Path,
    *,
    item_ids: list[str],
    arrays: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    shard_size: int = 1000,
    encoders: dict[str, dict] | None = None,
) -> dict:
    """Store precomputed features (``arrays[m]``: ``[n_items, D_m]``, row i = item_idx i+1) as shards.

    For features computed elsewhere (e.g. the authors' ``.npy`` files) and for tests: the
    result is an ordinary features folder that :func:`load_item_features` reads. Rows with
    ``masks[m]`` False are stored as zeros (default mask: the row is not all zeros).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(item_ids)
    if not arrays:
        raise ValueError("write_feature_arrays: no arrays")
    arrays = {m: np.asarray(x, dtype=np.float32) for m, x in arrays.items()}
    for m, x in arrays.items():
        if x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"write_feature_arrays: {m} has shape {x.shape}, expected [{n}, D]")
    masks = {m: np.asarray(masks[m], bool) if masks and m in masks else np.abs(x).sum(1) > 0 for m, x in arrays.items()}
    shards = []
    h = hashlib.sha256()
    for i in range(n_shards(n, shard_size)):
        first, last = shard_range(i, shard_size, n)
        rows = slice(first - 1, last)
        feats = {m: np.where(masks[m][rows, None], x[rows], 0.0).astype(np.float32) for m, x in arrays.items()}
        info = write_shard(
            out_dir / shard_name(i),
            item_idx=np.arange(first, last + 1),
            item_ids=list(item_ids[rows]),
            features=feats,
            mask={m: masks[m][rows] for m in arrays},
            missing={m: [None if k else "absent" for k in masks[m][rows]] for m in arrays},
        )
        h.update(info["sha256"].encode())
        shards.append({"file": shard_name(i), "index": i, "first_item": first, "last_item": last, "count": last - first + 1, **info, "missing": {}})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": "arrays:" + h.hexdigest(),
        "complete": True,
        "n_items": n,
        "shard_size": shard_size,
        "key_digits": KEY_DIGITS,
        "modalities": list(arrays),
        "encoder_specs": {},
        "encoders": {m: (encoders or {}).get(m, {"backend": "arrays", "modality": m, "dim": int(x.shape[1])}) for m, x in arrays.items()},
        "dims": {m: int(x.shape[1]) for m, x in arrays.items()},
        "item_ids": [str(x) for x in item_ids],
        "items_digest": items_digest(item_ids),
        "shards": shards,
        "missing": {m: {"total": int((~masks[m]).sum()), "reasons": {"absent": int((~masks[m]).sum())} if (~masks[m]).any() else {}, "examples": {}} for m in arrays},
        "run": {"mode": "arrays"},
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
