"""moedist's MAMEX against the authors' released code (benchmarks/vs_authors_mamex.py).

Runs only where a checkout of github.com/Rec4Fun/MAMEX is named by ``MOEDIST_MAMEX_AUTHORS``.
The authors' code is not redistributed with moedist, so this is skipped elsewhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AUTHORS = os.environ.get("MOEDIST_MAMEX_AUTHORS")

pytestmark = pytest.mark.skipif(
    not AUTHORS or not (Path(AUTHORS) / "model.py").is_file(),
    reason="MOEDIST_MAMEX_AUTHORS does not name a checkout of the authors' MAMEX code",
)


def _run(toy_data, toy_features, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "vs_authors_mamex.py"), "--authors", AUTHORS,
           "--data", str(toy_data), "--features", str(toy_features), "--out", str(out),
           "--check-batch-size", "64", "--batch-size", "64", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_same_weights_give_the_same_items_losses_and_gradients(toy_data, toy_features, tmp_path):
    result = _run(toy_data, toy_features, tmp_path / "eq.json", "--max-epochs", "0", "--check-batches", "2")
    eq = result["equivalence"]
    assert "splits" not in result or not result["splits"]  # --max-epochs 0 trains nothing
    assert eq["tensors_compared"] == 25  # user table, 2 × (gate w/b + 4 experts × w/b), fusion MLP w/b × 2
    diff = eq["largest_difference"]
    for key in ("item table", "text adapter", "image adapter", "loss bpr", "loss align", "loss total", "gradients"):
        assert diff[key]["relative"] < 1e-5, (key, diff)
    # the balance terms are KLs near 0: compare them absolutely
    for key in ("loss adapter", "loss fusion"):
        assert diff[key]["absolute"] < 1e-6, (key, diff)


@pytest.mark.parametrize("experts,top_k", [(8, 2), (6, 3)])
def test_other_grid_points_use_the_authors_layer_with_that_many_experts(toy_data, toy_features, tmp_path, experts, top_k):
    result = _run(toy_data, toy_features, tmp_path / "eq.json", "--max-epochs", "0", "--check-batches", "2",
                  "--experts", str(experts), "--top-k", str(top_k))
    assert result["settings"]["experts"] == experts and result["settings"]["top_k"] == top_k
    # user table + 2 × (gate w/b + experts × w/b) + fusion MLP w/b × 2
    assert result["equivalence"]["tensors_compared"] == 1 + 2 * (2 + 2 * experts) + 4
    diff = result["equivalence"]["largest_difference"]
    for key in ("item table", "loss total", "gradients"):
        assert diff[key]["relative"] < 1e-5, (key, diff)


def test_training_keeps_each_codes_best_epoch_and_skips_a_finished_split(toy_data, toy_features, tmp_path):
    out = tmp_path / "train.json"
    first = _run(toy_data, toy_features, out, "--max-epochs", "4", "--patience", "2", "--check-batches", "1")
    (name, row), = first["splits"].items()
    curve = row["curve"]
    assert [r["epoch"] for r in curve] == list(range(len(curve))) and 1 <= len(curve) <= 4
    for who in ("moedist", "authors"):
        valid = [r[who]["valid"] for r in curve]
        best = max(range(len(valid)), key=lambda i: (valid[i], -i))  # the first of equal values: strict improvement
        assert row["best_epoch"][who] == best
        assert row["test_at_best"][who]["ndcg@10"] == pytest.approx(curve[best][who]["test"])
        assert row["seconds_per_step"][who] > 0
    paired = row["paired_at_best"]["ndcg@10"]
    assert paired["mean_diff"] == pytest.approx(
        row["test_at_best"]["moedist"]["ndcg@10"] - row["test_at_best"]["authors"]["ndcg@10"])
    assert paired["ci95"][0] <= paired["mean_diff"] <= paired["ci95"][1]
    summary = first["summary"]
    assert summary["splits"] == 1
    assert summary["test ndcg@10"]["mean_diff"] == pytest.approx(paired["mean_diff"])
    second = _run(toy_data, toy_features, out, "--max-epochs", "4", "--patience", "2", "--check-batches", "1")
    assert second["splits"] == first["splits"]  # the finished split is not redone
    # a file holding splits of other settings is refused instead of mixed with them
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "vs_authors_mamex.py"), "--authors", AUTHORS,
           "--data", str(toy_data), "--features", str(toy_features), "--out", str(out), "--experts", "8",
           "--check-batch-size", "64", "--batch-size", "64", "--max-epochs", "4", "--patience", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "other settings (experts)" in proc.stderr


def test_checks_of_other_settings_are_redone_not_kept(toy_data, toy_features, tmp_path):
    out = tmp_path / "eq.json"
    _run(toy_data, toy_features, out, "--max-epochs", "0", "--check-batches", "1", "--speed-steps", "2")
    result = _run(toy_data, toy_features, out, "--max-epochs", "0", "--check-batches", "1", "--speed-steps", "2",
                  "--experts", "8", "--threads", "2")
    assert result["settings"]["experts"] == 8
    assert result["equivalence"]["tensors_compared"] == 1 + 2 * (2 + 2 * 8) + 4  # the 8-expert layers, not the 4
    assert result["speed"]["threads"] == 2
