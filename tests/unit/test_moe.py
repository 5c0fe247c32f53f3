"""Gates, balance losses, batched experts and the generic MoE layer (moedist.moe)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moedist.moe.experts as experts_module
from moedist.moe import DenseGate, LinearExperts, MoELayer, TopKGate, expert_load, kl_balance_loss
from moedist.moe.dispatch import apply_grouped


def _set_gate(gate: DenseGate, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        gate.proj.weight.copy_(weight)
        gate.proj.bias.copy_(bias)


def test_topk_gate_renormalises_over_kept_logits_and_zeros_the_rest():
    gate = TopKGate(in_features=2, num_experts=4, k=2)
    # logits = x @ Wᵀ + b with W = 0, so logits = b for every token.
    _set_gate(gate, torch.zeros(4, 2), torch.tensor([1.0, 3.0, 0.5, 2.0]))
    out = gate(torch.randn(5, 2))
    kept = torch.tensor([3.0, 2.0])
    w_kept = torch.exp(kept) / torch.exp(kept).sum()  # softmax over the 2 kept logits only
    expected = torch.tensor([0.0, w_kept[0].item(), 0.0, w_kept[1].item()])
    torch.testing.assert_close(out.weights, expected.expand(5, 4))
    assert (out.weights[:, [0, 2]] == 0).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(5))
    # probs stays the dense softmax over all 4 experts (what the balance loss reads).
    torch.testing.assert_close(out.probs, F.softmax(torch.tensor([1.0, 3.0, 0.5, 2.0]), -1).expand(5, 4))
    assert out.topk_idx.tolist() == [[1, 3]] * 5


def test_topk_gate_k_validation():
    with pytest.raises(ValueError):
        TopKGate(in_features=2, num_experts=4, k=5)


def test_dense_gate_is_softmax_and_noise_only_in_training():
    torch.manual_seed(0)
    gate = DenseGate(in_features=3, num_experts=4, noise_std=1.0)
    x = torch.randn(6, 3)
    gate.eval()
    out = gate(x)
    torch.testing.assert_close(out.weights, F.softmax(gate.proj(x), -1))
    assert out.topk_idx is None
    torch.testing.assert_close(gate(x).weights, out.weights)  # deterministic in eval
    gate.train()
    assert not torch.allclose(gate(x).weights, out.weights)  # noisy in training


@pytest.mark.parametrize("shape", [(1349, 2), (1349, 4), (64, 50, 3), (5, 8), (40, 9), (7, 64), (0, 4)])
def test_gate_softmax_equals_the_last_dim_softmax_in_value_and_gradient(shape):
    """``moe.gates.softmax`` (a transposed view for at most SMALL_SOFTMAX_MAX columns on CPU,
    both sides of the threshold here) against ``F.softmax``, with a -inf entry in every row
    but the last, as MAMEX's fusion masks absent modalities."""
    from moedist.moe.gates import softmax

    torch.manual_seed(0)
    x = (torch.randn(*shape) * 4).requires_grad_()
    masked = torch.zeros(shape, dtype=torch.bool)
    if shape[0]:
        masked[..., :-1, 0] = True
    xm = x.masked_fill(masked, float("-inf"))
    y, ref = softmax(xm), F.softmax(xm, dim=-1)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)
    assert bool((y[masked] == 0).all()) and torch.allclose(y.sum(-1), torch.ones(shape[:-1]))
    g = torch.randn(shape)
    (a,) = torch.autograd.grad((y * g).sum(), x, retain_graph=True)  # xm is shared
    (b,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kl_balance_loss_both_directions_by_hand():
    p = [0.7, 0.1, 0.1, 0.1]
    paper = sum(pi * math.log(pi / 0.25) for pi in p)  # KL(p̄ ‖ U)
    code = sum(0.25 * math.log(0.25 / pi) for pi in p)  # KL(U ‖ p̄)
    t = torch.tensor(p)
    assert kl_balance_loss(t, direction="paper").item() == pytest.approx(paper, rel=1e-5)
    assert kl_balance_loss(t, direction="code").item() == pytest.approx(code, rel=1e-5)
    assert paper != pytest.approx(code, rel=1e-3)
    # "code" is exactly what the MAMEX authors compute.
    ref = F.kl_div(t.log(), torch.full((4,), 0.25), reduction="sum")
    torch.testing.assert_close(kl_balance_loss(t, direction="code"), ref)
    for direction in ("paper", "code"):
        assert kl_balance_loss(torch.full((4,), 0.25), direction=direction).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        kl_balance_loss(t, direction="other")


def test_kl_balance_loss_dead_expert_is_finite_with_finite_grad():
    p = torch.tensor([0.5, 0.5, 0.0], requires_grad=True)
    for direction in ("paper", "code"):
        loss = kl_balance_loss(p, direction=direction)
        (g,) = torch.autograd.grad(loss, p)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert kl_balance_loss(p, direction="code").item() > 5.0  # punishes the dead expert hard


def test_linear_experts_equal_a_loop_of_linears():
    torch.manual_seed(0)
    linears = [nn.Linear(5, 3) for _ in range(4)]
    experts = LinearExperts.from_linears(linears)
    x = torch.randn(7, 5)
    y = experts(x)  # (T, E, out)
    assert y.shape == (7, 4, 3)
    for e, lin in enumerate(linears):
        torch.testing.assert_close(y[:, e], lin(x))
    # Grouped form (after dispatch): each expert on its own tokens.
    xg = torch.randn(4, 2, 5)
    yg = experts.forward_grouped(xg)
    for e, lin in enumerate(linears):
        torch.testing.assert_close(yg[e], lin(xg[e]))
    # Leading dims are kept.
    assert experts(torch.randn(2, 3, 5)).shape == (2, 3, 4, 3)


def _routing(case: str, E: int, k: int, shape: tuple) -> torch.Tensor:
    if case == "collapsed":  # every token picks experts 4 and 1: one expert's block holds all
        return torch.tensor([4, 1]).expand(*shape, 2).contiguous()
    if case == "balanced":  # token t picks t mod 5 and t+2 mod 5 (random order): 4 of 9 at most
        t = torch.arange(shape[0])
        idx = torch.stack([(t + 2) % E, t % E], -1)
        return torch.where(torch.rand(shape[0], 1) < 0.5, idx, idx.flip(-1))
    return torch.rand(*shape, E).argsort(-1)[..., :k]


def _selected_case(case: str, kernel: str):
    """5 experts of 8 -> 4 (16-byte rows, so grouped_mm applies), top-2 unless k = E; tokens
    ``[9]``, ``[3, 4]`` (leading dims) or none; routing from :func:`_routing`."""
    torch.manual_seed(1)
    E, k, shape = 5, 2, (9,)
    if case == "k_equals_e":
        k = E
    if case == "leading_dims":
        shape = (3, 4)
    if case == "no_tokens":
        shape = (0,)
    experts = LinearExperts(num_experts=E, in_features=8, out_features=4)
    experts.sorted_kernel = kernel
    x = torch.randn(*shape, 8, requires_grad=True)
    return experts, x, _routing(case, E, k, shape), shape, k


@pytest.mark.parametrize("kernel", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize(
    "case",
    ["balanced", "collapsed", "k_equals_e", "leading_dims", "no_tokens"],
)
def test_forward_selected_computes_only_the_chosen_experts_with_the_gradients_of_the_dense_form(case, kernel):
    experts, x, idx, shape, k = _selected_case(case, kernel)
    w = torch.rand(*shape, k, requires_grad=True)
    y = experts.forward_selected(x, idx)
    assert y.shape == (*shape, k, 4)
    # the reference: every expert on every token, then pick
    dense = experts(x).gather(-2, idx.unsqueeze(-1).expand(*idx.shape, 4))
    torch.testing.assert_close(y, dense)
    out = torch.einsum("...k,...ko->...o", w, y)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [experts.weight, experts.bias, x, w], allow_unused=True)
    ref_out = torch.einsum("...k,...ko->...o", w, dense)
    ref = torch.autograd.grad((ref_out * g).sum(), [experts.weight, experts.bias, x, w], allow_unused=True)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
    if case == "collapsed":  # unselected experts get no gradient at all
        assert grads[0][[0, 2, 3]].abs().sum() == 0 and grads[0][[1, 4]].abs().sum() > 0


@pytest.mark.parametrize("kernel", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("grouped", ["always", "default"])
@pytest.mark.parametrize("case", ["balanced", "collapsed", "k_equals_e", "leading_dims", "no_tokens"])
def test_forward_topk_selects_unless_that_costs_nearly_every_expert_with_the_same_values_and_gradients(
    case, grouped, kernel, monkeypatch
):
    experts, x, idx, shape, k = _selected_case(case, kernel)
    if grouped == "always":
        experts.grouped_max_fill = 1.0
    calls = []  # the selected-experts forms: apply_grouped (padded bmm), _topk_grouped (grouped_mm)
    monkeypatch.setattr(experts_module, "apply_grouped", lambda *a, **kw: calls.append("padded") or apply_grouped(*a, **kw))
    topk_grouped = experts._topk_grouped
    monkeypatch.setattr(experts, "_topk_grouped", lambda *a: calls.append("grouped") or topk_grouped(*a))
    w_k = torch.rand(*shape, k)
    weights = torch.zeros(*shape, experts.num_experts).scatter(-1, idx, w_k).requires_grad_()  # zero outside idx
    out = experts.forward_topk(x, weights, idx)
    assert out.shape == (*shape, 4)
    # the form that ran: the selected experts unless that costs more than 60% of the rows of
    # every expert on every token (E·T): T·k rows with grouped_mm, E·C with the padded block
    # (C = the busiest expert's count)
    T = idx.numel() // k
    counts = torch.bincount(idx.reshape(-1), minlength=experts.num_experts)
    rows = T * k if kernel == "grouped_mm" else experts.num_experts * int(counts.max() if T else 0)
    every_expert = rows > 0.6 * experts.num_experts * T
    if case == "k_equals_e" or (kernel == "padded_bmm" and case == "collapsed"):
        assert every_expert
    assert bool(calls) != (grouped == "default" and every_expert)
    assert set(calls) <= {"grouped" if kernel == "grouped_mm" else "padded"}
    ref_out = torch.einsum("...e,...eo->...o", weights, experts(x))  # every expert, dense weights
    torch.testing.assert_close(out, ref_out)
    g = torch.randn_like(out)
    params = [experts.weight, experts.bias, x, weights]
    grads = torch.autograd.grad((out * g).sum(), params, allow_unused=True)
    ref = torch.autograd.grad((ref_out * g).sum(), params, allow_unused=True)
    for name, a, b in zip(("weight", "bias", "x", "weights"), grads, ref):
        if name == "weights" and calls:  # grouped: only the kept weights are read
            mask = torch.zeros_like(weights).scatter(-1, idx, 1.0).bool()
            a = torch.zeros_like(b) if a is None else a
            torch.testing.assert_close(a[mask], b[mask])
            assert a[~mask].abs().sum() == 0
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("experts,k,selects", [(4, 2, True), (6, 3, True), (8, 4, True), (6, 4, False), (4, 3, False)])
def test_forward_topk_evaluates_every_expert_above_a_fill_of_60_percent(experts, k, selects, monkeypatch):
    layer = LinearExperts(num_experts=experts, in_features=8, out_features=4)
    calls = []
    topk_grouped = layer._topk_grouped
    monkeypatch.setattr(layer, "_topk_grouped", lambda *a: calls.append(1) or topk_grouped(*a))
    x = torch.randn(30, 8)
    idx = torch.stack([torch.randperm(experts)[:k] for _ in range(30)])  # k distinct experts per token
    weights = torch.zeros(30, experts).scatter(-1, idx, torch.rand(30, k))
    out = layer.forward_topk(x, weights, idx)
    assert bool(calls) is selects
    torch.testing.assert_close(out, torch.einsum("te,teo->to", weights, layer(x)))


def test_sorted_kernel_choice():
    x = torch.zeros(2, 8)
    assert LinearExperts(num_experts=2, in_features=8, out_features=4)._kernel(x) == "grouped_mm"
    # grouped_mm's rows must be multiples of 16 bytes: 6 float32 features are not
    assert LinearExperts(num_experts=2, in_features=6, out_features=4)._kernel(x) == "padded_bmm"
    assert LinearExperts(num_experts=2, in_features=8, out_features=3)._kernel(x) == "padded_bmm"
    experts = LinearExperts(num_experts=2, in_features=8, out_features=4)
    experts.sorted_kernel = "padded_bmm"
    assert experts._kernel(x) == "padded_bmm"
    experts.sorted_kernel = "loop"
    with pytest.raises(ValueError, match="sorted_kernel"):
        experts.forward_selected(x, torch.zeros(2, 1, dtype=torch.long))


def test_a_torch_without_cpu_grouped_mm_takes_the_padded_bmm_path_with_the_same_result(monkeypatch):
    """pyproject admits PyTorch releases older than CPU ``grouped_mm``: those take padded bmm."""
    torch.manual_seed(4)
    layer = MoELayer(in_features=8, out_features=4, num_experts=4, k=2, balance="paper")
    x = torch.randn(40, 8)
    assert experts_module.cpu_grouped_mm_available()  # the pinned stack has it
    assert layer.experts._kernel(x) == "grouped_mm"
    want = layer(x)[0]

    def missing(*args, **kwargs):
        raise RuntimeError("grouped_mm: no CPU kernel in this build")

    monkeypatch.setattr(experts_module, "_CPU_GROUPED_MM", None)
    monkeypatch.setattr(experts_module.F, "grouped_mm", missing)
    assert not experts_module.cpu_grouped_mm_available()
    assert layer.experts._kernel(x) == "padded_bmm"
    torch.testing.assert_close(layer(x)[0], want)  # would raise if grouped_mm were still called
    monkeypatch.delattr(experts_module.F, "grouped_mm")  # a release without the function at all
    monkeypatch.setattr(experts_module, "_CPU_GROUPED_MM", None)
    assert not experts_module.cpu_grouped_mm_available()


def test_moe_layer_sparse_and_dense_topk_forms_agree_in_value_and_gradient():
    torch.manual_seed(2)
    layer = MoELayer(in_features=8, out_features=4, num_experts=8, k=2, balance="paper")
    x = torch.randn(50, 8)
    results = []
    for sparse in (True, False):
        layer.sparse_topk = sparse
        layer.zero_grad()
        out, aux = layer(x)
        ((out ** 2).sum() + aux.balance_loss).backward()
        results.append((out.detach(), [p.grad.clone() for p in layer.parameters()]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_linear_experts_init_matches_stacked_nn_linear_and_is_shard_independent():
    torch.manual_seed(3)
    experts = LinearExperts(num_experts=4, in_features=6, out_features=2)
    torch.manual_seed(3)
    linears = [nn.Linear(6, 2) for _ in range(4)]
    for e, lin in enumerate(linears):
        torch.testing.assert_close(experts.weight[e], lin.weight.T, rtol=0, atol=0)
        torch.testing.assert_close(experts.bias[e], lin.bias, rtol=0, atol=0)
    # A shard holding global experts 2..3 starts from the same values.
    torch.manual_seed(3)
    shard = LinearExperts(num_experts=2, in_features=6, out_features=2, expert_offset=2, num_global_experts=4)
    assert shard.global_expert_ids.tolist() == [2, 3]
    torch.testing.assert_close(shard.weight, experts.weight[2:], rtol=0, atol=0)
    torch.testing.assert_close(shard.bias, experts.bias[2:], rtol=0, atol=0)
    assert "global_expert_ids" not in shard.state_dict()
    with pytest.raises(ValueError):
        LinearExperts(num_experts=3, in_features=2, out_features=2, expert_offset=2, num_global_experts=4)


def test_expert_load_counts_nonzero_weights_and_respects_mask():
    w = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    load, gmean = expert_load(w)
    torch.testing.assert_close(load, torch.tensor([3 / 4, 3 / 4, 2 / 4]))
    torch.testing.assert_close(gmean, w.mean(0))
    mask = torch.tensor([True, True, False, False])
    load, gmean = expert_load(w, probs=torch.full_like(w, 1 / 3), mask=mask)
    torch.testing.assert_close(load, torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(gmean, torch.full((3,), 1 / 3))


def test_moe_layer_topk_matches_manual_combination():
    torch.manual_seed(0)
    layer = MoELayer(in_features=4, out_features=3, num_experts=4, k=2, gate_in_features=5, balance="code")
    x, gx = torch.randn(6, 4), torch.randn(6, 5)
    out, aux = layer(x, gate_input=gx)
    logits = layer.gate.proj(gx)
    top_v, top_i = logits.topk(2, -1)
    w = F.softmax(top_v, -1)
    manual = torch.zeros(6, 3)
    for t in range(6):
        for j in range(2):
            e = top_i[t, j]
            manual[t] += w[t, j] * (x[t] @ layer.experts.weight[e] + layer.experts.bias[e])
    torch.testing.assert_close(out, manual)
    # Balance loss on the *dense* probs averaged over tokens.
    p_bar = F.softmax(logits, -1).mean(0)
    torch.testing.assert_close(aux.balance_loss, kl_balance_loss(p_bar, direction="code"))
    assert aux.load.sum().item() == pytest.approx(2.0)  # every token goes to exactly 2 experts
    torch.testing.assert_close(aux.gate_mean, p_bar.detach())
    aux.balance_loss.backward()
    assert layer.gate.proj.weight.grad.abs().sum() > 0


def test_moe_layer_dense_default_gate_input_and_no_balance():
    torch.manual_seed(1)
    layer = MoELayer(in_features=4, out_features=2, num_experts=3, balance=None)
    x = torch.randn(2, 5, 4)  # leading dims are kept
    out, aux = layer(x)
    g = F.softmax(layer.gate.proj(x), -1)
    manual = torch.einsum("bte,bteo->bto", g, layer.experts(x))
    torch.testing.assert_close(out, manual)
    assert out.shape == (2, 5, 2)
    assert aux.balance_loss.item() == 0.0
    torch.testing.assert_close(aux.load, torch.ones(3))
    # The paper direction is KL(p̄ ‖ U).
    layer.balance = "paper"
    _, aux = layer(x)
    torch.testing.assert_close(aux.balance_loss, kl_balance_loss(g.reshape(-1, 3).mean(0), direction="paper"))


def test_moe_layer_mask_restricts_balance_and_stats_to_real_tokens():
    torch.manual_seed(2)
    layer = MoELayer(in_features=3, out_features=2, num_experts=4, k=1, balance="paper")
    x = torch.randn(6, 3)
    mask = torch.tensor([True, False, True, True, False, False])
    _, aux = layer(x, mask=mask)
    _, aux_sub = layer(x[mask])
    torch.testing.assert_close(aux.balance_loss, aux_sub.balance_loss)
    torch.testing.assert_close(aux.load, aux_sub.load)
    torch.testing.assert_close(aux.gate_mean, aux_sub.gate_mean)
    _, aux_none = layer(x, mask=torch.zeros(6, dtype=torch.bool))
    assert aux_none.balance_loss.item() == 0.0 and aux_none.load.sum().item() == 0.0


def test_moe_layer_leaves_the_balance_loss_to_the_caller_as_token_sums_that_add_up():
    """balance_sums=True: the sums of two halves of the tokens give the whole set's loss."""
    from moedist.moe.gates import balance_from_sums

    torch.manual_seed(4)
    layer = MoELayer(in_features=3, out_features=2, num_experts=4, k=2, balance="code")
    x = torch.randn(7, 3)
    mask = torch.tensor([True, True, False, True, True, True, False])
    out, aux = layer(x, mask=mask)
    parts = [layer(x[s], mask=mask[s], balance_sums=True) for s in (slice(0, 3), slice(3, None))]
    assert all(a.balance_loss.item() == 0.0 for _, a in parts)
    torch.testing.assert_close(torch.cat([o for o, _ in parts]), out)
    total = sum(a.balance_sums[0] for _, a in parts)
    n = sum(a.balance_sums[1] for _, a in parts)
    assert n.item() == 5.0
    torch.testing.assert_close(total, layer.gate(x).probs[mask].sum(0))
    torch.testing.assert_close(balance_from_sums(total, n, direction="code"), aux.balance_loss)
    assert balance_from_sums(torch.zeros(4), torch.zeros(1)).item() == 0.0  # no tokens: no signal


def test_routing_entropy_by_hand():
    from moedist.moe import routing_entropy

    uniform = torch.full((3, 4), 0.25)
    assert routing_entropy(uniform).item() == pytest.approx(1.0)
    one_hot = torch.eye(4)
    assert routing_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])  # H = log 2, normalised by log 4
    assert routing_entropy(half).item() == pytest.approx(0.5)
    # leading dims are flattened; the mask picks tokens: (uniform + one-hot) / 2, (uniform + half) / 2
    mixed = torch.stack([uniform[0], one_hot[0], uniform[1], half[0]]).reshape(2, 2, 4)
    assert routing_entropy(mixed, mask=torch.tensor([[True, True], [False, False]])).item() == pytest.approx(0.5)
    assert routing_entropy(mixed, mask=torch.tensor([[False, False], [True, True]])).item() == pytest.approx(0.75)
    assert routing_entropy(mixed).item() == pytest.approx(2.5 / 4)
    assert routing_entropy(mixed, mask=torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    assert routing_entropy(torch.ones(5, 1)).item() == 0.0  # one expert: nothing to choose


def test_moe_layer_reports_the_routing_entropy_of_its_real_tokens():
    from moedist.moe import routing_entropy

    torch.manual_seed(3)
    layer = MoELayer(in_features=3, out_features=2, num_experts=4, k=2, balance="paper")
    x = torch.randn(5, 3) * 10
    mask = torch.tensor([True, True, False, True, False])
    _, aux = layer(x, mask=mask)
    probs = F.softmax(layer.gate.proj(x[mask]), -1)
    expected = (-(probs * probs.log()).sum(-1) / math.log(4)).mean()
    torch.testing.assert_close(aux.entropy, expected.detach())
    torch.testing.assert_close(aux.entropy, routing_entropy(layer.gate(x).probs, mask=mask))
    assert 0.0 < aux.entropy.item() < 1.0


def test_topk_moe_learns_a_piecewise_linear_map_that_one_linear_layer_cannot():
    """The gate really learns to route: inputs come from 4 clusters, each mapped by its own
    linear map. A top-2 MoE with 4 experts (MAMEX's adapter) must fit it far better than one
    linear layer, pick its top expert by cluster, and end with near one-hot routing."""
    g = torch.Generator().manual_seed(0)
    C, D, d, n = 4, 8, 4, 1024
    centers = torch.randn(C, D, generator=g) * 3
    maps = torch.randn(C, D, d, generator=g)
    cluster = torch.randint(0, C, (n,), generator=g)
    x = centers[cluster] + torch.randn(n, D, generator=g)
    y = torch.einsum("nD,nDd->nd", x, maps[cluster])  # y: (n, d)
    torch.manual_seed(0)
    moe = MoELayer(in_features=D, out_features=d, num_experts=C, k=2, balance="paper")
    lin = nn.Linear(D, d)

    def fit(module, forward) -> float:
        opt = torch.optim.Adam(module.parameters(), lr=0.02)
        for _ in range(600):
            out, extra = forward(module)
            loss = F.mse_loss(out, y) + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (F.mse_loss(forward(module)[0], y) / y.pow(2).mean()).item()

    err_moe = fit(moe, lambda m: (lambda o, a: (o, 0.1 * a.balance_loss))(*m(x)))
    err_lin = fit(lin, lambda m: (m(x), 0.0))
    # a gate that does not learn leaves a fixed mixture: one linear map, the linear error
    assert err_moe < 0.3 * err_lin, (err_moe, err_lin)
    with torch.no_grad():
        _, aux = moe(x)
        top = moe.gate(x).probs.argmax(-1)
    counts = torch.stack([torch.bincount(top[cluster == c], minlength=C) for c in range(C)])  # (C, E)
    # the top expert is (almost) a function of the cluster; two clusters may share a top
    # expert and differ in the second one, which top-2 also weighs
    assert counts.max(1).values.sum().item() / n > 0.85, counts
    assert aux.entropy.item() < 0.3  # near one-hot routing (1 = uniform)
