"""Mixture-of-Experts building blocks: gates, batched experts, balance losses, and expert
parallelism (``ep_size``: dispatch.py, parallel.py, checkpoint.py)."""
from moedist.moe.checkpoint import gather_expert_state, load_sharded_state, shard_state
from moedist.moe.dispatch import expert_parallel_apply
from moedist.moe.experts import LinearExperts, MoELayer
from moedist.moe.gates import (
    DenseGate,
    GateOutput,
    MoEAux,
    TopKGate,
    expert_load,
    kl_balance_loss,
    routing_entropy,
)
from moedist.moe.parallel import (
    ExpertParallelGroups,
    allreduce_gradients,
    expert_split,
    init_expert_parallel,
    moe_param_groups,
    prepare_deepspeed_moe,
)

__all__ = [
    "DenseGate",
    "ExpertParallelGroups",
    "GateOutput",
    "LinearExperts",
    "MoEAux",
    "MoELayer",
    "TopKGate",
    "allreduce_gradients",
    "expert_load",
    "expert_parallel_apply",
    "expert_split",
    "gather_expert_state",
    "init_expert_parallel",
    "kl_balance_loss",
    "load_sharded_state",
    "moe_param_groups",
    "prepare_deepspeed_moe",
    "routing_entropy",
    "shard_state",
]
