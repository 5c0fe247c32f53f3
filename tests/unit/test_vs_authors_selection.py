"""benchmarks/vs_authors_hm4sr.py's early stopping: each code at its own best validation epoch.

Pure bookkeeping over recorded epochs and ranks; it needs neither the authors' code nor data."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def va():
    yield from load_benchmark("vs_authors_hm4sr")


def _epochs(ours: list[float], theirs: list[float]) -> list[dict]:
    return [{"epoch": i, "valid": {"moedist": {"ndcg@20": a}, "authors": {"ndcg@20": b}}}
            for i, (a, b) in enumerate(zip(ours, theirs))]


def test_best_epoch_is_the_first_maximum_and_patience_waits_for_both_codes(va):
    e = _epochs([0.1, 0.3, 0.2, 0.3, 0.25], [0.1, 0.2, 0.4, 0.3, 0.3])
    assert va._best_epochs(e) == {"moedist": 1, "authors": 2}  # moedist ties at 3: the first counts
    assert va._patience_spent(e, 2)  # 4 − 1 ≥ 2 and 4 − 2 ≥ 2
    assert not va._patience_spent(e, 3)  # the authors' code peaked only 2 epochs ago
    assert not va._patience_spent([], 1)


def test_comparison_at_each_codes_own_best_epoch_uses_that_epochs_ranks(va):
    e = _epochs([0.1, 0.3, 0.2], [0.2, 0.1, 0.1])  # moedist best at 1, authors at 0
    users = 50
    good, bad = torch.ones(users, dtype=torch.long), torch.full((users,), 30, dtype=torch.long)
    ranks = {  # at their best epochs, moedist ranks every target 1st and the authors' code 30th
        "0": {"moedist": {"valid": bad, "test": bad}, "authors": {"valid": bad, "test": bad}},
        "1": {"moedist": {"valid": good, "test": good}, "authors": {"valid": good, "test": good}},
    }
    out = va.best_epoch_comparison(e, ranks, patience=1, seed=0)
    assert out["best_epoch"] == {"moedist": 1, "authors": 0} and out["stopped_early"]
    t = out["paired"]["test ndcg@10"]
    assert t["moedist"] == pytest.approx(1.0) and t["authors"] == 0.0  # rank 30 is outside the top 10
    assert t["mean_diff"] == pytest.approx(1.0) and t["users"] == users and t["p_value"] < 0.001
    t20 = out["paired"]["test ndcg@20"]
    assert t20["authors"] == 0.0 and t20["users_differ"] == users


def test_without_stored_ranks_a_shared_best_epoch_reuses_its_recorded_comparison(va):
    e = _epochs([0.1, 0.3, 0.2], [0.1, 0.3, 0.1])
    e[1]["paired"] = {"test ndcg@10": {"mean_diff": 0.01}}
    out = va.best_epoch_comparison(e, {}, patience=5, seed=0)
    assert out["best_epoch"] == {"moedist": 1, "authors": 1} and not out["stopped_early"]
    assert out["paired"] == e[1]["paired"]
    e[1].pop("paired")
    assert va.best_epoch_comparison(e, {}, patience=5, seed=0)["paired"] is None
