"""Process groups for expert parallelism, and the glue to DeepSpeed's MoE support.

Layout (the same as DeepSpeed's, ``use_data_before_expert_parallel_=False``). World size ``W``,
expert-parallel size ``E`` (``W % E == 0``)::

    expert-parallel groups       [0 .. E-1], [E .. 2E-1], ...     all-to-all of tokens
    expert-data-parallel groups  [0, E, 2E, ...], [1, E+1, ...]   replicas of one expert shard

Within an expert-parallel group, rank ``i`` (its *ep rank*) holds the experts
:func:`expert_split` gives it; ranks with the same ep rank in different groups hold the same
experts and average their gradients over the expert-data-parallel group.

Gradient semantics (DeepSpeed's, and :func:`allreduce_gradients` for trainers without it).
Each rank ``r`` back-propagates its own loss ``L_r``. The all-to-all backward delivers to an
expert shard the gradient of ``Σ_{r ∈ its EP group} L_r``; dense parameters see only ``L_r``.
DeepSpeed then divides *both* by the full data-parallel world size ``W``:

- dense:  ``all_reduce_sum(world) / W``
- expert: ``all_reduce_sum(expert-data-parallel group) / W``

so every parameter ends with ``∇ (1/W) Σ_r L_r``, independent of ``ep_size``. (With a per-rank
*mean* loss and uneven per-rank batches this is not the global mean over samples: the usual
data-parallel semantics.)

DeepSpeed only runs its expert-gradient path when the model contains a
``deepspeed.moe.layer.MoE`` module. :func:`moe_param_groups` (or :func:`prepare_deepspeed_moe`)
therefore attaches a parameter-free :data:`DeepSpeedMoEMarker` per ``ep_size``; the engine
sees it, creates its ``ep_size_{E}`` groups (same layout as above) and reduces the parameters
marked ``allreduce=False, group_name="ep_size_{E}"`` (done by ``LinearExperts``) over the
expert-data-parallel group only.

Checkpoints: DeepSpeed's own ``engine.save_checkpoint`` writes the module state of data-parallel
rank 0, i.e. *rank 0's expert shard only*, for moedist experts (the marker holds no experts).
Save model weights with :func:`moedist.moe.checkpoint.gather_expert_state` instead.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ExpertParallelGroups",
    "allreduce_gradients",
    "create_deepspeed_expert_groups",
    "expert_split",
    "init_expert_parallel",
    "is_expert_param",
    "mark_expert_params",
    "moe_param_groups",
    "prepare_deepspeed_moe",
]


def expert_split(num_experts: int, ep_size: int) -> list[int]:
    """Experts held by each ep rank: ``num_experts // ep_size`` each, the first
    ``num_experts % ep_size`` ranks one more (st-moe-pytorch's uneven split). A rank may hold
    0 experts when ``num_experts < ep_size``; it still takes part in every all-to-all."""
    if num_experts < 1 or ep_size < 1:
        raise ValueError(f"need num_experts >= 1 and ep_size >= 1, got {num_experts}, {ep_size}")
    base, extra = divmod(num_experts, ep_size)
    return [base + (1 if r < extra else 0) for r in range(ep_size)]


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of one expert-parallel size."""
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's view of one expert-parallel layout.

    ep_group:  the expert-parallel group (all-to-all); None when ``ep_size == 1``.
    edp_group: the expert-data-parallel group (gradient reduction of expert shards); None when
               ``ep_size == 1`` (experts are then ordinary data-parallel parameters).
    """

    ep_size: int
    ep_rank: int
    ep_ranks: tuple[int, ...]
    ep_group: Any
    edp_ranks: tuple[int, ...]
    edp_group: Any
    world: Any = None  # the default group these were built from (cache key)

    @property
    def name(self) -> str:
        return group_name(self.ep_size)

    # Process groups are per-process singletons: a deep copy of a model (EMA, best-model
    # snapshots) shares them, and pickling re-resolves them by ep_size in the new process.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (init_expert_parallel, (self.ep_size,))

    @classmethod
    def from_group(cls, ep_group) -> "ExpertParallelGroups":
        """Wrap a caller-made expert-parallel group (no expert-data-parallel group known:
        :func:`allreduce_gradients` and DeepSpeed need the standard layout instead)."""
        ranks = tuple(dist.get_process_group_ranks(ep_group))
        return cls(len(ranks), dist.get_rank(group=ep_group), ranks, ep_group, (), None)


_GROUPS: dict[int, ExpertParallelGroups] = {}


def init_expert_parallel(ep_size: int, *, deepspeed: bool = False) -> ExpertParallelGroups:
    """Create (once per process group and ``ep_size``) the expert-parallel and
    expert-data-parallel groups and return this rank's :class:`ExpertParallelGroups`.

    Collective: every rank must call it with the same ``ep_size`` (``torch.distributed.new_group``
    is called for *every* group, in the same order, on every rank). Later calls return the cached
    groups. ``deepspeed=True`` also creates DeepSpeed's own ``ep_size_{E}`` groups (needs
    ``deepspeed.init_distributed`` first); :class:`DeepSpeedMoEMarker` does that lazily otherwise.
    """
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if ep_size == 1:
        return ExpertParallelGroups(1, 0, (0,), None, (0,), None)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"ep_size={ep_size} needs torch.distributed to be initialised first "
            f"(init_process_group, or run under Ray Train / torchrun / deepspeed)"
        )
    world = dist.group.WORLD
    cached = _GROUPS.get(ep_size)
    if cached is None or cached.world is not world:
        W, rank = dist.get_world_size(), dist.get_rank()
        if W % ep_size:
            raise ValueError(f"ep_size={ep_size} does not divide the world size {W}")
        ep_mine = edp_mine = None
        ep_ranks_mine: tuple[int, ...] = ()
        edp_ranks_mine: tuple[int, ...] = ()
        # Same order on every rank: all EP groups, then all expert-data-parallel groups.
        for start in range(0, W, ep_size):
            ranks = tuple(range(start, start + ep_size))
            g = dist.new_group(list(ranks))
            if rank in ranks:
                ep_mine, ep_ranks_mine = g, ranks
        for pos in range(ep_size):
            ranks = tuple(range(pos, W, ep_size))
            g = dist.new_group(list(ranks))
            if rank in ranks:
                edp_mine, edp_ranks_mine = g, ranks
        cached = ExpertParallelGroups(
            ep_size=ep_size, ep_rank=ep_ranks_mine.index(rank), ep_ranks=ep_ranks_mine, ep_group=ep_mine,
            edp_ranks=edp_ranks_mine, edp_group=edp_mine, world=world,
        )
        _GROUPS[ep_size] = cached
    if deepspeed:
        create_deepspeed_expert_groups(ep_size)
    return cached


def create_deepspeed_expert_groups(ep_size: int) -> None:
    """DeepSpeed's ``ep_size_{E}`` expert(-data)-parallel groups, if not there yet (deepspeed
    0.19: ``deepspeed.utils.groups._create_expert_and_data_parallel``). Collective."""
    from deepspeed.utils import groups as ds_groups

    if group_name(ep_size) not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(ep_size)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def mark_expert_params(params, ep_size: int, *, ep_group=None, experts_per_rank=None) -> None:
    """Tag sharded expert parameters the way DeepSpeed's ``Experts`` does: no all-reduce over
    the whole world, reduce over the ``ep_size_{E}`` expert-data-parallel group instead.

    Also (for ``moedist.train.checkpoint``): ``expert_shard_dim = 0`` (dim 0 indexes local
    experts), ``ep_group`` (the group holding the other shards, in expert-offset order) and
    ``experts_per_rank`` (shard lengths; unequal when experts do not divide ``ep_size``)."""
    for p in params:
        p.allreduce = False
        p.group_name = group_name(ep_size)
        p.expert_shard_dim = 0
        p.ep_group = ep_group
        p.experts_per_rank = tuple(experts_per_rank) if experts_per_rank is not None else None


def is_expert_param(p: torch.Tensor) -> bool:
    """True for a parameter of an expert shard (DeepSpeed's ``is_moe_param``)."""
    return getattr(p, "allreduce", True) is False


def moe_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups with expert shards separated as DeepSpeed expects.

    Returns ``[{"name": "dense", "params": [...], "lr", "weight_decay"}]`` plus one group
    ``{"name": "ep_size_{E}", "moe": True, "params": [...], ...}`` per expert-parallel size
    (the format of ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``).
    Only trainable parameters are listed. Also attaches the DeepSpeed marker
    (:func:`prepare_deepspeed_moe`) when the model has sharded experts and DeepSpeed is
    importable, so that ``deepspeed.initialize`` reduces expert gradients correctly.
    """
    dense: list[nn.Parameter] = []
    experts: dict[str, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if is_expert_param(p):
            experts.setdefault(p.group_name, []).append(p)
        else:
            dense.append(p)
    groups = [{"name": "dense", "params": dense, "lr": lr, "weight_decay": weight_decay}]
    for name, params in experts.items():
        groups.append({"name": name, "moe": True, "params": params, "lr": lr, "weight_decay": weight_decay})
    if experts and _deepspeed_importable():
        prepare_deepspeed_moe(model)
    return groups


def _sharded_layers(model: nn.Module):
    """``(name, module)`` of every expert module that is sharded (``ep_size > 1``)."""
    for name, m in model.named_modules():
        if getattr(m, "ep_size", 1) > 1 and hasattr(m, "global_expert_ids"):
            yield name, m


@torch.no_grad()
def allreduce_gradients(model: nn.Module) -> None:
    """DeepSpeed's gradient averaging without DeepSpeed (for plain torch.distributed trainers,
    in place of DDP): dense grads ``all_reduce_sum(world) / W``, expert-shard grads
    ``all_reduce_sum(expert-data-parallel group) / W`` (see the module docstring)."""
    W = dist.get_world_size()
    edp = {group_name(m.ep_size): m.ep.edp_group for _, m in _sharded_layers(model)}
    if any(g is None for g in edp.values()):
        raise ValueError("an expert layer was built with a custom ep_group: its expert-data-parallel group is unknown")
    for p in model.parameters():
        if p.grad is None:
            if not p.requires_grad:
                continue
            p.grad = torch.zeros_like(p)  # every rank must take part in every reduction
        if is_expert_param(p):
            dist.all_reduce(p.grad, group=edp[p.group_name])
        else:
            dist.all_reduce(p.grad)
        p.grad.div_(W)


# ---------------------------------------------------------------------------------------------
# DeepSpeed marker
# ---------------------------------------------------------------------------------------------


def _deepspeed_importable() -> bool:
    if "deepspeed" in sys.modules:
        return True
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _build_marker_class() -> type:
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Parameter-free stand-in for ``deepspeed.moe.layer.MoE``.

        The DeepSpeed engine turns on its MoE gradient path (expert grads reduced over the
        expert-data-parallel group, ZeRO partitions per MoE param group) only if the model
        contains a ``MoE`` instance. This one holds no experts (``num_local_experts = 0``, so
        DeepSpeed's per-expert checkpoint files are skipped) and only creates DeepSpeed's
        ``ep_size_{E}`` groups when the engine calls ``set_deepspeed_parallelism``.
        """

        def __init__(self, *, num_experts: int, ep_size: int):
            nn.Module.__init__(self)  # skip MoE.__init__: no gate, no experts
            self.ep_size = ep_size
            self.num_experts = num_experts
            self.num_local_experts = 0
            self.expert_group_name = group_name(ep_size)
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if use_data_before_expert_parallel_:
                raise ValueError("moedist experts use the expert-before-data layout only")
            create_deepspeed_expert_groups(self.ep_size)

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

        def extra_repr(self) -> str:
            return f"ep_size={self.ep_size}, num_experts={self.num_experts}"

    DeepSpeedMoEMarker.__module__ = __name__
    DeepSpeedMoEMarker.__qualname__ = "DeepSpeedMoEMarker"
    return DeepSpeedMoEMarker


def __getattr__(name: str):
    # Built on first use so that importing moedist.moe never imports deepspeed (seconds);
    # module-level lookup keeps it picklable as moedist.moe.parallel.DeepSpeedMoEMarker.
    if name == "DeepSpeedMoEMarker":
        cls = _build_marker_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_deepspeed_moe(model: nn.Module) -> nn.Module:
    """Attach one :data:`DeepSpeedMoEMarker` per expert-parallel size found in ``model`` (as
    submodule ``_deepspeed_moe_ep{E}``; no parameters or buffers, so the state dict does not
    change). Idempotent; call before ``deepspeed.initialize`` (``moe_param_groups`` does)."""
    sizes: dict[int, int] = {}
    for _, m in _sharded_layers(model):
        sizes[m.ep_size] = max(sizes.get(m.ep_size, 0), m.num_global_experts)
    if not sizes:
        return model
    marker_cls = sys.modules[__name__].DeepSpeedMoEMarker
    for ep_size, num_experts in sorted(sizes.items()):
        attr = f"_deepspeed_moe_ep{ep_size}"
        if not isinstance(getattr(model, attr, None), marker_cls):
            model.add_module(attr, marker_cls(num_experts=num_experts, ep_size=ep_size))
    return model
