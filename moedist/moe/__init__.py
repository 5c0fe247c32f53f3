"""Mixture-of-Experts building blocks: gates, batched experts, balance losses."""
from moedist.moe.experts import LinearExperts, MoELayer
from moedist.moe.gates import (
    DenseGate,
    GateOutput,
    MoEAux,
    TopKGate,
    expert_load,
    kl_balance_loss,
)

__all__ = [
    "DenseGate",
    "GateOutput",
    "LinearExperts",
    "MoEAux",
    "MoELayer",
    "TopKGate",
    "expert_load",
    "kl_balance_loss",
]
