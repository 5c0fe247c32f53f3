"""The split-level summary of benchmarks/vs_authors_mamex.py, from hand-made split results."""
from __future__ import annotations

import pytest

from tests.conftest import load_benchmark

bench = pytest.fixture(scope="module")(lambda: (yield from load_benchmark("vs_authors_mamex")))


def _split(o: float, t: float, so: float, st: float) -> dict:
    metrics = lambda v: {"ndcg@10": v, "ndcg@20": v + 0.1, "recall@10": v / 2, "recall@20": v}  # noqa: E731
    return {"test_at_best": {"moedist": metrics(o), "authors": metrics(t)},
            "valid_at_best": {"moedist": o + 0.5, "authors": t + 0.5},
            "seconds_per_step": {"moedist": so, "authors": st}}


def test_summary_means_counts_and_exact_sign_flip_p(bench):
    splits = {"a": _split(0.20, 0.10, 1.0, 2.0), "b": _split(0.30, 0.28, 1.0, 3.0), "c": _split(0.10, 0.13, 2.0, 2.0)}
    s = bench.summarize(splits, "ndcg@10")
    t = s["test ndcg@10"]
    assert s["splits"] == 3
    assert t["moedist"] == pytest.approx(0.20) and t["authors"] == pytest.approx(0.17)
    assert t["mean_diff"] == pytest.approx(0.03)
    assert (t["splits_moedist_ahead"], t["splits_authors_ahead"]) == (2, 1)
    # differences +0.10, +0.02, -0.03 (sum 0.09). Flipping signs gives sums ±0.09, ±0.15,
    # ±0.11 and ±0.05: 6 of the 8 patterns reach |sum| >= 0.09, so p = 6/8
    assert t["exact"] and t["p_value"] == pytest.approx(0.75)
    assert s["valid ndcg@10 at best"]["moedist"] == pytest.approx(0.70)
    # the speed ratio is the mean of the per-split ratios: (2 + 3 + 1) / 3
    assert s["seconds_per_step"]["authors_over_moedist"] == pytest.approx(2.0)


def test_summary_p_value_of_a_uniform_win(bench):
    splits = {str(i): _split(0.2 + i / 100, 0.1, 1.0, 1.0) for i in range(6)}
    t = bench.summarize(splits, "ndcg@10")["test ndcg@10"]
    assert t["splits_moedist_ahead"] == 6
    assert t["p_value"] == pytest.approx(2 / 64)  # only all-plus and all-minus reach the observed sum


def test_summary_over_all_evaluated_epochs(bench):
    def curve(pairs):
        return [{"epoch": i, "moedist": {"valid": v, "test": o}, "authors": {"valid": v, "test": t}}
                for i, (o, t, v) in enumerate(pairs)]
    a = _split(0.20, 0.10, 1.0, 1.0)
    a["curve"] = curve([(0.1, 0.2, 0.3), (0.3, 0.2, 0.3)])  # test differences -0.1, +0.1
    b = _split(0.10, 0.20, 1.0, 1.0)
    b["curve"] = curve([(0.5, 0.2, 0.1), (0.4, 0.4, 0.1), (0.4, 0.1, 0.1)])  # +0.3, 0, +0.3
    s = bench.summarize({"a": a, "b": b}, "ndcg@10")
    t = s["test ndcg@10 over all evaluated epochs"]
    assert t["evaluations"] == 5 and (t["moedist_ahead"], t["authors_ahead"]) == (3, 1)
    assert t["mean_diff"] == pytest.approx(0.6 / 5)
    # split means 0 and +0.2: sign flips give |sum| 0.2 in all 4 patterns, so p = 1
    assert t["exact"] and t["split_mean_diff_p_value"] == pytest.approx(1.0)
    v = s["valid ndcg@10 over all evaluated epochs"]
    assert v["mean_diff"] == 0 and v["moedist_ahead"] == v["authors_ahead"] == 0
    # without curves the block is absent
    assert "test ndcg@10 over all evaluated epochs" not in bench.summarize({"x": _split(0.2, 0.1, 1.0, 1.0)}, "ndcg@10")
