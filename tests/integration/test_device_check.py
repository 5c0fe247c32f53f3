"""benchmarks/device_check.py on the CPU: the GPU forms of every layer against the CPU forms,
local training against a DeepSpeed engine, device evaluation against the CPU's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_check.py"


def _run(toy_data, toy_features, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--data", str(toy_data), "--features", str(toy_features), "--out", str(out),
           "--device", "cpu", "--batch-size", "64", "--steps", "8", "--threads", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_gpu_forms_local_and_deepspeed_training_and_evaluation_agree_on_the_cpu(precision, toy_data, toy_features, tmp_path):
    """``auto`` is fp32 DeepSpeed over gloo on the CPU: the same trajectory as local training.
    ``bf16`` is what a GPU runs (the module in bf16, float32 masters in DeepSpeed's wrapper,
    float32 features and scores): every model trains, close to the float32 run."""
    from moedist.data.dataset import PreparedDataset
    from moedist.train.cli import load_experiment_config
    from moedist.train.loop import build_model, load_features_for

    out = tmp_path / "check.json"
    proc = _run(toy_data, toy_features, out, "--deepspeed-precision", precision)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and set(res["models"]) == {"hm4sr", "sasrec", "mamex", "content"}
    data = PreparedDataset(toy_data)
    for name, row in res["models"].items():
        sw = row["same_weights"]
        cfg = load_experiment_config(name, None, [f"data={toy_data}", f"features={toy_features}"])
        model = build_model(cfg, data, load_features_for(cfg, data))
        trainable = sum(1 for p in model.parameters() if p.requires_grad)
        # every trainable tensor has a gradient on both sides, and each was compared
        assert sw["tensors_compared"] == trainable, (name, sw, trainable)
        assert sw["max_rel_diff"]["loss"] < 1e-4 and sw["max_rel_diff"]["gradients"] < 1e-3, (name, sw)
        tr = row["training"]
        local, ds = tr["local"]["losses"], tr["deepspeed"]["losses"]
        assert len(local) == len(ds) == 8 and not tr["local"]["tensors_not_updated"]
        if precision == "auto":
            assert tr["deepspeed"]["dtype"] == "float32" and tr["rtol"] == 1e-4
            # float32 on both sides, the same batches and dropout draws: the same trajectory
            for a, b in zip(local, ds):
                assert b == pytest.approx(a, rel=1e-5), (name, local, ds)
            assert tr["weights_apart_over_moved"] < 1e-4
        else:
            assert tr["deepspeed"]["dtype"] == "bfloat16" and tr["rtol"] == 0.02
            assert tr["mean_loss_rel_diff"] < 0.02 and 0 < tr["weights_apart_over_moved"] < 0.8
            assert tr["deepspeed_moved_over_local_moved"] > 0.5
        assert sum(local[4:]) / 4 < local[0], (name, local)
        ev = row["evaluation"]
        assert ev["max_abs_diff"] < 1e-3
        for metrics in (ev["valid_on_device"], ev["valid_deepspeed_on_device"]):
            assert 0.0 < metrics["ndcg@10"] <= 1.0
        assert ev["valid_on_device"]["ndcg@10"] == pytest.approx(ev["valid_on_cpu"]["ndcg@10"], abs=1e-3)


def test_a_failed_check_exits_1_and_says_which(toy_data, toy_features, tmp_path):
    out = tmp_path / "check.json"
    proc = _run(toy_data, toy_features, out, "--models", "content", "--train-rtol", "0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] is False
    row = res["models"]["content"]
    assert row["same_weights"]["ok"] and row["evaluation"]["ok"]
    assert not row["training"]["ok"] and row["training"]["rtol"] == 0.0
    assert "FAILED" in proc.stdout


def test_bad_arguments_are_refused_before_anything_runs(toy_data, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(toy_data), "--out", str(tmp_path / "x.json"),
                           "--device", "cpu", "--models", "mamex"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--features is needed for mamex" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(toy_data), "--out", str(tmp_path / "x.json"),
                           "--device", "cpu", "--models", "bert4rec"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown model(s) ['bert4rec']" in proc.stderr
    assert not (tmp_path / "x.json").exists()
