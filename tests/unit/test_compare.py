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


def test_runs_evaluated_with_other_rank_settings_are_refused():
    # train.mask_history removes history items from the candidates and train.rank_ties decides
    # ties: either moves every rank, so the "difference" would be the evaluation's, not the model's
    a, b = _runs([1, 2], [1, 2])
    a.settings = {"train.rank_ties": "pessimistic", "train.mask_history": False}
    b.settings = {"train.rank_ties": "pessimistic", "train.mask_history": True}
    with pytest.raises(DataError, match=r"train.mask_history=True vs False"):
        paired_compare(a, b)
    b.settings = {"train.rank_ties": "optimistic", "train.mask_history": False}
    with pytest.raises(DataError, match=r"train.rank_ties=optimistic vs pessimistic"):
        paired_compare(a, b)
    b.settings = dict(a.settings)
    assert paired_compare(a, b, resamples=100).p_value == 1.0


def test_runs_on_other_data_of_the_same_name_are_refused():
    # the same dataset name and user ids, but another interactions table (e.g. prepared with
    # another seed): the users are not the same people
    a, b = _runs([1, 2], [1, 2])
    a.data_sha, b.data_sha = "a" * 64, "b" * 64
    with pytest.raises(DataError, match="different data"):
        paired_compare(a, b)
    b.data_sha = None  # not recorded (a run of an older moedist): the other checks decide
    paired_compare(a, b, resamples=100)
    b.data_sha = a.data_sha
    paired_compare(a, b, resamples=100)


# ----------------------------------------------------------------------------- load_run_ranks on disk


def _fake_run(d, *, epochs_run=3, logged=3, train=None, users=(1, 2, 3), ranks=(1, 4, 30), data_sha=None):
    """A run directory as ``moedist train`` leaves it, written by hand."""
    import yaml

    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": "sasrec", "train": train or {}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.0}) + "\n" for e in range(logged)))
    (d / "results.json").write_text(json.dumps({"model": "sasrec", "dataset": "toy", "protocol": "loo",
                                                "best_epoch": epochs_run - 1, "epochs_run": epochs_run}))
    np.savez(d / "eval_ranks.npz", protocol=np.array("loo"), test_users=np.array(users), test_ranks=np.array(ranks),
             valid_users=np.array(users), valid_ranks=np.array(ranks))
    if data_sha is not None:
        best = d / "checkpoints" / "best"
        best.mkdir(parents=True)
        for f in ("model.safetensors", "optimizer.safetensors"):
            (best / f).write_bytes(b"")
        (best / "state.json").write_text(json.dumps({"complete": True, "dataset": {
            "name": "toy", "files": {"interactions.parquet": data_sha}}}))
    return d


def test_load_run_ranks_reads_the_settings_and_data_of_the_run(tmp_path):
    from moedist.report.compare import compare_runs, load_run_ranks

    base = load_run_ranks(_fake_run(tmp_path / "a", data_sha="1" * 64))
    assert base.settings == {"train.rank_ties": "pessimistic", "train.mask_history": False}  # the defaults
    assert base.data_sha == "1" * 64
    _fake_run(tmp_path / "masked", train={"mask_history": True})
    with pytest.raises(DataError, match="mask_history"):
        compare_runs([tmp_path / "a", tmp_path / "masked"], resamples=100)
    _fake_run(tmp_path / "other_data", data_sha="2" * 64)
    with pytest.raises(DataError, match="different data"):
        compare_runs([tmp_path / "a", tmp_path / "other_data"], resamples=100)
    _fake_run(tmp_path / "same", data_sha="1" * 64, train={"rank_ties": "pessimistic"})
    assert compare_runs([tmp_path / "a", tmp_path / "same"], resamples=100)[0].p_value == 1.0


def test_a_run_that_trained_on_after_its_results_is_refused(tmp_path):
    """A finished 3-epoch run resumed with a higher train.epochs and interrupted (or still
    running): metrics.jsonl has epochs 0..5, results.json and eval_ranks.npz are the old run's."""
    from moedist.report.compare import compare_runs, load_run_ranks

    _fake_run(tmp_path / "a")
    _fake_run(tmp_path / "resumed", epochs_run=3, logged=6)
    with pytest.raises(DataError, match=r"records 3 epoch\(s\) run.*goes on to epoch 5") as e:
        compare_runs([tmp_path / "a", tmp_path / "resumed"], resamples=100)
    assert str(tmp_path / "resumed") in str(e.value)
    with pytest.raises(DataError, match="earlier, shorter run"):
        load_run_ranks(tmp_path / "resumed")
    # a run without epochs (popularity) or with every epoch accounted for is fine
    load_run_ranks(_fake_run(tmp_path / "pop", epochs_run=0, logged=0))
    load_run_ranks(_fake_run(tmp_path / "done", epochs_run=6, logged=6))


def test_a_folder_that_is_not_a_run_is_named_as_such(tmp_path):
    from moedist.report.compare import load_run_ranks

    (tmp_path / "runs" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="not a run directory"):
        load_run_ranks(tmp_path / "runs")
