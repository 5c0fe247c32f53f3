"""Paired comparisons of runs (moedist compare): per-user metrics, sign-flip test, bootstrap."""
import json

import numpy as np
import pytest
import torch

from moedist.errors import DataError
from moedist.report.compare import (
    RunRanks,
    bootstrap_ci,
    paired_compare,
    per_user_metric,
    sign_flip_p_value,
)
from moedist.train.evaluate import cold_start_metric_sums, cold_start_metric_values, loo_metric_sums, loo_metric_values


def test_sign_flip_exact_p_values_by_hand():
    rng = np.random.default_rng(0)
    # all 3 differences positive: only the all-+ and all-- assignments reach |sum| = 3 -> 2/8
    assert sign_flip_p_value(np.array([1.0, 1.0, 1.0]), resamples=1000, rng=rng) == (0.25, True)
    # d = (2, 1): sums over signs are 3, 1, -1, -3 -> |sum| >= 3 for 2 of 4
    assert sign_flip_p_value(np.array([2.0, 1.0]), resamples=1000, rng=rng) == (0.5, True)
    # zeros do not count; (1, -1) sums to 0, so every assignment is at least as extreme
    assert sign_flip_p_value(np.array([0.0, 1.0, -1.0]), resamples=1000, rng=rng) == (1.0, True)
    assert sign_flip_p_value(np.zeros(5), resamples=1000, rng=rng) == (1.0, True)


def test_sign_flip_sampled_agrees_with_the_normal_approximation():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, 400)
    p, exact = sign_flip_p_value(d, resamples=20_000, rng=rng)
    assert not exact
    # under sign flips the sum has variance sum(d^2): a two-sided normal tail
    z = abs(d.sum()) / np.sqrt((d ** 2).sum())
    from math import erfc, sqrt

    assert p == pytest.approx(erfc(z / sqrt(2)), abs=0.01)
    assert 0 < p <= 1


def test_bootstrap_interval_matches_standard_error():
    rng = np.random.default_rng(2)
    d = rng.normal(0.05, 0.3, 1000)
    lo, hi = bootstrap_ci(d, resamples=20_000, confidence=0.95, rng=rng)
    se = d.std() / np.sqrt(d.size)
    assert lo < d.mean() < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.05)


def test_per_user_values_sum_to_the_batch_sums():
    ranks = torch.tensor([1, 3, 11, 2])
    vals = loo_metric_values(ranks, ks=[10])
    # by hand: 1/log2(2)=1, 1/log2(4)=0.5, rank 11 misses, 1/log2(3)
    assert vals["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 0.0, 1 / np.log2(3)])
    sums = loo_metric_sums(ranks, ks=[10])
    assert all(sums[k].item() == pytest.approx(v.sum().item()) for k, v in vals.items())
    cold = torch.tensor([[2, 5, 0], [0, 0, 0], [1, 0, 0]])
    cvals, users = cold_start_metric_values(cold, ks=[2])
    assert users.tolist() == [True, False, True]
    # user 0: hit at rank 2 of 2 positives -> (1/log2 3) / (1 + 1/log2 3); user 2: rank 1 -> 1
    assert cvals["ndcg@2"].tolist() == pytest.approx([(1 / np.log2(3)) / (1 + 1 / np.log2(3)), 0.0, 1.0])
    assert cold_start_metric_sums(cold, ks=[2])["count"].item() == 2


def _runs(ranks_a, ranks_b, protocol="loo", users=None):
    users = np.arange(len(ranks_a)) + 1 if users is None else users
    return (RunRanks("a", "m1", "toy", protocol, users, np.asarray(ranks_a)),
            RunRanks("b", "m2", "toy", protocol, np.arange(len(ranks_b)) + 1, np.asarray(ranks_b)))


def test_paired_compare_by_hand():
    a, b = _runs([1, 3, 20], [1, 1, 3])
    r = paired_compare(a, b, metric="ndcg@10", resamples=500)
    # per user: a = (1, .5, 0), b = (1, 1, .5) -> d = (0, .5, .5); exact p over the 2 nonzero = 2/4
    assert r.baseline_mean == pytest.approx(0.5)
    assert r.mean == pytest.approx(2.5 / 3)
    assert r.diff == pytest.approx(1 / 3)
    assert (r.wins, r.losses, r.users) == (2, 0, 3)
    assert (r.p_value, r.exact) == (0.5, True)
    assert 0 <= r.ci_low <= r.diff <= r.ci_high <= 0.5


def test_cold_start_rows_without_positives_are_dropped():
    rr = RunRanks("a", "m", "toy", "cold", np.array([1, 2, 3]), np.array([[1, 0], [0, 0], [4, 2]]))
    assert per_user_metric(rr, "recall@2").tolist() == pytest.approx([1.0, 0.5])


def test_mismatched_runs_and_bad_metrics_are_refused():
    a, b = _runs([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="evaluated users differ"):
        paired_compare(a, b)
    a, b = _runs([1, 2], [1, 2])
    b.dataset = "other"
    with pytest.raises(DataError, match="dataset/protocol"):
        paired_compare(a, b)
    a, b = _runs([1, 2], [1, 2])
    with pytest.raises(DataError, match="look like"):
        paired_compare(a, b, metric="ndcg")
    with pytest.raises(DataError, match="unknown metric"):
        paired_compare(a, b, metric="auc@10")
