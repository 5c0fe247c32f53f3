"""DeepSpeed configuration and process-group helpers for the training workers."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from moedist.errors import ConfigError
from moedist.train.config import ExperimentConfig


def use_bf16(cfg: ExperimentConfig, device: torch.device) -> bool:
    if cfg.dist.precision == "bf16":
        return True
    if cfg.dist.precision == "fp32":
        return False
    return device.type == "cuda"  # auto: bf16 on GPUs, fp32 on CPU


def deepspeed_config(cfg: ExperimentConfig, world: int, device: torch.device) -> dict:
    """The DeepSpeed config for ``cfg``; ``dist.deepspeed_config`` (JSON) overrides any key.

    ``train_batch_size`` is the global batch (``train.batch_size``, rounded up to a multiple of
    ``world * grad_accum``); the loop itself slices each global batch, so micro-batch sizes
    may differ by one between workers.
    """
    gas = max(1, cfg.dist.grad_accum)
    micro = max(1, -(-cfg.train.batch_size // (world * gas)))
    ds = {
        "train_batch_size": micro * world * gas,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(cfg.train.grad_clip),
        "zero_optimization": {"stage": int(cfg.dist.zero_stage)},
        "bf16": {"enabled": use_bf16(cfg, device)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if cfg.dist.deepspeed_config:
        path = Path(cfg.dist.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the DeepSpeed config ({e})") from None
        if "optimizer" in user:
            raise ConfigError(f"{path}: 'optimizer' is set by moedist (a torch.optim.Adam); remove it")
        ds = _merge(ds, user)
    return ds


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def optimizer_param_groups(model: torch.nn.Module, cfg: ExperimentConfig) -> list[dict]:
    """Adam parameter groups; expert-parallel parameters in groups of their own, as
    DeepSpeed requires to reduce them only over their expert-data-parallel group."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not any(getattr(p, "allreduce", True) is False for p in params):
        return [{"params": params, "name": "dense"}]
    from moedist.moe.parallel import moe_param_groups

    return moe_param_groups(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_group(device: torch.device) -> None:
    """A 1-process group on loopback, so DeepSpeed can run inside this process (local mode)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
