"""``run_tune`` on a local Ray instance it starts itself (no ``ray_local`` fixture here): a
trial that cannot fit is refused instead of waiting, and a finished search rerun does not
retrain its best config again when a one-worker trial trains with a DeepSpeed engine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moedist.errors import ConfigError
from moedist.train.cli import load_experiment_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SMALL = ["hm4sr.modalities=[id]", "hm4sr.hidden_size=16", "hm4sr.inner_size=32", "hm4sr.n_layers=1",
         "hm4sr.max_seq_len=10", "train.batch_size=64", "train.eval_batch_size=256", "train.progress=false",
         "dist.workers=1", "dist.max_failures=0", "train.epochs=1"]


@pytest.fixture
def no_ray():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("needs a process where Ray is not initialised (run_tune starts its own)")
    yield
    assert not ray.is_initialized(), "run_tune left the Ray instance it started running"


def test_a_trial_the_local_cluster_cannot_hold_is_refused_with_max_concurrent(toy_data, tmp_path, no_ray):
    """With --max-concurrent the trial used to wait for 8 CPUs on the 4-CPU local cluster this
    call started (7 days, the default worker start timeout); the timeout here bounds the old wait."""
    from moedist.tune.run import run_tune

    cfg = load_experiment_config("hm4sr", None, [f"data={toy_data}", *SMALL, "dist.cpus_per_worker=8"])
    with pytest.raises(ConfigError, match=r"one trial needs CPU 8.*the Ray cluster has CPU 4"):
        run_tune(cfg, num_samples=1, max_concurrent=1, experiment_name="too-big", storage_path=tmp_path, verbose=0,
                 echo=lambda s: None, worker_start_timeout_s=20)
    assert not (tmp_path / "too-big" / "results.csv").exists()


def test_rerun_keeps_the_retrained_best_of_a_one_worker_deepspeed_search(toy_data, tmp_path, no_ray):
    """A one-worker trial that needs a DeepSpeed engine (bf16 here; dist.precision=auto on a GPU)
    used to record dist.deepspeed=true in its config.yaml (the launcher set it on the config):
    the rerun then took the retrained best for another config, deleted it and trained it again.
    The config is now recorded as given."""
    from moedist.tune.run import run_tune

    cfg = load_experiment_config("hm4sr", None, [f"data={toy_data}", *SMALL, "dist.precision=bf16"])
    kwargs = dict(num_samples=1, max_concurrent=1, experiment_name="bf16", storage_path=tmp_path, verbose=0)
    first = run_tune(cfg, echo=lambda s: None, **kwargs)
    assert first["complete"] and first["best_results"] is not None
    results = tmp_path / "bf16" / "best" / "results.json"
    stamp = results.stat().st_mtime_ns
    said: list[str] = []
    again = run_tune(cfg, echo=said.append, **kwargs)
    assert again["restored"] and again["best_results"] == json.loads(results.read_text()) == first["best_results"]
    assert any("best config already retrained" in line for line in said), said
    assert not any("retraining the best config" in line for line in said), said
    assert results.stat().st_mtime_ns == stamp
    recorded = Path(again["experiment_dir"], "best", "config.yaml").read_text()
    assert "deepspeed: false" in recorded and "precision: bf16" in recorded
