"""Looking inside a trained model: rebuild it from a run directory and measure what it learnt.

- :func:`load_trained_model`: ``config.yaml`` -> :func:`~moedist.train.loop.build_model`
  (same data and features) -> ``checkpoints/best`` weights, on the CPU, in eval mode.
- :func:`hm4sr_score_contributions`: HM4SR's score is Σ_m H^m · C_mᵀ over modalities
  m ∈ {id, text, image}; this splits a validation batch's scores into the per-modality terms,
  using only the model's public pieces (forward hooks on ``model.encoders[m]`` capture the
  per-modality sequence outputs, :func:`~moedist.models.hm4sr.gather_last` takes H^m and
  ``candidate_tables()`` gives C_m) and checks that the terms add up to
  ``full_sort_predict``.
- :func:`hm4sr_temporal_gate`: the Temporal-MoE gate's expert weights as a function of the
  interval Δ, at a fixed absolute time.
- :func:`mamex_fusion`: MAMEX's fusion weights α per item with each item's category and
  cold-start split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moedist.errors import ConfigError, MoedistError

DAY = 86400
# named intervals marked on the temporal-gate plot (seconds)
NAMED_INTERVALS = [
    ("1 min", 60), ("1 h", 3600), ("1 day", DAY), ("1 week", 7 * DAY),
    ("1 month", 30 * DAY), ("1 year", 365 * DAY), ("10 years", 3650 * DAY),
]


class ProbeSkipped(MoedistError):
    """The model cannot be rebuilt or lacks the piece a plot needs; the message says why."""


@dataclass
class TrainedModel:
    cfg: object  # ExperimentConfig
    data: object  # PreparedDataset
    model: object  # torch.nn.Module, eval mode, CPU
    checkpoint: Path


def _resolve(raw: str | None, run_dir: Path) -> Path | None:
    """A path from config.yaml: as written (relative to where training ran), else relative
    to the run directory or one of its ancestors (a run tree moved as a whole)."""
    if not raw:
        return None
    p = Path(raw)
    if p.exists():
        return p
    if not p.is_absolute():
        for base in [run_dir, *run_dir.resolve().parents]:
            if (base / p).exists():
                return base / p
    return None


def _check_trained_on(ckpt: Path, cfg, data) -> None:
    """ProbeSkipped when the data or features at the config's paths now are not those the
    checkpoint was trained on (its ``state.json`` identity; older checkpoints record none): a
    dataset re-prepared in place, or features re-extracted with other weights, would otherwise
    be read through the trained weights as if they were the training data."""
    from moedist.train.checkpoint import read_state
    from moedist.train.identity import dataset_identity, features_identity, input_differences
    from moedist.train.loop import find_features, model_needs_features

    try:
        stored = read_state(ckpt)
    except MoedistError as e:
        raise ProbeSkipped(f"cannot read {ckpt}/state.json: {e}") from None
    stored_data = stored.get("dataset") if isinstance(stored.get("dataset"), dict) else {}
    # the items digest costs a pass over the items table: only when the checkpoint has one to compare
    dataset = dataset_identity(data.manifest, data.items if stored_data.get("items") else None)
    features = features_identity(find_features(cfg)) if model_needs_features(cfg) else None
    diffs = input_differences(stored, dataset, features)
    if diffs:
        raise ProbeSkipped(f"the data at the run's paths has changed since {ckpt} was trained: " + "; ".join(diffs))


def load_trained_model(run_dir: Path) -> TrainedModel:
    """Rebuild the run's model and load its best checkpoint (CPU, eval mode)."""
    import torch

    from moedist.config import load_config
    from moedist.data.dataset import PreparedDataset
    from moedist.train.checkpoint import latest_complete, load_checkpoint
    from moedist.train.config import ExperimentConfig
    from moedist.train.loop import build_model, load_features_for

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ProbeSkipped(f"{cfg_path} is missing, so the model cannot be rebuilt")
    ckpt = latest_complete(run_dir / "checkpoints" / "best")
    if ckpt is None:
        raise ProbeSkipped(f"no complete checkpoint in {run_dir / 'checkpoints' / 'best'}")
    try:
        cfg = load_config(ExperimentConfig, cfg_path)
    except ConfigError as e:
        raise ProbeSkipped(f"cannot read the run's configuration: {e}") from None
    data_dir = _resolve(cfg.data, run_dir)
    if data_dir is None:
        raise ProbeSkipped(f"the run's dataset {cfg.data!r} (config.yaml `data`) is not found")
    cfg.data = str(data_dir)
    if cfg.features:
        fdir = _resolve(cfg.features, run_dir)
        if fdir is None:
            raise ProbeSkipped(f"the run's features {cfg.features!r} (config.yaml `features`) are not found")
        cfg.features = str(fdir)
    sub = getattr(cfg, cfg.model, None)
    if sub is not None and hasattr(sub, "ep_size"):
        sub.ep_size = 1  # one process here; checkpoints store experts by global index
    data = PreparedDataset(cfg.data)
    features = load_features_for(cfg, data)
    _check_trained_on(ckpt, cfg, data)
    torch.manual_seed(0)
    model = build_model(cfg, data, features)
    load_checkpoint(ckpt, model, None)
    model.eval()
    return TrainedModel(cfg=cfg, data=data, model=model, checkpoint=ckpt)


# ----------------------------------------------------------------------------- HM4SR


@dataclass
class Contributions:
    modalities: list[str]
    target_mean: dict[str, float]  # mean over users of H^m · C_m[target]
    all_mean: dict[str, float]  # mean over users and items of H^m · C_m[i]
    spread: dict[str, float]  # mean over users of the std over items of H^m · C_m[i]
    top1_agree: dict[str, float]  # share of users whose top item by this term alone = overall top item
    n_users: int
    max_abs_error: float  # |Σ_m terms − full_sort_predict|, the consistency check


def score_contributions(model, batch: dict) -> dict:
    """Per-modality terms of HM4SR's scores for ``batch``: ``{m: [B, N]}`` with
    Σ_m terms = ``model.full_sort_predict(batch)`` (within float tolerance).

    Forward hooks on ``model.encoders[m]`` record each modality's sequence output during one
    ``full_sort_predict``; H^m is its last real position and C_m the model's
    ``candidate_tables()[m]``.
    """
    import torch

    from moedist.models.hm4sr import gather_last

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        enc.register_forward_hook(lambda mod, inp, out, m=m: seen.setdefault(m, out))
        for m, enc in model.encoders.items()
    ]
    try:
        with torch.no_grad():
            scores = model.full_sort_predict(batch)
            tables = model.candidate_tables()
    finally:
        for h in hooks:
            h.remove()
    terms = {}
    with torch.no_grad():  # the ID table is the embedding Parameter itself
        for m in tables:
            if m not in seen:
                raise ProbeSkipped(f"the model did not run encoder {m!r} in full_sort_predict")
            hidden = gather_last(seen[m], batch["item_seq_len"])  # (B, d)
            terms[m] = hidden @ tables[m].T  # (B, N)
        total = sum(terms.values())
    err = float((total - scores).abs().max())
    scale = float(scores.abs().max()) or 1.0
    if err > 1e-3 * scale + 1e-4:
        raise ProbeSkipped(
            f"the per-modality terms do not add up to the model's scores (max error {err:.3g}); "
            "HM4SR's scoring has changed and this report needs updating"
        )
    terms["_error"] = torch.tensor(err)
    return terms


def hm4sr_score_contributions(tm: TrainedModel, max_users: int = 512, chunk: int = 128) -> Contributions:
    """Statistics of the per-modality score terms over (up to) ``max_users`` validation users,
    in chunks of ``chunk`` users (a chunk's terms are ``[chunk, N]`` per modality)."""
    import torch

    from moedist.data.dataset import SequentialSamples

    model, data = tm.model, tm.data
    if not hasattr(model, "encoders") or not hasattr(model, "candidate_tables"):
        raise ProbeSkipped(f"model {tm.cfg.model} has no per-modality streams")
    samples = SequentialSamples.build(data, "valid", tm.cfg.hm4sr.max_seq_len)
    if len(samples) == 0:
        raise ProbeSkipped("the dataset has no validation samples")
    n = min(len(samples), max_users)
    sums: dict[str, dict[str, float]] = {}
    err = 0.0
    for lo in range(0, n, chunk):
        batch = samples.batch(np.arange(lo, min(lo + chunk, n)))
        terms = score_contributions(model, batch)
        err = max(err, float(terms.pop("_error")))
        target = batch["target"]
        items = slice(1, None)  # pad row 0 is never a candidate
        total_top = sum(terms.values())[:, items].argmax(1)
        for m, t in terms.items():
            acc = sums.setdefault(m, {"target": 0.0, "all": 0.0, "spread": 0.0, "top1": 0.0})
            acc["target"] += float(t.gather(1, target[:, None]).sum())
            acc["all"] += float(t[:, items].mean(dim=1).sum())
            acc["spread"] += float(t[:, items].std(dim=1).sum())
            acc["top1"] += float((t[:, items].argmax(1) == total_top).to(torch.float32).sum())
    return Contributions(
        modalities=list(sums),
        target_mean={m: a["target"] / n for m, a in sums.items()},
        all_mean={m: a["all"] / n for m, a in sums.items()},
        spread={m: a["spread"] / n for m, a in sums.items()},
        top1_agree={m: a["top1"] / n for m, a in sums.items()},
        n_users=n,
        max_abs_error=err,
    )


@dataclass
class TemporalGate:
    deltas: np.ndarray  # [G] seconds
    weights: np.ndarray  # [G, k2]
    buckets: np.ndarray  # [G] interval-embedding row used (after clamping)
    fixed_time: int  # absolute Unix time fed to the gate
    max_interval: int  # the dataset's Δmax: longer gaps share the last row
    observed: np.ndarray  # intervals between consecutive interactions in the data (seconds)


def hm4sr_temporal_gate(tm: TrainedModel, n_grid: int = 160) -> TemporalGate:
    """Gate weights over a log grid of Δ (0, 1 s … beyond the dataset's largest gap), with the
    absolute-time half of the gate input fixed at the data's median timestamp: the interval
    bucket comes from :func:`interval_bucket` on a two-item sequence ``[t, t + Δ]``."""
    import torch

    from moedist.models.hm4sr import interval_bucket

    tmoe = getattr(tm.model, "temporal_moe", None)
    if tmoe is None:
        raise ProbeSkipped("this HM4SR run has no Temporal MoE (hm4sr.use_tmoe=false)")
    data = tm.data
    max_iv = max(int(data.max_interval_seconds), 1)
    top = max(max_iv * 4, 2 * 365 * DAY)
    deltas = np.unique(np.concatenate([[0], np.round(np.logspace(0, np.log10(top), n_grid))])).astype(np.int64)
    t_fixed = int(np.median(data.seq_times)) if len(data.seq_times) else 1_500_000_000
    with torch.no_grad():
        time_seq = torch.stack([torch.full((len(deltas),), t_fixed, dtype=torch.int64),
                                t_fixed + torch.from_numpy(deltas)], dim=1)  # (G, 2)
        mask = torch.ones_like(time_seq, dtype=torch.bool)
        bucket = interval_bucket(time_seq, mask, tmoe.mu)[:, 1]  # (G,)
        bucket = bucket.clamp_max(tmoe.time_embedding.num_embeddings - 1)
        r1 = tmoe.time_embedding(bucket)  # (G, d)
        r2 = tmoe.absolute_embedding(torch.full((len(deltas), 1), t_fixed, dtype=torch.int64))[:, 0]  # (G, d)
        weights = tmoe.gate(torch.cat([r1, r2.to(r1.dtype)], dim=-1)).weights  # (G, k2)
    # observed gaps between consecutive interactions of the same user
    starts = data.offsets[1:-1]
    gaps = np.diff(data.seq_times)
    same_user = np.ones(len(gaps), dtype=bool)
    same_user[starts[(starts > 0) & (starts <= len(gaps))] - 1] = False
    return TemporalGate(deltas=deltas, weights=weights.numpy(), buckets=bucket.numpy(), fixed_time=t_fixed,
                        max_interval=max_iv, observed=gaps[same_user & (gaps >= 0)])


# ----------------------------------------------------------------------------- MAMEX


@dataclass
class Fusion:
    modalities: list[str]
    alpha: np.ndarray  # [I, M] for real items (row i = item_idx i + 1)
    category: list[str]  # [I]
    split: list[str]  # [I] cold-start split of the item: train / valid / test
    category_level: int  # depth in the category path used for grouping


def category_labels(data, max_groups: int = 10) -> tuple[list[str], int]:
    """One category per item: the first level of the category path (root first) at which the
    items differ; the ``max_groups`` largest groups are kept, the rest become "other"."""
    paths = [list(c) if c is not None else [] for c in data.items["categories"]]
    depth = max((len(p) for p in paths), default=0)
    level = 0
    for lv in range(depth):
        if len({p[lv] if len(p) > lv else None for p in paths}) > 1:
            level = lv
            break
    labels = [str(p[level]) if len(p) > level else "(none)" for p in paths]
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    keep = set(sorted(counts, key=lambda c: (-counts[c], c))[:max_groups])
    return [lab if lab in keep else "other" for lab in labels], level


def mamex_fusion(tm: TrainedModel) -> Fusion:
    model = tm.model
    if not hasattr(model, "fusion_weights"):
        raise ProbeSkipped(f"model {tm.cfg.model} has no fusion weights")
    alpha = model.fusion_weights().detach().cpu().numpy()  # (N, M)
    data = tm.data
    rows = data.items["item_idx"].to_numpy()
    labels, level = category_labels(data)
    return Fusion(modalities=list(model.modalities), alpha=alpha[rows], category=labels,
                  split=[str(s) for s in data.items["cold_split"]], category_level=level)
