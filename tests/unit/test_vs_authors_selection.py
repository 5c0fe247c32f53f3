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


def test_a_moedist_only_run_selects_on_its_own_curve(va):
    e = [{"epoch": i, "valid": {"moedist": {"ndcg@20": v}}, "test": {"moedist": {"ndcg@10": t}}}
         for i, (v, t) in enumerate([(0.1, 0.05), (0.3, 0.07), (0.2, 0.09)])]
    assert va._best_epochs(e, ("moedist",)) == {"moedist": 1}
    assert va._patience_spent(e, 1, ("moedist",)) and not va._patience_spent(e, 2, ("moedist",))
    out = va.best_epoch_comparison(e, {}, patience=1, seed=0, codes=("moedist",))
    assert out["best_epoch"] == {"moedist": 1} and out["test_at_best"] == {"ndcg@10": 0.07}


def _row(epoch: int, valid: float, test10: float, test20: float) -> dict:
    return {"valid": {"ndcg@20": valid}, "test": {"ndcg@10": test10, "ndcg@20": test20}}


def test_a_replicate_curve_is_compared_with_both_curves_of_the_reference_run(va):
    # epochs 0..29 for the reference; this run covers 0..27 (a shorter run) plus an epoch the reference lacks
    ref_rows, this_rows = [], []
    for i in range(30):
        ours, theirs = _row(i, 0.05 + i / 1000, 0.040, 0.060), _row(i, 0.05, 0.030 if i < 26 else 0.050, 0.070)
        ref_rows.append({"epoch": i, "valid": {"moedist": ours["valid"], "authors": theirs["valid"]},
                         "test": {"moedist": ours["test"], "authors": theirs["test"]}})
    for i in list(range(28)) + [40]:
        mine = _row(i, 0.06 if i == 3 else 0.01, 0.045, 0.065)
        this_rows.append({"epoch": i, "valid": {"moedist": mine["valid"]}, "test": {"moedist": mine["test"]}})
    out = va.against_reference(this_rows, {"epochs": ref_rows}, "ref.json")
    assert [r["epoch"] for r in out["per_epoch"]] == list(range(28))  # epoch 40 has no reference row
    s = out["summary"]
    assert s["epochs_compared"] == 28
    t10 = s["test ndcg@10"]
    mine_vs_ours = t10["this − reference moedist"]["all"]
    assert mine_vs_ours["mean"] == pytest.approx(0.005) and mine_vs_ours["ahead"] == 28 and mine_vs_ours["behind"] == 0
    late = t10["this − reference authors"]["26-"]
    assert late["epochs"] == 2 and late["mean"] == pytest.approx(-0.005) and late["behind"] == 2
    early = t10["reference moedist − reference authors"]["0-25"]
    assert early["epochs"] == 26 and early["mean"] == pytest.approx(0.010) and early["largest_abs"] == pytest.approx(0.010)
    assert s["test ndcg@20"]["this − reference authors"]["all"]["mean"] == pytest.approx(-0.005)
    best = s["at_best_over_these_epochs"]
    assert best["this"] == {"epoch": 3, "valid": 0.06, "test ndcg@10": 0.045}
    assert best["reference moedist"]["epoch"] == 27  # its valid curve rises; the last shared epoch is 27
    assert best["reference authors"]["epoch"] == 0  # flat: the first epoch counts


def test_an_authors_only_run_selects_on_and_compares_the_authors_curve(va):
    e = [{"epoch": i, "valid": {"authors": {"ndcg@20": v}}, "test": {"authors": {"ndcg@10": t, "ndcg@20": t}}}
         for i, (v, t) in enumerate([(0.2, 0.05), (0.1, 0.07), (0.15, 0.09)])]
    out = va.best_epoch_comparison(e, {}, patience=2, seed=0, codes=("authors",))
    assert out["best_epoch"] == {"authors": 0} and out["stopped_early"]
    assert out["test_at_best"] == {"ndcg@10": 0.05, "ndcg@20": 0.05}
    ref = [{"epoch": i, "valid": {"moedist": {"ndcg@20": 0.1}, "authors": {"ndcg@20": 0.1}},
            "test": {"moedist": {"ndcg@10": 0.02, "ndcg@20": 0.02}, "authors": {"ndcg@10": 0.04, "ndcg@20": 0.04}}}
           for i in range(3)]
    cmp = va.against_reference(e, {"epochs": ref}, "ref.json", "authors")
    assert cmp["this"] == "authors"
    assert [r["test ndcg@10"]["this"] for r in cmp["per_epoch"]] == [0.05, 0.07, 0.09]
    t10 = cmp["summary"]["test ndcg@10"]
    assert t10["this − reference authors"]["all"]["mean"] == pytest.approx(0.03)
    assert t10["this − reference moedist"]["all"]["mean"] == pytest.approx(0.05)
    assert cmp["summary"]["at_best_over_these_epochs"]["this"]["epoch"] == 0
    with pytest.raises(KeyError):  # an authors-only curve has no moedist rows to compare
        va.against_reference(e, {"epochs": ref}, "ref.json", "moedist")


def test_the_codes_a_run_trains(va):
    from types import SimpleNamespace as NS
    assert va.trained_codes(NS(moedist_only=False, authors_only=False)) == ("moedist", "authors")
    assert va.trained_codes(NS(moedist_only=True, authors_only=False)) == ("moedist",)
    assert va.trained_codes(NS(moedist_only=False, authors_only=True)) == ("authors",)
