"""Topology-independent training checkpoints.

A checkpoint directory holds::

    model.safetensors       full model weights, experts by *global* index
    optimizer.safetensors   Adam moments per parameter name (``exp_avg/<name>``, ``exp_avg_sq/<name>``)
    state.json              loop position (epoch, step in epoch, global step), best metric,
                            optimizer step count, the world size and ep_size that wrote it, and
                            (from the training loop) the run's resolved ``config`` and the
                            ``dataset`` / ``features`` identity that resuming checks
                            (:mod:`moedist.train.identity`)
    rng.safetensors         RNG states per rank: torch CPU (``rank<i>``), the CUDA generator of the
                            model's device when it is on a GPU (``rank<i>.cuda``), numpy's and
                            Python's global generators (``rank<i>.numpy*``, ``rank<i>.python*``);
                            restored only when the world size is unchanged

Nothing is pickled, so loading a checkpoint cannot execute code. The same files load into a
plain torch optimizer, a DeepSpeed engine with ZeRO stage 0, 1 or 2, any world size and any
``ep_size``: every tensor is stored whole, and each rank takes its slice on load. Saving is
collective (all ranks call it in the same order); only rank 0 writes, into a temporary
directory renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moedist.errors import CheckpointError
from moedist.io import fsync_path

FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint that does not fit the model (other parameter names or shapes):
    the run's configuration changed, not a damaged file. Never a reason to fall back to an
    older checkpoint, which would not fit either."""


# ----------------------------------------------------------------------------- expert shards


def expert_shard_info(param: torch.nn.Parameter):
    """``(dim, group)`` for a parameter sharded over an expert-parallel group, else None.

    Expert-parallel layers tag their sharded parameters with ``expert_shard_dim`` (the
    dimension that indexes local experts) and ``ep_group`` (the process group whose ranks
    hold the other experts, in order of expert offset).
    """
    dim = getattr(param, "expert_shard_dim", None)
    group = getattr(param, "ep_group", None)
    if dim is None or group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    return dim, group


def _split_sizes(param, group) -> list[int]:
    """Experts held by each rank of ``group`` (uneven splits allowed, a rank may hold 0)."""
    sizes = getattr(param, "experts_per_rank", None)
    if sizes is None:
        sizes = [param.shape[param.expert_shard_dim]] * dist.get_world_size(group)
    return list(sizes)


def _gather_full(param, tensor: torch.Tensor) -> torch.Tensor:
    info = expert_shard_info(param)
    if info is None:
        return tensor
    dim, group = info
    sizes = _split_sizes(param, group)
    # all_gather needs equal shapes: pad each shard to the largest, then trim
    width = max(sizes)
    moved = tensor.movedim(dim, 0).contiguous()
    if moved.shape[0] < width:
        moved = torch.cat([moved, moved.new_zeros((width - moved.shape[0], *moved.shape[1:]))])
    parts = [torch.empty_like(moved) for _ in sizes]
    dist.all_gather(parts, moved, group=group)
    full = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return full.movedim(0, dim)


def _local_slice(param, full: torch.Tensor) -> torch.Tensor:
    info = expert_shard_info(param)
    if info is None:
        return full
    dim, group = info
    sizes = _split_sizes(param, group)
    rank = dist.get_rank(group)
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank])


# ----------------------------------------------------------------------------- optimizer state


def _zero_optimizer(optimizer) -> bool:
    return optimizer is not None and hasattr(optimizer, "optimizer") and any(
        hasattr(p, "_hp_mapping") for g in optimizer.param_groups for p in g["params"]
    )


def master_params(optimizer) -> dict[int, torch.Tensor]:
    """``id(module parameter) -> float32 master copy`` under DeepSpeed's 16-bit wrappers without
    ZeRO (bf16 or fp16 at stage 0: ``fp16_groups[i][j]`` is the module's parameter,
    ``fp32_groups[i][j]`` its master, and the inner Adam's state is keyed by the master). Empty
    for a plain torch optimizer, fp32 DeepSpeed, and ZeRO (whose masters ``_hp_mapping`` reaches)."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high:
        return {}
    return {id(a): b for g16, g32 in zip(low, high) for a, b in zip(g16, g32)}


def _param_state(optimizer, param, key: str, masters: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Full (unpartitioned) Adam moment of ``param`` under a torch optimizer, DeepSpeed's
    16-bit wrapper (``masters``: :func:`master_params`) or a DeepSpeed ZeRO optimizer."""
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key)  # collective over the DP group
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed stage 0 wraps nothing, but be safe
    param = (masters or {}).get(id(param), param)
    st = inner.state.get(param) if inner is not None else None
    return None if not st or key not in st else st[key]


def _optimizer_step(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    steps = [int(s["step"]) for s in inner.state.values() if "step" in s]
    return max(steps) if steps else 0


def _set_optimizer_state(optimizer, model, moments: dict[str, torch.Tensor], step: int) -> None:
    params = dict(model.named_parameters())
    if _zero_optimizer(optimizer):
        from deepspeed.utils import safe_set_full_optimizer_state

        for name, p in params.items():
            if not p.requires_grad:
                continue
            for key in MOMENTS:
                full = moments.get(f"{key}/{name}")
                if full is None:
                    raise CheckpointError(f"optimizer state lacks {key} of {name}")
                safe_set_full_optimizer_state(p, _local_slice(p, full).to(p.device, torch.float32), key)
        inner = optimizer.optimizer
        for st in inner.state.values():
            if "step" in st:  # where and in what dtype the optimizer keeps it
                st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    masters = master_params(optimizer)
    for name, p in params.items():
        if not p.requires_grad or f"exp_avg/{name}" not in moments:
            continue
        key = masters.get(id(p), p)  # the state of a 16-bit module parameter sits on its master
        inner.state[key] = {
            "step": adam_step_tensor(inner, key, step),
            **{k: _local_slice(p, moments[f"{k}/{name}"]).to(key.device, key.dtype).clone() for k in MOMENTS},
        }


def adam_step_tensor(optimizer, param: torch.Tensor, step: int) -> torch.Tensor:
    """The ``step`` entry torch's Adam would keep for ``param``: float32 on the parameter's
    device for the fused (and capturable) kernels, a CPU scalar otherwise. A CPU step beside
    CUDA parameters is not what the fused CUDA kernel is given by Adam itself."""
    group = next((g for g in optimizer.param_groups if any(q is param for q in g["params"])), {})
    on_device = bool(group.get("fused") or group.get("capturable"))
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


# ----------------------------------------------------------------------------- save / load


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def full_model_state(model: torch.nn.Module, optimizer=None) -> dict[str, torch.Tensor]:
    """Whole-model weights (the float32 master copies where DeepSpeed keeps them: ZeRO, and its
    16-bit wrapper at stage 0), experts gathered. Collective."""
    state = {}
    params = dict(model.named_parameters())
    masters = master_params(optimizer)
    for name, t in model.state_dict().items():
        p = params.get(name)
        if p is not None and hasattr(p, "_hp_mapping"):
            from deepspeed.utils import safe_get_full_fp32_param

            t = safe_get_full_fp32_param(p)
        elif p is not None and id(p) in masters:
            t = masters[id(p)]
        t = _gather_full(p, t.detach()) if p is not None else t.detach()
        state[name] = t.float().cpu().contiguous() if t.is_floating_point() else t.cpu().contiguous()
    return state


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for an empty model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def rng_states(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's random generator states as tensors (safetensors holds nothing else):
    torch's CPU generator, the CUDA generator of ``device`` when it is a GPU (dropout and every
    other random op on the GPU draw from it, not from the CPU generator), numpy's and Python's
    global generators."""
    out = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    if kind == "MT19937":
        out["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
        out["numpy_pos"] = torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64)
        out["numpy_gauss"] = torch.tensor([float(gauss)], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    if version == 3:
        out["python"] = torch.tensor(internal, dtype=torch.int64)
        out["python_gauss"] = torch.tensor(
            [0.0 if gauss_next is None else float(gauss_next), float(gauss_next is not None)], dtype=torch.float64
        )
    return out


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_states` returned (the parts present; a checkpoint of an older
    moedist has only ``torch``). The CUDA state goes to ``device``'s generator."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].to(torch.uint8))
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].to(torch.uint8), device)
    if {"numpy", "numpy_pos", "numpy_gauss"} <= set(states):
        pos, has_gauss = (int(x) for x in states["numpy_pos"].tolist())
        np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                             float(states["numpy_gauss"][0])))
    if {"python", "python_gauss"} <= set(states):
        value, present = states["python_gauss"].tolist()
        random.setstate((3, tuple(int(x) for x in states["python"].tolist()), value if present else None))


def _rng_key(rank: int, kind: str) -> str:
    return f"rank{rank}" if kind == "torch" else f"rank{rank}.{kind}"  # "rank<i>": as older checkpoints


def _rank_rng(rng: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """One rank's states out of a whole ``rng.safetensors``."""
    out = {}
    for key, t in rng.items():
        head, _, kind = key.partition(".")
        if head == f"rank{rank}":
            out[kind or "torch"] = t
    return out


def _gather_rng_states(mine: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's :func:`rng_states` (collective; rank 0 writes them)."""
    if not dist.is_initialized():
        return [mine]
    parts: list = [None] * _world()
    # objects, not tensors: ranks may hold different sets of generators; NCCL moves the
    # pickled bytes through the current CUDA device (nothing is pickled to disk)
    dist.all_gather_object(parts, {k: v.numpy() for k, v in mine.items()})
    return [{k: torch.from_numpy(v) for k, v in p.items()} for p in parts]


def save_checkpoint(directory: str | Path, model, optimizer, loop_state: dict, *, ep_size: int = 1, keep_previous: bool = False) -> None:
    """Collective save of a complete, topology-independent checkpoint to ``directory``.

    ``keep_previous`` keeps the checkpoint it replaces as ``<directory>-previous``, the
    fallback when the newest one turns out unreadable.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    weights = full_model_state(model, optimizer)
    moments: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        masters = master_params(optimizer)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            for key in MOMENTS:
                t = _param_state(optimizer, p, key, masters)
                if t is None:
                    continue
                moments[f"{key}/{name}"] = _gather_full(p, t.detach()).float().cpu().contiguous()
    rngs = _gather_rng_states(rng_states(model_device(model)))
    if _rank() == 0:
        parent = directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        # what a save killed half-way left behind (each is a whole checkpoint's size)
        for stale in [*parent.glob(f".{directory.name}.tmp-*"), *parent.glob(f".{directory.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".{directory.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        save_file({_rng_key(i, k): t for i, r in enumerate(rngs) for k, t in r.items()}, str(tmp / "rng.safetensors"))
        state = dict(loop_state, optimizer_step=_optimizer_step(optimizer) if optimizer is not None else 0,
                     world_size=_world(), ep_size=ep_size, complete=True)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():  # on disk before the name says "complete"
            fsync_path(f)
        fsync_path(tmp)
        if keep_previous:
            # the replaced checkpoint becomes <directory>-previous first: at every moment either
            # <directory> or <directory>-previous holds the newest complete checkpoint
            prev = previous_of(directory)
            if directory.exists():
                shutil.rmtree(prev, ignore_errors=True)
                os.replace(directory, prev)
            os.replace(tmp, directory)
        else:
            old = parent / f".{directory.name}.old-{os.getpid()}"
            if directory.exists():
                os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        fsync_path(parent)
    if dist.is_initialized():
        dist.barrier()


def read_checkpoint(directory: str | Path) -> tuple[dict, dict, dict, dict]:
    """(weights, moments, state, rng) of a checkpoint; a clear error naming a bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for f in FILES:
        if not (directory / f).is_file():
            raise CheckpointError(f"{directory / f}: missing (incomplete checkpoint)")
    out = []
    for f in ("model.safetensors", "optimizer.safetensors"):
        try:
            out.append(load_file(str(directory / f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{directory / f}: unreadable or truncated ({e})") from None
    state = read_state(directory)
    rng = {}
    if (directory / "rng.safetensors").is_file():
        try:
            rng = load_file(str(directory / "rng.safetensors"))
        except (SafetensorError, OSError, ValueError, RuntimeError):
            rng = {}
    return out[0], out[1], state, rng


def read_state(directory: str | Path) -> dict:
    """``state.json`` of a checkpoint (the loop position, and the ``config`` / ``dataset`` of the
    run that wrote it), without reading the tensors."""
    path = Path(directory) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 (a damaged file)
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return state


def _check_fits(directory: Path, model, optimizer, weights: dict, moments: dict) -> None:
    """CheckpointMismatch unless every tensor of the checkpoint fits ``model`` (names and
    shapes of the weights, shapes of the Adam moments); CheckpointError when a ZeRO optimizer
    would lack a moment. Checked before anything is loaded, so a checkpoint that does not fit
    leaves the model and optimizer as they were."""
    own = model.state_dict()
    params = dict(model.named_parameters())
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        parts = [f"the model has {len(missing)} tensor(s) the checkpoint lacks ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"] if missing else []
        if unexpected:
            parts.append(f"the checkpoint has {len(unexpected)} the model lacks ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
        raise CheckpointMismatch(f"{directory}: does not match the model: " + "; ".join(parts))
    wrong = []
    for name, t in own.items():
        p = params.get(name)
        piece = _local_slice(p, weights[name]) if p is not None else weights[name]
        if piece.shape != t.shape:
            wrong.append(f"{name} {tuple(weights[name].shape)} in the checkpoint, {tuple(t.shape)} in the model")
    if wrong:
        raise CheckpointMismatch(f"{directory}: does not match the model: " + "; ".join(wrong[:4])
                                 + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else ""))
    if optimizer is None or not moments:
        return
    zero = _zero_optimizer(optimizer)
    for name, p in params.items():
        have = [key for key in MOMENTS if f"{key}/{name}" in moments]
        if have and len(have) < len(MOMENTS):  # a parameter's Adam state is both moments or none
            lacks = next(key for key in MOMENTS if key not in have)
            raise CheckpointError(f"{directory / 'optimizer.safetensors'}: has {have[0]} but lacks {lacks} of {name} (incomplete)")
        for key in MOMENTS:
            m = moments.get(f"{key}/{name}")
            if m is None:
                if zero and p.requires_grad:
                    raise CheckpointError(f"{directory / 'optimizer.safetensors'}: lacks {key} of {name}")
                continue
            if tuple(m.shape) != tuple(weights[name].shape):
                raise CheckpointMismatch(f"{directory / 'optimizer.safetensors'}: {key} of {name} has shape "
                                         f"{tuple(m.shape)}, the parameter {tuple(weights[name].shape)}")


def load_checkpoint(directory: str | Path, model, optimizer=None) -> dict:
    """Load weights (+ optimizer moments, + this rank's RNG states) into this rank's shard of
    ``model``; returns the loop state.

    Every file is read and checked against the model first: a truncated file raises
    CheckpointError, one that does not fit the model CheckpointMismatch, and in both cases
    nothing has been loaded. Must be called on every rank (ZeRO setters are collective).
    """
    directory = Path(directory)
    weights, moments, state, rng = read_checkpoint(directory)
    _check_fits(directory, model, optimizer, weights, moments)
    params = dict(model.named_parameters())
    own = model.state_dict()
    local = {}
    for name, t in own.items():
        p = params.get(name)
        piece = _local_slice(p, weights[name]) if p is not None else weights[name]
        local[name] = piece.to(t.dtype)
    model.load_state_dict(local, strict=True)
    masters = master_params(optimizer)
    for name, p in params.items():
        if hasattr(p, "_hp_mapping"):  # ZeRO keeps fp32 master weights apart from the module's
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(p, _local_slice(p, weights[name]).to(p.device, torch.float32))
        elif id(p) in masters:  # so does DeepSpeed's 16-bit wrapper at stage 0: the next step
            # would otherwise copy its masters of the engine's start back into the module
            with torch.no_grad():
                masters[id(p)].copy_(_local_slice(p, weights[name]))
    if optimizer is not None and moments:
        _set_optimizer_state(optimizer, model, moments, int(state.get("optimizer_step", 0)))
    mine = _rank_rng(rng, _rank())
    if state.get("world_size") == _world() and mine:
        set_rng_states(mine, model_device(model))
    state["same_topology"] = state.get("world_size") == _world() and state.get("ep_size") is not None
    return state


def previous_of(directory: str | Path) -> Path:
    directory = Path(directory)
    return directory.parent / f"{directory.name}-previous"


def latest_complete(*candidates: str | Path | None) -> Path | None:
    """The first candidate directory holding a readable, complete checkpoint."""
    for c in candidates:
        if c is None:
            continue
        c = Path(c)
        try:
            if all((c / f).is_file() for f in FILES) and read_state(c).get("complete"):
                return c
        except (OSError, CheckpointError):  # a damaged state.json: not a complete checkpoint
            continue
    return None
