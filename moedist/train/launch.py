"""Where a training run executes: this process (local mode) or Ray Train workers.

``launch(cfg)`` is what ``moedist train`` calls:

* ``dist.workers == 0`` (default): local debugging mode. The training loop runs in this
  process with a plain torch optimizer, so breakpoints and ``pdb`` work.
* ``dist.workers >= 1``: a Ray Train ``TorchTrainer`` with that many workers, each running
  the same loop around a DeepSpeed engine (gloo on CPU, NCCL on GPU). Worker failures are
  retried ``dist.max_failures`` times; each retry resumes from the latest checkpoint.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable

from moedist.config import to_dict
from moedist.errors import ConfigError
from moedist.train.config import ExperimentConfig, validate_experiment
from moedist.train.loop import (
    DistContext,
    check_expert_parallel,
    check_resumable,
    default_run_dir,
    resolve_device,
    run_training,
)


def launch(cfg: ExperimentConfig, *, echo: Callable[[str], None] | None = None) -> dict:
    validate_experiment(cfg)  # before Ray starts: a clear error, not one after the first epoch
    if cfg.dist.workers <= 0:
        if cfg.dist.ep_size > 1:
            raise ConfigError(f"dist.ep_size={cfg.dist.ep_size} needs dist.workers >= {cfg.dist.ep_size}")
        return run_training(cfg, echo=echo)
    check_expert_parallel(cfg, cfg.dist.workers)  # before any worker starts: a clear error, not a worker traceback
    return launch_ray(cfg, echo=echo)


def _worker_loop(config: dict) -> None:
    """Body of each Ray Train worker."""
    import ray.train
    import torch

    from moedist.config import _from_dict

    cfg = _from_dict(ExperimentConfig, config["cfg"])
    _quiet_ray_train_reports()
    ctx_ray = ray.train.get_context()
    rank, world = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    local_rank = ctx_ray.get_local_rank()
    device = resolve_device(cfg.train.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    engine = False
    if world == 1 and not cfg.dist.deepspeed:
        from moedist.train.distributed import needs_deepspeed_engine

        # one worker would otherwise train with the plain torch optimizer, ignoring
        # dist.precision (bf16, or auto on a GPU) and dist.deepspeed_config, unlike N workers;
        # the config is left as given (config.yaml records what was asked, and a tuning
        # search compares it with best.yaml)
        engine = needs_deepspeed_engine(cfg, device)

    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        resume = Path(ckpt.to_directory())

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        from ray.train import Checkpoint

        if rank == 0 and checkpoint_dir is not None:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)))
        else:
            ray.train.report(metrics)

    ctx = DistContext(rank=rank, world=world, local_rank=local_rank, device=device, report=report, resume_from=resume,
                      engine=engine)
    run_training(cfg, ctx=ctx)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report's full metrics dict and checkpoint path at INFO from each
    worker; the epoch line the loop prints already says it all. Keep Ray's warnings."""
    import importlib
    import logging

    for name in ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # another Ray version: nothing to quieten
            continue
        for logger_name in (name, getattr(module, "__file__", None)):  # context.py logs under its file path
            if logger_name:
                logging.getLogger(logger_name).setLevel(logging.WARNING)


def resolve_run_paths(cfg: ExperimentConfig) -> Path:
    """Make ``run_dir``, ``data`` and ``features`` absolute (Ray workers and Tune trials run in
    other working directories); returns the run directory."""
    from moedist.data.dataset import PreparedDataset

    data_name = PreparedDataset(cfg.data).name if cfg.data else None
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, data_name)
    run_dir = run_dir.resolve()
    cfg.run_dir = str(run_dir)
    cfg.data = str(Path(cfg.data).resolve())
    if cfg.features:
        cfg.features = str(Path(cfg.features).resolve())
    return run_dir


def init_ray(cfg: ExperimentConfig, *, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Connect to ``dist.ray_address`` / ``RAY_ADDRESS``, or start a local Ray instance.

    Returns True when this call initialised Ray (the caller shuts it down); False when Ray
    was already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.dist.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # a local cluster: logical CPUs oversubscribe small machines so the train
        # controller and the workers never wait on each other; the dashboard stays on
        # (loopback): Train V2 releases a stopped run's placement group through it
        from moedist.ray_auth import private_auth_token

        private_auth_token()
        ray.init(
            num_cpus=num_cpus or max(4, int(cfg.dist.workers * cfg.dist.cpus_per_worker) + 2),
            include_dashboard=True, dashboard_host="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}},
            log_to_driver=log_to_driver,
        )
    return True


def resolve_use_gpu(cfg: ExperimentConfig) -> bool:
    """``dist.use_gpu``; else False for ``train.device=cpu`` (no GPU is reserved, and the
    workers talk over gloo, not NCCL, with the model on the CPU); else whether the connected
    cluster has GPUs."""
    import ray

    if cfg.dist.use_gpu is not None:
        return bool(cfg.dist.use_gpu)
    if str(cfg.train.device).split(":")[0] == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


def worker_resources(cfg: ExperimentConfig, use_gpu: bool) -> dict[str, float]:
    """The Ray resources one training worker reserves: ``dist.cpus_per_worker`` CPUs, a GPU
    when ``use_gpu``, and ``dist.memory_per_worker`` GiB of Ray's ``memory`` resource (bytes)."""
    mem = cfg.dist.memory_per_worker
    if not (isinstance(mem, (int, float)) and math.isfinite(mem) and mem >= 0):
        raise ConfigError(f"dist.memory_per_worker must be a number of GiB >= 0 (0 = no reservation), got {mem!r}")
    if not (isinstance(cfg.dist.cpus_per_worker, (int, float)) and cfg.dist.cpus_per_worker > 0):
        raise ConfigError(f"dist.cpus_per_worker must be > 0, got {cfg.dist.cpus_per_worker!r}")
    res = {"CPU": float(cfg.dist.cpus_per_worker)}
    if use_gpu:
        res["GPU"] = 1.0
    if mem > 0:
        res["memory"] = float(int(mem * 2**30))
    return res


def format_resources(res: dict[str, float]) -> str:
    """Ray resources for a message: ``{"CPU": 2.0, "memory": 2**32}`` -> ``"CPU 2, memory 4.0 GiB"``."""
    return ", ".join(f"memory {v / 2**30:.1f} GiB" if r == "memory" else f"{r} {v:g}" for r, v in res.items())


def check_cluster_fits(need: dict[str, float], workers: int) -> None:
    """Refuse a run whose ``workers`` (``need``: one worker's resources) can never be placed
    at once on the cluster this process started, where Ray Train would wait for them forever.
    (A cluster given by address may autoscale, so it is not checked.)"""
    import ray

    have = ray.cluster_resources()
    short = [r for r, n in need.items() if n * workers > have.get(r, 0.0) + 1e-9]
    if short:
        want = format_resources({r: need[r] * workers for r in short})
        got = format_resources({r: have.get(r, 0.0) for r in short})
        raise ConfigError(f"{workers} worker(s) need {want} but the local Ray cluster has {got}; lower "
                          "dist.workers, dist.cpus_per_worker or dist.memory_per_worker")


def ray_storage_of(cfg: ExperimentConfig) -> tuple[str, str]:
    """(storage path, run name) of Ray's snapshot of ``moedist train --workers N`` runs:
    ``dist.storage_path`` or ``<run_dir>/../ray``, and the run directory's name."""
    run_dir = Path(cfg.run_dir)
    return cfg.dist.storage_path or str(run_dir.parent / "ray"), run_dir.name


def _forget_earlier_run(cfg: ExperimentConfig, echo) -> None:
    """``train.resume=false``: before the workers start, remove the earlier run's checkpoints
    from the run directory and Ray's snapshot of it, so that every checkpoint the workers find
    is this run's own: a retry after a worker failure then resumes this run instead of
    training it again from the start."""
    ckpts = Path(cfg.run_dir) / "checkpoints"
    if ckpts.is_dir():
        shutil.rmtree(ckpts)
        echo(f"train.resume=false: removed the earlier run's checkpoints in {ckpts}")
    storage, name = ray_storage_of(cfg)
    if "://" in storage:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(storage)
        path = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
            echo(f"train.resume=false: removed Ray's snapshot of the earlier run at {storage}/{name}")
        return
    path = Path(storage) / name
    if path.is_dir():
        shutil.rmtree(path)
        echo(f"train.resume=false: removed Ray's snapshot of the earlier run at {path}")


def build_trainer(
    cfg: ExperimentConfig,
    *,
    use_gpu: bool,
    name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    failure_config=None,
):
    """The ``TorchTrainer`` that runs ``cfg`` on ``dist.workers`` workers (paths already absolute).

    ``name`` / ``storage_path`` place Ray's run snapshot and checkpoints (default: the run
    directory's name under ``dist.storage_path`` or ``<run_dir>/../ray``); a trainer with the
    same name and storage resumes from its latest checkpoint. ``callbacks`` are Ray Train
    ``UserCallback``s (Tune's ``TuneReportCallback`` for a trial).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(cfg.run_dir)
    default_storage, default_name = ray_storage_of(cfg)
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": to_dict(cfg), "threads": max(1, int(cfg.dist.cpus_per_worker))},
        scaling_config=ScalingConfig(
            num_workers=cfg.dist.workers, use_gpu=bool(use_gpu), resources_per_worker=worker_resources(cfg, use_gpu),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or default_name,
            storage_path=storage_path or default_storage,
            failure_config=failure_config or FailureConfig(max_failures=cfg.dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
        ),
    )


def launch_ray(cfg: ExperimentConfig, *, echo: Callable[[str], None] | None = None) -> dict:
    echo = echo or (lambda s: print(s, flush=True))
    run_dir = resolve_run_paths(cfg)
    check_resumable(cfg, run_dir)
    started = init_ray(cfg)
    try:
        use_gpu = resolve_use_gpu(cfg)
        if started:
            check_cluster_fits(worker_resources(cfg, use_gpu), cfg.dist.workers)
        if not cfg.train.resume:
            _forget_earlier_run(cfg, echo)
        trainer = build_trainer(cfg, use_gpu=use_gpu)
        echo(f"Ray Train: {cfg.dist.workers} worker(s), ep_size {cfg.dist.ep_size}, ZeRO {cfg.dist.zero_stage}, {'GPU' if use_gpu else 'CPU'}")
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    finally:
        if started:
            import ray

            ray.shutdown()
    import json

    path = run_dir / "results.json"
    if not path.is_file():
        from moedist.errors import ConfigError

        # rank 0 wrote it on its own node: a node-local run directory on a multi-node cluster
        raise ConfigError(f"training finished, but its results are not at {path} on this node: the run directory "
                          "must be on storage that every node and the driver share (docs/deploy.md); the results "
                          "are in that folder on the node where the first worker ran")
    results = json.loads(path.read_text())
    from moedist.train.loop import format_results

    echo(format_results(results, cfg.train.topk))
    return results
