"""The training loop, the same code in every mode.

    moedist train --model hm4sr --data data/prepared/synthetic-small-2025               # local, this process
    moedist train --model hm4sr --data ... --workers 2 --ep-size 2 --zero-stage 1       # Ray Train + DeepSpeed

One process (local debugging mode: plain torch optimizer, ``pdb`` works) or one Ray Train
worker of N (a DeepSpeed engine per worker) runs :func:`run_training`. Every worker walks
the same epoch-seeded permutation of the training samples in global batches of
``train.batch_size`` and takes its own slice of each, so all workers run the same number of
steps (uneven slices never hang a collective) and the update equals the single-process
update on the same global batch: each worker's loss is weighted by its share of the batch.

Every run writes one run directory::

    run_dir/config.yaml          the resolved ExperimentConfig
    run_dir/metrics.jsonl        one line per epoch: loss parts, throughput, validation metrics, MoE load
    run_dir/tb/                  the same as TensorBoard scalars
    run_dir/checkpoints/best/    weights of the best validation epoch (topology-independent)
    run_dir/checkpoints/last/    weights + Adam moments + RNG + loop position, for resume
    run_dir/results.json         validation and test metrics of the best model
    run_dir/eval_ranks.npz       its rank of every held-out item per split and user (moedist compare)

The loop knows nothing model-specific beyond ``calculate_loss`` / ``full_sort_predict``
(docs/contracts.md); the two protocols differ only in the ``*Task`` classes below.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from moedist.config import save_config
from moedist.data.dataset import ColdStartData, PreparedDataset, SequentialSamples
from moedist.errors import CheckpointError, ConfigError, DataError, MoedistError
from moedist.io import atomic_write_bytes, atomic_write_text
from moedist.moe.dispatch import shard_bounds
from moedist.train.checkpoint import (
    CheckpointMismatch,
    latest_complete,
    load_checkpoint,
    previous_of,
    read_state,
    save_checkpoint,
)
from moedist.train.config import ExperimentConfig, validate_experiment
from moedist.train.evaluate import (
    EVAL_RANKS,
    cold_start_metric_sums,
    cold_start_ranks,
    full_sort_ranks,
    loo_metric_sums,
    pad_item_lists,
)
from moedist.train.identity import check_resume, noted_changes, run_identity

SEQUENTIAL_MODELS = {"hm4sr", "sasrec", "popularity"}
COLD_START_MODELS = {"mamex", "content"}


class TrainingDiverged(MoedistError):
    """The loss became NaN/inf. The last good checkpoint is kept."""


# ----------------------------------------------------------------------------- runtime


@dataclass
class DistContext:
    """Where this process sits: rank and world size, device, and how it reports."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # called after each epoch with (metrics, checkpoint_dir or None); Ray Train's report
    report: Callable[[dict, Path | None], None] | None = None
    # directory of a checkpoint to resume from that the launcher found (Ray's latest)
    resume_from: Path | None = None
    # train with a DeepSpeed engine even as the only process (a single Ray Train worker whose
    # config asks for bf16 or a dist.deepspeed_config); the recorded config stays as given
    engine: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this worker's GPU (``cuda:<local rank>``) where there are GPUs, else the CPU.
    ``cuda`` without an index is this worker's GPU too, so that workers on one node do not all
    land on GPU 0 (NCCL refuses two ranks on one device); ``cuda:N`` is taken as given."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available")
    return dev


def protocol_of(model: str) -> str:
    return "loo" if model in SEQUENTIAL_MODELS else "cold"


def default_run_dir(cfg: ExperimentConfig, data_name: str | None = None) -> Path:
    return Path("runs") / f"{cfg.model}-{data_name or Path(cfg.data).name}"


def find_features(cfg: ExperimentConfig) -> Path | None:
    """``cfg.features``, or the single feature set under ``<data>/features`` when there is one."""
    if cfg.features:
        return Path(cfg.features)
    root = Path(cfg.data) / "features"
    found = sorted(p for p in root.glob("*") if (p / "manifest.json").is_file()) if root.is_dir() else []
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConfigError(f"several feature sets under {root} ({names}); choose one with features=<dir>")
    return found[0] if found else None


def model_needs_features(cfg: ExperimentConfig) -> bool:
    if cfg.model == "hm4sr":
        return any(m != "id" for m in cfg.hm4sr.modalities)
    return cfg.model in COLD_START_MODELS


def load_features_for(cfg: ExperimentConfig, data: PreparedDataset, echo=None):
    if not model_needs_features(cfg):
        return None
    fdir = find_features(cfg)
    if fdir is None:
        raise ConfigError(
            f"model {cfg.model} needs item features but none were found under {Path(cfg.data) / 'features'}; "
            f"run `moedist extract {cfg.data}` or pass features=<dir>"
            + (" (or hm4sr.modalities=[id])" if cfg.model == "hm4sr" else "")
        )
    from moedist.features.store import load_item_features

    features = load_item_features(fdir, n_items=data.n_items, items=data.items, data_dir=data.path)
    if echo:
        echo(f"item features from {fdir}: " + ", ".join(f"{m} {tuple(t.shape)}" for m, t in features.features.items()))
    return features


def build_model(cfg: ExperimentConfig, data: PreparedDataset, features) -> torch.nn.Module:
    n_rows = data.n_item_rows
    n_users = data.n_users + 1
    if cfg.model == "hm4sr":
        from moedist.models.hm4sr import HM4SR

        cats = data.category_multihot() if cfg.hm4sr.use_cp else None
        return HM4SR(
            cfg.hm4sr, n_items=n_rows, n_users=n_users, item_features=features,
            item_categories=cats, max_interval_seconds=data.max_interval_seconds,
        )
    if cfg.model == "sasrec":
        from moedist.models.baselines import SASRec

        return SASRec(cfg.sasrec, n_items=n_rows, n_users=n_users)
    if cfg.model == "mamex":
        from moedist.models.mamex import MAMEX

        return MAMEX(cfg.mamex, n_items=n_rows, n_users=n_users, item_features=features)
    if cfg.model == "content":
        from moedist.models.baselines import ContentMapping

        return ContentMapping(cfg.content, n_items=n_rows, n_users=n_users, item_features=features)
    if cfg.model == "popularity":
        from moedist.models.baselines import Popularity

        return Popularity(counts=data.train_item_counts("loo"))
    raise ConfigError(f"unknown model {cfg.model!r}")


def check_expert_parallel(cfg: ExperimentConfig, world: int) -> None:
    """ConfigError unless ``dist.ep_size`` can run on ``world`` workers with this model and
    ZeRO stage (the launcher checks before starting any worker)."""
    ep = cfg.dist.ep_size
    if ep == 1:
        return
    if cfg.model not in ("hm4sr", "mamex"):
        raise ConfigError(f"dist.ep_size={ep}: model {cfg.model} has no MoE layers to shard")
    ablated = {"hm4sr": ("use_imoe", "its Interactive MoE"), "mamex": ("use_moe", "its adapter MoE")}[cfg.model]
    if not getattr(getattr(cfg, cfg.model), ablated[0]):
        # the Temporal MoE and the plain adapters are never sharded: nothing would be
        raise ConfigError(f"dist.ep_size={ep}: {cfg.model}.{ablated[0]}=false leaves {ablated[1]} out, "
                          "so there are no experts to shard; use dist.ep_size=1")
    if ep < 1 or world % ep:
        raise ConfigError(f"dist.ep_size={ep} must divide the number of workers ({world})")
    if cfg.dist.zero_stage > 0:
        # DeepSpeed 0.19 maps ZeRO's flat optimizer partitions back to parameters only for the
        # dense groups (its fragment links of expert groups are empty on all but one rank), so
        # expert Adam moments could not be saved by global expert index.
        raise ConfigError(
            f"dist.ep_size={ep} needs dist.zero_stage=0 (got {cfg.dist.zero_stage}): expert-parallel "
            "checkpoints must store the experts' optimizer state by global index"
        )


def apply_expert_parallel(cfg: ExperimentConfig, ctx: DistContext) -> None:
    """Carry ``dist.ep_size`` into the model's MoE layers (they shard their experts)."""
    check_expert_parallel(cfg, ctx.world)
    if cfg.dist.ep_size > 1:
        getattr(cfg, cfg.model).ep_size = cfg.dist.ep_size


def apply_catalogue_sharding(model: torch.nn.Module, cfg: ExperimentConfig, ctx: DistContext) -> int:
    """MAMEX on several workers: each encodes only its share of the item catalogue in a
    training step, and the item table is all-gathered (``mamex.shard_catalogue``, on by
    default; ``MAMEX.shard_catalogue``). Returns the number of shards (1: not sharded)."""
    if cfg.model == "mamex" and ctx.distributed and cfg.mamex.shard_catalogue:
        model.shard_catalogue(dist.group.WORLD)
        return ctx.world
    return 1


def model_ep_size(cfg: ExperimentConfig) -> int:
    sub = getattr(cfg, cfg.model, None)
    return int(getattr(sub, "ep_size", 1) or 1)


# ----------------------------------------------------------------------------- tasks


def _shard(n: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of ``range(n)`` (sizes differ by at most one)."""
    return np.arange(*shard_bounds(n, rank, world))


class SequentialTask:
    """Leave-one-out next-item prediction (HM4SR, SASRec, popularity)."""

    protocol = "loo"

    def __init__(self, data: PreparedDataset, cfg: ExperimentConfig, max_len: int):
        self.cfg = cfg
        self.n_item_rows, self.n_user_rows = data.n_item_rows, data.n_users + 1
        self.splits = {s: SequentialSamples.build(data, s, max_len) for s in ("train", "valid", "test")}

    def n_train(self) -> int:
        return len(self.splits["train"])

    def global_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[np.ndarray]:
        perm = rng.permutation(len(self.splits["train"]))
        for i in range(0, len(perm), batch_size):
            yield perm[i : i + batch_size]

    def make_batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return self.splits["train"].batch(idx)

    def eval_units(self, split: str) -> int:
        return len(self.splits[split])

    def eval_users(self, split: str) -> np.ndarray:
        """The user of each evaluation unit, in unit order."""
        return self.splits[split].users

    def eval_ranks(self, model, split: str, idx: np.ndarray, device) -> torch.Tensor:
        """Rank of each sample's target, ``[B]`` (exact, see evaluate.py)."""
        batch = {k: v.to(device) for k, v in self.splits[split].batch(idx).items()}
        scores = model.full_sort_predict(batch)  # [B, N]
        history = self.history(split, idx).to(device) if self.cfg.train.mask_history else None
        return full_sort_ranks(scores, batch["target"], ties=self.cfg.train.rank_ties, history=history)

    def history(self, split: str, idx: np.ndarray) -> torch.Tensor:
        """``[B, H]`` every item of each sample's user before its target, 0-padded (H = the
        longest such history in this batch): what ``train.mask_history`` removes from the
        candidates. Not ``item_seq``, which keeps only the last ``max_seq_len`` of them."""
        samples = self.splits[split]
        tgt = samples.target_pos[idx]
        start = samples.data.offsets[samples.users[idx]]
        length = tgt - start
        cols = np.arange(max(int(length.max()) if len(length) else 0, 1))
        valid = cols[None, :] < length[:, None]
        pos = np.where(valid, start[:, None] + cols[None, :], 0)
        return torch.from_numpy(np.where(valid, samples.data.seq_items[pos], 0).astype(np.int64))

    def metric_sums(self, ranks: torch.Tensor) -> dict:
        return loo_metric_sums(ranks, ks=self.cfg.train.topk)


class ColdStartTask:
    """Cold-start items (MAMEX, content mapping): BPR on warm items, rank the cold items."""

    protocol = "cold"

    def __init__(self, data: PreparedDataset, cfg: ExperimentConfig):
        self.cfg = cfg
        self.n_item_rows, self.n_user_rows = data.n_item_rows, data.n_users + 1
        self.cold = ColdStartData(data)
        self.candidates = torch.from_numpy(self.cold.candidates)
        self.heldout = {s: self.cold.heldout(s) for s in ("valid", "test")}
        self._triples = None

    def n_train(self) -> int:
        return len(self.cold)

    def global_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[np.ndarray]:
        self._triples = self.cold.epoch_triples(rng)
        n = len(self._triples[0])
        for i in range(0, n, batch_size):
            yield np.arange(i, min(i + batch_size, n))

    def make_batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        users, pos, neg = self._triples
        return {"user": torch.from_numpy(users[idx]), "pos_item": torch.from_numpy(pos[idx]), "neg_item": torch.from_numpy(neg[idx])}

    def eval_units(self, split: str) -> int:
        return len(self.heldout[split][0])

    def eval_users(self, split: str) -> np.ndarray:
        """The user of each evaluation unit, in unit order."""
        return self.heldout[split][0]

    def eval_ranks(self, model, split: str, idx: np.ndarray, device) -> torch.Tensor:
        """Ranks of each user's held-out items among the cold candidates, ``[B, P]`` (0 = pad)."""
        users, items = self.heldout[split]
        user = torch.from_numpy(users[idx]).to(device)
        positives = pad_item_lists([items[i] for i in idx], device=device)
        scores = model.full_sort_predict({"user": user})  # [B, N]
        return cold_start_ranks(scores, positives, candidates=self.candidates.to(device), ties=self.cfg.train.rank_ties)

    def metric_sums(self, ranks: torch.Tensor) -> dict:
        return cold_start_metric_sums(ranks, ks=self.cfg.train.topk)


def check_task_splits(task, data: PreparedDataset, trainable: bool) -> None:
    """A DataError naming the dataset and split when there is nothing to train on (a model
    with parameters) or nothing to validate or test on, before any epoch runs or anything in
    the run directory changes (else: a KeyError after the first epoch, an IndexError deep in
    the metrics, or metrics of 0 averaged over no user)."""
    if task.protocol == "loo":
        why = {"train": "users with >= 4 interactions", "valid": "users with >= 3 interactions",
               "test": "users with >= 2 interactions"}
        fix = "each user's last interaction is the test target, the one before the validation target"
    else:
        why = {"train": "interactions with warm (training) items", "valid": "interactions with validation cold items",
               "test": "interactions with test cold items"}
        fix = "prepare it again with larger cold_valid_frac / cold_test_frac"
    counts = {"valid": task.eval_units("valid"), "test": task.eval_units("test")}
    if trainable:
        counts = {"train": task.n_train(), **counts}
    for split, n in counts.items():
        if n == 0:
            protocol = "leave-one-out" if task.protocol == "loo" else "cold-start"
            raise DataError(f"the {protocol} {split} split is empty: it needs {why[split]} ({fix})", path=data.path)


def build_task(cfg: ExperimentConfig, data: PreparedDataset):
    if protocol_of(cfg.model) == "loo":
        max_len = cfg.sasrec.max_seq_len if cfg.model == "sasrec" else cfg.hm4sr.max_seq_len
        return SequentialTask(data, cfg, max_len)
    return ColdStartTask(data, cfg)


@torch.no_grad()
def evaluate_split(model, task, split: str, ctx: DistContext, batch_size: int, *, ranks_out: dict | None = None) -> dict[str, float]:
    """Exact metrics over all users of ``split``; each rank ranks its share of them.

    ``ranks_out``, when given, receives ``ranks_out[split]`` = the gathered ranks (one row per
    evaluation unit, in :meth:`eval_users` order), from which per-user metrics follow.

    Ranks are integers, so gathering them and computing the metrics once over the whole
    split gives the single-process numbers exactly, whatever the number of workers. Every
    rank runs the same number of forward passes (a rank with no users left runs one dummy
    sample), because expert-parallel layers need every rank in each forward.
    """
    n = task.eval_units(split)
    mine = _shard(n, ctx.rank, ctx.world)
    n_batches = math.ceil(max(len(_shard(n, r, ctx.world)) for r in range(ctx.world)) / batch_size) if n else 0
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    try:
        for b in range(n_batches):
            idx = mine[b * batch_size : (b + 1) * batch_size]
            if len(idx) == 0:
                task.eval_ranks(model, split, np.array([0]), ctx.device)  # keep collectives in step
                continue
            parts.append(task.eval_ranks(model, split, idx, ctx.device).cpu())
    finally:
        model.train(was_training)
    ranks = _cat_ranks(parts)
    if ctx.distributed:
        gathered: list = [None] * ctx.world
        dist.all_gather_object(gathered, ranks)
        ranks = _cat_ranks([g for g in gathered if g is not None and g.shape[0] > 0])
    if ranks_out is not None:
        ranks_out[split] = ranks
    sums = task.metric_sums(ranks)
    count = float(sums.pop("count"))
    return {k: float(v) / max(count, 1.0) for k, v in sums.items()}


_ITEM_FIELDS = ("item_seq", "target", "pos_item", "neg_item")


def check_batch_ids(batch: dict[str, torch.Tensor], n_item_rows: int, n_user_rows: int, where: str) -> None:
    """A clear error for ids outside the embedding tables, instead of an IndexError deep in
    torch (or, on GPU, a device-side assert that kills the process)."""
    for name, limit in [(f, n_item_rows) for f in _ITEM_FIELDS] + [("user", n_user_rows)]:
        t = batch.get(name)
        if t is None or t.numel() == 0:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= limit:
            bad = hi if hi >= limit else lo
            raise DataError(f"{where}: batch field {name!r} holds id {bad}, outside 0..{limit - 1}")


def _cat_ranks(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


# ----------------------------------------------------------------------------- steppers


class TorchStepper:
    """Local mode: a plain torch optimizer in this process."""

    kind = "torch"

    def __init__(self, model, cfg: ExperimentConfig):
        self.model = model
        from moedist.train.distributed import make_adam, split_router_groups

        params = [p for p in model.parameters() if p.requires_grad]
        groups = split_router_groups([{"params": params}], model, lr=cfg.train.lr, scale=cfg.train.router_lr_scale)
        self.optimizer = make_adam(groups, cfg) if params else None
        self.grad_clip = cfg.train.grad_clip
        self.micro_steps = max(1, cfg.dist.grad_accum)
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.micro_steps).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.micro_steps:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedStepper:
    """One DeepSpeed engine per worker (ZeRO 0/1/2; bf16 on GPU, fp32 on CPU)."""

    kind = "deepspeed"

    def __init__(self, model, cfg: ExperimentConfig, ctx: DistContext):
        import deepspeed

        from moedist.train.distributed import (
            deepspeed_config,
            ensure_single_process_group,
            make_adam,
            optimizer_param_groups,
        )

        ensure_single_process_group(ctx.device)
        ds_cfg = deepspeed_config(cfg, ctx.world, ctx.device)
        groups = optimizer_param_groups(model, cfg)
        optimizer = make_adam(groups, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        self.model = self.engine.module
        self.micro_steps = int(ds_cfg["gradient_accumulation_steps"])

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self) -> None:
        self.engine.step()


# ----------------------------------------------------------------------------- logging


class RunLogger:
    """metrics.jsonl + TensorBoard (rank 0 only).

    ``resumed_epoch`` is the last epoch the resumed checkpoint includes (None for a fresh
    start). A resumed run keeps both logs up to that epoch: the JSONL is cut back
    (:meth:`keep_epochs_upto`), and TensorBoard is told to hide the earlier events of later
    epochs (``purge_step``), so the re-trained epochs show once, with their new values. A
    fresh start removes an earlier run's events from ``tb/``.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_epoch: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            tb_dir = run_dir / "tb"
            if resumed_epoch is None and tb_dir.is_dir():
                shutil.rmtree(tb_dir)
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resumed_epoch is None else int(resumed_epoch) + 1
                self.tb = SummaryWriter(str(tb_dir), purge_step=purge)
            except Exception:  # tensorboard missing or broken: the JSONL has everything
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k.replace("@", "_at_"), v, record["epoch"])
            self.tb.flush()

    def keep_epochs_upto(self, epoch: int) -> None:
        """On resume: drop lines of epochs the checkpoint does not include (no duplicates)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                if ln.strip() and json.loads(ln).get("epoch", -1) <= epoch:
                    keep.append(ln)
            except json.JSONDecodeError:  # a line torn by a crash
                continue
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _improved(value: float, best: float | None, ties: bool) -> bool:
    if best is None:
        return True
    v, b = round(value, 5), round(best, 5)  # RecBole compares 5-decimal rounded values
    return v >= b if ties else v > b


def _moe_record(model) -> dict:
    stats = getattr(model, "moe_stats", None)
    if stats is None:
        return {}
    out = {}
    try:
        raw = stats()
    except Exception:  # before any forward some models have no statistics yet
        return {}
    for k, v in raw.items():
        t = torch.as_tensor(v).detach().float().cpu().flatten()
        if t.numel() == 1:
            out[f"moe/{k}"] = float(t)
        else:
            out[f"moe/{k}"] = [round(float(x), 6) for x in t]
    return out


# ----------------------------------------------------------------------------- training


def train_one_epoch(stepper, task, cfg: ExperimentConfig, ctx: DistContext, epoch: int, state: dict, *, progress=None) -> dict:
    """One pass over the epoch's global batches; this rank trains on its slice of each."""
    tc = cfg.train
    model = stepper.model
    rng = np.random.default_rng([tc.seed, epoch])
    model.train()
    totals: dict[str, float] = {}
    seen, steps, t0 = 0, 0, time.perf_counter()
    micro = stepper.micro_steps
    for gidx in task.global_batches(rng, tc.batch_size):
        if steps < state.get("step_in_epoch", 0):  # resume inside an epoch: skip done steps
            steps += 1
            continue
        n_global = len(gidx)
        mine = gidx[_shard(n_global, ctx.rank, ctx.world)]
        for m in range(micro):
            sub = mine[_shard(len(mine), m, micro)]
            weight = len(sub) * ctx.world * micro / n_global  # share of the global batch
            if len(sub) == 0:  # more ranks than samples: a zero-weight dummy keeps collectives in step
                sub, weight = gidx[:1], 0.0
            batch = task.make_batch(sub)
            check_batch_ids(batch, task.n_item_rows, task.n_user_rows, f"epoch {epoch}, step {steps}")
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            loss, parts = model.calculate_loss(batch)
            if not torch.isfinite(loss):
                detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
                raise TrainingDiverged(
                    f"non-finite loss {float(loss.detach())} at epoch {epoch}, step {steps} (global step {state['global_step']}); "
                    f"loss parts: {detail}. The last checkpoint is kept in checkpoints/last."
                )
            stepper.backward(loss * weight)
            stepper.step()
            # every rank keeps the same keys, also one that only ran dummy batches, so the
            # epoch's all-reduce of the totals below sends the same numbers from every rank
            w = len(sub) if weight > 0 else 0
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * w
            for k, v in parts.items():
                totals[f"loss_{k}"] = totals.get(f"loss_{k}", 0.0) + float(v) * w
            seen += w
        steps += 1
        state["global_step"] += 1
        if progress is not None and ctx.is_main:
            progress(min(steps * tc.batch_size, task.n_train()), float(loss.detach()), {k: float(v) for k, v in parts.items()})
        if tc.max_steps_per_epoch and steps >= tc.max_steps_per_epoch:
            break
    state["step_in_epoch"] = 0
    secs = time.perf_counter() - t0
    if ctx.distributed:  # averages over the whole global batch, not just this rank's slice
        keys = sorted(totals)
        # on the workers' device: NCCL reduces CUDA tensors only
        vec = torch.tensor([totals[k] for k in keys] + [float(seen)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(vec)
        totals = dict(zip(keys, vec[:-1].tolist()))
        seen = int(vec[-1])
    out = {k: v / max(seen, 1) for k, v in totals.items()}
    out["train_seconds"] = secs
    out["samples_per_second"] = seen / max(secs, 1e-9)
    return out


def _write_line(s: str) -> None:
    """Default progress output: straight to stdout. Not ``print``: Ray Train workers patch
    ``print`` to log *and* tee to stdout, so every line would reach the driver twice."""
    sys.stdout.write(s + "\n")
    sys.stdout.flush()


def run_training(cfg: ExperimentConfig, *, echo: Callable[[str], None] | None = None, ctx: DistContext | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns the results dict (on every rank)."""
    ctx = ctx or DistContext(device=resolve_device(cfg.train.device))
    say = echo or _write_line
    echo = say if ctx.is_main else (lambda s: None)
    tc = cfg.train
    if not cfg.data:
        raise ConfigError("data= is required (a directory written by `moedist data prepare`)")
    validate_experiment(cfg)
    data = PreparedDataset(cfg.data)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, data.name)
    # what config.yaml and every checkpoint record: the config as given, before the loop
    # carries dist.ep_size into the model's section
    as_given = copy.deepcopy(cfg)
    seed_everything(tc.seed)  # the same initial weights on every rank, expert shards included
    apply_expert_parallel(cfg, ctx)
    features = load_features_for(cfg, data, echo)
    task = build_task(cfg, data)
    model = build_model(cfg, data, features).to(ctx.device)
    catalogue_shards = apply_catalogue_sharding(model, cfg, ctx)
    # per-rank seeds from here on: dropout masks differ across workers, as across a larger batch
    seed_everything(tc.seed + 1000003 * ctx.rank)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = n_params > 0
    check_task_splits(task, data, trainable)
    stepper = None
    if trainable:
        use_ds = ctx.distributed or ctx.engine or cfg.dist.deepspeed
        stepper = DeepSpeedStepper(model, cfg, ctx) if use_ds else TorchStepper(model, cfg)
        model = stepper.model
    dtype = str(next(model.parameters()).dtype).replace("torch.", "") if trainable else None
    echo(f"{cfg.model}: {n_params:,} trainable parameters on {ctx.device} x{ctx.world}"
         f"{' (' + stepper.kind + ', ' + dtype + ')' if stepper else ''}; {task.n_train():,} training samples"
         f"{f'; item catalogue in {catalogue_shards} shards' if catalogue_shards > 1 else ''}; run dir {run_dir}")

    ckpt = run_dir / "checkpoints"
    identity = run_identity(as_given, data.manifest, find_features(cfg) if model_needs_features(cfg) else None,
                            items=data.items)
    state = {"epoch": -1, "step_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": None, "bad_evals": 0, "stopped": False}
    if trainable:
        # train.resume=false under the Ray launcher, which removed the earlier run's checkpoints
        # before the workers started: what is there now is this run's own (a retry after a
        # worker failure resumes it); run here directly, nothing is resumed
        launched = ctx.report is not None
        candidates = [ctx.resume_from, ckpt / "last", previous_of(ckpt / "last")] if tc.resume or launched else []
    else:  # nothing to train: the best checkpoint is the whole run, reused only for the same data and settings
        candidates = [ckpt / "best"] if tc.resume else []
    # before anything in the run directory changes: a checkpoint of another configuration or
    # dataset is refused here, and the old run stays as it was
    source, loaded = _resume(candidates, model, stepper, say if ctx.is_main else None, identity, trust_unverified=trainable)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(as_given, run_dir / "config.yaml")
    if source is not None:
        state.update({k: loaded[k] for k in state if k in loaded})
        echo(f"resumed from {source} (epoch {state['epoch']}, written by {loaded.get('world_size')} worker(s), ep_size {loaded.get('ep_size')})")
    elif ctx.is_main:  # a fresh start: nothing of an earlier run in this folder may pass for this one's
        for name in ("metrics.jsonl", "results.json", EVAL_RANKS):
            (run_dir / name).unlink(missing_ok=True)
        if trainable:
            # nor its best weights: until this run's first evaluation saves 'best', a crash and
            # a resume would take the earlier run's 'best' of the same epoch number for this one's
            shutil.rmtree(ckpt / "best", ignore_errors=True)
    logger = RunLogger(run_dir, enabled=ctx.is_main, resumed_epoch=state["epoch"] if source is not None else None)
    if source is not None:
        logger.keep_epochs_upto(state["epoch"])
    state.update(identity)  # every checkpoint of this run records what it was trained with
    if trainable and source is not None:
        _reconcile_best(ckpt, model, state, model_ep_size(cfg), echo)

    if trainable and not state["stopped"]:
        _fit(stepper, task, cfg, ctx, state, ckpt, logger, echo)
    elif trainable and state["epoch"] + 1 < tc.epochs:
        echo(f"note: this run stopped early at epoch {state['epoch']} ({state['bad_evals']} evaluations without "
             f"improvement), which is final: train.epochs={tc.epochs} trains nothing more. To train again, start "
             "fresh with train.resume=false (overwrites this run directory) or another --run-dir")
    elif not trainable and source is None:
        save_checkpoint(ckpt / "best", model, None, state)
    logger.close()

    best = _best_checkpoint(ckpt, state, trainable)
    if best is not None:
        try:
            load_checkpoint(best, model, None)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; the best model (epoch {state.get('best_epoch')}) cannot be tested. "
                                  "Start the run again with train.resume=false (or another --run-dir)") from None
    elif trainable:
        echo("note: no validation has run (no epoch trained), so the current weights are tested (best epoch: none)")
    bs = tc.eval_batch_size
    results = {
        "model": cfg.model,
        "dataset": data.name,
        "protocol": task.protocol,
        "best_epoch": state.get("best_epoch"),
        "epochs_run": state["epoch"] + 1,
        "trainable_parameters": n_params,
        "workers": ctx.world,
    }
    if cfg.model == "mamex":
        results["catalogue_shards"] = catalogue_shards
    ranks: dict = {}
    results["valid"] = evaluate_split(model, task, "valid", ctx, bs, ranks_out=ranks)
    results["test"] = evaluate_split(model, task, "test", ctx, bs, ranks_out=ranks)
    if ctx.is_main:
        # the ranks and results.json describe one model: an earlier results.json goes first, so
        # a crash between the two writes leaves new ranks without results, never beside old ones
        (run_dir / "results.json").unlink(missing_ok=True)
        write_eval_ranks(run_dir / EVAL_RANKS, task, ranks)
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
        if ctx.report is None:  # under Ray the driver prints the table
            echo(format_results(results, tc.topk))
    return results


def check_resumable(cfg: ExperimentConfig, run_dir: Path) -> None:
    """The launcher's check, before Ray or any worker starts: a ConfigError when the run
    directory's latest checkpoint was written with another dataset or settings (the workers
    check again, and also that the tensors fit the model)."""
    if not cfg.train.resume:
        return
    ckpt = Path(run_dir) / "checkpoints"
    for c in (ckpt / "last", previous_of(ckpt / "last")):
        source = latest_complete(c)
        if source is None:
            continue
        try:
            stored = read_state(source)
        except CheckpointError:
            continue
        import pandas as pd

        from moedist.data.prepare import load_manifest

        try:
            items = pd.read_parquet(Path(cfg.data) / "items.parquet")
        except Exception:  # the workers' PreparedDataset names the problem
            return
        identity = run_identity(cfg, load_manifest(cfg.data), find_features(cfg) if model_needs_features(cfg) else None,
                                items=items)
        check_resume(stored, identity, source)
        return


def write_eval_ranks(path: Path, task, ranks: dict) -> None:
    """The final model's rank of every held-out item, per split: ``<split>_users [U]`` and
    ``<split>_ranks`` (``[U]`` one-positive, or ``[U, P]`` with 0 = padding for cold start).
    ``moedist compare`` turns them into per-user metrics for paired significance tests."""
    import io

    arrays = {"protocol": np.array(task.protocol)}
    for split, r in ranks.items():
        arrays[f"{split}_users"] = np.asarray(task.eval_users(split), dtype=np.int64)
        arrays[f"{split}_ranks"] = r.cpu().numpy().astype(np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _resume(candidates, model, stepper, warn, identity: dict, *, trust_unverified: bool = True) -> tuple[Path | None, dict]:
    """Load the newest readable checkpoint among ``candidates``; an unreadable or truncated
    one is reported (naming the file) and the next older one is used instead.

    A readable checkpoint of another run is never skipped: one written with another dataset
    or with settings that change the model, objective or model selection
    (:func:`moedist.train.identity.check_resume`), or whose tensors do not fit the model, is
    a ConfigError naming the differences, raised before anything is loaded or written.
    A checkpoint of an older moedist records no identity; it is resumed with a warning when
    ``trust_unverified``, else ignored. Without ``trust_unverified`` (a model without
    training, simply rebuilt) a checkpoint that does not match is ignored too, not refused.
    If no candidate loads, the model and optimizer are untouched (the seeded initial model).
    """
    for c in candidates:
        source = latest_complete(c)
        if source is None:
            continue
        try:
            stored = read_state(source)
        except CheckpointError as e:
            if warn:
                warn(f"warning: cannot resume from it: {e}; trying an older checkpoint")
            continue
        if not trust_unverified:
            # a model without training costs nothing to rebuild: reuse its checkpoint only when
            # it provably matches this run (same data and settings), else build it afresh
            try:
                if not check_resume(stored, identity, source):
                    continue
            except ConfigError:
                continue
        elif not check_resume(stored, identity, source):
            if warn:
                warn(f"warning: {source} predates the checks of configuration and dataset on resume; "
                     "resuming from it unchecked")
        try:
            loaded = load_checkpoint(source, model, stepper.optimizer if stepper else None)
        except CheckpointMismatch as e:
            raise ConfigError(
                f"cannot resume: {e}. The run's model settings changed since this checkpoint was written; "
                "resume with the original settings, or start fresh with train.resume=false (overwrites this "
                "run directory) or another --run-dir"
            ) from None
        except CheckpointError as e:
            if warn:
                warn(f"warning: cannot resume from it: {e}; trying an older checkpoint")
            continue
        changed = noted_changes(stored.get("config") or {}, identity["config"])
        if changed and warn:
            warn(f"note: resuming with changed settings: {', '.join(changed)}")
        return source, loaded
    return None, {}


def _reconcile_best(ckpt: Path, model, state: dict, ep_size: int, echo) -> None:
    """Make ``checkpoints/best`` agree with the resumed state after a crash between an
    epoch's two saves, or a resume from an older 'last' than the newest:

    * the resumed epoch is the best one but 'best' holds an earlier epoch or none ('last' was
      saved, 'best' not): the resumed weights are that epoch's, so 'best' is written from them;
    * 'best' holds an epoch after the resumed one (a fallback to an older 'last'): the weights
      of the resumed state's best epoch are gone, and that later epoch is trained again, so
      the best is chosen afresh among the epochs trained from here (with a warning).

    Every rank decides from the same files (the run directory is shared, as it must be).
    """
    want = state.get("best_epoch")
    best = latest_complete(ckpt / "best")
    try:
        found = read_state(best) if best is not None else {}
    except CheckpointError:
        found = {}
    have = found.get("best_epoch")
    if want is None or have == want:
        return
    if isinstance(have, int) and have > state["epoch"]:
        # its weights are of an epoch to be trained again, and the resumed state's best
        # weights were overwritten by them: selection starts again from the epochs to come
        state.update(best=None, best_epoch=None, bad_evals=0)
        echo(f"warning: {ckpt / 'best'} holds epoch {have}, after the resumed epoch {state['epoch']} (an older "
             "checkpoint was resumed); the best epoch is chosen again among the epochs trained from here")
    elif want == state["epoch"] and (have is None or have < want):
        save_checkpoint(ckpt / "best", model, None, state, ep_size=ep_size)
        echo(f"note: {ckpt / 'best'} held {'no epoch' if have is None else f'epoch {have}'}, not the best epoch "
             f"{want}; restored it from the resumed weights")
    else:  # the best epoch's weights are gone: said now, not only after the remaining epochs
        echo(f"warning: {ckpt / 'best'} holds {'no complete checkpoint' if have is None else f'epoch {have}'}, but "
             f"epoch {want} was the best: unless a later epoch does better, the best model cannot be tested at the "
             "end. Put the directory back, or start again with train.resume=false (or another --run-dir)")


def _best_checkpoint(ckpt: Path, state: dict, trainable: bool) -> Path | None:
    """The checkpoint to test: ``checkpoints/best`` of the best epoch. A CheckpointError when
    it is missing or holds another epoch (the results would claim a best epoch whose weights
    were not tested); None when no validation has run at all (nothing to select from)."""
    if not trainable:
        return latest_complete(ckpt / "best")  # just written, or reused for the same data
    epoch = state.get("best_epoch")
    if epoch is None:
        return None
    best = latest_complete(ckpt / "best")
    found = read_state(best).get("best_epoch") if best is not None else None
    if best is None or found != epoch:
        what = "missing or incomplete" if best is None else f"of epoch {found}"
        raise CheckpointError(
            f"{ckpt / 'best'} is {what}, but epoch {epoch} was the best: the best model cannot be tested. "
            "Put the directory back, or start the run again with train.resume=false (or another --run-dir)"
        )
    return best


def _fit(stepper, task, cfg: ExperimentConfig, ctx: DistContext, state: dict, ckpt: Path, logger: RunLogger, echo) -> None:
    tc = cfg.train
    bar = _ProgressBar(enabled=tc.progress and ctx.is_main and sys.stderr.isatty(), total=task.n_train())
    ep_size = model_ep_size(cfg)
    model = stepper.model
    for epoch in range(state["epoch"] + 1, tc.epochs):
        bar.start(epoch)
        try:
            record = {"epoch": epoch, **train_one_epoch(stepper, task, cfg, ctx, epoch, state, progress=bar.update)}
        finally:
            bar.stop()
        line = (f"epoch {epoch:3d}  loss {record['loss']:.4f} ("
                + " ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
                + f")  {record['samples_per_second']:,.0f} samples/s")
        improved = False
        if epoch % tc.eval_every == 0:
            t0 = time.perf_counter()
            valid = evaluate_split(model, task, "valid", ctx, tc.eval_batch_size)
            record.update({f"valid_{k}": v for k, v in valid.items()})
            record["eval_seconds"] = time.perf_counter() - t0
            if tc.valid_metric not in valid:
                raise ConfigError(f"train.valid_metric={tc.valid_metric!r} is not computed (available: {', '.join(valid)})")
            value = valid[tc.valid_metric]
            line += f"  valid {tc.valid_metric} {value:.5f}"
            if _improved(value, state["best"], tc.ties_improve):
                state.update(best=value, best_epoch=epoch, bad_evals=0)
                improved = True
                line += " *"
            else:
                state["bad_evals"] += 1
        record.update(_moe_record(model))
        state["epoch"] = epoch
        stop = state["bad_evals"] > tc.patience
        state["stopped"] = stop  # early stopping is final; the epoch limit can be raised on resume
        # 'last' first: a crash between the two saves leaves a 'last' whose weights are the
        # best epoch's, from which a resume restores 'best' (_reconcile_best)
        save_checkpoint(ckpt / "last", model, stepper.optimizer, state, ep_size=ep_size, keep_previous=True)
        if improved:
            save_checkpoint(ckpt / "best", model, None, state, ep_size=ep_size)
        logger.log(record)
        if ctx.report is not None:
            ctx.report({k: v for k, v in record.items() if isinstance(v, (int, float))}, ckpt / "last")
        echo(line)
        if stop:
            echo(f"early stopping: {state['bad_evals']} evaluations without improvement (best epoch {state['best_epoch']})")
            break


class _ProgressBar:
    def __init__(self, *, enabled: bool, total: int):
        self.enabled, self.total, self.progress, self.task = enabled, total, None, None

    def start(self, epoch: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"epoch {epoch}"), BarColumn(), TextColumn("{task.description}"), TimeRemainingColumn(), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("", total=self.total)
        self.t0 = time.perf_counter()

    def update(self, done: int, loss: float, parts: dict) -> None:
        if self.progress is not None:
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            desc = f"loss {loss:.3f} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f" | {rate:,.0f} samples/s"
            self.progress.update(self.task, completed=done, description=desc)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def format_results(results: dict, ks) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    metrics = ["ndcg", "mrr", "hit"] if results["protocol"] == "loo" else ["recall", "ndcg"]
    t = Table(title=f"{results['model']} on {results['dataset']} (best epoch {results['best_epoch']})")
    t.add_column("split")
    cols = [f"{m}@{k}" for m in metrics for k in ks if f"{m}@{k}" in results["test"]]
    for c in cols:
        t.add_column(c, justify="right")
    for split in ("valid", "test"):
        t.add_row(split, *[f"{results[split][c]:.4f}" for c in cols])
    buf = StringIO()
    Console(file=buf, width=12 * (len(cols) + 1), highlight=False).print(t)
    return buf.getvalue().rstrip()
