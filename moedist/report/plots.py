"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

Every function takes plain data (lists, numpy arrays, the dataclasses of ``runs`` and
``probe``), writes one PNG and returns its path. No ``pyplot``: no global figure state, no
display backend, safe in a worker thread.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moedist.report.runs import ExpertSeries, metric_sort_key, scalar_group

DPI = 90
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _figure(n_panels: int, ncols: int = 3, panel=(4.6, 3.2)) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _plain(s) -> str:
    """``s`` drawn as written: run, trial, layer and category names come from the user, and
    matplotlib would parse a pair of ``$`` as mathtext (a name like ``lr$1e-3$`` is set in
    italics, ``a$\\frac{x$`` fails the whole figure)."""
    return str(s).replace("$", r"\$")


def _label(s) -> str:
    """A legend label for a user-given name: :func:`_plain`, and a leading ``_`` (which makes
    matplotlib leave the line out of the legend) kept by a leading space."""
    s = _plain(s)
    return " " + s if s.startswith("_") else s


def _mark_best(ax, best_epoch) -> None:
    if best_epoch is not None:
        ax.axvline(best_epoch, color="0.5", ls=":", lw=1)


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------- learning curves


def learning_curves(records: list[dict], loss_keys: list[str], valid_keys: list[str], best_epoch, path: Path,
                    title: str = "") -> Path:
    """Training loss parts, validation metrics (one panel per metric family, a line per K)
    and throughput per epoch; the best validation epoch is the dotted vertical line."""
    from moedist.report.runs import series

    families: dict[str, list[str]] = {}
    for k in valid_keys:
        fam = metric_sort_key(k)[0]
        families.setdefault(fam, []).append(k)
    has_speed = any("samples_per_second" in r for r in records)
    panels = (1 if loss_keys else 0) + len(families) + (1 if has_speed else 0)
    fig, axes = _figure(max(panels, 1))
    it = iter(axes)
    if loss_keys:
        ax = next(it)
        positive = True
        for i, k in enumerate(loss_keys):
            xs, ys = series(records, k)
            positive &= all(y > 0 for y in ys)
            ax.plot(xs, ys, marker="o", ms=3, lw=2.2 if k == "loss" else 1.3, color="black" if k == "loss" else _color(i),
                    label="total" if k == "loss" else k.removeprefix("loss_"))
        if positive:
            ax.set_yscale("log")
        ax.set_title("training loss (parts unweighted)")
        ax.legend(fontsize=8)
        _mark_best(ax, best_epoch)
        _epoch_axis(ax)
    for fam, keys in families.items():
        ax = next(it)
        for i, k in enumerate(keys):
            xs, ys = series(records, k)
            ax.plot(xs, ys, marker="o", ms=3, color=_color(i), label=k.removeprefix("valid_"))
        ax.set_title(f"validation {fam}")
        ax.legend(fontsize=8)
        _mark_best(ax, best_epoch)
        _epoch_axis(ax)
    if has_speed:
        ax = next(it)
        xs, ys = series(records, "samples_per_second")
        ax.plot(xs, ys, marker="o", ms=3, color="0.3")
        ax.set_title("training throughput")
        ax.set_ylabel("samples / s")
        ax.set_ylim(bottom=0)
        _epoch_axis(ax)
    if title:
        fig.suptitle(_plain(title))
    return _save(fig, path)


# ----------------------------------------------------------------------------- MoE


STAT_TITLES = {"gate_mean": "mean gate weight", "load": "load (share of tokens routed)"}


def expert_load(items: list[ExpertSeries], path: Path) -> Path:
    """One panel per MoE layer and statistic: a line per expert over epochs, with the
    uniform share (1/E for gate weights, k/E for top-k loads) dashed."""
    per_layer: dict[str, int] = {}
    for s in items:
        per_layer[s.layer] = per_layer.get(s.layer, 0) + 1
    fig, axes = _figure(len(items), ncols=2 if max(per_layer.values(), default=1) == 2 else 3)
    for ax, s in zip(axes, items):
        vals = np.array([row + [np.nan] * (s.n_experts - len(row)) for row in s.values], dtype=float)  # (T, E)
        for e in range(vals.shape[1]):
            ax.plot(s.epochs, vals[:, e], marker="o", ms=3, color=_color(e), label=f"expert {e}")
        total = float(np.nanmean(np.nansum(vals, axis=1)))
        ax.axhline(total / max(vals.shape[1], 1), color="0.4", ls="--", lw=1, label="uniform")
        ax.set_title(_plain(f"{s.layer}: {STAT_TITLES.get(s.stat, s.stat)}"), fontsize=10)
        ax.set_ylim(0, max(1.0, float(np.nanmax(vals)) * 1.05) if s.stat == "load" else max(float(np.nanmax(vals)) * 1.15, 1e-3))
        _epoch_axis(ax)
    if axes:
        axes[0].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def moe_scalars(scalars: dict[str, tuple[list[int], list[float]]], path: Path, modalities=("id", "text", "image")) -> Path:
    """Scalar MoE statistics over epochs (HM4SR's Interactive-MoE α per modality, MAMEX's
    mean fusion weight per modality, every gate's routing entropy), one panel per statistic
    with a line per modality."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(scalars):
        g, label = scalar_group(key, modalities)
        groups.setdefault(g, []).append((label, key))
    fig, axes = _figure(len(groups))
    for ax, (g, members) in zip(axes, groups.items()):
        for i, (label, key) in enumerate(members):
            xs, ys = scalars[key]
            ax.plot(xs, ys, marker="o", ms=3, color=_color(i), label=label)
        ax.set_title(g, fontsize=10)
        ax.legend(fontsize=8)
        _epoch_axis(ax)
    return _save(fig, path)


# ----------------------------------------------------------------------------- HM4SR probes


def contributions(c, path: Path) -> Path:
    """Per-modality terms H^m·C_m of HM4SR's scores on validation users: the mean term for the
    true next item against the mean over all items, and how much each term varies across
    items (what moves the ranking)."""
    fig, (ax1, ax2) = _figure(2, ncols=2)
    ms = c.modalities
    x = np.arange(len(ms))
    w = 0.38
    ax1.bar(x - w / 2, [c.target_mean[m] for m in ms], w, label="true next item", color=_color(0))
    ax1.bar(x + w / 2, [c.all_mean[m] for m in ms], w, label="all items (mean)", color=_color(7))
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set_xticks(x, ms)
    ax1.set_ylabel("mean score term H^m · C_m")
    ax1.set_title(f"score contribution per modality ({c.n_users} validation users)", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    ax2.bar(x, [c.spread[m] for m in ms], 0.55, color=[_color(i + 1) for i in range(len(ms))])
    for xi, m in zip(x, ms):
        ax2.annotate(f"top-1 agrees {c.top1_agree[m]:.0%}", (xi, c.spread[m]), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(x, ms)
    ax2.set_ylabel("std over items, mean over users")
    ax2.set_title("spread of each term across candidate items", fontsize=10)
    ax2.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def temporal_gate(tg, path: Path) -> Path:
    """Temporal-MoE gate weight of each expert against the interval Δ since the previous item
    (log axis; Δ = 0 at the far left), with the data's interval distribution shaded."""
    from moedist.report.probe import NAMED_INTERVALS

    fig = Figure(figsize=(9.5, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    zero_x = 0.3  # where Δ = 0 is drawn on the log axis
    x = np.where(tg.deltas == 0, zero_x, tg.deltas).astype(float)
    if len(tg.observed):
        hx = ax.twinx()
        obs = np.where(tg.observed == 0, zero_x, tg.observed).astype(float)
        bins = np.logspace(np.log10(zero_x * 0.8), np.log10(x.max() * 1.01), 60)
        hx.hist(obs, bins=bins, color="0.85", weights=np.full(len(obs), 1.0 / len(obs)))
        hx.set_ylabel("share of observed intervals", color="0.5")
        hx.tick_params(axis="y", colors="0.5")
        ax.set_zorder(hx.get_zorder() + 1)
        ax.patch.set_visible(False)
    for e in range(tg.weights.shape[1]):
        ax.plot(x, tg.weights[:, e], color=_color(e), lw=2, label=f"expert {e}")
    ax.axhline(1.0 / tg.weights.shape[1], color="0.4", ls="--", lw=1, label="uniform")
    ax.axvline(tg.max_interval, color="black", ls=":", lw=1)
    ax.annotate("dataset's longest gap \n(longer ones share its bucket) ", (tg.max_interval, 0.98),
                xycoords=("data", "axes fraction"), va="top", ha="right", fontsize=8)
    ax.set_xscale("log")
    ticks = [(zero_x, "0")] + [(s, n) for n, s in NAMED_INTERVALS if s <= x.max()]
    ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks], rotation=30)
    ax.minorticks_off()
    ax.set_xlim(zero_x * 0.8, x.max() * 1.01)
    ax.set_ylim(0, min(1.0, float(tg.weights.max()) * 1.15 + 0.02))
    ax.set_xlabel("interval Δ since the previous interaction")
    ax.set_ylabel("gate weight")
    ax.grid(alpha=0.3)
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(tg.fixed_time, tz=timezone.utc).strftime("%Y-%m-%d")
    ax.set_title(f"Temporal-MoE gate vs interval (absolute time fixed at {when}, the data's median)", fontsize=10)
    ax.legend(fontsize=8, loc="center left")
    return _save(fig, path)


# ----------------------------------------------------------------------------- MAMEX probes


def fusion(f, path: Path) -> Path:
    """MAMEX fusion weights α: their distribution over items (warm vs cold items) and per
    category (box per modality)."""
    alpha = f.alpha
    present = alpha.sum(axis=1) > 0
    cats = sorted({c for c, p in zip(f.category, present) if p}, key=lambda c: (c == "other", c))
    fig = Figure(figsize=(12, max(3.8, 0.42 * len(cats) * max(1, len(f.modalities) / 2) + 1.5)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    split = np.array(f.split)
    bins = np.linspace(0, 1, 51)
    m0 = f.modalities[0]
    for label, sel, color in (("warm (train) items", (split == "train") & present, _color(0)),
                              ("cold (valid/test) items", (split != "train") & present, _color(1))):
        if sel.any():
            ax1.hist(alpha[sel, 0], bins=bins, alpha=0.6, color=color, label=f"{label} ({int(sel.sum())})")
    ax1.set_xlabel(f"α_{m0}" + (f"  (α_{f.modalities[1]} = 1 − α_{m0})" if len(f.modalities) == 2 else ""))
    ax1.set_ylabel("items")
    ax1.set_title(f"fusion weight of {m0} over items", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    M = len(f.modalities)
    height = 0.8 / M
    cat_arr = np.array(f.category)
    for j, m in enumerate(f.modalities):
        data = [alpha[(cat_arr == c) & present, j] for c in cats]
        pos = np.arange(len(cats)) + (j - (M - 1) / 2) * height
        bp = ax2.boxplot(data, positions=pos, widths=height * 0.9, orientation="horizontal", patch_artist=True, showfliers=False,
                         manage_ticks=False)
        for box in bp["boxes"]:
            box.set_facecolor(_color(j))
            box.set_alpha(0.7)
        for med in bp["medians"]:
            med.set_color("black")
        ax2.plot([], [], color=_color(j), lw=6, label=f"α_{m}")
    counts = {c: int(((cat_arr == c) & present).sum()) for c in cats}
    ax2.set_yticks(np.arange(len(cats)), [_plain(f"{c} ({counts[c]})") for c in cats])
    ax2.invert_yaxis()
    ax2.set_xlim(-0.02, 1.02)
    ax2.axvline(1.0 / M, color="0.4", ls="--", lw=1)
    ax2.set_xlabel("fusion weight α")
    ax2.set_title(f"fusion weights by category (level {f.category_level} of the path; items)", fontsize=10)
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------- tuning


def tuning_scatter(x_values: list, y_values: list[float], xlabel: str, ylabel: str, best_index: int | None,
                   path: Path) -> Path:
    """The metric of every trial against one searched hyperparameter (best trial starred).
    Numbers get a (log, when they span two decades) value axis; anything else a category axis."""
    fig = Figure(figsize=(5.2, 3.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.asarray(y_values, dtype=float)
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                  and np.isfinite(v) for v in x_values)
    if numeric:
        x = np.asarray(x_values, dtype=float)
        if (x > 0).all() and x.max() / x.min() >= 100:
            ax.set_xscale("log")
    else:
        labels = sorted({str(v) for v in x_values})
        index = {lab: i for i, lab in enumerate(labels)}
        rng = np.random.default_rng(0)
        x = np.array([index[str(v)] for v in x_values], dtype=float) + rng.uniform(-0.12, 0.12, len(x_values))
        ax.set_xticks(range(len(labels)), [_plain(lab) for lab in labels])
    ax.scatter(x, y, s=28, color=_color(0), alpha=0.8, edgecolor="white", lw=0.5)
    if best_index is not None:
        ax.scatter([x[best_index]], [y[best_index]], marker="*", s=220, color=_color(3), edgecolor="black", lw=0.6,
                   label="best trial", zorder=3)
        ax.legend(fontsize=8)
    ax.set_xlabel(_plain(xlabel))
    ax.set_ylabel(_plain(ylabel))
    ax.grid(alpha=0.3)
    ax.set_title(_plain(f"{ylabel} vs {xlabel}"), fontsize=10)
    return _save(fig, path)


def trial_curves(curves: list[tuple[str, list[int], list[float]]], metric: str, best: str | None, path: Path,
                 *, label_all: bool = False, unit: str = "trial") -> Path:
    """The validation metric per epoch of every trial (best trial thick). Only the best line
    is named in the legend, unless ``label_all`` (a folder of runs: every line, a colour and
    line style each, so that the runs can be told apart)."""
    fig = Figure(figsize=(7.5, 4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = ("-", "--", "-.", ":")
    for i, (name, xs, ys) in enumerate(curves):
        is_best = name == best
        label = _label(f"{name} (best)" if is_best else name) if is_best or label_all else None
        ax.plot(xs, ys, marker="o", ms=2.5, lw=2.6 if is_best else 1.0 if not label_all else 1.4,
                alpha=1.0 if is_best or label_all else 0.6, color=_color(3) if is_best else _color(i),
                ls=styles[(i // len(COLORS)) % len(styles)] if label_all else "-", label=label,
                zorder=3 if is_best else 2)
    ax.set_ylabel(_plain(metric))
    ax.set_title(_plain(f"{metric} per epoch, one line per {unit}"), fontsize=10)
    if best is not None or (label_all and curves):
        ax.legend(fontsize=8 if len(curves) <= 12 else 6, ncol=1 if len(curves) <= 12 else 2)
    _epoch_axis(ax)
    return _save(fig, path)
