"""jobs/*.py: which dataset a recipe trains or tunes on (nothing is launched: launch and the
search are replaced by stubs that record the config they are given)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture
def jobs(monkeypatch, toy_data, toy_features):
    """The job modules with Ray, the embedded default and the launch stubbed out."""
    monkeypatch.syspath_prepend(str(JOBS))
    names = ("prepare_data", "train_hm4sr", "tune_hm4sr")
    saved = {n: sys.modules.pop(n, None) for n in names}
    mods = {n: importlib.import_module(n) for n in names}
    calls = {"prepare_default": [], "launch": [], "tune": []}

    def prepare_default(size="small", seed=2025, *, out=None):
        calls["prepare_default"].append(size)
        return toy_data, toy_features

    def launch(cfg, **kw):
        calls["launch"].append(cfg)
        return {}

    def tune_from_args(args, model, **kw):
        from moedist.tune.cli import config_from_args

        calls["tune"].append((args, config_from_args(args, model)))
        return {"experiment_path": "x", "results_csv": "x", "best_config": None, "best_results": None, "complete": True}

    monkeypatch.setattr(mods["prepare_data"], "connect_ray", lambda *a, **k: None)
    monkeypatch.setattr(mods["prepare_data"], "prepare_default", prepare_default)
    monkeypatch.setattr("moedist.train.launch.launch", launch)
    monkeypatch.setattr("moedist.tune.cli.tune_from_args", tune_from_args)
    yield mods, calls
    for n in names:
        sys.modules.pop(n, None)
        if saved[n] is not None:
            sys.modules[n] = saved[n]


def _config(tmp_path, toy_data, toy_features) -> str:
    path = tmp_path / "best.yaml"
    path.write_text(f"data: {toy_data}\nfeatures: {toy_features}\n")
    return str(path)


def test_train_job_uses_the_dataset_of_its_config(jobs, tmp_path, toy_data, toy_features):
    mods, calls = jobs
    assert mods["train_hm4sr"].main(["--config", _config(tmp_path, toy_data, toy_features), "--workers", "0"]) == 0
    assert calls["prepare_default"] == []  # not the embedded synthetic dataset
    (cfg,) = calls["launch"]
    assert Path(cfg.data) == toy_data and Path(cfg.features) == toy_features


def test_train_job_uses_a_data_override(jobs, toy_data):
    mods, calls = jobs
    mods["train_hm4sr"].main(["--workers", "0", f"data={toy_data}", "hm4sr.modalities=[id]"])
    assert calls["prepare_default"] == []
    assert Path(calls["launch"][0].data) == toy_data


def test_train_job_without_a_dataset_runs_the_embedded_default(jobs, toy_data, toy_features):
    mods, calls = jobs
    mods["train_hm4sr"].main(["--workers", "0", "--size", "tiny"])
    assert calls["prepare_default"] == ["tiny"]
    (cfg,) = calls["launch"]
    assert Path(cfg.data) == toy_data and Path(cfg.features) == toy_features


def test_tune_job_uses_the_dataset_of_its_config(jobs, tmp_path, toy_data, toy_features):
    mods, calls = jobs
    assert mods["tune_hm4sr"].main(["--config", _config(tmp_path, toy_data, toy_features), "--samples", "2"]) == 0
    assert calls["prepare_default"] == []
    ((args, cfg),) = calls["tune"]
    assert Path(cfg.data) == toy_data and args.samples == 2


def test_tune_job_without_a_dataset_runs_the_embedded_default(jobs, toy_data):
    mods, calls = jobs
    mods["tune_hm4sr"].main(["--size", "tiny"])
    assert calls["prepare_default"] == ["tiny"]
    ((args, cfg),) = calls["tune"]
    assert Path(cfg.data) == toy_data and args.samples == 4 and args.epochs == 8


def test_train_job_options_are_taken_as_given(jobs, tmp_path, toy_data):
    """--data / --run-dir are paths, not YAML (``exp #2`` used to become ``exp``); a data= or
    dist.workers= override wins over --data and the --workers default, other options win."""
    mods, calls = jobs
    odd = tmp_path / "exp #2"
    odd.symlink_to(toy_data)
    mods["train_hm4sr"].main(["--workers", "0", "--data", str(odd), "--run-dir", "0123", "--epochs", "3",
                              "train.epochs=9", "hm4sr.modalities=[id]"])
    cfg = calls["launch"][-1]
    assert cfg.data == str(odd) and cfg.run_dir == "0123" and cfg.train.epochs == 3 and cfg.dist.workers == 0
    mods["train_hm4sr"].main(["--data", "/elsewhere", f"data={toy_data}", "dist.workers=0", "hm4sr.modalities=[id]"])
    cfg = calls["launch"][-1]
    assert Path(cfg.data) == toy_data and cfg.dist.workers == 0 and not cfg.train.progress


def test_tune_job_takes_zero_samples_as_given(jobs, toy_data, capsys):
    mods, calls = jobs
    mods["tune_hm4sr"].main(["--size", "tiny", "--samples", "0", "--epochs", "0"])
    ((args, cfg),) = calls["tune"]
    assert args.samples == 0 and args.epochs == 0  # were replaced by the embedded default's 4 and 8


def test_prepare_job_paths_are_taken_as_given(jobs, monkeypatch, capsys):
    mods, calls = jobs
    seen = []
    monkeypatch.setattr(mods["prepare_data"], "prepare", lambda cfg, **kw: (seen.append(cfg), ("d", None))[1])
    assert mods["prepare_data"].main(["--source", "amazon", "--input", "/raw/exp #2/r.json.gz", "--out", "0123"]) == 0
    assert seen[0].input == "/raw/exp #2/r.json.gz" and seen[0].out == "0123"  # were "/raw/exp" and 83
