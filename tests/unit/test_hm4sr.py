"""HM4SR (moedist.models.hm4sr): shapes, gradients, each loss by hand, time features, ablations."""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moedist.errors import ConfigError
from moedist.models.hm4sr import (
    HM4SR,
    HM4SRConfig,
    causal_padding_mask,
    contrastive_same_target_zeroed,
    interval_bucket,
    interval_table_size,
)

N, C, L, DAY, T0 = 12, 5, 6, 86400, 1_300_000_000 // 86400 * 86400


def make_features(n_items=N, modalities=("text", "image"), seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = {"text": 10, "image": 8}
    feats = {m: torch.randn(n_items, dims[m], generator=g) for m in modalities}
    for t in feats.values():
        t[0] = 0.0  # pad row
    masks = {m: torch.arange(n_items) > 0 for m in modalities}
    return SimpleNamespace(features=feats, mask=masks)


def make_categories(n_items=N, n_cat=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    cats = (torch.rand(n_items, n_cat, generator=g) > 0.5).float()
    cats[0] = 0.0
    return cats


def tiny_config(**kw) -> HM4SRConfig:
    base = dict(hidden_size=16, n_heads=2, n_layers=1, inner_size=32, max_seq_len=L)
    base.update(kw)
    return HM4SRConfig(**base)


def make_model(seed=0, config=None, features="default", categories="default", n_items=N, **kw) -> HM4SR:
    torch.manual_seed(seed)
    return HM4SR(
        config or tiny_config(**kw),
        n_items=n_items,
        n_users=5,
        item_features=make_features(n_items) if features == "default" else features,
        item_categories=make_categories(n_items) if categories == "default" else categories,
        max_interval_seconds=400 * DAY,
    )


def make_batch():
    item_seq = torch.tensor(
        [[1, 2, 3, 4, 5, 6], [3, 4, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [8, 9, 10, 11, 2, 0]]
    )
    lens = (item_seq != 0).sum(1)
    gaps = torch.tensor([[0, 1, 0, 3, 30, 2], [0, 2, 0, 0, 0, 0], [0] * 6, [0, 0, 1, 7, 100, 0]])
    time_seq = torch.where(item_seq != 0, T0 + gaps.cumsum(1) * DAY, 0)
    return dict(
        item_seq=item_seq, item_seq_len=lens, time_seq=time_seq,
        target=torch.tensor([7, 5, 5, 3]), user=torch.arange(4),
    )


# ---- shapes, gradients, buffers ---------------------------------------------------------


def test_output_shapes_and_loss_parts():
    model = make_model()
    batch = make_batch()
    scores = model.full_sort_predict(batch)
    assert scores.shape == (4, N)
    loss, parts = model.calculate_loss(batch)
    assert set(parts) == {"ce", "idcl", "cp", "pcl"}
    assert loss.shape == () and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), sum(parts.values()))  # all λ = 1
    stats = model.moe_stats()
    for m in ("id", "text", "image"):
        assert stats[f"imoe/{m}/gate_mean"].shape == (4,)
        assert stats[f"imoe/{m}/gate_mean"].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert stats["tmoe/gate_mean"].shape == (4,) and stats["tmoe/load"].shape == (4,)
    for key in ("imoe/id/entropy", "imoe/text/entropy", "imoe/image/entropy", "tmoe/entropy"):
        assert stats[key].shape == () and 0.0 < stats[key].item() <= 1.0 + 1e-6
    assert stats["imoe/id/alpha"].item() == 0.0 and stats["imoe/text/alpha"].item() == 1.0


def test_gradient_reaches_every_trainable_parameter_and_features_are_frozen_buffers():
    # α_id = 0 at the authors' init would (correctly) block the id gate's gradient; use 1.
    model = make_model(alpha_init=(1.0, 1.0, 1.0))
    loss, _ = model.calculate_loss(make_batch())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = dict(model.named_parameters())
    assert not any(n.startswith(("feat_", "item_categories")) for n in names)
    buffers = dict(model.named_buffers())
    for key in ("feat_text", "feat_image", "item_categories"):
        assert not buffers[key].requires_grad and buffers[key].grad is None
    # Frozen data tables are not checkpointed with the model.
    assert "feat_text" not in model.state_dict() and "item_categories" not in model.state_dict()
    # Padding row of the id embedding is random (G-HM-5), not zero.
    assert model.item_embedding.weight[0].abs().sum() > 0


def test_parameter_count_matches_spec_formula():
    # Spec 1.8 (d=64, k1=k2=4, 768-d features): 64·N + 64·R + 193·C + 572,243, which includes
    # the authors' unused `absolute_m` Linear(64, 64) (4,160) that we do not build, and counts
    # no temporal experts (frozen in the authors' code).
    n_items, n_cat = 20, 7
    feats = SimpleNamespace(features={m: torch.zeros(n_items, 768) for m in ("text", "image")}, mask={})
    cfg = HM4SRConfig(temporal_experts_trainable=False)
    model = HM4SR(cfg, n_items=n_items, n_users=3, item_features=feats,
                  item_categories=make_categories(n_items, n_cat), max_interval_seconds=DAY)
    rows = interval_table_size(DAY, 100.0)
    expected = 64 * n_items + 64 * rows + 193 * n_cat + 572_243 - 4_160
    assert sum(p.numel() for p in model.parameters()) == expected


def test_initialisation_follows_spec():
    model = make_model()
    assert model.interactive_moe.alpha.tolist() == [0.0, 1.0, 1.0]
    # N(0, 0.02²) block: biases zero; PyTorch-default block: nonzero biases.
    assert model.projections["text"].bias.abs().sum() == 0
    assert model.temporal_moe.gate.proj.bias.abs().sum() == 0
    assert model.item_embedding.weight.std().item() < 0.05
    assert model.placeholders["text"].bias.abs().sum() > 0
    assert model.cat_linear.bias.abs().sum() > 0
    bound = 1 / math.sqrt(3 * 16)
    assert model.interactive_moe.experts.weight.abs().max() <= bound
    assert model.interactive_moe.experts.weight.std().item() > 0.06  # U(±1/√48): std 0.083, not 0.02
    assert 0.05 < model.temporal_moe.experts.std().item() < 0.2  # N(0, 0.1²)


# ---- losses by hand ---------------------------------------------------------------------


def test_ce_is_full_softmax_over_all_ids_including_pad():
    model = make_model().eval()  # eval: no dropout, so the two forwards agree
    batch = make_batch()
    scores = model.full_sort_predict(batch)
    _, parts = model.calculate_loss(batch)
    manual = torch.stack(
        [-(scores[b, batch["target"][b]] - scores[b].exp().sum().log()) for b in range(4)]
    ).mean()
    torch.testing.assert_close(parts["ce"], manual.detach())


def test_contrastive_same_target_logits_set_to_zero_by_hand():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    target = torch.tensor([7, 5, 5, 3])
    tau = 0.2
    got = contrastive_same_target_zeroed(a, b, target, tau)
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    total = 0.0
    for i in range(4):
        s_ii = float(an[i] @ bn[i]) / tau
        denom = 0.0
        for j in range(4):
            s_ij = float(an[i] @ bn[j]) / tau
            # same target, j ≠ i: logit 0 → contributes exp(0) = 1
            denom += 1.0 if (j != i and target[j] == target[i]) else math.exp(s_ij)
        total += -(s_ii - math.log(denom))
    assert got.item() == pytest.approx(total / 4, rel=1e-5)


def test_idcl_uses_raw_id_embedding_of_targets():
    model = make_model()
    torch.manual_seed(1)
    h = torch.randn(4, 16)
    target = torch.tensor([7, 5, 5, 3])
    expected = contrastive_same_target_zeroed(h, model.item_embedding.weight[target], target, 0.2)
    torch.testing.assert_close(model.idcl_loss(h, target), expected)


def _manual_bce(logit: float, y: float) -> float:
    return -(y * math.log(1 / (1 + math.exp(-logit))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-logit))))


def test_cp_is_bce_over_non_pad_input_items():
    model = make_model()
    batch = make_batch()
    tables = model.candidate_tables()
    got = model.cp_loss(batch["item_seq"], tables).item()
    items = [v for v in batch["item_seq"].flatten().tolist() if v != 0]  # duplicates kept, target excluded
    cand = torch.cat([tables[m] for m in ("id", "text", "image")], -1)
    terms = []
    for v in items:
        logits = model.cat_linear(cand[v]).detach()
        for c in range(C):
            terms.append(_manual_bce(float(logits[c]), float(model.item_categories[v, c])))
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_cp_authors_indexing_reads_element_b_l():
    model = make_model(cp_indexing="authors", max_seq_len=L)
    item_seq = torch.tensor([[1, 2, 0], [3, 4, 5]])  # L = 3 <= C = 5
    tables = model.candidate_tables()
    cand = torch.cat([tables[m] for m in ("id", "text", "image")], -1)
    flat = item_seq.flatten().tolist()
    terms = []
    for b, l in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]:  # non-pad (b, l)
        v = flat[b]  # row b of the flattened [B·L, C] matrix
        terms.append(_manual_bce(float(model.cat_linear(cand[v])[l].detach()), float(model.item_categories[v, l])))
    assert model.cp_loss(item_seq, tables).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    with pytest.raises(ValueError, match="categories"):
        model.cp_loss(torch.tensor([[1, 2, 3, 4, 5, 6]]), tables)  # position 5 >= 5 categories


def test_pcl_placeholders_floor_beta_len_on_real_positions_only():
    model = make_model(beta_pcl=0.3)
    lens = torch.tensor([6, 5, 3, 4, 1, 2] * 50)
    torch.manual_seed(0)
    chosen = model.placeholder_mask(lens, L)
    real = torch.arange(L)[None, :] < lens[:, None]
    assert chosen.sum(1).tolist() == [math.floor(0.3 * n) for n in lens.tolist()]
    assert not (chosen & ~real).any()
    # Every real position, the last one included, gets picked sometimes (len 6 → 1 of 6).
    assert chosen[lens == 6].any(0).all()
    assert chosen[lens == 4].any(0)[:4].all()


def test_pcl_without_placeholders_is_self_contrast_and_placeholders_change_it():
    model = make_model(beta_pcl=0.0).eval()
    batch = make_batch()
    _, parts = model.calculate_loss(batch)
    out = model._forward(batch["item_seq"], batch["item_seq_len"], batch["time_seq"])
    h = out["hidden"].detach()
    expected = torch.stack(
        [contrastive_same_target_zeroed(h[:, i], h[:, i], batch["target"], 1.0) for i in (1, 2)]
    ).mean()
    torch.testing.assert_close(parts["pcl"], expected)
    model.config.beta_pcl = 0.5
    torch.manual_seed(0)
    loss, parts2 = model.calculate_loss(batch)
    assert parts2["pcl"].item() != pytest.approx(parts["pcl"].item())
    loss.backward()
    assert model.placeholders["text"].weight.grad.abs().sum() > 0
    assert model.placeholders["image"].weight.grad.abs().sum() > 0


# ---- time features ----------------------------------------------------------------------


def test_interval_bucket_values_padding_and_first_position():
    t = torch.tensor([[T0, T0, T0 + DAY, T0 + 3 * DAY, 0, 0], [T0 + 5, T0, 0, 0, 0, 0]])
    lens = torch.tensor([4, 2])
    got = interval_bucket(t, lens, 100.0)
    assert got[0].tolist() == [0, 0, 1639, math.floor(100 * math.log2(2 * DAY + 1)), 0, 0]
    assert got[1].tolist() == [0, 0, 0, 0, 0, 0]  # Δ < 0 → 0, pads → 0
    assert got.dtype == torch.int64
    torch.testing.assert_close(interval_bucket(t, t != 0, 100.0), got)  # mask form
    assert interval_table_size(DAY, 100.0) == 1640
    assert interval_table_size(int(2 ** 28.705), 100.0) == 2871  # Games (spec 1.1 step 4)


def test_interval_bucket_float32_times_reproduce_recbole_rounding():
    base = 880_000_000  # MovieLens-era seconds: float32 steps of 64 s here
    t = torch.tensor([[base, base + 10, base + 100, base + DAY, 0]])
    lens = torch.tensor([4])
    exact = interval_bucket(t, lens, 100.0)
    assert exact[0, 1].item() == math.floor(100 * math.log2(11))
    f32 = interval_bucket(t, lens, 100.0, float32_times=True)
    # by hand: the times as float32, gaps and log2 in float32
    t32 = [float(torch.tensor(float(x), dtype=torch.float32)) for x in t[0, :4].tolist()]
    want = [0] + [math.floor(100 * math.log2(b - a + 1)) for a, b in zip(t32, t32[1:])] + [0]
    assert f32[0].tolist() == want
    assert f32[0, 1].item() != exact[0, 1].item()  # a 10 s gap is not kept at 64 s resolution
    # whole days are exact in float32: both ways agree
    days = torch.tensor([[T0, T0 + DAY, T0 + 8 * DAY, 0]])
    assert torch.equal(interval_bucket(days, torch.tensor([3]), 100.0, float32_times=True),
                       interval_bucket(days, torch.tensor([3]), 100.0))


@pytest.mark.parametrize("float32_times", [False, True])
def test_interval_bucket_sequence_length_one(float32_times):
    # L = 1 (hm4sr.max_seq_len=1): the only position is position 0, bucket 0; the result
    # used to be [B, 0] (built from the empty gap tensor), which crashed the time features
    t = torch.tensor([[T0], [T0 + DAY]])
    got = interval_bucket(t, torch.tensor([1, 1]), 100.0, float32_times=float32_times)
    assert got.tolist() == [[0], [0]] and got.dtype == torch.int64


def test_max_seq_len_one_trains_and_predicts():
    model = make_model(config=tiny_config(max_seq_len=1))
    batch = dict(item_seq=torch.tensor([[3], [4]]), item_seq_len=torch.tensor([1, 1]),
                 time_seq=torch.tensor([[T0], [T0 + DAY]]), target=torch.tensor([4, 5]), user=torch.arange(2))
    loss, parts = model.calculate_loss(batch)
    assert torch.isfinite(loss) and {"ce", "idcl", "cp", "pcl"} <= set(parts)
    loss.backward()
    model.eval()
    assert model.full_sort_predict(batch).shape == (2, N)


def test_absolute_time_embedding_code_and_paper_forms():
    model = make_model()
    tm = model.temporal_moe
    t = torch.tensor([[0, 5000]])  # small t: float32 a·t stays exact enough to check by hand
    with torch.no_grad():
        tm.absolute_w.weight.fill_(1e-3)
        tm.absolute_w.bias.fill_(0.7)
    j = 3
    inv = 1 / 10000 ** (j / 16)
    code = tm.absolute_embedding(t)[0, 1, j].item()
    tm.bias_inside = False
    paper = tm.absolute_embedding(t)[0, 1, j].item()
    a = float(tm.absolute_w.weight[j, 0].detach())
    assert code == pytest.approx(math.cos((a * 5000 + 0.7) * inv), abs=1e-5)
    assert paper == pytest.approx(math.cos(a * 5000 * inv + 0.7), abs=1e-5)
    assert code != pytest.approx(paper, abs=1e-2)


def test_pads_and_padded_length_do_not_change_scores():
    model = make_model().eval()
    batch = make_batch()
    ref = model.full_sort_predict(batch)
    noisy = dict(batch, time_seq=torch.where(batch["item_seq"] != 0, batch["time_seq"], 12345))
    torch.testing.assert_close(model.full_sort_predict(noisy), ref)
    short = {k: (v[:, :5] if k in ("item_seq", "time_seq") else v) for k, v in batch.items()}
    short["item_seq_len"] = short["item_seq_len"].clamp_max(5)
    keep = batch["item_seq_len"] <= 5
    torch.testing.assert_close(model.full_sort_predict(short)[keep], ref[keep])


def test_causal_padding_mask():
    m = causal_padding_mask(torch.tensor([[3, 4, 0]]))
    assert m.shape == (1, 1, 3, 3)
    assert (m[0, 0] == 0).tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    assert m.min().item() == -10000.0


# ---- ablations and options --------------------------------------------------------------


def _eval_scores(model, batch):
    return model.eval().full_sort_predict(batch)


def test_no_imoe_removes_module_and_equals_alpha_zero():
    full = make_model()
    ablated = make_model(use_imoe=False)
    assert ablated.interactive_moe is None
    assert not any("interactive_moe" in n for n, _ in ablated.named_parameters())
    missing = ablated.load_state_dict(full.state_dict(), strict=False)
    assert all(k.startswith("interactive_moe") for k in missing.unexpected_keys) and not missing.missing_keys
    batch = make_batch()
    assert not torch.allclose(_eval_scores(full, batch), _eval_scores(ablated, batch))
    with torch.no_grad():
        full.interactive_moe.alpha.zero_()  # no cross-modal contribution = no Interactive MoE
    torch.testing.assert_close(_eval_scores(full, batch), _eval_scores(ablated, batch))


def test_no_tmoe_removes_module_and_pcl_and_equals_identity_experts():
    full = make_model()
    ablated = make_model(use_tmoe=False)
    assert ablated.temporal_moe is None and not hasattr(ablated, "placeholders")
    _, parts = ablated.calculate_loss(make_batch())
    assert "pcl" not in parts and {"ce", "idcl", "cp"} <= set(parts)
    ablated.load_state_dict(full.state_dict(), strict=False)
    batch = make_batch()
    assert not torch.allclose(_eval_scores(full, batch), _eval_scores(ablated, batch))
    with torch.no_grad():
        full.temporal_moe.experts.fill_(1.0)  # u ⊙ Σ g_i·1 = u
    torch.testing.assert_close(_eval_scores(full, batch), _eval_scores(ablated, batch))


@pytest.mark.parametrize(
    "switch,part,module",
    [("use_cp", "cp", "cat_linear"), ("use_idcl", "idcl", None), ("use_pcl", "pcl", "placeholders")],
)
def test_loss_switches_remove_their_part(switch, part, module):
    batch = make_batch()
    full, ablated = make_model(), make_model(**{switch: False})
    if module:
        assert hasattr(full, module) and not hasattr(ablated, module)
        assert not any(n.startswith(module) for n, _ in ablated.named_parameters())
    ablated.load_state_dict(full.state_dict(), strict=False)
    torch.manual_seed(0)
    loss_full, parts_full = full.calculate_loss(batch)
    torch.manual_seed(0)
    loss_abl, parts_abl = ablated.calculate_loss(batch)
    assert part in parts_full and part not in parts_abl
    torch.testing.assert_close(loss_abl, loss_full - parts_full[part])


def test_no_categories_disables_cp():
    model = make_model(categories=None)
    _, parts = model.calculate_loss(make_batch())
    assert "cp" not in parts and not hasattr(model, "cat_linear")


def test_modalities_subset_without_image_features():
    feats = make_features(modalities=("text",))
    model = make_model(features=feats, modalities=("id", "text"))
    assert "image" not in model.projections and not hasattr(model, "feat_image")
    assert model.interactive_moe.experts.weight.shape == (4, 32, 32)  # M·d = 2·16
    assert model.temporal_moe.experts.shape == (4, 32)
    loss, parts = model.calculate_loss(make_batch())
    assert set(parts) == {"ce", "idcl", "cp", "pcl"} and torch.isfinite(loss)
    assert model.full_sort_predict(make_batch()).shape == (4, N)
    assert model.interactive_moe.alpha.tolist() == [0.0, 1.0]
    # ID only: no content modality, so no PCL.
    id_only = make_model(features=None, modalities=("id",))
    _, parts = id_only.calculate_loss(make_batch())
    assert "pcl" not in parts
    with pytest.raises(ConfigError, match="image"):
        make_model(features=feats)  # default modalities ask for image
    with pytest.raises(ConfigError):
        tiny_config(modalities=("text", "image"))  # must contain id


def test_frozen_temporal_experts_are_a_buffer_and_never_change():
    model = make_model(temporal_experts_trainable=False)
    assert "temporal_moe.experts" not in dict(model.named_parameters())
    assert "temporal_moe.experts" in model.state_dict()  # restored on resume
    before = model.temporal_moe.experts.clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, _ = model.calculate_loss(make_batch())
    loss.backward()
    opt.step()
    torch.testing.assert_close(model.temporal_moe.experts, before, rtol=0, atol=0)
    trainable = make_model()
    assert "temporal_moe.experts" in dict(trainable.named_parameters())


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = make_model(max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.full_sort_predict(make_batch())


def test_deterministic_with_seed():
    batch = make_batch()
    results = []
    for _ in range(2):
        model = make_model(seed=7)
        torch.manual_seed(11)  # dropout and PCL sampling
        loss, parts = model.calculate_loss(batch)
        results.append((loss.detach(), parts))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1]["pcl"].item() == results[1][1]["pcl"].item()
    model = make_model(seed=8)
    torch.manual_seed(11)
    assert model.calculate_loss(batch)[0].item() != results[0][0].item()


def test_a_few_adam_steps_reduce_the_loss():
    model = make_model(hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = make_batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        torch.manual_seed(0)
        loss, _ = model.calculate_loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_config_validation():
    with pytest.raises(ConfigError):
        tiny_config(cp_indexing="other")
    with pytest.raises(ConfigError):
        tiny_config(hidden_size=15)
    cfg = replace(tiny_config(), modalities=["id", "image"])  # lists are normalised
    assert cfg.modalities == ("id", "image")


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_cpu_dropout_matches_f_dropout_in_distribution(p):
    from moedist.models.common import dropout

    torch.manual_seed(0)
    x = torch.rand(400, 500) + 0.5  # no zeros in the input: zeros in the output are dropped entries
    x.requires_grad_(True)
    y = dropout(x, p, True)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1.0 - p, abs=0.005)
    if p < 1.0:
        torch.testing.assert_close(y[kept], x[kept] / (1.0 - p))  # the F.dropout scaling
    y.sum().backward()
    expected = torch.where(kept, torch.full_like(x, 1.0 / (1.0 - p) if p < 1 else 0.0), torch.zeros_like(x))
    torch.testing.assert_close(x.grad, expected)  # gradient flows through kept entries only
    assert dropout(x, p, False) is x  # eval: identity
    torch.manual_seed(3)
    a = dropout(x, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.5, True))  # reproducible under the seed


def test_dropout_half_draws_one_fair_bit_per_element():
    """At p = 0.5 the CPU mask is bits of random 64-bit words (:func:`fair_bits`): every bit
    position of a word must be a fair, independent coin (a byte holding the words' always-zero
    top bit would drop one element in 56 every time)."""
    from moedist.models.common import LITTLE_ENDIAN, dropout, fair_bits

    if not LITTLE_ENDIAN:
        pytest.skip("the bit path runs on little-endian machines only")
    torch.manual_seed(1)
    x = torch.rand(3000, 56) + 0.5
    bits = fair_bits(x)
    assert bits.shape == x.shape and bits.dtype == x.dtype and set(bits.unique().tolist()) == {0.0, 1.0}
    per_position = bits.mean(0)  # each of a word's 56 bits over 3000 words: 0.5 ± 0.009
    assert (per_position - 0.5).abs().max().item() < 0.05
    b = bits.flatten()
    assert abs(b.mean().item() - 0.5) < 0.004  # 168,000 coins: 0.5 ± 0.0012
    assert torch.corrcoef(torch.stack([b[:-1], b[1:]]))[0, 1].abs().item() < 0.02  # neighbours independent
    odd = torch.rand(7, 13, 5)  # a size that is not a multiple of 56
    assert fair_bits(odd).shape == odd.shape
    # the bits are those of the random words, bit 0 of byte 0 first (the table lookup expands
    # each byte exactly as shifting would)
    torch.manual_seed(3)
    got = fair_bits(odd, 2.0)
    torch.manual_seed(3)
    words = torch.empty((odd.numel() + 55) // 56, dtype=torch.int64).random_()
    expect = [((int(w) >> i) & 1) * 2.0 for w in words for i in range(56)][: odd.numel()]
    assert got.flatten().tolist() == expect
    torch.manual_seed(5)
    y = dropout(x, 0.5, True)
    torch.manual_seed(5)
    assert torch.equal(y, x * fair_bits(x) * 2.0)  # p = 0.5 takes the bit path


def test_cpu_attention_path_equals_sdpa_without_dropout():
    """The CPU training path (used when attention dropout is on) computes the same attention as
    SDPA: with a dropout probability so small that no entry is dropped, outputs agree."""
    from moedist.models.hm4sr import MultiHeadAttention, causal_padding_mask

    torch.manual_seed(0)
    mha = MultiHeadAttention(hidden_size=16, n_heads=2, attn_dropout_prob=1e-12, hidden_dropout_prob=0.0,
                             layer_norm_eps=1e-12)
    x = torch.randn(3, 7, 16)
    seq = torch.tensor([[1, 2, 3, 0, 0, 0, 0], [4, 5, 6, 7, 8, 9, 1], [2, 0, 0, 0, 0, 0, 0]])
    mask = causal_padding_mask(seq)
    mha.train()
    manual = mha(x, mask)
    mha.attn_dropout_prob = 0.0  # -> the fused SDPA branch
    torch.testing.assert_close(manual, mha(x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [7, 64, 1000])
def test_blocked_cpu_feed_forward_equals_the_ordinary_pass(rows, monkeypatch):
    """On CPU the feed-forward runs over blocks of rows and recomputes each block's intermediate
    in the backward: the same output, and the gradients of the ordinary pass (float64: exact to
    rounding; a row count that does not divide into blocks)."""
    import moedist.models.hm4sr as H

    torch.manual_seed(0)
    ffn = H.FeedForward(hidden_size=8, inner_size=32, hidden_dropout_prob=0.0, layer_norm_eps=1e-12).double()
    x = torch.randn(5, 23, 8, dtype=torch.float64, requires_grad=True)  # 115 rows
    g = torch.randn(5, 23, 8, dtype=torch.float64)
    params = [x, *ffn.parameters()]
    results = {}
    calls = []
    original = H._BlockedFFN.apply
    monkeypatch.setattr(H._BlockedFFN, "apply", lambda *a: calls.append(a[-1]) or original(*a))
    for block in (0, rows):
        monkeypatch.setattr(H, "FFN_BLOCK_ROWS", block)
        calls.clear()
        y = ffn(x)
        assert calls == ([rows] if block else [])
        results[block] = (y.detach(), torch.autograd.grad((y * g).sum(), params))
    torch.testing.assert_close(results[rows][0], results[0][0], rtol=1e-12, atol=0)
    for a, b in zip(results[rows][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(H, "FFN_BLOCK_ROWS", rows)
    w = [p.detach().clone().requires_grad_() for p in (ffn.dense_1.weight, ffn.dense_1.bias, ffn.dense_2.weight, ffn.dense_2.bias)]
    xs = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xs, *w: H._BlockedFFN.apply(xs, *w, rows), (xs, *w))


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_blocked_cpu_attention_reproduces_the_one_pass_dropout_attention(p, monkeypatch):
    """CPU attention with dropout runs block by block and recomputes scores, softmax and the
    dropout mask in its backward (nothing [B, h, L, L] stored). With the same seed it draws the
    same mask as the one-pass form (bits at p = 0.5, uniform numbers otherwise), so outputs and
    gradients agree; checked through the layer (q, k, v are strided views there) in float64."""
    import moedist.models.hm4sr as H

    torch.manual_seed(0)
    attn = H.MultiHeadAttention(hidden_size=8, n_heads=2, attn_dropout_prob=p, hidden_dropout_prob=0.0,
                                layer_norm_eps=1e-12).double().train()
    x = torch.randn(19, 7, 8, dtype=torch.float64, requires_grad=True)
    seq = torch.randint(0, 4, (19, 7))
    seq[:, -1] = 1  # every sequence has an item
    mask = H.causal_padding_mask(seq).double()
    g = torch.randn(19, 7, 8, dtype=torch.float64)
    params = [x, *attn.parameters()]
    results = {}
    for block in (0, 4):  # 19 sequences: blocks of 4, the last one short
        monkeypatch.setattr(H, "ATTN_BLOCK_SEQS", block)
        torch.manual_seed(7)
        y = attn(x, mask)
        results[block] = (y.detach(), torch.autograd.grad((y * g).sum(), params))
    torch.testing.assert_close(results[4][0], results[0][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[4][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # dropout really happened: another seed gives another output
    torch.manual_seed(8)
    assert not torch.allclose(attn(x, mask), results[4][0])


@pytest.mark.parametrize("modalities", [2, 3])
def test_blocked_cpu_interactive_moe_equals_the_einsum_form(modalities, monkeypatch):
    """On CPU the Interactive MoE's experts and gate-weighted sum run over blocks of tokens and
    recompute the expert outputs in the backward: the same output, and the same gradients into
    the input, the experts, the gates and α as the one-pass einsum form (float64, a token count
    that does not divide into blocks)."""
    import moedist.models.hm4sr as H

    torch.manual_seed(0)
    moe = H.InteractiveMoE(hidden_size=8, num_modalities=modalities, num_experts=4,
                           alpha_init=[0.0] + [1.0] * (modalities - 1)).double()
    with torch.no_grad():
        moe.alpha.add_(torch.rand(modalities, dtype=torch.float64))  # every α nonzero
        moe.experts.bias.normal_()  # biases count too
    e = torch.randn(5, 13, modalities, 8, dtype=torch.float64, requires_grad=True)  # 65 tokens
    g = torch.randn(5, 13, modalities, 8, dtype=torch.float64)
    params = [e, *moe.parameters()]
    calls, original = [], H._BlockedInteractiveMoE.apply
    monkeypatch.setattr(H._BlockedInteractiveMoE, "apply", lambda *a: calls.append(a[-1]) or original(*a))
    results = {}
    for rows in (0, 16):
        monkeypatch.setattr(H, "IMOE_BLOCK_ROWS", rows)
        calls.clear()
        x, gates = moe(e)
        assert calls == ([16] if rows else [])
        results[rows] = (x.detach(), gates.detach(), torch.autograd.grad((x * g).sum(), params))
    torch.testing.assert_close(results[16][0], results[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[16][1], results[0][1], rtol=0, atol=0)
    for a, b in zip(results[16][2], results[0][2]):
        assert b.abs().sum() > 0  # every parameter gets a gradient in this check
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
