"""The training loop: one process (CPU or one GPU), early stopping, best-checkpoint test.

    moedist train --model hm4sr --data data/prepared/synthetic-small-2025

Every run writes one run directory::

    run_dir/config.yaml          the resolved ExperimentConfig
    run_dir/metrics.jsonl        one line per epoch: loss parts, throughput, validation metrics
    run_dir/tb/                  the same as TensorBoard scalars
    run_dir/checkpoints/best/    model weights (safetensors) of the best validation epoch
    run_dir/checkpoints/last/    weights + optimizer + RNG + loop state, for resume
    run_dir/results.json         final validation and test metrics of the best model

The loop knows nothing model-specific beyond ``calculate_loss`` / ``full_sort_predict``
(docs/contracts.md); what differs between the sequential and the cold-start protocol lives
in the two ``*Task`` classes below.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from moedist.config import atomic_write_text, save_config, to_dict
from moedist.data.dataset import ColdStartData, PreparedDataset, SequentialSamples
from moedist.errors import CheckpointError, ConfigError, MoedistError
from moedist.train.config import ExperimentConfig
from moedist.train.evaluate import evaluate_cold_start, evaluate_full_sort

SEQUENTIAL_MODELS = {"hm4sr", "sasrec"}
COLD_START_MODELS = {"mamex", "content"}


class TrainingDiverged(MoedistError):
    """The loss became NaN/inf. The last good checkpoint is kept."""


# ----------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available")
    return dev


def protocol_of(model: str) -> str:
    return "loo" if model in SEQUENTIAL_MODELS or model == "popularity" else "cold"


def default_run_dir(cfg: ExperimentConfig, data: PreparedDataset | None = None) -> Path:
    name = data.name if data is not None else Path(cfg.data).name
    return Path("runs") / f"{cfg.model}-{name}"


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


# ----------------------------------------------------------------------------- tasks


class SequentialTask:
    """Leave-one-out next-item prediction (HM4SR, SASRec, popularity)."""

    protocol = "loo"

    def __init__(self, data: PreparedDataset, cfg: ExperimentConfig, max_len: int):
        self.cfg = cfg
        self.splits = {s: SequentialSamples.build(data, s, max_len) for s in ("train", "valid", "test")}

    def n_train(self) -> int:
        return len(self.splits["train"])

    def train_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        samples = self.splits["train"]
        perm = rng.permutation(len(samples))
        for i in range(0, len(perm), batch_size):
            yield samples.batch(perm[i : i + batch_size])

    def evaluate(self, model, split: str, device: torch.device) -> dict[str, float]:
        samples = self.splits[split]
        bs = self.cfg.train.eval_batch_size
        batches = (samples.batch(np.arange(i, min(i + bs, len(samples)))) for i in range(0, len(samples), bs))
        acc = evaluate_full_sort(
            model, batches, ks=self.cfg.train.topk, ties=self.cfg.train.rank_ties,
            mask_history=self.cfg.train.mask_history, device=device,
        )
        return acc.means()


class ColdStartTask:
    """Cold-start items (MAMEX, content mapping): BPR on warm items, rank the cold items."""

    protocol = "cold"

    def __init__(self, data: PreparedDataset, cfg: ExperimentConfig):
        self.cfg = cfg
        self.cold = ColdStartData(data)
        self.candidates = torch.from_numpy(self.cold.candidates)
        self.heldout = {}
        for split in ("valid", "test"):
            users, items = self.cold.heldout(split)
            self.heldout[split] = {int(u): [int(i) for i in its] for u, its in zip(users, items)}

    def n_train(self) -> int:
        return len(self.cold)

    def train_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        users, pos, neg = self.cold.epoch_triples(rng)
        for i in range(0, len(users), batch_size):
            sl = slice(i, i + batch_size)
            yield {
                "user": torch.from_numpy(users[sl]),
                "pos_item": torch.from_numpy(pos[sl]),
                "neg_item": torch.from_numpy(neg[sl]),
            }

    def evaluate(self, model, split: str, device: torch.device) -> dict[str, float]:
        acc = evaluate_cold_start(
            model, self.heldout[split], candidates=self.candidates.to(device), ks=self.cfg.train.topk,
            ties=self.cfg.train.rank_ties, batch_size=self.cfg.train.eval_batch_size, device=device,
        )
        return acc.means()


def build_task(cfg: ExperimentConfig, data: PreparedDataset):
    if protocol_of(cfg.model) == "loo":
        max_len = cfg.sasrec.max_seq_len if cfg.model == "sasrec" else cfg.hm4sr.max_seq_len
        return SequentialTask(data, cfg, max_len)
    return ColdStartTask(data, cfg)


# ----------------------------------------------------------------------------- checkpoints


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    """Model weights as safetensors (no pickle), written to a temp dir then renamed."""
    from safetensors.torch import save_file

    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    _swap_dir(tmp, directory)


def _swap_dir(tmp: Path, directory: Path) -> None:
    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint weights missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def save_last(model, optimizer, state: dict, directory: Path) -> None:
    """Everything needed to continue: weights, optimizer, RNG, loop counters."""
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict() if optimizer is not None else {}, "torch_rng": torch.get_rng_state()},
        tmp / "optimizer.pt",
    )
    (tmp / "state.json").write_text(json.dumps(state))
    _swap_dir(tmp, directory)


def load_last(model, optimizer, directory: Path) -> dict:
    load_weights(model, directory)
    try:
        extra = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((directory / "state.json").read_text())
    except Exception as e:  # truncated/corrupt files of any kind
        raise CheckpointError(f"{directory}: incomplete checkpoint ({type(e).__name__}: {e})") from None
    if optimizer is not None and extra["optimizer"]:
        optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["torch_rng"])
    return state


# ----------------------------------------------------------------------------- loop


@dataclass
class EpochStats:
    loss: float
    parts: dict[str, float]
    samples: int
    seconds: float


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_one_epoch(model, optimizer, task, cfg: ExperimentConfig, epoch: int, device, *, progress=None, global_step: int = 0) -> EpochStats:
    """One pass over the training samples. Epoch-seeded order makes resume exact."""
    tc = cfg.train
    rng = np.random.default_rng([tc.seed, epoch])
    model.train()
    total, n, t0 = 0.0, 0, time.perf_counter()
    part_sums: dict[str, float] = {}
    steps = 0
    for batch in task.train_batches(rng, tc.batch_size):
        batch = _move(batch, device)
        loss, parts = model.calculate_loss(batch)
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise TrainingDiverged(
                f"non-finite loss {float(loss)} at epoch {epoch} step {steps} (global step {global_step + steps}); "
                f"parts: {detail}. The last checkpoint is kept."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        bsz = int(next(iter(batch.values())).shape[0])
        total += float(loss.detach()) * bsz
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0.0) + float(v) * bsz
        n += bsz
        steps += 1
        if progress is not None:
            progress(n, float(loss), {k: float(v) for k, v in parts.items()}, n / max(time.perf_counter() - t0, 1e-9))
        if tc.max_steps_per_epoch and steps >= tc.max_steps_per_epoch:
            break
    secs = time.perf_counter() - t0
    return EpochStats(total / max(n, 1), {k: v / max(n, 1) for k, v in part_sums.items()}, n, secs)


class RunLogger:
    """metrics.jsonl + TensorBoard + console lines."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None]):
        self.path = run_dir / "metrics.jsonl"
        self.echo = echo
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # tensorboard missing or broken: JSONL still has everything
            self.tb = None

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            step = record["epoch"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k.replace("@", "_at_"), v, step)
            self.tb.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop lines of epochs that the checkpoint does not include."""
        if not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", -1) <= epoch]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _improved(value: float, best: float | None, ties: bool) -> bool:
    if best is None:
        return True
    v, b = round(value, 5), round(best, 5)
    return v >= b if ties else v > b


def run_training(cfg: ExperimentConfig, *, echo: Callable[[str], None] | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` in this process; returns the results dict."""
    echo = echo or (lambda s: print(s, flush=True))
    tc = cfg.train
    if not cfg.data:
        raise ConfigError("data= is required (a directory written by `moedist data prepare`)")
    data = PreparedDataset(cfg.data)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    device = resolve_device(tc.device)
    seed_everything(tc.seed)

    features = None
    if model_needs_features(cfg):
        fdir = find_features(cfg)
        if fdir is None:
            raise ConfigError(
                f"model {cfg.model} needs item features but none were found under {Path(cfg.data) / 'features'}; "
                f"run `moedist extract {cfg.data}` or pass features=<dir>"
                + (" (or hm4sr.modalities=[id])" if cfg.model == "hm4sr" else "")
            )
        from moedist.features.store import load_item_features

        features = load_item_features(fdir, n_items=data.n_items)
        echo(f"item features from {fdir}: " + ", ".join(f"{m} {tuple(t.shape)}" for m, t in features.features.items()))

    task = build_task(cfg, data)
    model = build_model(cfg, data, features).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    echo(f"{cfg.model}: {n_params:,} trainable parameters on {device}; {task.n_train():,} training samples; run dir {run_dir}")

    ckpt = run_dir / "checkpoints"
    optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay) if params else None
    logger = RunLogger(run_dir, echo)
    state = {"epoch": -1, "best": None, "best_epoch": None, "bad_evals": 0, "global_step": 0, "stopped": False}
    if tc.resume and (ckpt / "last" / "state.json").is_file():
        try:
            state = load_last(model, optimizer, ckpt / "last")
            echo(f"resumed from {ckpt / 'last'} after epoch {state['epoch']}")
        except CheckpointError as e:
            echo(f"warning: {e}; starting from scratch")
        logger.truncate_after(state["epoch"])
    elif (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    if optimizer is not None and not state.get("stopped"):
        _fit(model, optimizer, task, cfg, device, state, ckpt, logger, echo)
    elif optimizer is None and not (ckpt / "best").exists():
        save_weights(model, ckpt / "best")
    logger.close()

    if (ckpt / "best").exists():
        load_weights(model, ckpt / "best")
    results = {
        "model": cfg.model,
        "dataset": data.name,
        "protocol": task.protocol,
        "best_epoch": state.get("best_epoch"),
        "epochs_run": state["epoch"] + 1,
        "trainable_parameters": n_params,
        "valid": task.evaluate(model, "valid", device),
        "test": task.evaluate(model, "test", device),
    }
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    echo(format_results(results, tc.topk))
    return results


def _fit(model, optimizer, task, cfg, device, state, ckpt, logger, echo) -> None:
    tc = cfg.train
    bar = _ProgressBar(enabled=tc.progress and sys.stderr.isatty(), total=task.n_train())
    for epoch in range(state["epoch"] + 1, tc.epochs):
        bar.start(epoch)
        stats = train_one_epoch(model, optimizer, task, cfg, epoch, device, progress=bar.update, global_step=state["global_step"])
        bar.stop()
        state["global_step"] += math.ceil(stats.samples / tc.batch_size)
        record = {"epoch": epoch, "loss": stats.loss, **{f"loss_{k}": v for k, v in stats.parts.items()},
                  "train_seconds": stats.seconds, "samples_per_second": stats.samples / max(stats.seconds, 1e-9)}
        line = f"epoch {epoch:3d}  loss {stats.loss:.4f} (" + " ".join(f"{k} {v:.4f}" for k, v in stats.parts.items()) + f")  {record['samples_per_second']:,.0f} samples/s"
        if epoch % tc.eval_every == 0:
            t0 = time.perf_counter()
            valid = task.evaluate(model, "valid", device)
            record.update({f"valid_{k}": v for k, v in valid.items()})
            record["eval_seconds"] = time.perf_counter() - t0
            if tc.valid_metric not in valid:
                raise ConfigError(f"train.valid_metric={tc.valid_metric!r} is not computed (available: {', '.join(valid)})")
            value = valid[tc.valid_metric]
            line += f"  valid {tc.valid_metric} {value:.5f}"
            if _improved(value, state["best"], tc.ties_improve):
                state.update(best=value, best_epoch=epoch, bad_evals=0)
                save_weights(model, ckpt / "best")
                line += " *"
            else:
                state["bad_evals"] += 1
        state["epoch"] = epoch
        stop = state["bad_evals"] > tc.patience
        state["stopped"] = stop or epoch == tc.epochs - 1
        logger.log(record)
        save_last(model, optimizer, state, ckpt / "last")
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

    def update(self, done: int, loss: float, parts: dict, rate: float) -> None:
        if self.progress is not None:
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


