"""Reading what training and tuning left on disk: run directories, run collections, tuning tables.

A *run directory* (``moedist train``) holds ``config.yaml``, ``metrics.jsonl`` (one record per
epoch), ``checkpoints/best`` and ``results.json``; any of them may be missing (a run that
crashed, a popularity run with no epochs). A *collection* is a folder whose subfolders are
run directories (``runs/quality/*``). A *tuning folder* holds ``results.csv`` (one row per
trial: hyperparameter columns such as ``hm4sr.k1`` and the best validation metric) and
per-trial run directories.

Nothing here imports torch or matplotlib.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from moedist.errors import MoedistError

RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json")
# config sections whose keys a tuning table may search over
CONFIG_SECTIONS = ("hm4sr", "mamex", "sasrec", "content", "train", "dist")
# prefixes Ray Tune puts before hyperparameter columns in its result tables
_CONFIG_PREFIXES = ("config/train_loop_config/", "train_loop_config/", "config/", "params/")


class ReportError(MoedistError):
    """The report's input is not a run directory, run collection or tuning folder."""


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def is_tuning_dir(path: Path) -> bool:
    return path.is_dir() and (path / "results.csv").is_file()


def child_runs(path: Path) -> list[Path]:
    """Subdirectories of ``path`` that are run directories (sorted by name)."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))


def classify(path: str | Path) -> str:
    """``"run"``, ``"tuning"`` or ``"collection"``; :class:`ReportError` naming ``path`` otherwise."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such directory (expected a run directory written by `moedist train`)")
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (expected a run directory written by `moedist train`)")
    if is_tuning_dir(path):
        return "tuning"
    if is_run_dir(path):
        return "run"
    if child_runs(path):
        return "collection"
    raise ReportError(
        f"{path}: not a run directory (none of {', '.join(RUN_FILES)} found), nor a tuning folder "
        f"(results.csv) nor a folder of run directories"
    )


@dataclass
class RunInfo:
    """One run directory, read leniently: whatever is missing or unreadable is None/empty
    and the reason is in ``problems``."""

    path: Path
    config: dict = field(default_factory=dict)  # raw config.yaml
    records: list[dict] = field(default_factory=list)  # metrics.jsonl, in epoch order
    results: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str | None:
        return (self.results or {}).get("model") or self.config.get("model")

    @property
    def best_epoch(self) -> int | None:
        return (self.results or {}).get("best_epoch")

    @property
    def valid_metric(self) -> str | None:
        return (self.config.get("train") or {}).get("valid_metric")

    @property
    def best_checkpoint(self) -> Path | None:
        from moedist.train.checkpoint import latest_complete  # no torch import at module load

        return latest_complete(self.path / "checkpoints" / "best")

    def stale_results(self) -> tuple[bool, str] | None:
        """Whether ``results.json`` (and ``eval_ranks.npz``, written with it) belongs to the
        epochs in ``metrics.jsonl``: ``None`` when they agree (or cannot be checked), else
        ``(certain, why)``.

        ``results.json`` is written once, at the end of a run, and a resumed or restarted run
        leaves the previous one in place until it finishes. Epochs logged after the
        ``epochs_run`` it records are certain proof that the run has since trained on (it is
        still running, or was interrupted after a resume); fewer logged epochs than it records
        mean ``metrics.jsonl`` was started over (``train.resume=false``), almost always.
        """
        if not self.results or not self.records:
            return None
        n = self.results.get("epochs_run")
        if not isinstance(n, int) or isinstance(n, bool):
            return None
        last = self.records[-1]["epoch"]
        if last > n - 1:
            return True, (f"results.json is from an earlier, shorter run: it records {n} epoch(s) run (best epoch "
                          f"{self.results.get('best_epoch')}) but metrics.jsonl goes on to epoch {last}, so the run was "
                          "resumed and is still training or was interrupted; its results, best epoch and eval ranks "
                          "are those of the earlier run until it finishes")
        if last < n - 1:
            return False, (f"metrics.jsonl ends at epoch {last} but results.json records {n} epochs run: the run was "
                           "probably started over (train.resume=false) and has not finished, so its results are those "
                           "of the earlier run")
        return None


def read_run(path: str | Path) -> RunInfo:
    path = Path(path)
    info = RunInfo(path=path)
    cfg = path / "config.yaml"
    if cfg.is_file():
        try:
            from moedist.config import read_yaml

            info.config = read_yaml(cfg)
        except MoedistError as e:
            info.problems.append(str(e))
    else:
        info.problems.append(f"{cfg}: missing")
    mpath = path / "metrics.jsonl"
    if mpath.is_file():
        by_epoch: dict[int, dict] = {}
        for n, line in enumerate(mpath.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                info.problems.append(f"{mpath}:{n}: not JSON (torn line skipped)")
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
                by_epoch[rec["epoch"]] = rec  # a repeated epoch (resume) keeps the last line
        info.records = [by_epoch[e] for e in sorted(by_epoch)]
    else:
        info.problems.append(f"{mpath}: missing")
    rpath = path / "results.json"
    if rpath.is_file():
        try:
            res = json.loads(rpath.read_text())
            info.results = res if isinstance(res, dict) else None
        except json.JSONDecodeError as e:
            info.problems.append(f"{rpath}: not JSON ({e})")
    else:
        info.problems.append(f"{rpath}: missing")
    return info


def comparison_runs(path: Path, kind: str) -> list[RunInfo]:
    """Runs to put in the results table: the collection's runs, or the run's siblings (when
    its parent holds two or more runs with ``results.json``). Runs without results are left out."""
    if kind == "collection":
        candidates = child_runs(path)
    elif kind == "run":
        candidates = child_runs(path.resolve().parent)
    else:
        candidates = []
    runs = [read_run(p) for p in candidates if (p / "results.json").is_file()]
    runs = [r for r in runs if r.results and isinstance(r.results.get("test"), dict)]
    if kind == "run" and len(runs) < 2:
        return []
    return runs


# ----------------------------------------------------------------------------- metrics.jsonl


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a scalar key over the records that have it."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["epoch"])
            ys.append(float(v))
    return xs, ys


def loss_keys(records: list[dict]) -> list[str]:
    keys = {k for r in records for k, v in r.items() if (k == "loss" or k.startswith("loss_")) and isinstance(v, (int, float))}
    return sorted(keys, key=lambda k: (k != "loss", k))


def valid_keys(records: list[dict]) -> list[str]:
    keys = {k for r in records for k, v in r.items() if k.startswith("valid_") and isinstance(v, (int, float))}
    return sorted(keys, key=metric_sort_key)


def metric_sort_key(name: str) -> tuple:
    base = name.removeprefix("valid_").removeprefix("test_")
    m = re.fullmatch(r"(.*)@(\d+)", base)
    return (m.group(1), int(m.group(2))) if m else (base, 0)


@dataclass
class ExpertSeries:
    """One MoE layer's per-expert statistic over epochs: ``values[i][e]`` at ``epochs[i]``."""

    layer: str
    stat: str  # "load" | "gate_mean" | other per-expert statistic
    epochs: list[int]
    values: list[list[float]]

    @property
    def n_experts(self) -> int:
        return max((len(v) for v in self.values), default=0)

    def informative(self) -> bool:
        """False when every value is identical (dense gates route every token to every
        expert, so their ``load`` is all ones)."""
        flat = {round(x, 9) for row in self.values for x in row}
        return len(flat) > 1


_STAT_SUFFIX = re.compile(r"^(?P<layer>.+?)[./](?P<stat>load|gate_mean|[a-z_]+)$")


def moe_series(records: list[dict]) -> tuple[list[ExpertSeries], dict[str, tuple[list[int], list[float]]]]:
    """Split the ``moe/<key>`` entries into per-expert series (lists) and scalar series.

    ``moe/imoe/text/gate_mean`` -> layer ``imoe/text``, stat ``gate_mean``;
    ``moe/adapter.image.load`` -> layer ``adapter.image``, stat ``load``.
    """
    lists: dict[tuple[str, str], ExpertSeries] = {}
    scalars: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for k, v in r.items():
            if not k.startswith("moe/"):
                continue
            key = k[4:]
            if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                m = _STAT_SUFFIX.match(key)
                layer, stat = (m.group("layer"), m.group("stat")) if m else (key, "value")
                s = lists.setdefault((layer, stat), ExpertSeries(layer, stat, [], []))
                s.epochs.append(r["epoch"])
                s.values.append([float(x) for x in v])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                xs, ys = scalars.setdefault(key, ([], []))
                xs.append(r["epoch"])
                ys.append(float(v))
    order = {"gate_mean": 0, "load": 1}
    out = sorted(lists.values(), key=lambda s: (s.layer, order.get(s.stat, 2), s.stat))
    return out, scalars


def scalar_group(key: str, modalities=("id", "text", "image")) -> tuple[str, str]:
    """``imoe/text/alpha`` -> (``imoe/*/alpha``, ``text``); keys without a modality -> (key, key)."""
    parts = re.split(r"([./])", key)
    for i, p in enumerate(parts):
        if p in modalities:
            return "".join(parts[:i] + ["*"] + parts[i + 1 :]), p
    return key, key


# ----------------------------------------------------------------------------- tuning tables


def normalise_hparam(col: str) -> str | None:
    """The config key of a hyperparameter column (``config/hm4sr.k1`` -> ``hm4sr.k1``), else None."""
    name = col
    for p in _CONFIG_PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
            break
    name = name.replace("/", ".")
    head = name.split(".", 1)[0]
    if head in CONFIG_SECTIONS and "." in name:
        return name
    return None


@dataclass
class TuningTable:
    path: Path
    frame: object  # pandas.DataFrame
    metric: str  # column holding the metric
    mode: str  # "max" | "min"
    hparams: dict[str, str]  # column -> config key
    trial_col: str | None  # column naming each trial's directory, if any

    def trial_dir(self, row) -> Path | None:
        if self.trial_col is None:
            return None
        raw = row.get(self.trial_col)
        if not isinstance(raw, str) or not raw:
            return None
        p = Path(raw.removeprefix("file://"))
        # as written, relative to the experiment, or moved with it (``moedist tune`` keeps
        # trials under ``<experiment>/trials/<trial_id>``)
        for cand in (p, self.path / p, self.path / "trials" / p.name, self.path / p.name):
            if is_run_dir(cand):
                return cand
        return None


_TRIAL_COLS = ("run_dir", "trial_dir", "path", "logdir", "trial_path", "local_path", "trial_id")


def read_tuning_table(path: Path, metric: str | None = None, mode: str | None = None) -> TuningTable:
    import pandas as pd

    csv = path / "results.csv"
    try:
        frame = pd.read_csv(csv)
    except Exception as e:  # noqa: BLE001 - pandas raises several types for malformed CSV
        raise ReportError(f"{csv}: cannot read the tuning table ({type(e).__name__}: {e})") from None
    if frame.empty:
        raise ReportError(f"{csv}: the tuning table has no rows")
    hparams = {c: k for c in frame.columns if (k := normalise_hparam(str(c))) is not None}
    if metric is None:
        metric = _guess_metric(frame, hparams, path)
    if metric not in frame.columns:
        raise ReportError(f"{csv}: no column {metric!r} (columns: {', '.join(map(str, frame.columns))})")
    if mode is None:
        mode = "min" if "loss" in metric else "max"
    trial_col = next((c for c in _TRIAL_COLS if c in frame.columns), None)
    return TuningTable(path=path, frame=frame, metric=metric, mode=mode, hparams=hparams, trial_col=trial_col)


def trial_runs(path: Path) -> list[Path]:
    """Run directories of a tuning folder's trials: ``trials/*`` (``moedist tune``) or direct subfolders."""
    return child_runs(path / "trials") or child_runs(path)


def _guess_metric(frame, hparams: dict, path: Path) -> str:
    import pandas as pd

    numeric = [c for c in frame.columns if c not in hparams and pd.api.types.is_numeric_dtype(frame[c])]
    # the valid_metric the trials were selected on, when a trial's config.yaml says so
    wanted = []
    for sub in trial_runs(path)[:1]:
        vm = read_run(sub).valid_metric
        if vm:
            wanted += [f"best_valid_{vm}", f"valid_{vm}", vm, f"best_{vm}"]
    wanted += ["best_metric", "metric", "score"]
    for w in wanted:
        if w in numeric:
            return w
    for prefix in ("best_valid_", "valid_", ""):
        for c in numeric:
            if str(c).startswith(prefix) and "@" in str(c):
                return c
    raise ReportError(
        f"{path / 'results.csv'}: cannot tell which column is the metric (no column like "
        f"'valid_ndcg@20'); pass it with --metric"
    )
