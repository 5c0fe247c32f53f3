"""What a checkpoint was trained on, and whether a run may resume from it.

Every checkpoint's ``state.json`` records the run's resolved configuration (``config``, as
``config.yaml`` has it) and the prepared dataset's identity (``dataset``: its name, the
``fingerprint`` and per-table sha256 ``files`` of its ``dataset.json``), plus the item
features' identity for models that read them (``features``: the sha256 of every shard named
in the features' ``manifest.json``). Resuming compares them with the current run
(:func:`check_resume`) and refuses, with a :class:`~moedist.errors.ConfigError` that lists
every difference, when continuing would mix two different runs.

Settings that may change on resume (:data:`RESUME_SAFE_KEYS`) say how long to train, how
large the optimizer's steps are, where the work runs, or how it is shown; they leave the
model, its objective, the data and the choice of the best epoch as they were:

* ``train.epochs`` (the epoch limit; raise it to continue a finished run), ``train.patience``
  (early stopping that has already stopped a run stays final), ``train.progress``,
  ``train.eval_batch_size`` (exact ranks whatever the batch), ``train.device``,
  ``train.resume``, ``train.topk`` (which cut-offs are reported; ``train.valid_metric``, which
  selects, must be among them and may not change), so a finished run can be re-evaluated at
  other cut-offs;
* the step size: ``train.lr``, ``train.router_lr_scale``, ``train.grad_clip`` and
  ``train.fused_adam`` (e.g. continue a diverged run from its last good checkpoint with a
  lower learning rate); the resumed run then no longer equals the uninterrupted one, and the
  loop says which of these changed;
* every ``dist.*`` key but ``dist.deepspeed_config`` (workers, ``ep_size``, ZeRO stage,
  gradient accumulation, precision, Ray placement and retries: checkpoints are
  topology-independent, and the global batch stays ``train.batch_size``), and the model
  section's ``ep_size``, which the loop sets from ``dist.ep_size``;
* ``data``, ``features`` and ``run_dir`` as paths: the dataset and features are compared by
  content (a moved or re-spelled path is fine, other content is not).

Everything else in ``model``, ``train`` and the model's own section (``sasrec.*`` for
``--model sasrec``; other models' sections are ignored) must be equal, e.g.
``train.seed``, ``train.batch_size``, ``train.weight_decay`` (a term of the objective),
``train.valid_metric``, ``train.ties_improve``, ``train.rank_ties``,
``train.mask_history``, ``train.max_steps_per_epoch``, ``train.eval_every``,
``sasrec.hidden_size``. To start over instead, pass ``train.resume=false`` (the run
directory is overwritten) or another ``--run-dir``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moedist.config import to_dict
from moedist.errors import ConfigError

RESUME_SAFE_KEYS = frozenset({
    "data", "features", "run_dir",
    "train.epochs", "train.patience", "train.progress", "train.eval_batch_size", "train.device", "train.resume",
    "train.topk",
    "train.lr", "train.router_lr_scale", "train.grad_clip", "train.fused_adam",
})
# safe changes the loop reports when it resumes (they change the training from here on)
RESUME_NOTED_KEYS = ("train.lr", "train.router_lr_scale", "train.grad_clip", "train.fused_adam", "train.patience")
RESUME_SAFE_PREFIXES = ("dist.",)
RESUME_UNSAFE_KEYS = frozenset({"dist.deepspeed_config"})  # may override the optimizer or the batch
_MODEL_PLACEMENT = ("ep_size",)  # set from dist.ep_size by the loop


ITEMS_TABLE = "items.parquet"
ITEMS_DIGEST_VERSION = "items-v1"  # how items_content_digest hashes; digests of another version are not compared


def items_content_digest(items) -> str:
    """sha256 of what the models read from the items table, in ``item_idx`` order: ids, text,
    categories, and each image source by :func:`~moedist.features.images.portable_image_ref`
    (the table stores local image paths absolute, so its file hash changes when the same raw
    data is prepared in another folder, e.g. a copy on a cluster volume)."""
    from moedist.features.images import portable_image_ref
    from moedist.features.store import text_or_none as text

    df = items.sort_values("item_idx", kind="stable") if "item_idx" in items else items

    from moedist.io import sha256_strings

    cols = {
        "item_id": (str(v) for v in df["item_id"]),
        "text": (text(v) for v in df["text"]) if "text" in df else None,
        "categories": ("\x1f".join(map(str, c)) if c is not None and not isinstance(c, float) else "" for c in df["categories"])
        if "categories" in df else None,
        "image": (None if text(v) is None else portable_image_ref(text(v)) for v in df["image"]) if "image" in df else None,
    }
    parts = {k: None if v is None else sha256_strings(v) for k, v in cols.items()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def dataset_identity(manifest: dict, items=None) -> dict:
    """The parts of a prepared dataset that identify its content: ``dataset.json``'s name,
    fingerprint and table hashes, with the items table also by :func:`items_content_digest`
    when ``items`` (its DataFrame) is given (that digest then decides for the items table)."""
    out = {
        "name": manifest.get("name"),
        "fingerprint": manifest.get("fingerprint"),
        "files": dict(manifest.get("files") or {}),
    }
    if items is not None:
        out["items"] = f"{ITEMS_DIGEST_VERSION}:{items_content_digest(items)}"
    return out


def features_identity(features_dir: str | Path | None) -> str | None:
    """sha256 over the shards' sha256 listed in ``<features_dir>/manifest.json`` (None when
    there are no features or no readable manifest: loading them reports that)."""
    if features_dir is None:
        return None
    try:
        manifest = json.loads((Path(features_dir) / "manifest.json").read_text())
        shards = sorted((int(s["index"]), str(s["sha256"])) for s in manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    h = hashlib.sha256(json.dumps({"dims": manifest.get("dims"), "shards": shards}, sort_keys=True).encode())
    return h.hexdigest()


def run_identity(cfg, manifest: dict, features_dir: str | Path | None = None, items=None) -> dict:
    """``{"config", "dataset", "features"}`` to store in every checkpoint of this run."""
    return {"config": to_dict(cfg), "dataset": dataset_identity(manifest, items), "features": features_identity(features_dir)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_resume_safe(key: str, model: str) -> bool:
    if key in RESUME_UNSAFE_KEYS:
        return False
    if key in RESUME_SAFE_KEYS or key.startswith(RESUME_SAFE_PREFIXES):
        return True
    return key in {f"{model}.{k}" for k in _MODEL_PLACEMENT}


def config_differences(stored: dict, current: dict) -> list[str]:
    """``"key: <stored> in the checkpoint, <current> now"`` for every setting that differs and
    matters (see the module docstring). Keys that only one side has (settings added or removed
    by another moedist version) are not compared."""
    model = current.get("model")
    sections = {"train", "dist", str(model)}
    a, b = _flatten(stored), _flatten(current)
    out = []
    for key in sorted(set(a) & set(b)):
        if "." in key and key.split(".", 1)[0] not in sections:
            continue  # another model's section
        if is_resume_safe(key, str(model)):
            continue
        if _norm(a[key]) != _norm(b[key]):
            out.append(f"{key}: {a[key]!r} in the checkpoint, {b[key]!r} now")
    return out


def noted_changes(stored: dict, current: dict) -> list[str]:
    """The allowed changes worth a line when resuming (:data:`RESUME_NOTED_KEYS`)."""
    a, b = _flatten(stored), _flatten(current)
    return [f"{k} {a[k]!r} -> {b[k]!r}" for k in RESUME_NOTED_KEYS if k in a and k in b and _norm(a[k]) != _norm(b[k])]


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def dataset_differences(stored: dict | None, current: dict) -> list[str]:
    """Why two :func:`dataset_identity` values name different data (empty: the same)."""
    if not stored:
        return []
    sf, cf = dict(stored.get("files") or {}), dict(current.get("files") or {})
    si, ci = str(stored.get("items") or ""), str(current.get("items") or "")
    if si and ci:  # the items by content, not by file hash
        sf.pop(ITEMS_TABLE, None)
        cf.pop(ITEMS_TABLE, None)
        same_version = si.split(":", 1)[0] == ci.split(":", 1)[0]
        if same_version and si != ci:
            sf[ITEMS_TABLE + " (ids, text, categories or images)"] = stored["items"]
            cf[ITEMS_TABLE + " (ids, text, categories or images)"] = current["items"]
    if sf and cf:
        if sf == cf:
            return []
        changed = sorted(n for n in set(sf) | set(cf) if sf.get(n) != cf.get(n))
        name = "" if stored.get("name") == current.get("name") else f" ({stored.get('name')!r} in the checkpoint, {current.get('name')!r} now)"
        return [f"dataset: other content{name}: {', '.join(changed)} differ (sha256 in dataset.json)"]
    if stored.get("fingerprint") and current.get("fingerprint"):
        if stored["fingerprint"] == current["fingerprint"]:
            return []
        return [f"dataset: fingerprint {str(stored['fingerprint'])[:12]}... in the checkpoint, {str(current['fingerprint'])[:12]}... now"]
    return []


def input_differences(stored_state: dict, dataset: dict, features: str | None) -> list[str]:
    """Why the dataset and item features a checkpoint recorded (its ``state.json``) are not
    ``dataset`` (:func:`dataset_identity`) and ``features`` (:func:`features_identity`);
    empty when they are the same or the checkpoint recorded none."""
    diffs = dataset_differences(stored_state.get("dataset"), dataset)
    sf = stored_state.get("features")
    if sf and features and sf != features:
        diffs.append("features: other item features (shard sha256 in the features' manifest.json differ)")
    return diffs


def check_resume(stored_state: dict, identity: dict, source: Path | str) -> bool:
    """ConfigError listing the differences when the checkpoint at ``source`` (its
    ``state.json``: ``stored_state``) was written by another configuration, dataset or
    feature set than ``identity`` (:func:`run_identity`). Returns False when the checkpoint
    records no identity (written by an older moedist), so nothing could be checked."""
    if "config" not in stored_state and "dataset" not in stored_state:
        return False
    diffs = input_differences(stored_state, identity["dataset"], identity.get("features"))
    if isinstance(stored_state.get("config"), dict):
        diffs += config_differences(stored_state["config"], identity["config"])
    if diffs:
        raise ConfigError(
            f"cannot resume from {source}: it was written by a different run:\n  " + "\n  ".join(diffs)
            + "\nResume with the original settings, or start fresh with train.resume=false "
            "(overwrites this run directory) or another --run-dir. Settings that may change on resume: "
            + ", ".join(sorted(k for k in RESUME_SAFE_KEYS if k.startswith("train.")))
            + ", " + ", ".join(f"{p}* (but {', '.join(sorted(RESUME_UNSAFE_KEYS))})" for p in RESUME_SAFE_PREFIXES) + "."
        )
    return True
