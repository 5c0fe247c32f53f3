"""Cold-start / popularity baselines (moedist.models.baselines): Popularity, ContentMapping."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from moedist.errors import ConfigError
from moedist.models.baselines import ContentMapping, ContentMappingConfig, Popularity, PopularityConfig
from moedist.train.evaluate import evaluate_cold_start, evaluate_full_sort

torch.set_num_threads(1)


@dataclass
class Feats:
    features: dict
    mask: dict


# ------------------------------------------------------------------ Popularity


def test_popularity_scores_are_training_counts():
    model = Popularity(PopularityConfig(), n_items=6, n_users=4)
    model.fit(torch.tensor([1, 1, 2, 3, 3, 3, 0, 0]))  # pads (0) never count
    assert model.counts.tolist() == [0, 2, 1, 3, 0, 0]
    # cold-start batch: one identical row per user
    s = model.full_sort_predict({"user": torch.tensor([1, 2, 3])})
    assert s.shape == (3, 6) and torch.equal(s, torch.tensor([[0.0, 2, 1, 3, 0, 0]]).expand(3, -1))
    # sequential batch (no "user" needed)
    s = model.full_sort_predict({"item_seq": torch.zeros(2, 5, dtype=torch.long)})
    assert s.shape == (2, 6)
    loss, parts = model.calculate_loss({"user": torch.tensor([1])})
    assert loss.item() == 0 and parts == {} and model.moe_stats() == {}
    assert "counts" in model.state_dict()  # the counts are the model
    with pytest.raises(ValueError):
        model.fit(torch.tensor([7]))
    # the training loop passes precomputed counts (data.train_item_counts)
    given = Popularity(counts=torch.tensor([0.0, 2, 1, 3, 0, 0]))
    assert given.n_items == 6 and torch.equal(given.counts, model.counts)
    with pytest.raises(ValueError):
        Popularity()


def test_popularity_under_both_protocols():
    model = Popularity(n_items=6, train_items=torch.tensor([1, 1, 2, 3, 3, 3]))
    # LOO: targets 3 (most popular, rank 1) and 2 (rank 3 behind 3 and 1)
    batches = [{"user": torch.tensor([1, 2]), "target": torch.tensor([3, 2]), "item_seq": torch.ones(2, 3, dtype=torch.long)}]
    acc = evaluate_full_sort(model, batches, ks=(1, 3))
    assert acc.means()["hit@1"] == pytest.approx(0.5) and acc.means()["hit@3"] == pytest.approx(1.0)
    # cold start: candidates 2, 4, 5 (counts 1, 0, 0); user 1 holds out item 2 -> rank 1
    acc = evaluate_cold_start(model, {1: [2], 2: [4]}, candidates=torch.tensor([2, 4, 5]), ks=(1,))
    # user 2's item 4 ties with 5 at 0: pessimistic rank 3 -> miss
    assert acc.means()["recall@1"] == pytest.approx(0.5)


# ------------------------------------------------------------------ ContentMapping


def _planted(n_items=21, dim=6, seed=0, missing_image=()):
    gen = torch.Generator().manual_seed(seed)
    centre_a, centre_b = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    cluster = torch.tensor([0] + [1 + (i % 2) for i in range(1, n_items)])
    feats = torch.zeros(n_items, dim)
    feats[cluster == 1] = centre_a + 0.1 * torch.randn(int((cluster == 1).sum()), dim, generator=gen)
    feats[cluster == 2] = centre_b + 0.1 * torch.randn(int((cluster == 2).sum()), dim, generator=gen)
    present = cluster > 0
    img_mask = present.clone()
    img = feats.clone()
    for i in missing_image:
        img_mask[i] = False
        img[i] = 0
    return Feats({"image": img, "text": feats[:, :4].clone()}, {"image": img_mask, "text": present}), cluster


def test_content_mapping_shapes_and_gradients():
    feats, _ = _planted(missing_image=(5,))
    torch.manual_seed(0)
    model = ContentMapping(ContentMappingConfig(embed_dim=8, hidden_dim=16, modality_dropout=0.3),
                           n_items=21, n_users=7, item_features=feats)
    batch = {"user": torch.tensor([1, 2]), "pos_item": torch.tensor([1, 5]), "neg_item": torch.tensor([2, 6])}
    loss, parts = model.calculate_loss(batch)
    assert set(parts) == {"bpr", "reg"}
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.content.shape == (21, 6 + 4) and not model.content.requires_grad
    # features are L2-normalised per modality; absent / padding rows are zero
    assert torch.allclose(model.content[1, :6].norm(), torch.tensor(1.0))
    assert torch.all(model.content[5, :6] == 0) and torch.all(model.content[0] == 0)
    assert model.present[5].tolist() == [False, True]
    model.eval()
    assert model.full_sort_predict({"user": torch.tensor([1, 2, 3])}).shape == (3, 21)
    with pytest.raises(ConfigError):
        ContentMappingConfig(modality_dropout=1.0)


def test_content_mapping_learns_planted_problem_and_scores_cold_items():
    feats, cluster = _planted()
    torch.manual_seed(0)
    model = ContentMapping(ContentMappingConfig(embed_dim=8, hidden_dim=16), n_items=21, n_users=7, item_features=feats)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    users = torch.arange(1, 7)
    likes = torch.where(users <= 3, 1, 2)
    warm, cold = torch.arange(1, 17), torch.tensor([17, 18, 19, 20])
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        u = users.repeat_interleave(4)
        pos = torch.cat([warm[cluster[warm] == likes[i]][torch.randint(8, (4,), generator=gen)] for i in range(6)])
        neg = torch.cat([warm[cluster[warm] != likes[i]][torch.randint(8, (4,), generator=gen)] for i in range(6)])
        loss, parts = model.calculate_loss({"user": u, "pos_item": pos, "neg_item": neg})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["bpr"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model.eval()
    scores = model.full_sort_predict({"user": users})[:, cold]
    cold_a, cold_b = (cluster[cold] == 1).nonzero()[:, 0], (cluster[cold] == 2).nonzero()[:, 0]
    for i, u in enumerate(users.tolist()):
        liked, other = (cold_a, cold_b) if u <= 3 else (cold_b, cold_a)
        assert scores[i, liked].min() > scores[i, other].max(), u
