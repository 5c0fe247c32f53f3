"""Where a training run executes: this process (local mode) or Ray Train workers.

``launch(cfg)`` is what ``moedist train`` calls:

* ``dist.workers == 0`` (default): local debugging mode. The training loop runs in this
  process with a plain torch optimizer, so breakpoints and ``pdb`` work.
* ``dist.workers >= 1``: a Ray Train ``TorchTrainer`` with that many workers, each running
  the same loop around a DeepSpeed engine (gloo on CPU, NCCL on GPU). Worker failures are
  retried ``dist.max_failures`` times; each retry resumes from the latest checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from moedist.config import to_dict
from moedist.train.config import ExperimentConfig
from moedist.train.loop import DistContext, default_run_dir, resolve_device, run_training


def launch(cfg: ExperimentConfig, *, echo: Callable[[str], None] | None = None) -> dict:
    if cfg.dist.workers <= 0:
        if cfg.dist.ep_size > 1:
            from moedist.errors import ConfigError

            raise ConfigError(f"dist.ep_size={cfg.dist.ep_size} needs dist.workers >= {cfg.dist.ep_size}")
        return run_training(cfg, echo=echo)
    return launch_ray(cfg, echo=echo)


def _worker_loop(config: dict) -> None:
    """Body of each Ray Train worker."""
    import ray.train
    import torch

    from moedist.config import _from_dict

    cfg = _from_dict(ExperimentConfig, config["cfg"])
    ctx_ray = ray.train.get_context()
    rank, world = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    local_rank = ctx_ray.get_local_rank()
    device = resolve_device(cfg.train.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config.get("threads", 1))))

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

    ctx = DistContext(rank=rank, world=world, local_rank=local_rank, device=device, report=report, resume_from=resume)
    run_training(cfg, ctx=ctx)


def launch_ray(cfg: ExperimentConfig, *, echo: Callable[[str], None] | None = None) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    echo = echo or (lambda s: print(s, flush=True))
    from moedist.data.dataset import PreparedDataset

    data_name = PreparedDataset(cfg.data).name if cfg.data else None
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, data_name)
    run_dir = run_dir.resolve()
    cfg.run_dir = str(run_dir)
    cfg.data = str(Path(cfg.data).resolve())
    if cfg.features:
        cfg.features = str(Path(cfg.features).resolve())

    started = False
    if not ray.is_initialized():
        address = cfg.dist.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # a local cluster: logical CPUs oversubscribe small machines so the train
            # controller and the workers never wait on each other
            ray.init(
                num_cpus=max(4, int(cfg.dist.workers * cfg.dist.cpus_per_worker) + 2),
                include_dashboard=True, dashboard_host="127.0.0.1",
                runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}},
                log_to_driver=True,
            )
        started = True
    try:
        use_gpu = cfg.dist.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"cfg": to_dict(cfg), "threads": max(1, int(cfg.dist.cpus_per_worker))},
            scaling_config=ScalingConfig(
                num_workers=cfg.dist.workers, use_gpu=bool(use_gpu),
                resources_per_worker={"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=cfg.dist.storage_path or str(run_dir.parent / "ray"),
                failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        echo(f"Ray Train: {cfg.dist.workers} worker(s), ep_size {cfg.dist.ep_size}, ZeRO {cfg.dist.zero_stage}, {'GPU' if use_gpu else 'CPU'}")
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    finally:
        if started:
            ray.shutdown()
    import json

    results = json.loads((run_dir / "results.json").read_text())
    from moedist.train.loop import format_results

    echo(format_results(results, cfg.train.topk))
    return results
