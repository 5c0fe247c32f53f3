"""Items -> frozen text / image features -> WebDataset shards + manifest.json.

Two drivers with the same encoders, batching rules and outputs:

* :func:`extract_features` (Ray Data): the items to do become a dataset of small blocks,
  ``map_batches`` runs them through a pool of encoder actors (one encoder pair per actor;
  ``num_gpus=1`` each with ``use_gpu``, else ``num_cpus=0.5`` so that a 2-core machine keeps
  CPUs for Ray Data's own tasks -- STACK_NOTES 6/8), and the driver streams the results,
  assembles them per shard and writes each shard as soon as it is complete. Shards are
  written by the driver, so the output folder need not be shared with the workers.
* :func:`extract_features_local`: the same in one process, no Ray (laptops, the benchmark).

Per shard: ``shard-NNNNNN.tar`` holds items ``[i*shard_size + 1, (i+1)*shard_size]``; it is
written to a temporary file and renamed into place, then recorded (with its sha256) in
``manifest.json`` (also replaced atomically). A re-run with the same items table, encoder
specs, encoder implementations (each class's ``version``), weights (sha256 of the files) and
shard size (the manifest's ``fingerprint``) skips every shard whose file still has the
recorded sha256 and redoes only the others, so a crash costs at most the shards in flight.
Kept shards are never mixed with shards from a different encoder: if the encoders describe
themselves differently from the ones that made the kept shards (a library upgraded, ...;
the device does not count), every shard is rebuilt. A kept shard is also rebuilt when some
of its images failed for a temporary reason (timeout, connection error, HTTP 5xx / 429) or
were ``file_not_found`` and the file is there now (``retry_missing=False`` turns that off).
See :mod:`moedist.features.store` for the file layout.

Images are loaded inside the encoding step (:class:`moedist.features.images.ImageFetcher`:
local files or URLs, bounded concurrency, retries, disk cache); a missing or broken image
gives zeros + mask False and its reason is counted in the manifest. Null / blank text is
treated the same way (reason ``no_text``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from moedist.errors import ConfigError, DataError
from moedist.features import store
from moedist.features.encoders import encoder_identity, normalize_spec, spec_label
from moedist.features.images import TEMPORARY_REASONS, ImageFetcher, is_url, local_image_path

ITEM_COLUMNS = ("item_idx", "item_id", "text", "image")
MAX_EXAMPLES = 20  # per modality and reason, in the manifest
NEARLY_ALL = 0.9  # a modality missing for this share of the items or more is warned about
# description fields that say where an encoder ran or was installed, not what it computes
# (the weights' content is compared through their sha256)
DEVICE_LIKE = frozenset({"device", "model_path", "weights_path"})


# ============================================================================ planning


def default_out_dir(data_dir: str | Path, text_encoder: Any = "minilm", image_encoder: Any = "efficientnet_lite0") -> Path:
    """``<data_dir>/features/<text label>+<image label>``."""
    return Path(data_dir) / "features" / f"{spec_label(text_encoder)}+{spec_label(image_encoder)}"


def read_items(data_dir: str | Path) -> pd.DataFrame:
    """``items.parquet`` -> DataFrame (item_idx, item_id, text, image), checked: item_idx = 1..I."""
    path = Path(data_dir) / "items.parquet"
    if not path.is_file():
        raise DataError("no items.parquet: not a prepared dataset (run `moedist data prepare`)", path=path)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"cannot read items table ({e})", path=path) from e
    missing = [c for c in ("item_idx", "item_id") if c not in table.column_names]
    if missing:
        raise DataError(f"items table lacks columns {missing}", path=path)
    df = table.to_pandas()
    for c in ("text", "image"):
        if c not in df:
            df[c] = None
    df = df[list(ITEM_COLUMNS)].copy()
    try:
        df["item_idx"] = df["item_idx"].astype(np.int64)
    except (TypeError, ValueError) as e:  # NaN, text, ...: pandas' own message names neither file nor column
        raise DataError(f"column item_idx must hold integers 1..{len(df)} ({type(e).__name__}: {e})", path=path) from None
    df = df.sort_values("item_idx", kind="stable").reset_index(drop=True)
    n = len(df)
    if n == 0:
        raise DataError("items table is empty", path=path)
    if not np.array_equal(df["item_idx"].to_numpy(), np.arange(1, n + 1)):
        bad = int(np.flatnonzero(df["item_idx"].to_numpy() != np.arange(1, n + 1))[0])
        raise DataError(f"item_idx must be exactly 1..{n} (row {bad}: item_idx {int(df['item_idx'].iloc[bad])})", path=path)
    # object columns with None for missing values (pandas NA does not cross Ray / numpy well)
    for c in ("item_id", "text", "image"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    df["item_id"] = [str(x) if x is not None else "" for x in df["item_id"]]
    return df


def items_fingerprint(df: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for c in ITEM_COLUMNS:
        h.update(c.encode())
        h.update(json.dumps([None if v is None else (int(v) if c == "item_idx" else str(v)) for v in df[c].tolist()]).encode())
    return h.hexdigest()


def _comparable(d: Any) -> Any:
    """An encoder description without its device-like fields (:data:`DEVICE_LIKE`), as JSON."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            if k in DEVICE_LIKE:
                continue
            if k == "path" and d.get("sha256"):
                continue  # weights known by their sha256: where they lie (a cache, a mount) does not count
            if k == "torch" and isinstance(v, str):
                v = v.split("+")[0]  # 2.5.1+cu121 vs 2.5.1+cpu: the device again
            out[k] = _comparable(v)
        return out
    if isinstance(d, (list, tuple)):
        return [_comparable(v) for v in d]
    return d


def description_changes(old: dict, new: dict) -> list[str]:
    """Top-level fields in which two encoder descriptions differ (device-like fields ignored)."""
    a, b = _comparable(json.loads(json.dumps(old))), _comparable(json.loads(json.dumps(new)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class EncodersChanged(DataError):
    """The encoders now running differ from the ones that made the shards kept from an earlier run."""


def _spec_for_fingerprint(spec: dict | None) -> dict | None:
    if spec is None:
        return None
    return {k: v for k, v in spec.items() if k not in ("device", "cache_dir")}  # where it runs does not change what it computes


@dataclass
class FetchConfig:
    """How images are loaded (see :class:`ImageFetcher`)."""

    cache_dir: str | None = None
    base_dir: str | None = None
    max_workers: int = 8
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5

    def fetcher(self) -> ImageFetcher:
        return ImageFetcher(cache_dir=self.cache_dir, base_dir=self.base_dir, max_workers=self.max_workers, timeout=self.timeout, retries=self.retries, backoff=self.backoff)


@dataclass
class Plan:
    data_dir: Path
    out_dir: Path
    items: pd.DataFrame
    specs: dict[str, dict]  # modality -> normalised spec (only modalities with an encoder)
    shard_size: int
    fingerprint: str
    manifest: dict  # the manifest being built (done shards already in it)
    todo: list[int]  # shard indices to build
    skipped: list[int]  # shard indices kept from an earlier run

    @property
    def n_items(self) -> int:
        return len(self.items)

    def todo_items(self) -> pd.DataFrame:
        if not self.todo:
            return self.items.iloc[:0]
        shard_of = (self.items["item_idx"].to_numpy() - 1) // self.shard_size
        return self.items[np.isin(shard_of, self.todo)]


def _normalise_specs(text_encoder, image_encoder) -> dict[str, dict]:
    specs = {}
    for modality, spec in (("text", text_encoder), ("image", image_encoder)):
        if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "")):
            continue
        s = normalize_spec(spec)
        if s["modality"] != modality:
            raise ConfigError(f"the {modality} encoder spec is a {s['modality']} encoder: {s}")
        specs[modality] = s
    if not specs:
        raise ConfigError("no encoder: give a text encoder, an image encoder, or both")
    return specs


_FINGERPRINT_PARTS = {
    "format_version": "the features format",
    "items": "the items table",
    "specs": "the encoder specs",
    "encoders": "the encoder implementations or their weights",
    "shard_size": "the shard size",
}


def _what_changed(old: dict, inputs: dict) -> str:
    before = old.get("fingerprint_inputs")
    if not isinstance(before, dict):
        return "items, encoders, weights or shard size"
    changed = [label for k, label in _FINGERPRINT_PARTS.items() if before.get(k) != json.loads(json.dumps(inputs.get(k)))]
    return ", ".join(changed) or "the fingerprint's inputs"


def _retry_reason(entry: dict, out_dir: Path, items: pd.DataFrame, data_dir: Path) -> str | None:
    """Why a kept shard should be rebuilt to retry its missing images, or None.

    Temporary failures (:data:`TEMPORARY_REASONS`: timeout, connection error, HTTP 5xx/429)
    always retry. ``file_not_found`` retries only when one of those files exists now: a
    mount that was down comes back, while a genuinely absent file would otherwise make every
    re-run rebuild every shard that has one.
    """
    reasons = entry.get("missing", {}).get("image", {}) or {}
    temporary = {r: int(v.get("count", 0)) for r, v in reasons.items() if r in TEMPORARY_REASONS}
    if temporary:
        return f"{sum(temporary.values())} image(s) failed for temporary reasons ({', '.join(f'{r}: {c}' for r, c in sorted(temporary.items()))})"
    if "file_not_found" in reasons:
        missing = store.read_shard_missing(out_dir / entry["file"])
        sources = items["image"].to_numpy()
        back = 0
        for idx, why in missing.items():
            src = sources[idx - 1] if 1 <= idx <= len(sources) else None
            if why.get("image") == "file_not_found" and isinstance(src, str) and src.strip() and not is_url(src.strip()):
                back += local_image_path(src.strip(), data_dir).is_file()
        if back:
            return f"{back} image file(s) that were not found are there now"
    return None


def plan_extraction(
    data_dir,
    out_dir,
    *,
    text_encoder,
    image_encoder,
    shard_size: int,
    retry_missing: bool = True,
    keep: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> Plan:
    """Read the items, compare with an existing manifest and decide which shards to (re)build.

    ``keep=False`` rebuilds every shard whatever the manifest says; ``retry_missing=False``
    keeps shards whose images failed for temporary reasons.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    data_dir = Path(data_dir).resolve()
    specs = _normalise_specs(text_encoder, image_encoder)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(data_dir, specs.get("text"), specs.get("image"))
    out_dir.mkdir(parents=True, exist_ok=True)
    items = read_items(data_dir)
    inputs = {
        "format_version": store.FORMAT_VERSION,
        "items": items_fingerprint(items),
        "specs": {m: _spec_for_fingerprint(s) for m, s in specs.items()},
        # each encoder class's version and the sha256 of its weights: a new implementation or
        # new weights at the same path is a different fingerprint
        "encoders": {m: encoder_identity(s) for m, s in specs.items()},
        "shard_size": shard_size,
    }
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    n = len(items)
    count = store.n_shards(n, shard_size)

    # leftovers of a crash: temporary files are never valid shards
    for tmp in out_dir.glob("*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass

    old = None
    mpath = out_dir / store.MANIFEST
    if mpath.is_file():
        try:
            old = store.read_manifest(out_dir)
        except DataError as e:
            log(f"ignoring unusable manifest ({e}); rebuilding every shard")
    done: dict[int, dict] = {}
    if old is not None and old.get("fingerprint") == fingerprint and keep:
        for s in old.get("shards", []):
            p = out_dir / s["file"]
            if int(s["index"]) >= count:
                continue
            if not (p.is_file() and store.sha256_file(p) == s.get("sha256")):
                log(f"{s['file']}: missing or changed since it was written; rebuilding it")
                continue
            why = None
            if retry_missing:
                try:
                    why = _retry_reason(s, out_dir, items, data_dir)
                except DataError as e:
                    why = f"unreadable ({e})"
            if why:
                log(f"{s['file']}: {why}; rebuilding it to retry them")
                continue
            done[int(s["index"])] = s
    elif old is not None and old.get("fingerprint") == fingerprint:
        pass  # keep=False: the caller has said why
    elif old is not None:
        log(f"{_what_changed(old, inputs)} changed since the last run; rebuilding every shard")
    manifest = {
        "format": store.FORMAT,
        "format_version": store.FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_inputs": json.loads(json.dumps(inputs)),
        "complete": False,
        "data_dir": str(data_dir),
        "n_items": n,
        "shard_size": shard_size,
        "key_digits": store.KEY_DIGITS,
        "modalities": list(specs),
        "encoder_specs": specs,
        "encoders": dict(old.get("encoders", {})) if done else {},
        "dims": dict(old.get("dims", {})) if done else {},
        "item_ids": items["item_id"].tolist(),
        "items_digest": store.items_digest(items["item_id"].tolist(), **{m: items[m].tolist() for m in specs}),
        "shards": [done[i] for i in sorted(done)],
        "missing": {},
    }
    # shards from an earlier, different run that the new layout does not have
    valid_names = {store.shard_name(i) for i in range(count)}
    stale = [p for p in out_dir.glob("shard-*.tar") if p.name not in valid_names]
    if stale and mpath.is_file():
        # the manifest on disk may list them (and say complete): replace it first, so that an
        # interruption from here on leaves a manifest that lists only shards that are there
        store.write_json_atomic(mpath, manifest)
    for p in stale:
        p.unlink()
    todo = [i for i in range(count) if i not in done]
    return Plan(data_dir, out_dir, items, specs, shard_size, fingerprint, manifest, todo, sorted(done))


# ============================================================================ encoding (shared)


def encode_rows(encoders: dict, fetcher: ImageFetcher, item_idx: np.ndarray, text: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """One batch of items -> feature arrays, masks and missing reasons (same in Ray and local).

    Returns ``item_idx [B]`` and, per modality ``m`` with an encoder, ``m [B, D_m]`` float32,
    ``m_ok [B]`` bool and ``m_reason [B]`` str ("" when present).
    """
    n = len(item_idx)
    out: dict[str, np.ndarray] = {"item_idx": np.asarray(item_idx, dtype=np.int64)}
    if "text" in encoders:
        enc = encoders["text"]
        ok = np.array([isinstance(t, str) and bool(t.strip()) for t in text], bool)
        x = np.zeros((n, enc.dim), np.float32)
        if ok.any():
            x[ok] = enc.encode([t for t, k in zip(text, ok) if k])
        out["text"], out["text_ok"] = x, ok
        out["text_reason"] = np.array(["" if k else "no_text" for k in ok], dtype=object)
    if "image" in encoders:
        enc = encoders["image"]
        loaded = fetcher.fetch_many(list(image))
        ok = np.array([im is not None for im, _ in loaded], bool)
        x = np.zeros((n, enc.dim), np.float32)
        if ok.any():
            x[ok] = enc.encode([im for im, _ in loaded if im is not None])
        out["image"], out["image_ok"] = x, ok
        out["image_reason"] = np.array([(r or "decode_error") if im is None else "" for im, r in loaded], dtype=object)
    return out


class EncodeBatch:
    """Ray Data callable class: one encoder per modality per actor, built once in ``__init__``."""

    def __init__(self, specs: dict[str, dict], fetch: dict):
        from moedist.features.encoders import build_encoder

        self.encoders = {m: build_encoder(s) for m, s in specs.items()}
        self.fetcher = FetchConfig(**fetch).fetcher()
        self.meta = json.dumps({m: e.describe() for m, e in self.encoders.items()})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = encode_rows(self.encoders, self.fetcher, batch["item_idx"], batch["text"], batch["image"])
        # the encoders' descriptions travel with the results (on the first row of each batch),
        # so the manifest records what actually ran in the actors
        meta = np.full(len(out["item_idx"]), "", dtype=object)
        if len(meta):
            meta[0] = self.meta
        out["encoder_meta"] = meta
        return out


# ============================================================================ shard assembly


@dataclass
class _ShardBuffer:
    first: int
    last: int
    features: dict[str, np.ndarray] = field(default_factory=dict)
    ok: dict[str, np.ndarray] = field(default_factory=dict)
    reason: dict[str, list] = field(default_factory=dict)
    filled: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.last - self.first + 1


class ShardAssembler:
    """Collects encoded rows (in any order), writes each shard once all its items are in."""

    def __init__(self, plan: Plan, *, on_shard: Callable[[dict], None] = lambda s: None):
        self.first_batch: tuple[float, int] | None = None  # (perf_counter, rows) of the first result
        self.plan = plan
        self.manifest = plan.manifest
        self.buffers: dict[int, _ShardBuffer] = {}
        self.pending = set(plan.todo)
        self.on_shard = on_shard
        self.rows_done = 0
        self.modalities = list(plan.specs)

    def set_encoders(self, descriptions: dict[str, dict]) -> None:
        """Record the running encoders. Raises :class:`EncodersChanged` when shards are kept
        from an earlier run and these encoders describe themselves differently (device-like
        fields aside): the drivers then rebuild every shard rather than mix the two."""
        enc, dims = self.manifest["encoders"], self.manifest["dims"]
        if self.plan.skipped:
            for m, d in descriptions.items():
                if m in enc:
                    changes = description_changes(enc[m], d)
                    if changes:
                        raise EncodersChanged(
                            f"the {m} encoder differs from the one that made the {len(self.plan.skipped)} kept shard(s) "
                            f"({'; '.join(changes)[:600]})",
                            path=self.plan.out_dir,
                        )
        for m, d in descriptions.items():
            if m in dims and dims[m] != d["dim"]:
                raise DataError(f"{m} encoder gives {d['dim']}-d features but the kept shards have {dims[m]}-d; delete the folder and re-run", path=self.plan.out_dir)
            enc[m] = d
            dims[m] = int(d["dim"])

    def add(self, batch: dict[str, np.ndarray]) -> None:
        item_idx = np.asarray(batch["item_idx"], dtype=np.int64)
        if self.first_batch is None:
            self.first_batch = (time.perf_counter(), len(item_idx))
        shard_of = (item_idx - 1) // self.plan.shard_size
        for sid in np.unique(shard_of):
            sid = int(sid)
            if sid not in self.pending:
                continue  # a duplicate from a retried task, or a shard already written
            rows = np.flatnonzero(shard_of == sid)
            buf = self.buffers.get(sid)
            if buf is None:
                first, last = store.shard_range(sid, self.plan.shard_size, self.plan.n_items)
                buf = self.buffers[sid] = _ShardBuffer(first, last)
                buf.filled = np.zeros(buf.size, bool)
                for m in self.modalities:
                    buf.features[m] = np.zeros((buf.size, batch[m].shape[1]), np.float32)
                    buf.ok[m] = np.zeros(buf.size, bool)
                    buf.reason[m] = [None] * buf.size
            pos = item_idx[rows] - buf.first
            fresh = ~buf.filled[pos]
            rows, pos = rows[fresh], pos[fresh]
            for m in self.modalities:
                buf.features[m][pos] = batch[m][rows]
                buf.ok[m][pos] = batch[f"{m}_ok"][rows]
                for r, p in zip(rows, pos):
                    buf.reason[m][p] = batch[f"{m}_reason"][r] or None
            buf.filled[pos] = True
            self.rows_done += len(pos)
            if buf.filled.all():
                self._write(sid, buf)

    def _write(self, sid: int, buf: _ShardBuffer) -> None:
        plan = self.plan
        name = store.shard_name(sid)
        ids = plan.items["item_id"].iloc[buf.first - 1 : buf.last].tolist()
        info = store.write_shard(
            plan.out_dir / name,
            item_idx=np.arange(buf.first, buf.last + 1),
            item_ids=ids,
            features=buf.features,
            mask=buf.ok,
            missing=buf.reason,
        )
        missing: dict[str, dict[str, Any]] = {}
        for m in self.modalities:
            reasons: dict[str, list[int]] = {}
            for p, r in enumerate(buf.reason[m]):
                if r:
                    reasons.setdefault(r, []).append(buf.first + p)
            if reasons:
                missing[m] = {r: {"count": len(v), "examples": v[:MAX_EXAMPLES]} for r, v in sorted(reasons.items())}
        entry = {"file": name, "index": sid, "first_item": buf.first, "last_item": buf.last, "count": buf.size, **info, "missing": missing}
        shards = [s for s in self.manifest["shards"] if s["index"] != sid] + [entry]
        self.manifest["shards"] = sorted(shards, key=lambda s: s["index"])
        self.manifest["missing"] = summarise_missing(self.manifest["shards"], self.modalities)
        store.write_json_atomic(plan.out_dir / store.MANIFEST, self.manifest)  # the shard now counts as done
        self.pending.discard(sid)
        del self.buffers[sid]
        self.on_shard(entry)

    def finish(self, run: dict, log: Callable[[str], None] = lambda m: None) -> dict:
        if self.pending:
            raise RuntimeError(f"extraction ended with shards {sorted(self.pending)} incomplete ({sum(int(b.filled.sum()) for b in self.buffers.values())} rows buffered)")
        self.manifest["missing"] = summarise_missing(self.manifest["shards"], self.modalities)
        self.manifest["warnings"] = coverage_warnings(self.manifest)
        self.manifest["run"] = run
        self.manifest["complete"] = True
        store.write_json_atomic(self.plan.out_dir / store.MANIFEST, self.manifest)
        for w in self.manifest["warnings"]:
            log(f"WARNING: {w}")
            warnings.warn(w, RuntimeWarning, stacklevel=3)
        return self.manifest


def coverage_warnings(manifest: dict) -> list[str]:
    """A line per modality that is missing for nearly every item (:data:`NEARLY_ALL`)."""
    n = int(manifest.get("n_items") or 0)
    out = []
    for m, info in manifest.get("missing", {}).items():
        total = int(info.get("total", 0))
        if n and total >= NEARLY_ALL * n:
            reasons = ", ".join(f"{r}: {c:,}" for r, c in info.get("reasons", {}).items())
            hint = ""
            if m == "image" and any(r in TEMPORARY_REASONS or r == "file_not_found" for r in info.get("reasons", {})):
                hint = "; if the images were unreachable (network, a mount that was down), fix that and re-run: those shards are rebuilt"
            out.append(f"{m} features are missing for {total:,} of {n:,} items ({reasons}){hint}")
    return out


def summarise_missing(shards: list[dict], modalities: list[str]) -> dict:
    out = {}
    for m in modalities:
        reasons: dict[str, int] = {}
        examples: dict[str, list[int]] = {}
        for s in shards:
            for r, v in s.get("missing", {}).get(m, {}).items():
                reasons[r] = reasons.get(r, 0) + int(v["count"])
                ex = examples.setdefault(r, [])
                ex.extend(v["examples"][: MAX_EXAMPLES - len(ex)])
        out[m] = {"total": sum(reasons.values()), "reasons": dict(sorted(reasons.items())), "examples": dict(sorted(examples.items()))}
    return out


# ============================================================================ drivers


def _fetch_config(plan: Plan, image_cache_dir, fetch_workers, fetch_timeout, fetch_retries) -> FetchConfig:
    cache = Path(image_cache_dir) if image_cache_dir is not None else plan.data_dir / "features" / ".image-cache"
    return FetchConfig(cache_dir=str(cache), base_dir=str(plan.data_dir), max_workers=fetch_workers, timeout=fetch_timeout, retries=fetch_retries)


def _chunks(df: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(df), size):
        yield df.iloc[start : start + size]


class _Progress:
    def __init__(self, enabled: bool, total: int, description: str):
        self.bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(description, total=total)

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def update(self, completed: int) -> None:
        if self.bar:
            self.bar.update(self.task, completed=completed)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)


def _run_record(mode: str, plan: Plan, encoded: int, t0: float, asm: "ShardAssembler | None" = None, **extra) -> dict:
    """Timing of this run. ``steady_items_per_s`` leaves out start-up (Ray, actors, model
    loading) and the first batch: items after the first batch / time after it."""
    end = time.perf_counter()
    seconds = end - t0
    steady = None
    if asm is not None and asm.first_batch is not None:
        t_first, n_first = asm.first_batch
        if encoded > n_first and end > t_first:
            steady = round((encoded - n_first) / (end - t_first), 2)
    return {
        "mode": mode,
        "items_encoded": encoded,
        "shards_built": len(plan.todo),
        "shards_skipped": len(plan.skipped),
        "seconds": round(seconds, 3),
        "items_per_s": round(encoded / seconds, 2) if seconds > 0 and encoded else None,
        "first_result_s": round(asm.first_batch[0] - t0, 3) if asm is not None and asm.first_batch else None,
        "steady_items_per_s": steady,
        **extra,
    }


def extract_features_local(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    text_encoder: Any = "minilm",
    image_encoder: Any = "efficientnet_lite0",
    shard_size: int = 1000,
    batch_size: int = 64,
    progress: bool = True,
    image_cache_dir: str | Path | None = None,
    fetch_workers: int = 8,
    fetch_timeout: float = 10.0,
    fetch_retries: int = 2,
    retry_missing: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Single-process extraction: same encoders, batches, shards and manifest as :func:`extract_features`."""
    from moedist.features.encoders import build_encoder

    t0 = time.perf_counter()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    replan = dict(text_encoder=text_encoder, image_encoder=image_encoder, shard_size=shard_size, retry_missing=retry_missing, log=log)
    plan = plan_extraction(data_dir, out_dir, **replan)
    todo = plan.todo_items()
    asm = ShardAssembler(plan)
    if len(todo):
        encoders = {m: build_encoder(s) for m, s in plan.specs.items()}
        descriptions = {m: e.describe() for m, e in encoders.items()}
        try:
            asm.set_encoders(descriptions)
        except EncodersChanged as e:
            log(f"{e}; rebuilding every shard so that no features from the two are mixed")
            plan = plan_extraction(data_dir, out_dir, keep=False, **replan)
            todo = plan.todo_items()
            asm = ShardAssembler(plan)
            asm.set_encoders(descriptions)
        log(f"encoding {len(todo):,} items into {len(plan.todo)} shard(s) ({len(plan.skipped)} kept) -> {plan.out_dir}")
        fetcher = _fetch_config(plan, image_cache_dir, fetch_workers, fetch_timeout, fetch_retries).fetcher()
        with _Progress(progress, len(todo), "extract (local)") as bar:
            for chunk in _chunks(todo, batch_size):
                asm.add(encode_rows(encoders, fetcher, chunk["item_idx"].to_numpy(), chunk["text"].to_numpy(), chunk["image"].to_numpy()))
                bar.update(asm.rows_done)
    else:
        log(f"all {len(plan.skipped)} shard(s) up to date in {plan.out_dir}")
    import torch

    return asm.finish(_run_record("local", plan, asm.rows_done, t0, asm, batch_size=batch_size, torch_threads=torch.get_num_threads()), log)


def _ensure_ray(ray_address: str | None) -> bool:
    """Connect to / start Ray; returns True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=ray_address, log_to_driver=False)
        return True
    # RAY_AUTH_MODE is left as the caller set it: a local Ray's GCS and raylets listen on every
    # interface (not loopback), and Ray only authenticates callers (its default for a new local
    # cluster: a token in ~/.ray/auth_token) when auth is not disabled
    from moedist.ray_auth import private_auth_token

    private_auth_token()
    project_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH")) if p)
    # 4+ logical CPUs and fractional actor CPUs: actor pools deadlock on 2 CPUs (STACK_NOTES 6)
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1),
        object_store_memory=256 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    return True


def extract_features(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    text_encoder: Any = "minilm",
    image_encoder: Any = "efficientnet_lite0",
    shard_size: int = 1000,
    batch_size: int = 64,
    num_actors: int = 1,
    use_gpu: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    image_cache_dir: str | Path | None = None,
    fetch_workers: int = 8,
    fetch_timeout: float = 10.0,
    fetch_retries: int = 2,
    retry_missing: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Extract item features with Ray Data; returns the manifest (also in ``<out_dir>/manifest.json``).

    ``out_dir`` defaults to ``<data_dir>/features/<text>+<image>``. Ray is started locally
    unless it is already initialised or ``ray_address`` / ``RAY_ADDRESS`` names a cluster.
    """
    t0 = time.perf_counter()
    if num_actors < 1 or batch_size < 1:
        raise ConfigError(f"num_actors and batch_size must be >= 1 (got {num_actors}, {batch_size})")
    replan = dict(text_encoder=text_encoder, image_encoder=image_encoder, shard_size=shard_size, retry_missing=retry_missing, log=log)
    plan = plan_extraction(data_dir, out_dir, **replan)
    if not plan.todo:
        log(f"all {len(plan.skipped)} shard(s) up to date in {plan.out_dir}")
        return ShardAssembler(plan).finish(_run_record("ray", plan, 0, t0, num_actors=num_actors, batch_size=batch_size), log)

    import ray.data

    started = _ensure_ray(ray_address)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    try:
        # in-order output keeps the driver's buffer to ~one shard; our own bar replaces Ray's
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        fetch = _fetch_config(plan, image_cache_dir, fetch_workers, fetch_timeout, fetch_retries)
        try:
            asm = _stream_ray(plan, fetch, num_actors=num_actors, batch_size=batch_size, use_gpu=use_gpu, progress=progress, log=log)
        except EncodersChanged as e:
            # found when the actors report what they run, before any shard is written
            log(f"{e}; rebuilding every shard so that no features from the two are mixed")
            plan = plan_extraction(data_dir, out_dir, keep=False, **replan)
            asm = _stream_ray(plan, fetch, num_actors=num_actors, batch_size=batch_size, use_gpu=use_gpu, progress=progress, log=log)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()
    return asm.finish(_run_record("ray", plan, asm.rows_done, t0, asm, num_actors=num_actors, batch_size=batch_size, use_gpu=use_gpu), log)


def _stream_ray(plan: Plan, fetch: FetchConfig, *, num_actors: int, batch_size: int, use_gpu: bool, progress: bool, log) -> "ShardAssembler":
    """Run the plan's items through a Ray Data actor pool into its shards; returns the assembler."""
    import pyarrow as pa
    import ray.data

    todo = plan.todo_items()
    asm = ShardAssembler(plan)
    log(f"encoding {len(todo):,} items into {len(plan.todo)} shard(s) ({len(plan.skipped)} kept) with {num_actors} actor(s) -> {plan.out_dir}")
    # one block per batch: blocks are the unit the actor pool distributes
    # (explicit schema: a block whose images are all null would otherwise be typed "null")
    schema = pa.schema([("item_idx", pa.int64()), ("text", pa.string()), ("image", pa.string())])
    blocks = [pa.Table.from_pandas(c[["item_idx", "text", "image"]], schema=schema, preserve_index=False) for c in _chunks(todo, batch_size)]
    ds = ray.data.from_arrow(blocks)
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 0.5}
    ds = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"specs": plan.specs, "fetch": fetch.__dict__},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        **resources,
    )
    have_meta = False
    with _Progress(progress, len(todo), f"extract (ray, {num_actors} actor{'s' if num_actors > 1 else ''})") as bar:
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in batches:
                metas = [m for m in batch["encoder_meta"] if m]
                if metas and not have_meta:
                    asm.set_encoders(json.loads(metas[0]))
                    have_meta = True
                asm.add(batch)
                bar.update(asm.rows_done)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stop the pipeline (and its actors) now, also when leaving early
    return asm
