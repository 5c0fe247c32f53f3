"""``moedist tune``: hyperparameter search (Ray Tune + ASHA) over Ray Train runs.

    moedist tune --model hm4sr --data data/prepared/synthetic-small-2025 --samples 16
    moedist tune --model mamex --data DATA --space space.yaml --workers 2 --name mamex-baby train.epochs=200
    moedist tune --model hm4sr --data DATA --storage s3://bucket/runs      # on a Ray cluster (RAY_ADDRESS)

Each trial trains the model's defaults (``moedist/configs/<model>.yaml``) + ``--config`` +
``key=value`` overrides + the trial's sampled values, on ``--workers`` Ray Train workers.
The experiment folder ``<storage>/<name>`` gets ``results.csv`` / ``results.parquet`` (one
row per trial), ``best.yaml`` (``moedist train --config best.yaml`` reruns it) and ``best/``
(the best config retrained, with test metrics). Rerunning the command resumes the search with
the settings it started with; only ``--memory-per-worker`` applies to a resumed search as well
(for trials that ran out of memory).
"""
from __future__ import annotations

import argparse

TUNE_MODELS = ("hm4sr", "mamex", "sasrec", "content")


def add_tune_arguments(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    if model_required:
        p.add_argument("--model", choices=TUNE_MODELS, required=True, help="model to tune (default spaces: hm4sr, mamex)")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--features", help="feature shards directory (default: the one under <data>/features)")
    p.add_argument("--config", help="YAML with ExperimentConfig keys (the base of every trial)")
    p.add_argument("--samples", type=int, help="trials to sample (with grid keys: repeats of the grid); default 8")
    p.add_argument("--space", help="YAML overriding the search space (key: {grid|choice|uniform|quniform|loguniform: [...]})")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial (default 1)")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, help="Ray CPUs per worker")
    p.add_argument("--memory-per-worker", dest="memory_per_worker", type=float, metavar="GIB",
                   help="GiB of Ray's memory resource each worker reserves, so trials at once fit the RAM (default 0: none)")
    p.add_argument("--epochs", type=int, help="maximum epochs per trial (train.epochs)")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int,
                   help="trials at once (default: as many as the cluster holds with all their workers)")
    p.add_argument("--grace-period", dest="grace_period", type=int, default=1,
                   help="evaluations before ASHA may stop a trial (default 1)")
    p.add_argument("--reduction-factor", dest="reduction_factor", type=float, default=2.0, help="ASHA reduction factor (default 2)")
    p.add_argument("--metric", help="metric to maximise (default valid_<train.valid_metric>)")
    p.add_argument("--worker-start-timeout", dest="worker_start_timeout", type=float, metavar="SECONDS",
                   help="how long a trial waits for its workers to be placed, e.g. while an autoscaler adds "
                        "GPU nodes or other trials finish (default $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, else 7 days)")
    p.add_argument("--name", help="experiment name (default tune-<model>-<dataset>)")
    p.add_argument("--storage", default="runs", help="experiment storage: a shared folder or an s3:// URI (default runs/)")
    p.add_argument("--local-dir", dest="local_dir",
                   help="with an s3:// --storage: where the trials' run directories, tables and best/ are written "
                        "(default runs/<name>); on a multi-node cluster a folder every node shares")
    p.add_argument("--seed", type=int, help="search seed (default train.seed)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to continue an existing experiment")
    p.add_argument("--no-retrain", dest="retrain", action="store_false", help="do not retrain the best config")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. train.epochs=30")


def config_from_args(args, model: str):
    """The base ExperimentConfig of every trial from parsed ``tune`` arguments."""
    from moedist.train.cli import load_experiment_config
    from moedist.tune.spaces import apply_overrides

    cfg = load_experiment_config(model, args.config, list(args.overrides) + [f"model={model}"])
    # flags are taken as given (argparse types the numeric ones), never parsed as YAML:
    # --data "exp #2" stays "exp #2", --data 0123 stays "0123"; they win over key=value
    flags = {key: value for key, value in (
        ("data", args.data), ("features", args.features), ("train.epochs", args.epochs),
        ("dist.workers", args.workers), ("dist.cpus_per_worker", args.cpus_per_worker),
        ("dist.memory_per_worker", args.memory_per_worker)) if value is not None}
    cfg = apply_overrides(cfg, flags)
    if args.workers is None and cfg.dist.workers < 1:
        cfg.dist.workers = 1
    return cfg


def tune_from_args(args, model: str, *, echo=print) -> dict:
    from moedist.tune.run import run_tune

    cfg = config_from_args(args, model)
    return run_tune(
        cfg, space=args.space, num_samples=8 if args.samples is None else args.samples, max_concurrent=args.max_concurrent, metric=args.metric,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor, experiment_name=args.name,
        storage_path=args.storage, local_dir=getattr(args, "local_dir", None), resume=args.resume, retrain_best=args.retrain, seed=args.seed, echo=echo,
        memory_per_worker=args.memory_per_worker, worker_start_timeout_s=args.worker_start_timeout,
    )


def exit_code(out: dict) -> int:
    """0 when every trial finished and the best was picked; 1 when a trial ended in an error
    (an orchestrator's retry, e.g. a RayJob's backoffLimit, then resumes it); 130 when the
    search was interrupted. A rerun resumes the search in both cases."""
    if out["complete"]:
        return 0
    return 1 if out.get("errored") else 130


def cmd_tune(args) -> int:
    from moedist.cli import console

    out = tune_from_args(args, args.model, echo=lambda s: console.print(s, highlight=False, soft_wrap=True, markup=False))
    console.print(f"results: {out['results_csv']}" + (f"\nbest config: {out['best_config']}" if out["best_config"] else ""))
    return exit_code(out)


def add_commands(sub) -> None:
    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune + ASHA (see --help)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)
