"""Topology-independent model state: expert tensors keyed by *global* expert index.

The format is simply the state dict of the same model built with ``ep_size = 1``: every
``LinearExperts`` stores its full ``<prefix>.weight [E, in, out]`` and ``<prefix>.bias [E, out]``
where row ``e`` is global expert ``e``. So a checkpoint written by 2 ranks with ``ep_size=2``
loads on 1 rank (``load_state_dict`` directly, or :func:`load_sharded_state`) and on 4 ranks
with ``ep_size=4`` or ``ep_size=2`` (:func:`load_sharded_state` keeps each rank's slice).

    state = gather_expert_state(model)        # collective over each expert-parallel group
    if rank == 0: save_file(state, path)      # e.g. safetensors
    ...
    load_sharded_state(model, load_file(path))  # any ep_size, any world size

Scope: the model weights. Optimizer state of expert shards (Adam moments) is per rank and
not regathered here; a resume on a different topology restarts those moments. DeepSpeed's
``engine.save_checkpoint`` does not know moedist experts (see ``moe/parallel.py``): use these
helpers on ``engine.module`` for the weights. ZeRO stage 3 (partitioned parameters) is not
supported by these helpers.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moedist.moe.experts import LinearExperts

__all__ = ["gather_expert_state", "load_sharded_state", "shard_state"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user model inside a DeepSpeed engine or DDP wrapper."""
    if type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel", "PipelineEngine"):
        return model.module
    return model


def _expert_tensors(model: nn.Module):
    """``(state key, LinearExperts, tensor)`` for every expert weight/bias, in module order
    (the same on every rank, which keeps the gathers below matched)."""
    for name, m in model.named_modules():
        if isinstance(m, LinearExperts):
            prefix = f"{name}." if name else ""
            for pname in ("weight", "bias"):
                t = getattr(m, pname)
                if t is not None:
                    yield prefix + pname, m, t


def _all_gather_experts(t: Tensor, m: LinearExperts) -> Tensor:
    """Concatenate the expert shards of ``t`` over ``m``'s expert-parallel group in ep-rank
    order (shards may differ in length: padded to the longest for ``all_gather``)."""
    counts = m.experts_per_rank
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=m.ep.ep_group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


@torch.no_grad()
def gather_expert_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every sharded expert tensor replaced by the full tensor over
    all global experts (row = global expert index) — i.e. the ``ep_size = 1`` state dict.

    Collective: every rank of every expert-parallel group must call it. Returns the same
    dict on every rank (detached tensors; non-expert entries as in ``state_dict()``).
    """
    model = _unwrap(model)
    state = model.state_dict()
    for key, m, t in _expert_tensors(model):
        if m.ep_size > 1:
            state[key] = _all_gather_experts(t.detach(), m)
        elif m.num_experts != m.num_global_experts:
            raise ValueError(f"{key}: a static shard (expert_offset) has no group to gather over")
    return state


def shard_state(model: nn.Module, full_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``full_state`` (global expert tensors ``[E, ...]``) with each expert tensor sliced to the
    experts this rank holds in ``model`` (rows ``expert_offset .. expert_offset + E_local``)."""
    model = _unwrap(model)
    local = dict(full_state)
    for key, m, _ in _expert_tensors(model):
        if key not in local:
            continue
        full = local[key]
        if full.shape[0] != m.num_global_experts:
            raise ValueError(
                f"{key}: checkpoint has {full.shape[0]} experts, the model {m.num_global_experts}"
            )
        local[key] = full[m.expert_offset : m.expert_offset + m.num_experts]
    return local


def load_sharded_state(model: nn.Module, full_state: Mapping[str, Tensor], *, strict: bool = True):
    """Load a topology-independent state dict (from :func:`gather_expert_state`, or any
    ``ep_size = 1`` state dict) into ``model`` with whatever ``ep_size`` it was built with.
    Local: no communication. Returns ``load_state_dict``'s missing/unexpected keys."""
    model = _unwrap(model)
    return model.load_state_dict(shard_state(model, full_state), strict=strict)
