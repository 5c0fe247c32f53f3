"""``write_report``: one self-contained HTML page about a run, a folder of runs or a tuning run.

    moedist report runs/hm4sr-synthetic-small-2025            # -> runs/.../report/index.html
    moedist report runs/tune-hm4sr --out /tmp/tune-report        # a Ray Tune experiment folder

The page embeds its figures (base64 PNG, so the one file can be mailed or attached) and the
PNGs are also written next to it. What it shows depends on what the directory holds:

- a run directory: results, learning curves, per-expert load of every MoE layer over
  training, scalar MoE statistics (α), and, rebuilt from ``checkpoints/best``, HM4SR's
  per-modality score contributions and Temporal-MoE gate against the interval, or MAMEX's
  fusion weights per item by category; a results table when its parent folder holds other
  runs (baselines, ablations);
- a folder of run directories: the results table and the validation curves of every run;
- a tuning folder (``results.csv``): the trials table, the metric against each searched
  hyperparameter, every trial's validation curve, and the best trial's run report.

A figure whose data is absent is skipped with a note saying why; only input that is none of
the above is an error (:class:`~moedist.report.runs.ReportError`).
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from moedist.errors import MoedistError
from moedist.io import temp_dir
from moedist.report import plots
from moedist.report.runs import (
    ExpertSeries,
    ReportError,
    RunInfo,
    child_runs,
    classify,
    comparison_runs,
    loss_keys,
    metric_sort_key,
    moe_series,
    read_run,
    read_tuning_table,
    series,
    trial_runs,
    valid_keys,
)

GENERATOR = "moedist-report"
MAX_TABLE_ROWS = 60


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments in order

    def text(self, s: str) -> None:
        self.parts.append(f"<p>{s}</p>")

    def note(self, s: str) -> None:
        self.parts.append(f'<p class="note">{html.escape(s)}</p>')


class _Builder:
    """Collects sections and figures; figures go to ``out`` and are skipped with a note on failure."""

    def __init__(self, out: Path, embed: bool):
        self.out = out
        self.embed = embed
        self.sections: list[Section] = []
        self.figures: list[str] = []
        self.skipped: list[str] = []

    def section(self, title: str) -> Section:
        s = Section(title)
        self.sections.append(s)
        return s

    def skip(self, sec: Section, what: str, why: str) -> None:
        sec.note(f"{what}: skipped, {why}")
        self.skipped.append(f"{what}: {why}")

    def figure(self, sec: Section, name: str, caption: str, draw, *args, **kwargs) -> bool:
        """Draw ``draw(*args, path=..., **kwargs)`` into ``name``; a failure becomes a note."""
        path = self.out / name
        try:
            draw(*args, path=path, **kwargs)
        except MoedistError as e:
            self.skip(sec, caption.split(":")[0], str(e))
            return False
        except Exception as e:  # noqa: BLE001 - a figure must never sink the whole report
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            self.skip(sec, caption.split(":")[0], f"drawing failed ({detail})")
            return False
        self.figures.append(name)
        src = name
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        sec.parts.append(
            f'<figure><a href="{html.escape(name)}"><img src="{src}" alt="{html.escape(name)}"></a>'
            f"<figcaption>{html.escape(caption)} <span class=\"file\">({html.escape(name)})</span></figcaption></figure>"
        )
        return True


# ----------------------------------------------------------------------------- public API


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, embed_images: bool = True,
                 metric: str | None = None, mode: str | None = None, probe_models: bool = True) -> Path:
    """Write the HTML report of ``run_dir`` (a run directory, a folder of runs or a tuning
    folder) to ``out_dir`` (default ``<run_dir>/report``) and return the path of ``index.html``.

    ``embed_images``: put the PNGs into the page as base64 (they are written beside it either
    way). ``metric``/``mode``: the tuning table's metric column and whether higher ("max") or
    lower ("min") is better (default: guessed). ``probe_models=False`` skips rebuilding the
    model from its checkpoint (no torch work). Raises :class:`ReportError` (a
    :class:`~moedist.errors.MoedistError`) naming the path when ``run_dir`` is none of those.
    """
    run_dir = Path(run_dir)
    kind = classify(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out_dir is None and out.is_symlink():
        # run folders are often shared: a link planted there must not send this user's report,
        # and its removal of stale PNGs, into a folder the link chooses
        raise ReportError(f"{out} is a symbolic link (to {os.readlink(out)}); the report is not written through it. "
                          "Remove the link, or give the output folder with --out")
    tuning = read_tuning_table(run_dir, metric, mode) if kind == "tuning" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, prefix=f".{out.name}.")
    try:
        b = _Builder(tmp, embed_images)
        t0 = time.perf_counter()
        if kind == "run":
            run = read_run(run_dir)
            _run_sections(b, run, prefix="", probe=probe_models, siblings=comparison_runs(run_dir, kind))
            title = f"{run.model or 'run'} report: {run_dir.name}"
        elif kind == "collection":
            runs = comparison_runs(run_dir, kind)
            _comparison_section(b, runs, current=None)
            _collection_curves(b, [read_run(p) for p in child_runs(run_dir)])
            title = f"runs report: {run_dir.name}"
        else:
            _tuning_sections(b, tuning, probe=probe_models)
            title = f"tuning report: {run_dir.name}"
        page = _page(title, run_dir, kind, b, time.perf_counter() - t0)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _install(tmp: Path, out: Path) -> None:
    """Move the finished report into place, file by file (each replace is atomic, index.html
    last). PNGs of an earlier report in ``out`` (recognised by its index.html) that this one
    no longer draws are removed; nothing else in ``out`` is touched."""
    if not out.exists():
        os.replace(tmp, out)
        return
    index = out / "index.html"
    ours = index.is_file() and GENERATOR in index.read_text(errors="ignore")[:2000]
    new = {f.name for f in tmp.iterdir()}
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "index.html"):
        os.replace(f, out / f.name)
    if ours:
        for old in out.glob("*.png"):
            if old.name not in new:
                old.unlink()


# ----------------------------------------------------------------------------- run sections


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return html.escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return html.escape(str(v))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _run_sections(b: _Builder, run: RunInfo, prefix: str, probe: bool, siblings: list[RunInfo] | None = None) -> None:
    _summary_section(b, run)
    if siblings:
        _comparison_section(b, siblings, current=run.path)
    _curves_section(b, run, prefix)
    _moe_section(b, run, prefix)
    if probe:
        _probe_section(b, run, prefix)


def _summary_section(b: _Builder, run: RunInfo) -> None:
    sec = b.section(f"Run {html.escape(run.name)}")
    res = run.results or {}
    facts = [("model", run.model), ("dataset", res.get("dataset") or run.config.get("data")),
             ("protocol", res.get("protocol")), ("best epoch", res.get("best_epoch")),
             ("epochs run", res.get("epochs_run", len(run.records) or None)),
             ("trainable parameters", res.get("trainable_parameters")), ("workers", res.get("workers")),
             ("selection metric", run.valid_metric), ("run directory", str(run.path))]
    sec.parts.append(_table(["", ""], [[html.escape(k), _fmt(v)] for k, v in facts if v is not None], "facts"))
    if isinstance(res.get("valid"), dict) and isinstance(res.get("test"), dict):
        cols = sorted(set(res["valid"]) | set(res["test"]), key=metric_sort_key)
        rows = [[split] + [_fmt(res[split].get(c, float("nan"))) for c in cols] for split in ("valid", "test")]
        sec.parts.append(_table(["split"] + [html.escape(c) for c in cols], rows, "metrics"))
    else:
        sec.note("no results.json: the run has not finished (metrics below are per epoch)")
    stale = run.stale_results()
    if stale is not None:
        sec.note(stale[1])
    for p in run.problems:
        if "results.json" not in p:
            sec.note(p)
    cfg = run.path / "config.yaml"
    if cfg.is_file():
        sec.parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(cfg.read_text())}</pre></details>")


def _curves_section(b: _Builder, run: RunInfo, prefix: str) -> None:
    sec = b.section("Learning curves")
    if not run.records:
        b.skip(sec, "learning curves", "metrics.jsonl is missing or empty (a model without training epochs, or a run that never finished one)")
        return
    lk, vk = loss_keys(run.records), valid_keys(run.records)
    b.figure(sec, f"{prefix}learning_curves.png",
             "Learning curves: training loss and its unweighted parts (log scale), validation metrics per K, "
             "throughput; dotted line = best validation epoch",
             plots.learning_curves, run.records, lk, vk, None if run.stale_results() else run.best_epoch,
             title=run.name)
    if not vk:
        sec.note("no validation metrics were logged (train.eval_every larger than the number of epochs?)")


def _moe_section(b: _Builder, run: RunInfo, prefix: str) -> None:
    sec = b.section("Mixture-of-experts routing over training")
    lists, scalars = moe_series(run.records)
    if not lists and not scalars:
        why = "no moe/* entries in metrics.jsonl" if run.records else "metrics.jsonl is missing or empty"
        b.skip(sec, "expert load", f"{why} (model {run.model} logs no MoE statistics)")
        return
    shown = [s for s in lists if s.stat != "load" or s.informative()]
    dense = sorted({s.layer for s in lists if s.stat == "load" and not s.informative()})
    if shown:
        b.figure(sec, f"{prefix}expert_load.png",
                 "Expert load per MoE layer: a line per expert over epochs (statistics of the last forward "
                 "pass of each epoch); dashed = uniform share. Lines pulling apart towards 0 and 1 mean the "
                 "layer collapses onto few experts",
                 plots.expert_load, shown)
        sec.parts.append(_collapse_table(shown))
    if dense:
        sec.note("load is 1 for every expert of " + ", ".join(dense) + " (dense gates route every token to every "
                 "expert), so only their mean gate weights are drawn")
    mods = tuple((run.config.get(run.model or "", {}) or {}).get("modalities") or ("id", "text", "image"))
    if scalars:
        b.figure(sec, f"{prefix}moe_scalars.png",
                 "Scalar MoE statistics over epochs: Interactive-MoE α per modality (HM4SR), mean and spread of "
                 "the fusion weights per modality (MAMEX), and each gate's routing entropy (mean per-token gate "
                 "entropy over log E: 1 = the gate gives every token the same uniform weights, i.e. it does not "
                 "route; 0 = one expert per token)",
                 plots.moe_scalars, scalars, modalities=mods)


def _collapse_table(items: list[ExpertSeries]) -> str:
    rows = []
    for s in items:
        if not all(math.isfinite(x) for x in s.values[-1]):  # a diverged run: no share or entropy to speak of
            rows.append([html.escape(s.layer), html.escape(s.stat), str(len(s.values[-1])), "–", "–", "–",
                         "not finite (NaN/inf values: diverged?)"])
            continue
        last = [max(x, 0.0) for x in s.values[-1]]
        total = sum(last)
        E = len(last)
        if total <= 0 or E < 2:
            continue
        share = [x / total for x in last]
        ent = -sum(p * math.log(p) for p in share if p > 0) / math.log(E)
        verdict = "collapsed" if max(share) > 0.9 else ("skewed" if ent < 0.7 else "balanced")
        rows.append([html.escape(s.layer), html.escape(s.stat), str(E), f"{max(share):.1%}", f"{min(share):.1%}",
                     f"{ent:.2f}", verdict])
    if not rows:
        return ""
    return ("<p>At the last logged epoch (share = the expert's value over the layer's total; entropy 1 = uniform). "
            "These are averages over tokens: a balanced average can still hide sharp per-token routing.</p>"
            + _table(["layer", "statistic", "experts", "max share", "min share", "normalised entropy", "verdict"], rows))


def _probe_section(b: _Builder, run: RunInfo, prefix: str) -> None:
    from moedist.report import probe as pr

    model = run.model
    if model not in ("hm4sr", "mamex"):
        if model is not None:
            sec = b.section("Inside the model")
            b.skip(sec, "modality and gate analysis", f"model {model} has no modality fusion or temporal gate")
        return
    sec = b.section("Inside the trained model (best checkpoint)")
    try:
        tm = pr.load_trained_model(run.path)
    except MoedistError as e:
        what = "per-modality score contributions and temporal gate" if model == "hm4sr" else "fusion weights"
        b.skip(sec, what, str(e))
        return
    sec.text(f"Rebuilt from <code>config.yaml</code> and <code>{html.escape(str(tm.checkpoint))}</code> on the CPU.")
    if model == "hm4sr":
        try:
            c = pr.hm4sr_score_contributions(tm)
        except MoedistError as e:
            b.skip(sec, "score contributions", str(e))
        else:
            b.figure(sec, f"{prefix}modality_contributions.png",
                     "Per-modality score contributions: HM4SR scores item i for user u as Σ_m H^m·C_m[i]; left, the "
                     "mean term of each modality for the true next item vs over all items (validation users); right, "
                     "how much each term varies across items, and how often its top-1 item alone equals the model's",
                     plots.contributions, c)
            rows = [[html.escape(m), _fmt(c.target_mean[m]), _fmt(c.all_mean[m]), _fmt(c.spread[m]),
                     f"{c.top1_agree[m]:.1%}"] for m in c.modalities]
            sec.parts.append(_table(["modality", "mean term, true item", "mean term, all items", "spread over items",
                                     "top-1 agrees with model"], rows))
            sec.note(f"the terms add up to the model's scores within {c.max_abs_error:.2g}")
        try:
            tg = pr.hm4sr_temporal_gate(tm)
        except MoedistError as e:
            b.skip(sec, "temporal gate", str(e))
        else:
            b.figure(sec, f"{prefix}temporal_gate.png",
                     "Temporal-MoE gate vs interval: the weight of each temporal expert as a function of the gap Δ "
                     "since the previous interaction (interval_bucket + the gate over [interval; absolute time] "
                     "embeddings, absolute time fixed); grey = distribution of the gaps in the data",
                     plots.temporal_gate, tg)
    else:
        try:
            f = pr.mamex_fusion(tm)
        except MoedistError as e:
            b.skip(sec, "fusion weights", str(e))
        else:
            if not tm.model.learned_fusion:
                sec.note("this run has no learned fusion (mamex.use_fusion=false or one modality): α is the plain "
                         "average of the modalities an item has")
            b.figure(sec, f"{prefix}fusion_weights.png",
                     "Modality fusion weights: MAMEX's α per item (fusion_weights()), left over all items, warm vs "
                     "cold; right per item category (boxes: quartiles; dashed = equal weights)",
                     plots.fusion, f)


# ----------------------------------------------------------------------------- comparisons


def _comparison_section(b: _Builder, runs: list[RunInfo], current: Path | None) -> None:
    if not runs:
        return
    sec = b.section("Results of the runs side by side (test split, best validation epoch)")
    # one table per dataset and protocol: numbers on other data or another protocol are not comparable
    by_protocol: dict[tuple[str, str], list[RunInfo]] = {}
    for r in runs:
        by_protocol.setdefault((str(r.results.get("dataset", "?")), str(r.results.get("protocol", "?"))), []).append(r)
    cur = current.resolve() if current is not None else None
    for (dataset, protocol), group in by_protocol.items():
        cols = sorted({c for r in group for c in r.results["test"]}, key=metric_sort_key)
        # the best finite number per column: a NaN (diverged run) or a null must neither win nor fail the page
        best = {c: max((r.results["test"][c] for r in group if _finite(r.results["test"].get(c))), default=None)
                for c in cols}
        rows = []
        for r in group:
            name = html.escape(r.name) + (" <em>(this run)</em>" if cur is not None and r.path.resolve() == cur else "")
            if r.stale_results() is not None:
                name += " <em>(results of an earlier run of this directory)</em>"
            cells = []
            for c in cols:
                v = r.results["test"].get(c)
                txt = _fmt(v) if isinstance(v, (int, float)) else "–"
                cells.append(f"<b>{txt}</b>" if _finite(v) and v == best[c] and len(group) > 1 else txt)
            rows.append([name, html.escape(str(r.model)), _fmt(r.best_epoch)] + cells)
        label = {"loo": "leave-one-out (sequential)", "cold": "cold-start items"}.get(protocol, protocol)
        sec.text(f"Dataset <b>{html.escape(dataset)}</b>, protocol: {html.escape(label)}; best value per column in bold.")
        sec.parts.append(_table(["run", "model", "best epoch"] + [f"test {html.escape(c)}" for c in cols], rows, "results"))


def _collection_curves(b: _Builder, runs: list[RunInfo]) -> None:
    by_metric: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for r in runs:
        vm = r.valid_metric
        if vm and r.records:
            xs, ys = series(r.records, f"valid_{vm}")
            if xs:
                by_metric.setdefault(f"valid_{vm}", []).append((r.name, xs, ys))
    sec = b.section("Validation curves of the runs")
    if not by_metric:
        b.skip(sec, "validation curves", "no run has per-epoch validation metrics")
        return
    for i, (m, curves) in enumerate(sorted(by_metric.items())):
        b.figure(sec, f"runs_{_slug(m)}.png", f"Validation curves: {m} per epoch, one line per run",
                 plots.trial_curves, curves, m, None, label_all=True, unit="run")


# ----------------------------------------------------------------------------- tuning


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def _tuning_sections(b: _Builder, t, probe: bool) -> None:
    import pandas as pd

    frame = t.frame
    sec = b.section("Tuning trials")
    ok = frame[pd.to_numeric(frame[t.metric], errors="coerce").notna()]
    failed = len(frame) - len(ok)
    ordered = ok.sort_values(t.metric, ascending=(t.mode == "min"), kind="mergesort")
    best_pos = ordered.index[0] if len(ordered) else None
    sec.text(f"{len(frame)} trials in <code>{html.escape(str(t.path / 'results.csv'))}</code>; metric "
             f"<b>{html.escape(str(t.metric))}</b> ({'higher' if t.mode == 'max' else 'lower'} is better)"
             + (f"; {failed} trial(s) without a metric (failed or stopped before evaluation)" if failed else "") + ".")
    hcols = list(t.hparams)
    extra = [c for c in ("trial_id", "status", "stopped_by", "epochs_run") if c in frame.columns and c not in hcols]
    shown = ordered.head(MAX_TABLE_ROWS)
    rows = [[_fmt(r.get(c)) for c in extra + hcols] + [f"<b>{_fmt(r[t.metric])}</b>" if i == best_pos else _fmt(r[t.metric])]
            for i, r in shown.iterrows()]
    sec.parts.append(_table([html.escape(str(c)) for c in extra + [t.hparams[c] for c in hcols]] + [html.escape(str(t.metric))],
                            rows, "results"))
    if len(ordered) > MAX_TABLE_ROWS:
        sec.note(f"the {len(ordered) - MAX_TABLE_ROWS} worse trials are not listed")

    sec = b.section("Metric against each searched hyperparameter")
    if not hcols:
        b.skip(sec, "hyperparameter scatter plots", f"results.csv has no hyperparameter columns (like hm4sr.k1 or config/train.lr); columns: {', '.join(map(str, frame.columns))}")
    elif len(ok) == 0:
        b.skip(sec, "hyperparameter scatter plots", "no trial has a metric value")
    best_i = list(ok.index).index(best_pos) if best_pos is not None else None
    for c in hcols:
        vals = ok[c].tolist()
        if len(ok) and len({str(v) for v in vals}) < 2:
            sec.note(f"{t.hparams[c]} = {vals[0]!r} in every trial: not searched, no plot")
            continue
        if len(ok):
            b.figure(sec, f"tuning_{_slug(t.hparams[c])}.png",
                     f"{t.hparams[c]}: {t.metric} of each trial against {t.hparams[c]} (star = best trial)",
                     plots.tuning_scatter, [_py(v) for v in vals], ok[t.metric].astype(float).tolist(),
                     t.hparams[c], str(t.metric), best_i)

    # trial directories: validation curves and the best trial's own report
    trial_dirs = {}
    for i, r in frame.iterrows():
        d = t.trial_dir(r)
        if d is not None:
            trial_dirs[i] = d
    if not trial_dirs:
        trial_dirs = {f"dir:{p.name}": p for p in trial_runs(t.path)}
    sec = b.section("Validation curves of the trials")
    curve_key = "valid_" + str(t.metric).removeprefix("best_").removeprefix("valid_")
    curves, best_name = [], None
    for key, d in trial_dirs.items():
        run = read_run(d)
        key_here = curve_key if any(curve_key in rec for rec in run.records) else (f"valid_{run.valid_metric}" if run.valid_metric else curve_key)
        xs, ys = series(run.records, key_here)
        if xs:
            curves.append((d.name, xs, ys))
        if key == best_pos:
            best_name = d.name
    if curves:
        b.figure(sec, "tuning_curves.png", f"Trial curves: {curve_key} per epoch, one line per trial",
                 plots.trial_curves, curves, curve_key, best_name)
    else:
        b.skip(sec, "trial curves", "no trial directory with per-epoch validation metrics was found "
               "(results.csv names none that exists, and no subfolder is a run directory)")
    best_dir = trial_dirs.get(best_pos) if best_pos is not None else None
    if best_dir is not None:
        b.section(f"Best trial: {html.escape(best_dir.name)}").text(
            f"The run report of the best trial (<code>{html.escape(str(best_dir))}</code>) follows.")
        _run_sections(b, read_run(best_dir), prefix="best_", probe=probe)
    elif best_pos is not None:
        sec.note("the best trial's run directory is not known (no run_dir/trial_dir/path column naming an existing "
                 "run directory in results.csv), so its run report is not included")


def _py(v):
    """numpy scalars -> Python scalars (bools stay categories)."""
    if hasattr(v, "item"):
        v = v.item()
    return v


# ----------------------------------------------------------------------------- page


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left} table.facts td{text-align:left}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.88em;color:#444;max-width:60em}
.note{color:#8a6d3b;background:#fcf8e3;border-left:3px solid #e6c35c;padding:.3em .7em;font-size:.9em}
.file{color:#888} pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em} .meta{color:#666;font-size:.85em}
"""


def _page(title: str, source: Path, kind: str, b: _Builder, seconds: float) -> str:
    toc = "".join(f'<li><a href="#s{i}">{s.title}</a></li>' for i, s in enumerate(b.sections))
    body = "".join(f'<h2 id="s{i}">{s.title}</h2>' + "".join(s.parts) for i, s in enumerate(b.sections))
    skipped = ""
    if b.skipped:
        skipped = "<p class=\"note\">Skipped: " + "; ".join(html.escape(s) for s in b.skipped) + "</p>"
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(kind)} report of <code>{html.escape(str(source))}</code>, written {when} in {seconds:.1f} s;
{len(b.figures)} figure(s), {len(b.skipped)} skipped.</p>
{skipped}
<ul>{toc}</ul>
{body}
</body></html>
"""
