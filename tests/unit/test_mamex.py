"""MAMEX (moedist.models.mamex): shapes, gradients, every loss term by hand, top-k routing,
ablations, missing-modality masking, cold items scored from content."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from moedist.errors import ConfigError
from moedist.models.mamex import MAMEX, MAMEXAux, MAMEXConfig
from moedist.moe import LinearExperts, MoELayer, TopKGate

torch.set_num_threads(1)

N = 9  # 8 items + padding row 0
USERS = 6  # 5 users + padding row 0
D_IMG, D_TXT, D = 6, 5, 8


@dataclass
class Feats:
    features: dict
    mask: dict


def make_features(seed: int = 0, *, missing_image: tuple[int, ...] = ()) -> Feats:
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(N, D_IMG, generator=gen)
    txt = torch.randn(N, D_TXT, generator=gen)
    img[0] = 0
    txt[0] = 0
    mask_img = torch.ones(N, dtype=torch.bool)
    mask_img[0] = False
    mask_txt = mask_img.clone()
    for i in missing_image:
        img[i] = 0
        mask_img[i] = False
    return Feats({"image": img, "text": txt}, {"image": mask_img, "text": mask_txt})


def make_model(seed: int = 0, feats: Feats | None = None, **cfg) -> MAMEX:
    torch.manual_seed(seed)
    cfg.setdefault("embed_dim", D)
    return MAMEX(MAMEXConfig(**cfg), n_items=N, n_users=USERS, item_features=feats or make_features())


BATCH = {
    "user": torch.tensor([1, 2, 3, 5]),
    "pos_item": torch.tensor([1, 4, 2, 7]),
    "neg_item": torch.tensor([3, 8, 6, 5]),
}


# ------------------------------------------------------------------ shapes, gradients


@pytest.mark.parametrize("adapter", ["mamex", "modality_router", "joint_router"])
def test_shapes_and_parts(adapter):
    model = make_model(adapter=adapter)
    e, z, aux = model.item_representations()
    assert e.shape == (N, D) and set(z) == {"image", "text"}
    assert all(t.shape == (N, D) for t in z.values())
    assert isinstance(aux, MAMEXAux) and aux.alpha.shape == (N, 2)
    assert torch.all(e[0] == 0)  # padding row has no modality
    loss, parts = model.calculate_loss(BATCH)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(parts) == {"bpr", "reg", "align", "adapter", "fusion"}
    model.eval()
    assert model.full_sort_predict({"user": torch.tensor([1, 2])}).shape == (2, N)
    assert model.fusion_weights().shape == (N, 2)


@pytest.mark.parametrize("adapter", ["mamex", "modality_router", "joint_router"])
def test_gradient_reaches_every_parameter_and_no_feature(adapter):
    feats = make_features(missing_image=(3,))
    model = make_model(adapter=adapter, feats=feats, fusion_dropout=0.0)
    loss, _ = model.calculate_loss(BATCH)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    # features are frozen buffers: not parameters, no grad
    names = {n for n, _ in model.named_parameters()}
    assert not any("feat_" in n for n in names)
    for m in ("image", "text"):
        assert not model.features(m).requires_grad and model.features(m).grad is None
    # non-persistent: not in checkpoints
    assert not any(k.startswith("feat_") or k.startswith("present_") for k in model.state_dict())


def test_features_are_l2_normalised():
    model = make_model()
    norms = model.features("image").norm(dim=1)
    assert norms[0] == 0
    assert torch.allclose(norms[1:], torch.ones(N - 1), atol=1e-6)


# ------------------------------------------------------------------ each loss term by hand


def _fake_items(model, e, z, *, adapter_loss=0.0, fusion_loss=0.0):
    aux = MAMEXAux(
        adapter_loss=torch.tensor(adapter_loss), fusion_loss=torch.tensor(fusion_loss),
        alpha=torch.zeros(e.shape[0], 2), adapters={}, align_loss=model.align_loss(e, z),
    )
    model.item_representations = lambda: (e, z, aux)


def test_bpr_reg_align_by_hand():
    # 2 real items, d = 2
    feats = Feats(
        {"image": torch.randn(3, 4), "text": torch.randn(3, 4)},
        {"image": torch.tensor([False, True, True]), "text": torch.tensor([False, True, True])},
    )
    torch.manual_seed(0)
    model = MAMEX(MAMEXConfig(embed_dim=2, lambda_adapter=0.5, lambda_fusion=0.25, reg_coeff=0.1),
                  n_items=3, n_users=2, item_features=feats)
    with torch.no_grad():
        model.user_embedding.weight[1] = torch.tensor([1.0, 2.0])
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = {"image": torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]),
         "text": torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])}
    _fake_items(model, e, z, adapter_loss=0.4, fusion_loss=0.8)
    batch = {"user": torch.tensor([1]), "pos_item": torch.tensor([1]), "neg_item": torch.tensor([2])}
    loss, parts = model.calculate_loss(batch)
    # s_ui = [1,2]·[1,0] = 1, s_uj = [1,2]·[0,1] = 2 -> BPR = softplus(2 - 1) = ln(1 + e)
    assert parts["bpr"].item() == pytest.approx(math.log(1 + math.e))  # 1.31326
    # reg = |e_u|² + |e_i|² + |e_j|² = 5 + 1 + 1 = 7
    assert parts["reg"].item() == pytest.approx(7.0)
    # align, over the 2 real items × 2 dims (row 0 excluded):
    #   image: e - z = [0,-1], [0,1] -> (0+1+0+1)/4 = 0.5
    #   text:  e - z = [0, 0], [0,-2] -> (0+0+0+4)/4 = 1.0
    assert parts["align"].item() == pytest.approx(1.5)
    # total = 1.31326 + 0.1·7 + 1·1.5 + 0.5·0.4 + 0.25·0.8
    assert loss.item() == pytest.approx(math.log(1 + math.e) + 0.7 + 1.5 + 0.2 + 0.2)

    # item 2 lacks text: its text row drops out of the text term -> text 0/2 = 0, image 0.5
    feats.mask["text"][2] = False
    torch.manual_seed(0)
    model = MAMEX(MAMEXConfig(embed_dim=2), n_items=3, n_users=2, item_features=feats)
    _fake_items(model, e, z)
    assert model.calculate_loss(batch)[1]["align"].item() == pytest.approx(0.5)


# mean gate distribution forced on every item, and the KL values by hand:
P_BAR = [0.7, 0.1, 0.1, 0.1]
# paper KL(p̄‖U) = 0.7 ln(0.7·4) + 3·0.1 ln(0.1·4) = 0.72073 - 0.27489 = 0.44585
KL_PAPER = 0.7 * math.log(2.8) + 0.3 * math.log(0.4)
# code  KL(U‖p̄) = ¼[ln(0.25/0.7) + 3 ln(0.25/0.1)] = ¼[-1.02962 + 2.74887] = 0.42981
KL_CODE = 0.25 * (math.log(0.25 / 0.7) + 3 * math.log(2.5))
ALPHA = [0.8, 0.2]
# paper KL(ᾱ‖U₂) = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.37600 - 0.18326 = 0.19274
FUSION_PAPER = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
# code  KL(U₂‖ᾱ) = ½[ln(0.5/0.8) + ln(0.5/0.2)] = ½[-0.47000 + 0.91629] = 0.22314
FUSION_CODE = 0.5 * (math.log(0.5 / 0.8) + math.log(2.5))


def _force_gates(model, adapter):
    """Constant gate logits: every item's dense gate softmax is P_BAR, α is ALPHA."""
    with torch.no_grad():
        gates = {"mamex": lambda: [l.gate for l in model.adapters.moes.values()],
                 "modality_router": lambda: list(model.adapters.gates.values()),
                 "joint_router": lambda: [model.adapters.gate]}[adapter]()
        for g in gates:
            g.proj.weight.zero_()
            g.proj.bias.copy_(torch.tensor(P_BAR).log())
        last = model.fusion_gate[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor(ALPHA).log())


@pytest.mark.parametrize("direction", ["paper", "code"])
@pytest.mark.parametrize("adapter", ["mamex", "modality_router", "joint_router"])
def test_balance_losses_both_directions(direction, adapter):
    assert KL_PAPER == pytest.approx(0.44585, abs=1e-5) and KL_CODE == pytest.approx(0.42981, abs=1e-5)
    assert FUSION_PAPER == pytest.approx(0.19274, abs=1e-5) and FUSION_CODE == pytest.approx(0.22314, abs=1e-5)
    model = make_model(kl_direction=direction, adapter=adapter)
    _force_gates(model, adapter)
    _, parts = model.calculate_loss(BATCH)
    kl = KL_PAPER if direction == "paper" else KL_CODE
    n_terms = 1 if adapter == "joint_router" else 2  # summed over the two modalities
    assert parts["adapter"].item() == pytest.approx(n_terms * kl, rel=1e-5)
    fusion = FUSION_PAPER if direction == "paper" else FUSION_CODE
    assert parts["fusion"].item() == pytest.approx(fusion, rel=1e-5)


def test_adapter_balance_uses_dense_probs_over_present_catalogue_items():
    feats = make_features(missing_image=(2, 5))
    model = make_model(feats=feats, kl_direction="code")
    _, _, aux = model.item_representations()
    total = 0.0
    for m, D_m in (("image", D_IMG), ("text", D_TXT)):
        layer = model.adapters.moes[m]
        keep = model.present(m)
        probs = F.softmax(layer.gate.proj(model.features(m)[keep]), dim=-1)  # dense, all K
        p_bar = probs.mean(0)
        total += (0.25 * (math.log(0.25) - p_bar.log())).sum().item()
        assert torch.allclose(aux.adapters[m].gate_mean, p_bar, atol=1e-6)
    assert aux.adapter_loss.item() == pytest.approx(total, rel=1e-5)


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_routing_exactly_k_experts(k):
    model = make_model(top_k=k)
    layer = model.adapters.moes["text"]
    assert isinstance(layer, MoELayer) and isinstance(layer.gate, TopKGate)
    g = layer.gate(model.features("text")[1:])
    nonzero = (g.weights != 0).sum(dim=1)
    assert torch.all(nonzero == k)
    assert torch.allclose(g.weights.sum(dim=1), torch.ones(N - 1), atol=1e-6)
    model.item_representations()
    stats = model.moe_stats()
    # every real item is routed to k experts, so the per-expert loads sum to k
    assert stats["adapter.text.load"].sum().item() == pytest.approx(k)
    assert stats["adapter.image.gate_mean"].sum().item() == pytest.approx(1.0, abs=1e-5)
    probs = F.softmax(layer.gate.proj(model.features("text")[model.present("text")]), dim=-1)
    entropy = (-(probs * probs.log()).sum(-1) / math.log(probs.shape[-1])).mean()
    assert stats["adapter.text.entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    assert set(stats) >= {"fusion.alpha_mean.image", "fusion.alpha_mean.text", "fusion.alpha_std.text"}
    assert stats["fusion.alpha_mean.image"] + stats["fusion.alpha_mean.text"] == pytest.approx(1.0)


def test_adapter_designs_share_what_they_should():
    shared = make_model(adapter="modality_router").adapters
    assert isinstance(shared.experts, LinearExperts) and set(shared.gates) == {"image", "text"}
    assert shared.experts.in_features == max(D_IMG, D_TXT)  # zero-padded common width
    joint = make_model(adapter="joint_router").adapters
    assert joint.gate.proj.in_features == D_IMG + D_TXT  # one router on the concatenation
    model = make_model(adapter="joint_router")
    model.item_representations()
    assert {"adapter.joint.load", "adapter.joint.gate_mean", "adapter.joint.entropy"} <= set(model.moe_stats())
    assert 0.0 < model.moe_stats()["adapter.joint.entropy"].item() <= 1.0


# ------------------------------------------------------------------ ablations


def test_without_moe_has_no_moe_parameters_or_term():
    model = make_model(use_moe=False)
    assert not any(isinstance(mod, (MoELayer, TopKGate, LinearExperts)) for mod in model.modules())
    assert all(isinstance(model.adapters.linears[m], torch.nn.Linear) for m in ("image", "text"))
    _, parts = model.calculate_loss(BATCH)
    assert "adapter" not in parts and "align" in parts and "fusion" in parts


def test_without_fusion_is_a_fixed_average():
    model = make_model(use_fusion=False, feats=make_features(missing_image=(4,)))
    assert model.fusion_gate is None
    alpha = model.fusion_weights()
    both = torch.tensor([i not in (0, 4) for i in range(N)])
    assert torch.all(alpha[both] == 0.5)
    assert alpha[4].tolist() == [0.0, 1.0]  # only text present: the average is text alone
    e, z, _ = model.item_representations()
    assert torch.allclose(e[1], 0.5 * (z["image"][1] + z["text"][1]))
    _, parts = model.calculate_loss(BATCH)
    assert "fusion" not in parts


def test_without_align_drops_the_term():
    model = make_model(use_align=False, fusion_dropout=0.0)
    loss, parts = model.calculate_loss(BATCH)
    assert "align" not in parts
    expected = parts["bpr"] + 1e-6 * parts["reg"] + parts["adapter"] + parts["fusion"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_single_modality_has_no_fusion():
    model = make_model(modalities=("text",))
    e, z, aux = model.item_representations()
    assert model.fusion_gate is None and torch.allclose(e, z["text"])
    assert set(model.calculate_loss(BATCH)[1]) == {"bpr", "reg", "align", "adapter"}


@pytest.mark.parametrize("adapter,use_moe,use_fusion", [
    ("mamex", True, True), ("modality_router", True, True), ("joint_router", True, True),
    ("mamex", False, True), ("mamex", True, False),
])
def test_complete_catalogue_shortcut_equals_the_masked_pass(adapter, use_moe, use_fusion):
    """Every real item has every modality: the pass over rows 1.. without masking gives the
    same item table, adapter outputs, α, every loss term, statistics and gradients as the
    general masked pass over all rows."""
    results = []
    for complete in (True, False):
        model = make_model(adapter=adapter, use_moe=use_moe, use_fusion=use_fusion).eval()  # dropout off
        assert model._complete
        model._complete = complete
        e, z, aux = model.item_representations()
        loss, parts = model.calculate_loss(BATCH)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((e, z, aux.alpha, parts, model.moe_stats(), grads))
    (e1, z1, a1, p1, s1, g1), (e0, z0, a0, p0, s0, g0) = results
    torch.testing.assert_close(e1, e0)
    assert e1[0].abs().sum() == 0 and a1[0].abs().sum() == 0  # padding row
    for m in z0:
        torch.testing.assert_close(z1[m], z0[m])
    torch.testing.assert_close(a1, a0)
    assert p1.keys() == p0.keys()
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k])
    assert s1.keys() == s0.keys()
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k])
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n])


def test_missing_modality_turns_the_shortcut_off():
    assert not make_model(feats=make_features(missing_image=(3,)))._complete


def test_config_validation():
    with pytest.raises(ConfigError):
        MAMEXConfig(top_k=5)
    with pytest.raises(ConfigError):
        MAMEXConfig(adapter="shared")
    with pytest.raises(ConfigError):
        MAMEXConfig(kl_direction="forward")
    with pytest.raises(ConfigError):
        make_model(modalities=("image", "audio"))


# ------------------------------------------------------------------ missing modalities


@pytest.mark.parametrize("adapter", ["mamex", "modality_router", "joint_router"])
def test_missing_image_gets_zero_weight_and_no_influence(adapter):
    a = make_features(seed=0, missing_image=(3,))
    b = make_features(seed=0, missing_image=(3,))
    b.features["image"][3] = torch.randn(D_IMG) * 10  # garbage in the absent row
    m1 = make_model(seed=1, feats=a, adapter=adapter).eval()
    m2 = make_model(seed=1, feats=b, adapter=adapter).eval()
    alpha = m1.fusion_weights()
    assert alpha[3].tolist() == [0.0, 1.0]  # α_image = 0: the logit was -inf
    assert torch.all(alpha[0] == 0)  # padding row
    assert torch.all(alpha[1:].sum(1).sub(1).abs() < 1e-6)
    users = {"user": torch.arange(1, USERS)}
    assert torch.equal(m1.full_sort_predict(users), m2.full_sort_predict(users))
    m1.train()
    m2.train()
    torch.manual_seed(5)
    l1, p1 = m1.calculate_loss(BATCH)
    torch.manual_seed(5)
    l2, p2 = m2.calculate_loss(BATCH)
    assert l1.item() == l2.item()  # nor on any loss term (balance, align)


def test_missing_image_excluded_from_balance_stats():
    model = make_model(feats=make_features(missing_image=(2, 3, 4, 5, 6, 7, 8)))  # only item 1 has an image
    model.item_representations()
    stats = model.moe_stats()
    # one item with an image, routed to top_k = 2 experts: loads are 0 or 1 (fractions of 1 item)
    assert sorted(stats["adapter.image.load"].tolist()) == [0.0, 0.0, 1.0, 1.0]


# ------------------------------------------------------------------ cold items, evaluation cache


def test_cold_items_scored_from_content_only():
    """Two planted clusters; users 1-3 like cluster A, users 4-6 cluster B. Train on warm
    items only; unseen cold items of each cluster rank for the right users."""
    torch.manual_seed(0)
    n_items, n_users, dim = 21, 7, 6  # 20 items + pad, 6 users + pad
    centre_a, centre_b = torch.randn(dim), torch.randn(dim)
    cluster = torch.tensor([0] + [1 + (i % 2) for i in range(1, n_items)])  # 1 = A, 2 = B
    feats = torch.zeros(n_items, dim)
    feats[cluster == 1] = centre_a + 0.1 * torch.randn(int((cluster == 1).sum()), dim)
    feats[cluster == 2] = centre_b + 0.1 * torch.randn(int((cluster == 2).sum()), dim)
    present = cluster > 0
    item_features = Feats({"image": feats.clone(), "text": feats.clone()}, {"image": present, "text": present.clone()})
    cold = torch.tensor([17, 18, 19, 20])  # never trained on
    warm = torch.arange(1, 17)
    model = MAMEX(MAMEXConfig(embed_dim=8), n_items=n_items, n_users=n_users, item_features=item_features)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    users = torch.arange(1, n_users)
    likes = torch.where(users <= 3, 1, 2)
    for _ in range(60):
        u = users.repeat_interleave(4)
        pool_pos = [warm[cluster[warm] == likes[i]] for i in range(len(users))]
        pool_neg = [warm[cluster[warm] != likes[i]] for i in range(len(users))]
        pos = torch.cat([p[torch.randint(len(p), (4,))] for p in pool_pos])
        neg = torch.cat([p[torch.randint(len(p), (4,))] for p in pool_neg])
        loss, _ = model.calculate_loss({"user": u, "pos_item": pos, "neg_item": neg})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    scores = model.full_sort_predict({"user": users})[:, cold]  # (6, 4)
    assert scores.abs().min() > 0 and scores.std() > 0
    cold_a, cold_b = cold[cluster[cold] == 1] - 17, cold[cluster[cold] == 2] - 17
    for i, u in enumerate(users.tolist()):
        liked, other = (cold_a, cold_b) if u <= 3 else (cold_b, cold_a)
        assert scores[i, liked].min() > scores[i, other].max(), u


def test_eval_item_table_cache_follows_parameters():
    model = make_model().eval()
    users = {"user": torch.tensor([1, 2])}
    s1 = model.full_sort_predict(users)
    assert torch.equal(s1, model.full_sort_predict(users))
    with torch.no_grad():
        model.adapters.moes["text"].experts.bias.add_(1.0)  # in place, like an optimiser step
    s2 = model.full_sort_predict(users)
    assert not torch.allclose(s1, s2)
    model.train()
    model.eval()
    assert torch.equal(s2, model.full_sort_predict(users))


def _composed_bpr(e_u, e_i, e_j):
    """The BPR and reg terms composed from elementwise ops (the formula of spec A7)."""
    bpr = F.softplus((e_u * e_j).sum(-1) - (e_u * e_i).sum(-1)).mean()
    return bpr, (e_u.pow(2).sum(-1) + e_i.pow(2).sum(-1) + e_j.pow(2).sum(-1)).mean()


@pytest.mark.parametrize("form", ["triples", "rows"])
def test_fused_bpr_matches_the_composed_formula_in_value_and_gradient(form):
    from moedist.models.common import bpr_and_reg, bpr_and_reg_rows

    gen = torch.Generator().manual_seed(3)
    B, d, n = 23, 6, 9
    e_u = torch.randn(B, d, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, n, (B,), generator=gen)
    neg = torch.randint(0, n, (B,), generator=gen)
    pos[:3] = neg[:3] = 4  # repeated rows: their gradients must add up in the table
    weights = (0.7, 2.5)  # loss = 0.7·bpr + 2.5·reg: both outputs' gradients are used

    if form == "rows":
        got = bpr_and_reg_rows(e_u, table, pos, neg)
        inputs = (e_u, table)
    else:
        got = bpr_and_reg(e_u, table[pos], table[neg])
        inputs = (e_u, table)
    ref = _composed_bpr(e_u, table[pos], table[neg])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    g_got = torch.autograd.grad(sum(w * t for w, t in zip(weights, got)), inputs)
    g_ref = torch.autograd.grad(sum(w * t for w, t in zip(weights, ref)), inputs)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and against finite differences
    fn = (lambda u, t: bpr_and_reg_rows(u, t, pos, neg)) if form == "rows" else (lambda u, t: bpr_and_reg(u, t[pos], t[neg]))
    assert torch.autograd.gradcheck(fn, inputs)


def test_fused_bpr_sums_16_bit_inputs_in_float32():
    from moedist.models.common import bpr_and_reg

    gen = torch.Generator().manual_seed(0)
    e = [torch.randn(512, 64, generator=gen) for _ in range(3)]
    ref = _composed_bpr(*e)
    half = [t.to(torch.bfloat16).requires_grad_() for t in e]
    got = bpr_and_reg(*half)
    ref16 = _composed_bpr(*[t.float() for t in half])  # same inputs, float32 arithmetic
    for a, b, c in zip(got, ref16, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)  # float32 sums, not bfloat16 ones
        torch.testing.assert_close(a, c, rtol=2e-2, atol=0)
    got[0].backward()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in half)
