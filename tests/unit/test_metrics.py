"""Exact ranking metrics (moedist.train.evaluate): hand-computed values, tie policies,
masking, the cold-start multi-positive protocol, chunked == unchunked, accumulation."""
from __future__ import annotations

import math

import pytest
import torch

from moedist.train.evaluate import (
    MetricAccumulator,
    chunked_cold_start_ranks,
    chunked_full_sort_ranks,
    cold_start_metric_sums,
    cold_start_metric_sums_from_scores,
    cold_start_ranks,
    evaluate_cold_start,
    evaluate_full_sort,
    full_sort_metric_sums,
    full_sort_ranks,
    loo_metric_sums,
    metric_names,
    pad_item_lists,
    round_metrics,
)


def g(rank: int) -> float:
    """DCG gain of a hit at ``rank``."""
    return 1.0 / math.log2(rank + 1)


# ------------------------------------------------------------------ leave-one-out


# col:            0(pad) 1     2     3     4     5
LOO_SCORES = torch.tensor(
    [
        [9.0, 0.5, 0.9, 0.1, 0.7, 0.3],  # target 4 (0.7): only col 2 (0.9) above -> rank 2
        [0.0, 0.2, 0.1, 0.8, 0.4, 0.6],  # target 2 (0.1): 0.2, 0.8, 0.4, 0.6 above -> rank 5
        [0.0, 0.2, 0.1, 0.8, 0.4, 0.6],  # target 3 (0.8): nothing above -> rank 1
    ]
)
LOO_TARGETS = torch.tensor([4, 2, 3])


def test_loo_ranks_and_padding_mask():
    assert full_sort_ranks(LOO_SCORES, LOO_TARGETS).tolist() == [2, 5, 1]
    # without the padding mask row 0's pad score 9.0 is above the target too: rank 3
    assert full_sort_ranks(LOO_SCORES, LOO_TARGETS, mask_padding=False).tolist() == [3, 5, 1]
    with pytest.raises(ValueError):
        full_sort_ranks(LOO_SCORES, torch.tensor([0, 2, 3]))


def test_loo_metric_values_by_hand():
    s = full_sort_metric_sums(LOO_SCORES, LOO_TARGETS, ks=(1, 2, 5))
    # ranks 2, 5, 1
    assert s["count"].item() == 3
    # @1: only the rank-1 row hits
    assert s["hit@1"].item() == 1 and s["recall@1"].item() == 1
    assert s["ndcg@1"].item() == pytest.approx(1.0)  # 1/log2(2)
    assert s["mrr@1"].item() == pytest.approx(1.0)
    # @2: ranks 2 and 1 hit: NDCG = 1/log2(3) + 1/log2(2) = 0.63093 + 1
    assert s["hit@2"].item() == 2
    assert s["ndcg@2"].item() == pytest.approx(1 / math.log2(3) + 1.0)
    assert s["mrr@2"].item() == pytest.approx(1 / 2 + 1)
    assert s["precision@2"].item() == pytest.approx(2 / 2)
    # @5: all hit: NDCG = 0.63093 + 1/log2(6) (= 0.38685) + 1 = 2.01778
    assert s["hit@5"].item() == 3
    assert s["ndcg@5"].item() == pytest.approx(1 / math.log2(3) + 1 / math.log2(6) + 1.0)
    assert s["ndcg@5"].item() == pytest.approx(2.017783, abs=1e-6)
    assert s["mrr@5"].item() == pytest.approx(1 / 2 + 1 / 5 + 1)
    assert s["precision@5"].item() == pytest.approx(3 / 5)


def test_loo_ties_each_policy():
    #                     pad   1    2    3    4
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.2]])
    target = torch.tensor([2])
    # nothing strictly above 0.5; cols 1 and 3 tie with the target (pad col 0 is -inf)
    assert full_sort_ranks(scores, target, ties="pessimistic").item() == 3  # 1 + 2 ties
    assert full_sort_ranks(scores, target, ties="optimistic").item() == 1  # 1 + 0
    assert full_sort_ranks(scores, target, ties="index").item() == 2  # 1 + col 1 (< 2)
    # a collapsed model (all scores equal) gets the worst rank under the default policy
    flat = torch.zeros(1, 11)
    assert full_sort_ranks(flat, torch.tensor([1])).item() == 10
    with pytest.raises(ValueError):
        full_sort_ranks(scores, target, ties="random")


def test_loo_nan_scores_rank_last():
    scores = torch.tensor([[0.0, float("nan"), 0.3, 0.2]])
    # NaN is treated as -inf: the NaN target is below both real scores -> rank 3 (the
    # masked pad column is not a candidate, so it does not tie with it)
    assert full_sort_ranks(scores, torch.tensor([1])).item() == 3


def test_real_infinities_are_not_tied_with_the_extreme_finite_scores():
    """Only NaN becomes -inf: a real +inf target is above an item at the largest finite float
    (rank 1, not a pessimistic tie), and a real -inf item is below a NaN-free finite score."""
    big = torch.finfo(torch.float32).max
    scores = torch.tensor([[0.0, float("inf"), big, 1.0]])
    assert full_sort_ranks(scores, torch.tensor([1])).item() == 1
    assert full_sort_ranks(scores, torch.tensor([2])).item() == 2
    low = torch.tensor([[0.0, float("-inf"), -big, 1.0]])
    assert full_sort_ranks(low, torch.tensor([2])).item() == 2  # only item 3 is above -max
    assert full_sort_ranks(low, torch.tensor([1])).item() == 3
    # cold start goes through the same counting
    ranks = cold_start_ranks(scores, torch.tensor([[1, 0]]), candidates=torch.tensor([1, 2, 3]))
    assert ranks.tolist() == [[1, 0]]


def test_loo_history_mask_option():
    #                      pad  1    2    3    4
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.3, 0.5]])
    target = torch.tensor([4])
    item_seq = torch.tensor([[1, 4, 0]])  # history contains item 1 and the target itself
    # off by default: 0.9 and 0.8 above 0.5 -> rank 3
    assert full_sort_ranks(scores, target).item() == 3
    # history removes item 1 (0.9) but never the target: only 0.8 above -> rank 2
    assert full_sort_ranks(scores, target, history=item_seq).item() == 2
    as_bool = torch.tensor([[False, True, False, False, True]])
    assert full_sort_ranks(scores, target, history=as_bool).item() == 2


# ------------------------------------------------------------------ cold start

N_COLD = 10
CANDIDATES = torch.tensor([2, 4, 5, 7, 8, 9])


def _cold_scores() -> torch.Tensor:
    row = torch.zeros(N_COLD)
    # warm items 1, 3, 6 score highest but are not candidates, so they never count
    row[[1, 3, 6]] = 5.0
    # candidate order by score: 2 (.9) r1, 5 (.8) r2, 8 (.7) r3, 7 (.3) r4, 9 (.2) r5, 4 (.1) r6
    row[[2, 4, 5, 7, 8, 9]] = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7, 0.2])
    return row.repeat(3, 1)


def test_cold_start_ranks_over_candidates_only():
    positives = pad_item_lists([[5, 4], [2, 8, 7, 9], []])
    assert positives.tolist() == [[4, 5, 0, 0], [2, 7, 8, 9], [0, 0, 0, 0]]
    ranks = cold_start_ranks(_cold_scores(), positives, candidates=CANDIDATES)
    assert ranks.tolist() == [[6, 2, 0, 0], [1, 4, 3, 5], [0, 0, 0, 0]]
    with pytest.raises(ValueError):  # item 3 is warm: not a candidate, could never be hit
        cold_start_ranks(_cold_scores(), pad_item_lists([[3]]), candidates=CANDIDATES)


def test_cold_start_metric_values_by_hand():
    positives = pad_item_lists([[5, 4], [2, 8, 7, 9], []])
    s = cold_start_metric_sums_from_scores(
        _cold_scores(), positives, candidates=CANDIDATES, ks=(1, 2, 5, 6)
    )
    # user C has no held-out item: not counted
    assert s["count"].item() == 2
    # user A: |T|=2, ranks {2, 6};  user B: |T|=4, ranks {1, 3, 4, 5}
    # @1: A no hit; B hit at rank 1. Recall = 0 + 1/4; IDCG_B@1 = 1 -> NDCG = 0 + 1
    assert s["recall@1"].item() == pytest.approx(0.25)
    assert s["ndcg@1"].item() == pytest.approx(1.0)
    assert s["hit@1"].item() == 1
    assert s["precision@1"].item() == pytest.approx(1.0)
    # @2: A hits rank 2: recall 1/2, NDCG = g(2) / (g(1)+g(2)) = .63093/1.63093 = .38685
    #     B hits rank 1: recall 1/4, |T|=4 > K: IDCG over min(2,4)=2 -> 1/1.63093 = .61315
    ndcg2_a = g(2) / (g(1) + g(2))
    ndcg2_b = g(1) / (g(1) + g(2))
    assert ndcg2_a == pytest.approx(0.386853, abs=1e-6) and ndcg2_b == pytest.approx(0.613147, abs=1e-6)
    assert s["recall@2"].item() == pytest.approx(0.5 + 0.25)
    assert s["ndcg@2"].item() == pytest.approx(ndcg2_a + ndcg2_b)  # = 1.0 exactly here
    assert s["hit@2"].item() == 2
    assert s["precision@2"].item() == pytest.approx(1 / 2 + 1 / 2)
    # @5: A still one hit (rank 2); |T|=2 < K: IDCG over 2 -> same .38685, recall 1/2
    #     B all four hit: DCG = g1+g3+g4+g5 = 1+.5+.43068+.38685 = 2.31753,
    #     IDCG over min(5,4)=4: g1+g2+g3+g4 = 2.56161 -> .90472; recall 1
    ndcg5_b = (g(1) + g(3) + g(4) + g(5)) / (g(1) + g(2) + g(3) + g(4))
    assert ndcg5_b == pytest.approx(0.904717, abs=1e-6)
    assert s["recall@5"].item() == pytest.approx(0.5 + 1.0)
    assert s["ndcg@5"].item() == pytest.approx(ndcg2_a + ndcg5_b)
    assert s["precision@5"].item() == pytest.approx(1 / 5 + 4 / 5)
    # @6: A both hit: DCG = g2 + g6 = .63093 + .35621 = .98714 / 1.63093 = .60526
    ndcg6_a = (g(2) + g(6)) / (g(1) + g(2))
    assert ndcg6_a == pytest.approx(0.605260, abs=1e-6)
    assert s["ndcg@6"].item() == pytest.approx(ndcg6_a + ndcg5_b)
    assert s["recall@6"].item() == pytest.approx(2.0)


def test_cold_start_ties_with_several_positives():
    # four candidates all tied; positives at columns 1 and 3
    scores = torch.ones(1, 5)
    candidates = torch.tensor([1, 2, 3, 4])  # item i at column i - 1
    positives = torch.tensor([[2, 4]])  # columns 1 and 3
    # pessimistic: negatives (cols 0, 2) first, then positives by index -> ranks 3, 4
    assert cold_start_ranks(scores, positives, candidates=candidates).tolist() == [[3, 4]]
    # optimistic: positives first -> 1, 2
    assert cold_start_ranks(scores, positives, candidates=candidates, ties="optimistic").tolist() == [[1, 2]]
    # index: plain column order -> col 1 is 2nd, col 3 is 4th
    assert cold_start_ranks(scores, positives, candidates=candidates, ties="index").tolist() == [[2, 4]]


# ------------------------------------------------------------------ chunked == unchunked


def _reference_ranks(scores, pos_cols, ties, removed=None):
    """Brute force: sort every row under the policy's key, read off the positions."""
    out = torch.zeros_like(pos_cols)
    for b in range(scores.shape[0]):
        pos = {int(c) for c in pos_cols[b] if c >= 0}
        s = scores[b].tolist()
        if removed is not None:
            s = [(-math.inf if removed[b, j] and j not in pos else v) for j, v in enumerate(s)]
        def key(j):
            tie = {"index": 0, "pessimistic": int(j in pos), "optimistic": int(j not in pos)}[ties]
            return (-s[j], tie, j)
        order = sorted(range(len(s)), key=key)
        where = {j: r + 1 for r, j in enumerate(order)}
        for p in range(pos_cols.shape[1]):
            if pos_cols[b, p] >= 0:
                out[b, p] = where[int(pos_cols[b, p])]
    return out


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "index"])
def test_chunked_full_sort_equals_unchunked_and_reference(ties):
    gen = torch.Generator().manual_seed(0)
    batch, n = 7, 23
    scores = torch.randint(0, 4, (batch, n), generator=gen).float()  # many ties on purpose
    targets = torch.randint(1, n, (batch,), generator=gen)
    history = torch.randint(0, n, (batch, 5), generator=gen)
    for hist in (None, history):
        full = full_sort_ranks(scores, targets, ties=ties, history=hist)
        removed = torch.zeros(batch, n, dtype=torch.bool)
        removed[:, 0] = True
        if hist is not None:
            for b in range(batch):
                for h in hist[b].tolist():
                    if h:
                        removed[b, h] = True
        ref = _reference_ranks(scores, targets[:, None], ties, removed)[:, 0]
        assert torch.equal(full, ref)
        for chunk in (1, 2, 5, 7, 22, 23, 100):
            calls = []

            def score_fn(a, b):
                calls.append((a, b))
                return scores[:, a:b]

            got = chunked_full_sort_ranks(
                score_fn, targets, n_items=n, chunk_size=chunk, ties=ties, history=hist
            )
            assert torch.equal(got, full), chunk
            assert max(b - a for a, b in calls) <= chunk


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "index"])
def test_chunked_cold_start_equals_unchunked_and_reference(ties):
    gen = torch.Generator().manual_seed(1)
    batch, n = 6, 30
    scores = torch.randint(0, 3, (batch, n), generator=gen).float()
    candidates = torch.tensor([3, 5, 6, 10, 11, 17, 20, 21, 25, 29, 2])
    lists = [candidates[torch.randperm(len(candidates), generator=gen)[: 1 + b % 5]].tolist() for b in range(batch)]
    lists[2] = []
    positives = pad_item_lists(lists)
    full = cold_start_ranks(scores, positives, candidates=candidates, ties=ties)
    cand_scores = scores[:, candidates]
    col_of = {int(c): j for j, c in enumerate(candidates)}
    pos_cols = torch.tensor([[col_of.get(int(i), -1) for i in row] for row in positives])
    assert torch.equal(full, _reference_ranks(cand_scores, pos_cols, ties))
    for chunk in (1, 3, 4, 10, 11, 50):
        got = chunked_cold_start_ranks(
            lambda a, b: cand_scores[:, a:b], positives, candidates=candidates, chunk_size=chunk, ties=ties
        )
        assert torch.equal(got, full), chunk
    sums = cold_start_metric_sums(full, ks=(1, 3, 20))
    assert sums["count"].item() == batch - 1


# ------------------------------------------------------------------ accumulation


def test_accumulator_sums_and_means():
    acc = MetricAccumulator(metric_names((1, 2), protocol="loo"))
    assert math.isnan(acc.means()["ndcg@1"])  # nothing counted yet
    a = loo_metric_sums(torch.tensor([1, 3]), ks=(1, 2))  # hit@1: 1, hit@2: 1
    b = loo_metric_sums(torch.tensor([2, 2, 1]), ks=(1, 2))  # hit@1: 1, hit@2: 3
    acc.add(a)
    acc.add(b)
    assert acc.count == 5
    m = acc.means()
    assert m["hit@1"] == pytest.approx(2 / 5)
    assert m["hit@2"] == pytest.approx(4 / 5)
    # MRR@2 = (1 + 0 + 1/2 + 1/2 + 1) / 5
    assert m["mrr@2"] == pytest.approx(3 / 5)
    # ndcg@2 = (1 + 3 * 1/log2(3) ... ) : ranks 1,3,2,2,1 -> 2 + 2/log2(3)
    assert m["ndcg@2"] == pytest.approx((2 + 2 / math.log2(3)) / 5)
    # means stay unrounded; display and early stopping round
    assert round_metrics(m)["ndcg@2"] == round(m["ndcg@2"], 5)
    assert "ndcg@2=0.65237" in acc.format()
    names, vec = acc.to_tensor()
    other = MetricAccumulator()
    other.load_tensor(names, vec * 2)
    assert other.count == 10 and other.means() == pytest.approx(m)
    acc.all_reduce()  # no process group: a no-op
    assert acc.count == 5
    with pytest.raises(KeyError):
        acc.add({"hit@1": 1.0})


def test_accumulator_all_reduce_single_rank_gloo(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        acc = MetricAccumulator(metric_names((1,), protocol="cold"))
        acc.add({"recall@1": 1.5, "ndcg@1": 1.0, "hit@1": 2.0, "precision@1": 2.0, "count": 3.0})
        acc.all_reduce()
        assert acc.count == 3 and acc.means()["recall@1"] == pytest.approx(0.5)
    finally:
        dist.destroy_process_group()


class _FixedScores(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def full_sort_predict(self, batch):
        return self.scores[batch["user"]]  # row u = user u's scores


def test_model_level_loops():
    cold = _cold_scores()  # rows 0..2 are users 0..2
    model = _FixedScores(cold)
    heldout = {0: [5, 4], 1: [2, 8, 7, 9], 2: []}
    acc = evaluate_cold_start(model, heldout, candidates=CANDIDATES, ks=(2,), batch_size=1)
    assert acc.count == 2
    assert acc.means()["recall@2"] == pytest.approx((0.5 + 0.25) / 2)
    loo = _FixedScores(LOO_SCORES)
    batches = [
        {"user": torch.tensor([0, 1]), "target": LOO_TARGETS[:2], "item_seq": torch.tensor([[2, 0], [0, 0]])},
        {"user": torch.tensor([2]), "target": LOO_TARGETS[2:], "item_seq": torch.tensor([[1, 0]])},
    ]
    acc = evaluate_full_sort(loo, batches, ks=(1,))
    assert acc.count == 3 and acc.means()["hit@1"] == pytest.approx(1 / 3)
    # masking history removes item 2 (0.9) from row 0: its target becomes rank 1
    acc = evaluate_full_sort(loo, batches, ks=(1,), mask_history=True)
    assert acc.means()["hit@1"] == pytest.approx(2 / 3)
