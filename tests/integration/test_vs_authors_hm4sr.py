"""moedist's HM4SR against the authors' released code (benchmarks/vs_authors_hm4sr.py).

Runs only where a checkout of github.com/SStarCCat/HM4SR is named by ``MOEDIST_HM4SR_AUTHORS``
(and, if they are not importable already, the modules its bundled RecBole needs by
``MOEDIST_AUTHORS_EXTRA_PATH``: ``pip install --no-deps --target DIR colorlog colorama texttable
thop``). The authors' code is not redistributed with moedist, so this is skipped elsewhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AUTHORS = os.environ.get("MOEDIST_HM4SR_AUTHORS")
EXTRA = os.environ.get("MOEDIST_AUTHORS_EXTRA_PATH")

pytestmark = pytest.mark.skipif(
    not AUTHORS or not (Path(AUTHORS) / "recbole_model" / "HM4SR.py").is_file(),
    reason="MOEDIST_HM4SR_AUTHORS does not name a checkout of the authors' HM4SR code",
)


def _cmd(toy_data, toy_features, out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_authors_hm4sr.py"), "--authors", AUTHORS,
           "--data", str(toy_data), "--features", str(toy_features), "--out", str(out),
           "--threads", "1", "--check-batch-size", "64", "--batch-size", "64", *extra]
    return cmd + (["--extra-path", EXTRA] if EXTRA else [])


def _run(toy_data, toy_features, out: Path, *extra: str) -> dict:
    proc = subprocess.run(_cmd(toy_data, toy_features, out, *extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_same_weights_give_the_same_scores_losses_and_gradients(toy_data, toy_features, tmp_path):
    eq = _run(toy_data, toy_features, tmp_path / "eq.json", "--epochs", "0", "--check-batches", "2")["equivalence"]
    # float32 reductions in a different order: agreement to a few ulps, far below any modelling difference
    for key in ("scores", "ce", "idcl", "cp", "pcl", "total"):
        assert eq["max_rel_diff"][key] < 1e-5, (key, eq)
    assert eq["gradients"]["parameters_compared"] >= 100
    assert eq["gradients"]["max_rel_diff"] < 1e-3, eq["gradients"]
    # toy timestamps are whole days: float32 seconds lose nothing, so no interval bucket moves
    assert eq["interval_buckets"]["differ_raw_seconds"] == 0


def test_training_side_by_side_records_each_epoch_once_and_resumes(toy_data, toy_features, tmp_path):
    out = tmp_path / "train.json"
    first = _run(toy_data, toy_features, out, "--epochs", "1", "--max-steps", "2", "--check-batches", "1")
    assert [e["epoch"] for e in first["epochs"]] == [0]
    second = _run(toy_data, toy_features, out, "--epochs", "2", "--max-steps", "2", "--check-batches", "1")
    assert [e["epoch"] for e in second["epochs"]] == [0, 1]
    assert second["epochs"][0] == first["epochs"][0]  # the finished epoch is not redone
    for row in second["epochs"]:
        for split in ("valid", "test"):
            for who in ("moedist", "authors"):
                assert 0.0 <= row[split][who]["ndcg@10"] <= 1.0
        assert row["train_loss"]["moedist"] > 0 and row["train_loss"]["authors"] > 0
    final = second["final_paired"]
    assert final["after_epochs"] == 2
    last = second["epochs"][-1]["test"]
    for who in ("moedist", "authors"):  # the paired comparison is of the same final models
        assert final["test ndcg@10"][who] == pytest.approx(last[who]["ndcg@10"])
    t = final["test ndcg@10"]
    assert t["mean_diff"] == pytest.approx(t["moedist"] - t["authors"])
    assert t["ci95"][0] <= t["mean_diff"] <= t["ci95"][1] and 0.0 < t["p_value"] <= 1.0


def test_with_dropout_on_both_codes_have_the_same_expected_loss(toy_data, toy_features, tmp_path):
    """Dropout and PCL draws in train mode, moedist's weights after 3 epochs in both: the two
    codes' mean losses agree within a few standard errors, and moedist's exact and float32 times
    (identical on whole days) give identical losses under the same draws. (Trained weights, not
    initial ones: there the loss hardly depends on dropout. With the authors' embedding dropout
    at 0.4 instead of 0.5 the difference here is 18 standard errors.)"""
    res = _run(toy_data, toy_features, tmp_path / "drop.json", "--epochs", "3", "--check-batches", "1",
               "--dropout-check", "30", "--dropout-check-batches", "2")
    chk = res["dropout_check"]
    assert chk["weights"] == "moedist's after epoch 2" and chk["draws"] == 30 and chk["batches"] == 2
    means = chk["mean_loss"]
    assert means["moedist, exact times"] == means["moedist, float32 times"]
    assert chk["loss_std_per_draw"] > 0  # dropout really is on: the draws differ
    d = chk["moedist, float32 times − authors"]
    assert d["standard_error"] > 0
    assert abs(d["mean_diff"]) < 4 * d["standard_error"], chk


# Nothing random reaches either loss: no dropout, PCL weighted 0.
DETERMINISTIC = ["--override", "hm4sr.hidden_dropout_prob=0", "--override", "hm4sr.attn_dropout_prob=0",
                 "--override", "hm4sr.lambda_pcl=0", "--epochs", "2", "--max-steps", "2", "--check-batches", "1"]


@pytest.fixture(scope="module")
def deterministic_reference(toy_data, toy_features, tmp_path_factory) -> tuple[Path, dict]:
    """A side-by-side run with nothing random in either loss."""
    path = tmp_path_factory.mktemp("vs-authors-ref") / "ref.json"
    return path, _run(toy_data, toy_features, path, *DETERMINISTIC)


@pytest.mark.parametrize("who", ["moedist", "authors"])
def test_a_single_code_run_repeats_the_side_by_side_runs_weights_and_batches(
        who, toy_data, toy_features, tmp_path, deterministic_reference):
    """Nothing random reaches the loss (no dropout, PCL weighted 0): a ``--moedist-only`` or
    ``--authors-only`` run, whatever its --draw-seed, retraces the side-by-side run's curve of
    that code exactly, so both start from the same weights and see the same batches. With
    dropout on, another --draw-seed gives other draws, and a finished epoch is never continued
    under other draws or in the other mode."""
    other_who = "authors" if who == "moedist" else "moedist"
    flag, other = f"--{who}-only", f"--{other_who}-only"
    ref_path, ref = deterministic_reference
    alone = _run(toy_data, toy_features, tmp_path / "alone.json", *DETERMINISTIC, flag, "--draw-seed", "3",
                 "--reference", str(ref_path))
    assert alone["settings"][f"{who}_only"] and alone["settings"]["draw_seed"] == 3
    assert not alone["settings"][f"{other_who}_only"]
    for mine, theirs in zip(alone["epochs"], ref["epochs"], strict=True):
        assert set(mine["test"]) == set(mine["train_loss"]) == {who} and "paired" not in mine
        assert mine["train_loss"][who] == pytest.approx(theirs["train_loss"][who], rel=1e-6)
        assert mine["test"][who] == pytest.approx(theirs["test"][who], rel=1e-6)
    cmp = alone["against_reference"]
    assert cmp["this"] == who and len(cmp["per_epoch"]) == 2
    for row in cmp["per_epoch"]:
        t = row["test ndcg@10"]
        assert t["this"] == pytest.approx(t[f"reference {who}"], rel=1e-6)
    s = cmp["summary"]["test ndcg@10"][f"this − reference {who}"]["all"]
    assert abs(s["mean"]) < 1e-6

    draws = ["--epochs", "1", "--max-steps", "2", "--check-batches", "1"]
    a = _run(toy_data, toy_features, tmp_path / "a.json", *draws, flag, "--draw-seed", "1")
    b = _run(toy_data, toy_features, tmp_path / "b.json", *draws, flag, "--draw-seed", "2")
    assert a["epochs"][0]["train_loss"][who] != b["epochs"][0]["train_loss"][who]
    for resume, message in (([flag, "--draw-seed", "2"], "draw_seed: 1 -> 2"),
                            ([other, "--draw-seed", "1"], f"{who}_only: True -> False")):
        proc = subprocess.run(_cmd(toy_data, toy_features, tmp_path / "a.json", *draws, *resume),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        assert json.loads((tmp_path / "a.json").read_text()) == a


def test_single_code_runs_refuse_checks_that_need_both_models_and_a_reference_of_another_seed(
        toy_data, toy_features, tmp_path):
    base = _cmd(toy_data, toy_features, tmp_path / "x.json")
    proc = subprocess.run(base + ["--moedist-only", "--time-input-check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--time-input-check and --dropout-check need both models" in proc.stderr
    proc = subprocess.run(base + ["--authors-only", "--dropout-check", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "drop --authors-only" in proc.stderr
    proc = subprocess.run(base + ["--authors-only", "--moedist-only"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exclude each other" in proc.stderr
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"settings": {"seed": 7}, "epochs": [{"test": {"authors": {"ndcg@10": 0.1}}}]}))
    proc = subprocess.run(base + ["--moedist-only", "--reference", str(ref)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "seed 7" in proc.stderr and str(ref) in proc.stderr
    ref.write_text("{}")
    proc = subprocess.run(base + ["--reference", str(ref)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a finished side-by-side result" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_resume_refuses_other_steps_data_or_features_and_the_check_follows_its_settings(
        toy_data, toy_features, tmp_path):
    """A finished epoch is not continued with another --max-steps or with other dataset or
    feature content (the same content under another path is fine); before the first epoch, an
    equivalence check made with another seed or other overrides is redone, not kept."""
    import shutil

    import numpy as np

    from moedist.features.store import load_item_features, write_feature_arrays

    out = tmp_path / "r.json"
    first = _run(toy_data, toy_features, out, "--epochs", "1", "--max-steps", "2", "--check-batches", "1")
    moved = tmp_path / "features-copy"
    shutil.copytree(toy_features, moved)
    feats = load_item_features(toy_features)
    other = tmp_path / "features-other"
    write_feature_arrays(other, item_ids=feats.item_ids[1:],
                         arrays={m: np.ascontiguousarray(t[1:].numpy()[::-1]) for m, t in feats.features.items()})
    for steps, features, message in (("3", toy_features, "max_steps: 2 -> 3"), ("2", other, "--features: other content")):
        cmd = _cmd(toy_data, toy_features, out, "--epochs", "2", "--check-batches", "1", "--max-steps", steps)
        cmd[cmd.index("--features") + 1] = str(features)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        assert json.loads(out.read_text()) == first
    cmd = _cmd(toy_data, toy_features, out, "--epochs", "2", "--max-steps", "2", "--check-batches", "1")
    cmd[cmd.index("--features") + 1] = str(moved)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [e["epoch"] for e in json.loads(out.read_text())["epochs"]] == [0, 1]

    eq = tmp_path / "eq.json"
    a = _run(toy_data, toy_features, eq, "--epochs", "0", "--check-batches", "1")["equivalence"]
    assert a["checked_with"]["seed"] == 2025
    b = _run(toy_data, toy_features, eq, "--epochs", "0", "--check-batches", "1", "--seed", "7")["equivalence"]
    assert b["checked_with"]["seed"] == 7 and b != a
    c = _run(toy_data, toy_features, eq, "--epochs", "0", "--check-batches", "1", "--seed", "7")["equivalence"]
    assert c == b  # the same settings: the check is kept
