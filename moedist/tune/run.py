"""Ray Tune over Ray Train: each trial is a TorchTrainer run, ASHA stops the poor ones.

    moedist tune --model hm4sr --data data/prepared/synthetic-small-2025 --samples 16 --workers 1
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune_hm4sr.py --storage /shared/runs

Ray 2.60 runs Train V2, which refuses ``Tuner(TorchTrainer)``. A trial is therefore a
*function trainable* (:func:`moedist_trial`) that applies its hyperparameters to the base
ExperimentConfig and runs a ``TorchTrainer`` (``moedist.train.launch.build_trainer``, the same
trainer ``moedist train --workers N`` runs); a Train callback forwards each validation
report to Tune, where ASHA compares trials at its rungs. The trial driver itself takes 0.01
CPU; its workers take ``dist.workers x dist.cpus_per_worker`` CPUs (+1 GPU each, and
``dist.memory_per_worker`` GiB of Ray's ``memory`` resource each when set), so at most
``cluster resources / that`` trials run at once: a trial never holds its driver while waiting
for workers that other trials occupy, and trials do not together outgrow the node's memory.

One experiment folder holds everything (``<storage>/<name>``)::

    experiment_state-*.json, tuner.pkl, moedist_trial_*/   Ray Tune's state (resume) and trial logs
    trials/<trial_id>/         each trial's moedist run directory (config, metrics.jsonl, checkpoints)
    ray/<trial_id>/            Ray Train's run snapshot and reported checkpoints of each trial
    results.csv, results.parquet   one row per trial: hyperparameters, best validation metric,
                               epochs run, status and why it stopped (asha / early_stopping / ...)
    best.yaml                  the best trial's full ExperimentConfig (``moedist train --config best.yaml``)
    best/                      that config retrained (resumable run directory) + results.json with test metrics

Running the same command again restores the experiment (``Tuner.restore``): finished trials
are kept, interrupted and errored ones continue from their last checkpoint, and nothing is
re-run when everything finished.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from moedist.config import _from_dict, atomic_write_text, load_config, read_yaml, save_config, to_dict
from moedist.errors import ConfigError, MoedistError
from moedist.train.config import LOO_MODELS, ExperimentConfig, validate_experiment
from moedist.tune.spaces import apply_overrides, describe, resolve_space, searched_keys, to_tune

TRIAL_DRIVER_CPU = 0.01  # Ray refuses a 0-CPU trial; the trial's workers hold the real resources
# How long a trial waits for its training workers to be placed. Ray Train's own default (60 s)
# fails a trial that waits for an autoscaler to add GPU nodes (minutes: a node, then the
# image), or for a running trial to finish (a restored search starts its errored and
# interrupted trials together). On a local cluster that run_tune starts itself, a trial no
# node can hold is refused before the search starts (max_concurrent_trials); a remote cluster
# may autoscale, so there the wait is for capacity that is expected to come.
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_WORKER_START_TIMEOUT_S = 7 * 24 * 3600.0


def _is_uri(path: str) -> bool:
    return "://" in path


# ----------------------------------------------------------------------------- the trial


class RecordingASHA(ASHAScheduler):
    """ASHA that notes which trials it stopped early (``asha_stopped.jsonl`` beside the table).

    Tune marks a trial the scheduler stops ``done`` and TERMINATED, exactly like one whose
    training ended by itself, so the results table learns the difference from this record.
    """

    def __init__(self, *, record_path: str, **kwargs):
        super().__init__(**kwargs)
        self._record_path = record_path

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            Path(self._record_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self._record_path, "a") as f:
                f.write(json.dumps({"trial_id": trial.trial_id, self._time_attr: result.get(self._time_attr),
                                    self._metric: result.get(self._metric)}) + "\n")
        return action


def asha_stopped_trials(path: Path) -> set[str]:
    return {r["trial_id"] for r in _read_jsonl(path) if "trial_id" in r}



def _report_callback(metric: str):
    """Tune's ``TuneReportCallback``, forwarding only reports that carry ``metric``.

    The loop reports every epoch, but validates only every ``train.eval_every`` epochs (MAMEX:
    10); Tune requires the metric in every result, so ASHA's time unit is one evaluation.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReportCallback()


def moedist_trial(config: dict, *, base: dict, trials_dir: str, train_storage: str, metric: str,
                  use_gpu: bool, controller_failure_limit: int, worker_start_timeout_s: float | None = None) -> None:
    """One Tune trial: the base config + this trial's values, trained by a TorchTrainer."""
    from ray import tune
    from ray.train import FailureConfig

    from moedist.train.launch import build_trainer

    if worker_start_timeout_s is not None:
        # Ray Train hands this variable from the process calling fit() to its controller
        os.environ[WORKER_START_TIMEOUT_ENV] = f"{worker_start_timeout_s:g}"
    cfg = apply_overrides(_from_dict(ExperimentConfig, base), config)
    trial_id = tune.get_context().get_trial_id()
    cfg.run_dir = str(Path(trials_dir) / trial_id)
    trainer = build_trainer(
        cfg, use_gpu=use_gpu, name=trial_id, storage_path=train_storage,
        callbacks=[_report_callback(metric)],
        # a trial whose workers cannot start fails (and is resumed by a rerun) instead of
        # retrying forever while holding its share of the cluster
        failure_config=FailureConfig(max_failures=cfg.dist.max_failures, controller_failure_limit=controller_failure_limit),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


# ----------------------------------------------------------------------------- resources


def trial_resources(cfg: ExperimentConfig, use_gpu: bool) -> dict[str, float]:
    """What one trial holds while it runs: its driver plus its training workers."""
    from moedist.train.launch import worker_resources

    need = {r: cfg.dist.workers * n for r, n in worker_resources(cfg, use_gpu).items()}
    need["CPU"] += TRIAL_DRIVER_CPU
    return need


def max_concurrent_trials(need: Mapping[str, float], available: Mapping[str, float], *, local: bool = False) -> int:
    """How many trials fit the cluster at once, each with all its workers (>= 1 or an error).
    ``local``: the cluster is the one this process started (it will not grow)."""
    fits = min(math.floor(available.get(r, 0.0) / n + 1e-9) for r, n in need.items() if n > 0)
    if fits < 1:
        from moedist.train.launch import format_resources

        have = format_resources({r: available.get(r, 0.0) for r in need})
        want = format_resources(dict(need))
        hint = "" if local else ", or pass max_concurrent on an autoscaling cluster (trials then wait for nodes)"
        raise ConfigError(f"one trial needs {want} (dist.workers x dist.cpus_per_worker / dist.memory_per_worker, "
                          f"+ its driver) but the Ray cluster has {have}; lower dist.workers / dist.cpus_per_worker / "
                          f"dist.memory_per_worker{hint}")
    return fits


def check_metric(metric: str, cfg: ExperimentConfig) -> None:
    """A ConfigError unless the trials report ``metric`` (``valid_<name>@<k>``, k in
    ``train.topk``): Tune would otherwise fail the search after the first trial's training."""
    from moedist.train.evaluate import metric_names

    reported = [f"valid_{m}" for m in metric_names(cfg.train.topk, protocol="loo" if cfg.model in LOO_MODELS else "cold")]
    if metric not in reported:
        raise ConfigError(f"metric {metric!r} is not reported by the {cfg.model} trials (choose one of: "
                          f"{', '.join(reported)})")


# ----------------------------------------------------------------------------- results


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            if line.strip():
                out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _trial_records(trial, run_dir: Path, frames: dict) -> list[dict]:
    """The trial's epoch records: its run directory's metrics.jsonl (complete across resumes),
    else what Tune received."""
    records = _read_jsonl(run_dir / "metrics.jsonl")
    if records:
        return records
    df = frames.get(trial.trial_id)
    if df is None or len(df) == 0:
        return []
    return df.to_dict("records")


OOM_HINT = ("set dist.memory_per_worker (GiB per worker; moedist tune --memory-per-worker) so that fewer "
            "trials run at once")


def _first_line(err: Any) -> str | None:
    """One line for the results table: the error's last line, or, for workers that Ray's
    memory monitor killed (whose text ends in a long help paragraph), what the node's memory
    was and the remedy."""
    if err is None:
        return None
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    for ln in lines:
        if "killed due to the node running low on memory" in ln:
            m = re.search(r"was ([\d.]+\s*GB) used / ([\d.]+\s*GB) limit", ln)
            at = f" (node memory {m.group(1)} of {m.group(2)})" if m else ""
            return f"out of memory: killed by Ray's memory monitor{at}; {OOM_HINT}"
    return lines[-1][:300] if lines else type(err).__name__


def saved_statuses(exp_path: str) -> dict[str, str]:
    """Trial statuses as Tune last saved them. After an interrupt (Ctrl+C) the trials that
    were running are TERMINATED in memory but RUNNING in the saved state, and a rerun
    resumes them: the saved state is the truth about what is finished."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: str(t.status) for t in ExperimentAnalysis(exp_path).trials}
    except Exception:  # no state file (yet): fall back to the in-memory statuses
        return {}


def expected_trials(space: Mapping[str, Any], num_samples: int) -> int:
    grids = [len(s["grid"]) for s in space.values() if isinstance(s, Mapping) and "grid" in s]
    return num_samples * math.prod(grids)


def results_rows(grid, *, keys: list[str], metric: str, mode: str, trials_dir: Path, cfg: ExperimentConfig,
                 asha_stopped: set[str] = frozenset(), statuses: Mapping[str, str] | None = None) -> list[dict]:
    """One row per trial: its searched values, best validation metric, epochs, status, stop reason."""
    analysis = grid._experiment_analysis  # Trial objects carry the status the Result lacks
    frames = getattr(analysis, "trial_dataframes", {}) or {}
    statuses = statuses or {}
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):  # restore reorders them
        run_dir = trials_dir / trial.trial_id
        records = _trial_records(trial, run_dir, frames)
        scored = [r for r in records if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
        pick = max if mode == "max" else min
        best = pick(scored, key=lambda r: r[metric]) if scored else None
        epochs_run = int(max((r.get("epoch", -1) for r in records), default=-1)) + 1
        last = trial.last_result or {}
        status = statuses.get(trial.trial_id, str(trial.status))
        # Tune marks a scheduler-stopped trial done and TERMINATED too: the ASHA record tells
        if status == "ERROR":
            stopped_by = "error"
        elif status != "TERMINATED":
            stopped_by = "interrupted"  # PENDING / RUNNING / PAUSED: a rerun resumes it
        elif trial.trial_id in asha_stopped:
            stopped_by = "asha"
        elif epochs_run >= cfg.train.epochs:
            stopped_by = "max_epochs"
        else:
            stopped_by = "early_stopping"  # train.patience evaluations without improvement
        error = None
        if status == "ERROR":
            try:
                error = _first_line(trial.get_pickled_error() or trial.get_error())
            except Exception:  # the error file may live on another node
                error = "error"
        row = {"trial_id": trial.trial_id}
        for k in keys:
            row[k] = trial.config.get(k)
        row.update({
            f"best_{metric}": float(best[metric]) if best else float("nan"),
            "best_epoch": int(best["epoch"]) if best and "epoch" in best else None,
            f"last_{metric}": float(scored[-1][metric]) if scored else float("nan"),
            "epochs_run": epochs_run,
            "evaluations": len(scored),
            "iterations": int(last.get("training_iteration", 0) or 0),  # ASHA's time unit (evaluations)
            "status": status,
            "stopped_by": stopped_by,
            "asha_stopped": stopped_by == "asha",
            "early_stopped": stopped_by == "early_stopping",
            "error": error,
            "run_dir": str(run_dir),
        })
        rows.append(row)
    return rows


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """results.csv + results.parquet (atomic: a reader never sees half a table)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    csv, parquet = out_dir / "results.csv", out_dir / "results.parquet"
    atomic_write_text(csv, df.to_csv(index=False))
    tmp = out_dir / ".results.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, parquet)
    return csv, parquet


def format_table(rows: list[dict], *, keys: list[str], metric: str, mode: str, best_id: str | None) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"trials ({metric}, best {'max' if mode == 'max' else 'min'}; * = best)")
    cols = ["trial_id", *keys, f"best_{metric}", "epochs_run", "stopped_by"]
    for c in cols:
        t.add_column(c.replace("hm4sr.", "").replace("mamex.", ""), justify="left" if c in ("trial_id", "stopped_by") else "right")
    key = f"best_{metric}"
    order = sorted(rows, key=lambda r: (math.isnan(r[key]), -r[key] if mode == "max" else r[key]))
    for r in order:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.5f}" if c == key and isinstance(v, float) else ("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)))
        if r["trial_id"] == best_id:
            cells[0] += " *"
        t.add_row(*cells)
    buf = StringIO()
    Console(file=buf, width=max(100, 14 * len(cols)), highlight=False).print(t)
    return buf.getvalue().rstrip()


def pick_best(rows: list[dict], metric: str, mode: str) -> dict | None:
    key = f"best_{metric}"
    scored = [r for r in rows if isinstance(r[key], float) and not math.isnan(r[key])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[key])


def _same_config(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Whether ``run_dir`` trained ``cfg``, up to the memory reservation, which changes where
    and how many runs fit, not what one trains (a resumed search may raise it)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:
        saved, wanted = read_yaml(path), json.loads(json.dumps(to_dict(cfg)))
    except MoedistError:
        return False
    for tree in (saved, wanted):
        if isinstance(tree.get("dist"), dict):
            tree["dist"].pop("memory_per_worker", None)
    return saved == wanted


def _upload(local_dir: Path, uri: str, names: list[str]) -> None:
    """Copy the experiment's tables and best config next to Tune's state on remote storage."""
    import pyarrow.fs as pafs

    for name in names:
        src = local_dir / name
        if src.is_dir():
            for f in ("config.yaml", "results.json", "metrics.jsonl"):
                if (src / f).is_file():
                    pafs.copy_files(str(src / f), f"{uri}/{name}/{f}")
        elif src.is_file():
            pafs.copy_files(str(src), f"{uri}/{name}")


# ----------------------------------------------------------------------------- the search


def run_tune(
    base_cfg: ExperimentConfig,
    *,
    space: str | Path | Mapping[str, Any] | None = None,
    num_samples: int = 8,
    max_concurrent: int | None = None,
    metric: str | None = None,
    mode: str = "max",
    grace_period: int = 1,
    reduction_factor: float = 2,
    experiment_name: str | None = None,
    storage_path: str | Path = "runs",
    local_dir: str | Path | None = None,
    resume: bool = True,
    retrain_best: bool = True,
    seed: int | None = None,
    controller_failure_limit: int = 0,
    worker_start_timeout_s: float | None = None,
    verbose: int = 1,
    echo: Callable[[str], None] | None = None,
    memory_per_worker: float | None = None,
) -> dict:
    """Search ``space`` around ``base_cfg`` with ASHA; write the results table and ``best.yaml``;
    retrain the best configuration into ``<experiment>/best``. Returns a summary dict.

    ``space``: a YAML path or mapping overriding the model's default space (see
    :mod:`moedist.tune.spaces`); ``metric``: default ``valid_<train.valid_metric>`` (mode
    max); ``grace_period``: evaluations before ASHA may stop a trial; ``max_concurrent``:
    default, as many trials as the cluster's CPUs/GPUs hold with all their workers;
    ``storage_path``: a local folder or a URI (``s3://...``) Ray writes the experiment to (with
    a URI the tables, ``best.yaml`` and the trials' run directories are written under
    ``local_dir`` — default ``runs/<name>`` — and the tables and best config copied there too);
    ``resume``: restore the experiment when it exists (else refuse to overwrite it); a resumed
    experiment keeps the base config it started with, except ``memory_per_worker``: when given,
    it sets ``dist.memory_per_worker`` of a new search and replaces the stored one of a resumed
    search, so trials killed for memory can be resumed with a larger reservation;
    ``worker_start_timeout_s``: how long a trial waits for its workers to be placed (default
    ``$RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, else 7 days: trials queue on the cluster's
    resources instead of failing); ``controller_failure_limit``: how often a trial's Train
    controller may fail and restart (0: a trial whose workers were killed, e.g. for memory,
    ends as an error that a rerun resumes).

    A trial that ends in an error leaves the search incomplete (``complete`` false,
    ``errored`` lists them): nothing is retrained, and running the same call again resumes
    the errored trials from their checkpoints.
    """
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from moedist.train.launch import init_ray, launch, ray_storage_of, resolve_run_paths, resolve_use_gpu
    from moedist.train.loop import format_results

    echo = echo or (lambda s: print(s, flush=True))
    cfg = copy.deepcopy(base_cfg)
    if not cfg.data:
        raise ConfigError("data= is required (a directory written by `moedist data prepare`)")
    if mode not in ("max", "min"):
        raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
    if num_samples < 1 or grace_period < 1:
        raise ConfigError(f"num_samples and grace_period must be >= 1 (got {num_samples}, {grace_period})")
    if worker_start_timeout_s is None:
        env = os.environ.get(WORKER_START_TIMEOUT_ENV)
        try:
            worker_start_timeout_s = float(env) if env else DEFAULT_WORKER_START_TIMEOUT_S
        except ValueError:
            raise ConfigError(f"{WORKER_START_TIMEOUT_ENV}={env!r} is not a number of seconds") from None
    if not (math.isfinite(worker_start_timeout_s) and worker_start_timeout_s > 0):
        raise ConfigError(f"the worker start timeout must be a positive number of seconds, got {worker_start_timeout_s!r}")
    if max_concurrent is not None and max_concurrent < 1:  # Tune reads 0 as "no limit"
        raise ConfigError(f"max_concurrent must be >= 1 (trials at once), got {max_concurrent}")
    if cfg.dist.workers < 1:
        cfg.dist.workers = 1  # a trial is a TorchTrainer run: at least one Ray Train worker
    cfg.train.progress = False
    if memory_per_worker is not None:
        cfg.dist.memory_per_worker = memory_per_worker
    # before anything is written: every trial would fail on a bad base config, and a resumed
    # search keeps the base config and metric it started with
    validate_experiment(cfg)
    resolved = resolve_space(space, cfg)
    keys = searched_keys(resolved)
    metric = metric or f"valid_{cfg.train.valid_metric}"
    check_metric(metric, cfg)
    seed = cfg.train.seed if seed is None else seed

    from moedist.data.dataset import PreparedDataset

    name = experiment_name or f"tune-{cfg.model}-{PreparedDataset(cfg.data).name}"
    storage = str(storage_path)
    remote = _is_uri(storage)
    if remote:
        storage = storage.rstrip("/")
        exp_path = f"{storage}/{name}"
        local_exp = Path(local_dir or "runs").resolve() / name
    else:
        storage = str(Path(storage).resolve())
        exp_path = str(Path(storage) / name)
        local_exp = Path(local_dir).resolve() / name if local_dir else Path(exp_path)
    cfg.run_dir = str(local_exp / "trials" / "_")  # resolve_run_paths makes data/features absolute
    resolve_run_paths(cfg)
    cfg.run_dir = None
    trials_dir = local_exp / "trials"
    train_storage = f"{exp_path}/ray"
    asha_record = local_exp / "asha_stopped.jsonl"

    started = init_ray(cfg, num_cpus=max(4, os.cpu_count() or 1))
    try:
        use_gpu = resolve_use_gpu(cfg)
        cfg.dist.use_gpu = use_gpu  # every trial and the retrain alike
        need = trial_resources(cfg, use_gpu)
        if max_concurrent is None:
            max_concurrent = max_concurrent_trials(need, ray.cluster_resources(), local=started)
        elif started:  # a trial that no node of the local cluster this call started holds would wait forever
            max_concurrent_trials(need, ray.cluster_resources(), local=True)
        plan_path, base_path = local_exp / "tune_plan.json", local_exp / "base_config.yaml"
        restored = bool(resume) and tune.Tuner.can_restore(exp_path)
        plan = json.loads(plan_path.read_text()) if restored and plan_path.is_file() else {}
        if restored and base_path.is_file():
            # a resumed search keeps the base config, metric and space it started with
            stored = load_config(ExperimentConfig, base_path)
            if memory_per_worker is not None and memory_per_worker != stored.dist.memory_per_worker:
                echo(f"resumed trials reserve {memory_per_worker:g} GiB per worker "
                     f"(dist.memory_per_worker; was {stored.dist.memory_per_worker:g})")
                stored.dist.memory_per_worker = memory_per_worker
                max_concurrent_trials(trial_resources(stored, use_gpu), ray.cluster_resources())  # one trial must fit
                save_config(stored, base_path)
            if to_dict(stored) != to_dict(cfg):
                echo(f"note: resuming with the experiment's stored base config {base_path}, not this call's"
                     " (only --memory-per-worker applies to a resumed search)")
            cfg = stored
            metric, mode = plan.get("metric", metric), plan.get("mode", mode)
            keys = list(plan.get("searched_keys", keys))
        n_evals = len(range(0, cfg.train.epochs, max(1, cfg.train.eval_every)))
        trainable = tune.with_resources(
            tune.with_parameters(
                moedist_trial, base=to_dict(cfg), trials_dir=str(trials_dir), train_storage=train_storage,
                metric=metric, use_gpu=use_gpu, controller_failure_limit=controller_failure_limit,
                worker_start_timeout_s=worker_start_timeout_s,
            ),
            {"cpu": TRIAL_DRIVER_CPU},
        )
        if restored:
            echo(f"restoring the experiment at {exp_path} (its stored search space and settings are used; "
                 "interrupted and errored trials continue from their checkpoints)")
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        else:
            if tune.Tuner.can_restore(exp_path):
                raise ConfigError(f"experiment {exp_path} exists; resume it (the default) or choose another name")
            echo(f"search space ({cfg.model}, {num_samples} sample(s), metric {metric} {mode}):\n{describe(resolved)}")
            echo(f"each trial: {cfg.dist.workers} worker(s) x {cfg.dist.cpus_per_worker:g} CPU"
                 f"{' + 1 GPU' if use_gpu else ''}"
                 f"{f' + {cfg.dist.memory_per_worker:g} GiB memory' if cfg.dist.memory_per_worker else ''}; up to {max_concurrent} trial(s) at once; ASHA grace period "
                 f"{grace_period} of {n_evals} evaluation(s), reduction factor {reduction_factor:g}")
            save_config(cfg, base_path)
            atomic_write_text(plan_path, json.dumps({
                "model": cfg.model, "num_samples": num_samples, "expected_trials": expected_trials(resolved, num_samples),
                "space": resolved, "searched_keys": keys, "metric": metric, "mode": mode}, indent=1, default=str))
            tuner = tune.Tuner(
                trainable,
                param_space=to_tune(resolved, seed=seed),
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=num_samples,
                    scheduler=RecordingASHA(record_path=str(asha_record), time_attr="training_iteration",
                                            max_t=max(n_evals, grace_period), grace_period=grace_period,
                                            reduction_factor=reduction_factor),
                    # the generator itself caps concurrency (Tune ignores max_concurrent_trials
                    # next to a SearchGenerator)
                    search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed),
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage, verbose=verbose,
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        grid = tuner.fit()

        local_exp.mkdir(parents=True, exist_ok=True)
        plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
        rows = results_rows(grid, keys=keys, metric=metric, mode=mode, trials_dir=trials_dir, cfg=cfg,
                            asha_stopped=asha_stopped_trials(asha_record), statuses=saved_statuses(exp_path))
        csv, parquet = write_table(rows, local_exp)
        finished = sum(r["status"] in ("TERMINATED", "ERROR") for r in rows)
        errored = [r["trial_id"] for r in rows if r["status"] == "ERROR"]
        ended = finished == len(rows) and finished >= int(plan.get("expected_trials", 0))
        complete = ended and not errored
        best_row = pick_best(rows, metric, mode)
        echo(format_table(rows, keys=keys, metric=metric, mode=mode, best_id=best_row["trial_id"] if best_row else None))
        oom = [r["trial_id"] for r in rows if (r.get("error") or "").startswith("out of memory")]
        if oom:
            echo(f"trial(s) {', '.join(oom)} ran out of memory. Rerun the same command with a larger "
                 "--memory-per-worker (GiB per worker; dist.memory_per_worker) to resume them with fewer trials at once")
        summary: dict[str, Any] = {
            "experiment": name, "experiment_path": exp_path, "experiment_dir": str(local_exp),
            "restored": restored, "complete": complete, "metric": metric, "mode": mode,
            "max_concurrent": max_concurrent, "searched_keys": keys, "trials": rows, "errored": errored,
            "results_csv": str(csv), "results_parquet": str(parquet),
            "best": None, "best_config": None, "best_results": None,
        }
        if not complete:
            if errored:
                echo(f"{len(errored)} trial(s) ended in an error ({', '.join(errored)}; the 'error' column of "
                     f"{csv}); nothing is retrained until every trial has finished: run the same command "
                     "again to resume them from their checkpoints")
            if not ended:
                echo(f"the search was interrupted ({finished} of {max(len(rows), int(plan.get('expected_trials', 0)))} "
                     "trials finished); run the same command again to resume it")
            if remote:
                _upload(local_exp, exp_path, ["results.csv", "results.parquet"])
            return summary
        if best_row is None:
            echo("no trial reported a validation result; nothing to retrain")
            return summary

        trial = next(t for t in grid._experiment_analysis.trials if t.trial_id == best_row["trial_id"])
        best_cfg = apply_overrides(cfg, dict(trial.config))
        best_cfg.run_dir = str(local_exp / "best")
        if remote or local_dir:  # else launch's default, <experiment>/ray, is train_storage already
            best_cfg.dist.storage_path = train_storage
        best_yaml = local_exp / "best.yaml"
        # without run_dir: training from best.yaml is a run of its own (runs/<model>-<data> or
        # --run-dir), never a resume inside this search's best/, which a rerun of the search
        # would then find changed and train again
        save_config(dataclasses.replace(best_cfg, run_dir=None), best_yaml)
        summary["best"] = {"trial_id": best_row["trial_id"], "config": {k: best_row[k] for k in keys},
                           metric: best_row[f"best_{metric}"], "epochs_run": best_row["epochs_run"]}
        summary["best_config"] = str(best_yaml)
        echo(f"best trial {best_row['trial_id']}: {metric} {best_row[f'best_{metric}']:.5f}; config {best_yaml}")

        if retrain_best:
            best_dir = local_exp / "best"
            if (best_dir / "results.json").is_file() and _same_config(best_dir, best_cfg):
                results = json.loads((best_dir / "results.json").read_text())
                echo(f"best config already retrained in {best_dir}")
                echo(format_results(results, best_cfg.train.topk))
            else:
                if best_dir.exists() and not _same_config(best_dir, best_cfg):
                    # an earlier best of this experiment: never resume one config's checkpoint into another
                    shutil.rmtree(best_dir)
                    if not remote:
                        storage, name = ray_storage_of(best_cfg)
                        shutil.rmtree(Path(storage) / name, ignore_errors=True)
                echo(f"retraining the best config into {best_dir}")
                results = launch(best_cfg, echo=echo)
            summary["best_results"] = results
        if remote:
            _upload(local_exp, exp_path, ["results.csv", "results.parquet", "best.yaml", "best"])
        return summary
    finally:
        if started:
            ray.shutdown()
