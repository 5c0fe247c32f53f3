"""train.router_lr_scale: the MoE gates' parameters get their own learning rate."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moedist.errors import ConfigError
from moedist.moe import MoELayer
from moedist.train.config import ExperimentConfig
from moedist.train.distributed import optimizer_param_groups, split_router_groups
from moedist.train.loop import TorchStepper


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.moe = MoELayer(in_features=6, out_features=3, num_experts=4, k=2, balance="paper")

    def forward(self, x):
        out, aux = self.moe(self.inp(x))
        return out, aux


def _ids(ps):
    return {id(p) for p in ps}


def test_split_moves_exactly_the_gate_parameters():
    model = Tiny()
    params = list(model.parameters())
    groups = split_router_groups([{"params": params, "name": "dense"}], model, lr=1e-3, scale=10.0)
    assert [g["name"] for g in groups] == ["dense", "dense-router"]
    assert _ids(groups[1]["params"]) == _ids(model.moe.gate.parameters())
    assert groups[1]["lr"] == pytest.approx(1e-2) and "lr" not in groups[0]
    assert _ids(groups[0]["params"]) | _ids(groups[1]["params"]) == _ids(params)
    assert not _ids(groups[0]["params"]) & _ids(groups[1]["params"])
    same = [{"params": params}]
    assert split_router_groups(same, model, lr=1e-3, scale=1.0) is same
    with pytest.raises(ConfigError, match="router_lr_scale"):
        split_router_groups(same, model, lr=1e-3, scale=0.0)


def test_optimizer_param_groups_keeps_the_router_apart():
    cfg = ExperimentConfig()
    cfg.train.router_lr_scale = 5.0
    groups = optimizer_param_groups(Tiny(), cfg)
    assert [g["name"] for g in groups] == ["dense", "dense-router"]
    assert groups[1]["lr"] == pytest.approx(5 * cfg.train.lr)


def test_first_adam_step_moves_gates_by_the_scaled_lr():
    # Adam's first step moves every parameter with a nonzero gradient by lr * g / (|g| + eps) ≈ lr.
    torch.manual_seed(0)
    model = Tiny()
    cfg = ExperimentConfig()
    cfg.train.lr, cfg.train.router_lr_scale = 1e-3, 10.0
    stepper = TorchStepper(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, aux = model(torch.randn(32, 5))
    stepper.backward(out.pow(2).mean() + aux.balance_loss)
    stepper.step()
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs()
        expected = 1e-2 if name.startswith("moe.gate.") else 1e-3
        assert moved.max().item() == pytest.approx(expected, rel=1e-3), name


def test_fused_adam_is_the_default_and_makes_the_plain_adam_update():
    torch.manual_seed(0)
    x = torch.randn(32, 5)
    runs = {}
    for fused in (True, False):
        torch.manual_seed(1)
        model = Tiny()
        cfg = ExperimentConfig()
        cfg.train.router_lr_scale = 10.0  # two parameter groups with different lr
        cfg.train.weight_decay = 0.01
        cfg.train.fused_adam = fused
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        stepper = TorchStepper(model, cfg)
        assert bool(stepper.optimizer.defaults["fused"]) is fused
        assert len(stepper.optimizer.param_groups) == 2
        for _ in range(5):
            out, aux = model(x)
            stepper.backward(out.pow(2).mean() + aux.balance_loss)
            stepper.step()
        runs[fused] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ExperimentConfig().train.fused_adam is True
    moved = 0
    for name, p in runs[True].items():
        torch.testing.assert_close(p, runs[False][name], rtol=1e-5, atol=1e-7)
        moved += int((p - init[name]).abs().max() > 1e-3)
    assert moved == len(runs[True])
