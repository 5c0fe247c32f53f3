"""SASRec baseline (moedist.models.baselines): contract, CE, masking, training signal."""
from __future__ import annotations

import pytest
import torch

from moedist.errors import ConfigError
from moedist.models.baselines import SASRec, SASRecConfig

N, L = 10, 5


def make_model(seed=0, **kw) -> SASRec:
    torch.manual_seed(seed)
    cfg = SASRecConfig(**{**dict(hidden_size=16, n_heads=2, n_layers=1, inner_size=32, max_seq_len=L), **kw})
    return SASRec(cfg, n_items=N, n_users=4)


def make_batch():
    item_seq = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 0, 0, 0, 0]])
    return dict(
        item_seq=item_seq, item_seq_len=(item_seq != 0).sum(1), time_seq=torch.zeros_like(item_seq),
        target=torch.tensor([6, 8, 9]), user=torch.arange(3),
    )


def test_shapes_and_ce_over_all_ids():
    model = make_model().eval()
    batch = make_batch()
    scores = model.full_sort_predict(batch)
    assert scores.shape == (3, N)
    loss, parts = model.calculate_loss(batch)
    assert set(parts) == {"ce"}
    manual = torch.stack([scores[b].logsumexp(0) - scores[b, batch["target"][b]] for b in range(3)]).mean()
    torch.testing.assert_close(loss, manual)
    assert model.moe_stats() == {}


def test_scores_are_dot_products_with_item_embeddings_and_ignore_padding():
    model = make_model().eval()
    batch = make_batch()
    h = model(batch["item_seq"], batch["item_seq_len"])
    torch.testing.assert_close(model.full_sort_predict(batch), h @ model.item_embedding.weight.T)
    # Extra pad columns (a shorter padded length) do not change the last-position state.
    short = dict(batch, item_seq=batch["item_seq"][1:, :2], item_seq_len=batch["item_seq_len"][1:])
    torch.testing.assert_close(model(short["item_seq"], short["item_seq_len"]), h[1:])
    # Causal: the state at position 2 does not see position 4; the state at position 4 does.
    changed = batch["item_seq"].clone()
    changed[0, 4] = 9
    at2 = torch.tensor([3, 2, 1])
    torch.testing.assert_close(model(changed, at2), model(batch["item_seq"], at2))
    h2 = model(changed, batch["item_seq_len"])
    assert not torch.allclose(h2[0], h[0])
    torch.testing.assert_close(h2[1:], h[1:])


def test_gradients_and_training_reduce_loss():
    model = make_model(hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = make_batch()
    losses = []
    for step in range(10):
        opt.zero_grad()
        loss, _ = model.calculate_loss(batch)
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_deterministic_with_seed_and_validation():
    batch = make_batch()
    out = []
    for _ in range(2):
        model = make_model(seed=3)
        torch.manual_seed(5)
        out.append(model.calculate_loss(batch)[0].detach())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        make_model(max_seq_len=3).full_sort_predict(batch)
    with pytest.raises(ConfigError):
        SASRecConfig(hidden_size=15, n_heads=2)


def test_init_is_bert_style():
    model = make_model()
    assert model.item_embedding.weight.std().item() < 0.05
    assert model.encoder.layers[0].attention.query.bias.abs().sum() == 0
    assert torch.equal(model.layer_norm.weight, torch.ones(16))
