"""Configuration of a training run: which model, which data, how to train it.

``moedist/configs/<model>.yaml`` hold the per-model defaults (the papers' settings);
``moedist train --model hm4sr train.lr=5e-4 hm4sr.k1=8`` overrides any key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moedist.models.baselines import ContentMappingConfig, SASRecConfig
from moedist.models.hm4sr import HM4SRConfig
from moedist.models.mamex import MAMEXConfig

ModelName = Literal["hm4sr", "mamex", "sasrec", "popularity", "content"]


@dataclass
class TrainConfig:
    epochs: int = 100  # maximum epochs
    batch_size: int = 1024  # training batch (sequences for HM4SR/SASRec, triples for MAMEX)
    eval_batch_size: int = 2048  # users per evaluation batch
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0
    router_lr_scale: float = 1.0  # lr multiplier for MoE gate (router) parameters; 1 = the papers
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the authors clip nothing)
    # PyTorch's fused Adam kernel (CPU and CUDA): one pass over each parameter and its two
    # moments instead of about ten elementwise ops; the same update up to float rounding.
    # false = torch's default single-tensor Adam (the authors' optimizer, op for op).
    fused_adam: bool = True
    eval_every: int = 1  # evaluate on validation every N epochs (MAMEX: 10), epoch 0 included
    patience: int = 10  # stop after `patience + 1` consecutive evaluations without improvement
    valid_metric: str = "ndcg@20"  # model selection metric (HM4SR: ndcg@20, MAMEX: ndcg@10)
    ties_improve: bool = False  # equal (5-decimal rounded) validation value counts as improvement
    topk: tuple[int, ...] = (5, 10, 20, 50)  # K of the reported metrics
    rank_ties: Literal["pessimistic", "optimistic", "index"] = "pessimistic"  # equal scores vs target
    mask_history: bool = False  # remove history items from candidates (off, as in the authors' code)
    seed: int = 2025
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 truncates (smoke runs, benchmarks)
    resume: bool = True  # continue from run_dir/checkpoints/last when it exists
    progress: bool = True  # live progress bar on a terminal


@dataclass
class DistConfig:
    workers: int = 0  # Ray Train workers; 0 = local debugging mode (this process, no Ray)
    ep_size: int = 1  # expert-parallel group size (experts sharded over this many workers)
    zero_stage: Literal[0, 1, 2] = 0  # DeepSpeed ZeRO stage
    grad_accum: int = 1  # micro-steps per optimizer step (the global batch stays train.batch_size)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    deepspeed: bool = False  # local mode: also go through a (1-process) DeepSpeed engine
    deepspeed_config: str | None = None  # JSON whose keys override the generated DeepSpeed config
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # Ray CPUs per training worker
    # GiB of Ray's "memory" resource each training worker reserves (0 = none). Ray then places
    # workers, and Tune starts trials, only where the node's memory resource has room, instead
    # of oversubscribing RAM until its memory monitor kills workers. On CPU, an HM4SR worker at
    # the papers' batch of 1,024 peaks at about 3-5 GiB (README); on GPUs host memory is small.
    memory_per_worker: float = 0.0
    ray_address: str | None = None  # None = connect to RAY_ADDRESS / a running cluster, else start a local one
    max_failures: int = 2  # Ray Train restarts after a worker failure (resume from the last checkpoint)
    storage_path: str | None = None  # Ray run storage (shared path or s3:// URI); default: <run_dir>/ray


@dataclass
class ExperimentConfig:
    model: ModelName = "hm4sr"
    data: str = ""  # prepared dataset directory (`moedist data prepare`)
    features: str | None = None  # feature shards directory (`moedist extract`); default: the one under <data>/features
    run_dir: str | None = None  # output directory (default runs/<model>-<dataset>)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    hm4sr: HM4SRConfig = field(default_factory=HM4SRConfig)
    mamex: MAMEXConfig = field(default_factory=MAMEXConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    content: ContentMappingConfig = field(default_factory=ContentMappingConfig)


LOO_MODELS = ("hm4sr", "sasrec", "popularity")  # leave-one-out protocol; the others: cold start


def validate_experiment(cfg: ExperimentConfig) -> None:
    """ConfigError naming the key for a value the loop cannot run with, before any data is
    read or any epoch is trained (the YAML loader has checked the types already)."""
    import math

    from moedist.errors import ConfigError

    tc = cfg.train

    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r}: must be {what}")

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    need(tc.epochs >= 0, "train.epochs", tc.epochs, "an integer >= 0")
    need(tc.batch_size >= 1, "train.batch_size", tc.batch_size, "an integer >= 1")
    need(tc.eval_batch_size >= 1, "train.eval_batch_size", tc.eval_batch_size, "an integer >= 1")
    need(tc.eval_every >= 1, "train.eval_every", tc.eval_every, "an integer >= 1 (evaluate every N epochs)")
    need(tc.patience >= 0, "train.patience", tc.patience, "an integer >= 0")
    need(tc.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", tc.max_steps_per_epoch, "an integer >= 0 (0 = whole epochs)")
    for key in ("lr", "weight_decay", "router_lr_scale", "grad_clip"):
        v = getattr(tc, key)
        need(finite(v) and v >= 0, f"train.{key}", v, "a finite number >= 0")
    topk = list(tc.topk)
    need(len(topk) > 0 and all(k >= 1 for k in topk), "train.topk", topk, "a non-empty list of integers >= 1")
    need(cfg.dist.grad_accum >= 1, "dist.grad_accum", cfg.dist.grad_accum, "an integer >= 1")
    need(cfg.dist.ep_size >= 1, "dist.ep_size", cfg.dist.ep_size, "an integer >= 1")
    workers = cfg.dist.workers
    if workers > 1 and tc.batch_size < workers and cfg.model != "popularity":
        # each worker trains on its slice of every global batch: with fewer samples than
        # workers the last ones never get a sample, and the epoch's loss reduction fails
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is smaller than dist.workers={workers}: every worker needs at "
            f"least one sample of each global batch; use train.batch_size >= {workers} or fewer workers"
        )
    if workers <= 0 and not cfg.dist.deepspeed:
        # local mode trains with a plain torch optimizer: these settings would be ignored
        if cfg.dist.precision == "bf16":
            raise ConfigError(
                "dist.precision='bf16' needs a DeepSpeed engine, which local mode (no dist.workers) does not use: "
                "add dist.deepspeed=true, or train with --workers N"
            )
        if cfg.dist.deepspeed_config:
            raise ConfigError(
                f"dist.deepspeed_config={cfg.dist.deepspeed_config!r} needs a DeepSpeed engine, which local mode "
                "(no dist.workers) does not use: add dist.deepspeed=true, or train with --workers N"
            )
    section = getattr(cfg, cfg.model, None)
    model_ep = getattr(section, "ep_size", 1)
    if model_ep not in (1, cfg.dist.ep_size):
        # the loop copies dist.ep_size into the model's section; a value set there alone
        # would shard the experts behind the launcher's checks (or crash without workers)
        raise ConfigError(
            f"{cfg.model}.ep_size={model_ep} differs from dist.ep_size={cfg.dist.ep_size}: set the "
            f"expert-parallel size with --ep-size (dist.ep_size), not {cfg.model}.ep_size"
        )
    if cfg.model != "popularity":  # nothing is selected for a model without training
        from moedist.train.evaluate import metric_names

        protocol = "loo" if cfg.model in LOO_MODELS else "cold"
        names = metric_names(topk, protocol=protocol)
        if tc.valid_metric not in names:
            raise ConfigError(
                f"train.valid_metric={tc.valid_metric!r} is not a metric of the "
                f"{'leave-one-out' if protocol == 'loo' else 'cold-start'} protocol with train.topk={topk} "
                f"(choose one of: {', '.join(names)})"
            )
