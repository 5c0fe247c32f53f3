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
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the authors clip nothing)
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
class ExperimentConfig:
    model: ModelName = "hm4sr"
    data: str = ""  # prepared dataset directory (`moedist data prepare`)
    features: str | None = None  # feature shards directory (`moedist extract`); default: the one under <data>/features
    run_dir: str | None = None  # output directory (default runs/<model>-<dataset>)
    train: TrainConfig = field(default_factory=TrainConfig)
    hm4sr: HM4SRConfig = field(default_factory=HM4SRConfig)
    mamex: MAMEXConfig = field(default_factory=MAMEXConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    content: ContentMappingConfig = field(default_factory=ContentMappingConfig)
