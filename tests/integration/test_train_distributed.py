"""Ray Train + DeepSpeed workers against the single-process loop (CPU, gloo).

With dropout off, a data-parallel step on a global batch split across workers equals the
single-process step on the same batch; so whole runs must agree up to float tolerance —
across worker counts, ZeRO stages, a resume on another topology, and a killed worker.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from moedist.train.cli import load_experiment_config
from moedist.train.launch import launch
from moedist.train.loop import run_training

pytestmark = pytest.mark.integration

BASE = ["train.batch_size=50", "train.eval_batch_size=64", "train.progress=false", "train.lr=0.003",
        "sasrec.hidden_size=16", "sasrec.inner_size=32", "sasrec.n_layers=1", "sasrec.max_seq_len=10",
        "sasrec.hidden_dropout_prob=0.0", "sasrec.attn_dropout_prob=0.0", "dist.max_failures=0",
        "dist.cpus_per_worker=1"]


def cfg(data, run_dir, *extra):
    return load_experiment_config("sasrec", None, [f"data={data}", f"run_dir={run_dir}", *BASE, *extra])


def weights(run_dir, which="last"):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "checkpoints" / which / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-4):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("attention.key.bias"):
            # softmax ignores a shift shared by all keys, so this bias's true gradient is 0 and
            # what it gets is rounding noise, which Adam normalises into lr-sized steps
            continue
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(toy_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("single") / "run"
    res = run_training(cfg(toy_data, d, "train.epochs=3"), echo=lambda s: None)
    return d, res


@pytest.fixture(scope="module")
def two_workers(toy_data, tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("two") / "run"
    res = launch(cfg(toy_data, d, "train.epochs=3", "dist.workers=2"), echo=lambda s: None)
    return d, res


def test_two_workers_equal_one_process(single, two_workers):
    (d1, r1), (d2, r2) = single, two_workers
    assert r2["workers"] == 2
    assert losses(d2) == pytest.approx(losses(d1), rel=1e-5)
    assert_same_weights(d1, d2)
    assert r2["test"] == pytest.approx(r1["test"], abs=2e-3)


def test_zero_stage_2_equals_stage_0(toy_data, tmp_path, two_workers, ray_local):
    d = tmp_path / "z2"
    launch(cfg(toy_data, d, "train.epochs=3", "dist.workers=2", "dist.zero_stage=2"), echo=lambda s: None)
    assert_same_weights(two_workers[0], d)


def test_checkpoint_from_two_workers_resumes_on_one(toy_data, tmp_path, two_workers, ray_local):
    d = tmp_path / "resume"
    launch(cfg(toy_data, d, "train.epochs=1", "dist.workers=2", "dist.zero_stage=1"), echo=lambda s: None)
    state = json.loads((d / "checkpoints" / "last" / "state.json").read_text())
    assert state["world_size"] == 2 and state["epoch"] == 0
    run_training(cfg(toy_data, d, "train.epochs=3"), echo=lambda s: None)  # local, 1 process
    assert len(losses(d)) == 3
    assert losses(d) == pytest.approx(losses(two_workers[0]), rel=1e-5)
    assert_same_weights(two_workers[0], d)


def _kill_a_worker_after_first_epoch(run_dir: Path, done: threading.Event, killed: list) -> None:
    """Kill one training worker at a moment when at least one epoch, and not the last, is on disk."""
    try:
        workers = _train_workers(2, lambda: not done.is_set(), timeout=600)
        seen = _freeze_after_first_epoch(run_dir, workers, lambda: not done.is_set(), timeout=600)
        workers[0].kill()
        killed.append((workers[0].pid, seen))
        for p in workers[1:]:
            p.resume()
    except Exception as e:  # reported by the test, which cannot see this thread's failures
        killed.append(e)


def test_killed_worker_resumes_and_matches_uninterrupted_run(toy_data, tmp_path, two_workers, ray_local):
    d = tmp_path / "killed"
    done, killed = threading.Event(), []
    t = threading.Thread(target=_kill_a_worker_after_first_epoch, args=(d, done, killed), daemon=True)
    t.start()
    try:
        res = launch(cfg(toy_data, d, "train.epochs=3", "dist.workers=2", "dist.max_failures=2"), echo=lambda s: None)
    finally:
        done.set()
        t.join(5)
    assert killed and not isinstance(killed[0], Exception), killed
    assert killed[0][1] < 3, f"the worker was killed after the last epoch ({killed[0][1]} on disk)"
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert losses(d) == pytest.approx(losses(two_workers[0]), rel=1e-5)
    assert_same_weights(two_workers[0], d)
    assert res["test"] == pytest.approx(two_workers[1]["test"], abs=1e-9)


HM4SR_SMALL = ["hm4sr.hidden_size=16", "hm4sr.inner_size=32", "hm4sr.n_layers=1", "hm4sr.max_seq_len=10",
               "hm4sr.hidden_dropout_prob=0.0", "hm4sr.attn_dropout_prob=0.0", "hm4sr.k1=3",
               "hm4sr.use_idcl=false", "hm4sr.use_pcl=false", "hm4sr.use_cp=false", "hm4sr.alpha_init=[1.0,1.0,1.0]",
               # the absolute-time embedding multiplies raw Unix seconds (~1e9, spec G-HM-3): its
               # gradients turn float rounding differences into visible ones within a few steps
               "hm4sr.use_tmoe=false"]


def hm4sr_cfg(data, features, run_dir, *extra):
    return load_experiment_config("hm4sr", None, [f"data={data}", f"features={features}", f"run_dir={run_dir}",
                                                  *BASE[:4], "dist.max_failures=0", *HM4SR_SMALL, *extra])


def test_expert_parallel_training_equals_replicated_experts(toy_data, toy_features, tmp_path, ray_local):
    """HM4SR with its 3 Interactive-MoE experts sharded 2+1 over 2 workers trains like
    the replicated model; its checkpoint (experts and Adam moments by global index) resumes in
    one process and on 2 workers with ep_size=1, continuing exactly like the replicated run."""
    import shutil

    ep = tmp_path / "ep2"
    launch(hm4sr_cfg(toy_data, toy_features, ep, "train.epochs=2", "dist.workers=2", "dist.ep_size=2"), echo=lambda s: None)
    rep = tmp_path / "ep1"
    launch(hm4sr_cfg(toy_data, toy_features, rep, "train.epochs=2", "dist.workers=2"), echo=lambda s: None)
    assert json.loads((ep / "checkpoints" / "last" / "state.json").read_text())["ep_size"] == 2
    w = weights(ep)
    assert w["interactive_moe.experts.weight"].shape[0] == 3  # stored whole, by global expert index
    assert losses(ep) == pytest.approx(losses(rep), rel=1e-5)
    assert_same_weights(ep, rep)
    ep_on_two = tmp_path / "ep2-then-2-workers"
    shutil.copytree(ep, ep_on_two)
    # continue: the replicated run in one process, the ep_size=2 checkpoint in one process and on 2 workers
    run_training(hm4sr_cfg(toy_data, toy_features, rep, "train.epochs=3"), echo=lambda s: None)
    run_training(hm4sr_cfg(toy_data, toy_features, ep, "train.epochs=3"), echo=lambda s: None)
    launch(hm4sr_cfg(toy_data, toy_features, ep_on_two, "train.epochs=3", "dist.workers=2"), echo=lambda s: None)
    for d in (ep, ep_on_two):
        assert len(losses(d)) == 3
        assert losses(d)[:2] == pytest.approx(losses(rep)[:2], rel=1e-5)
        assert_same_weights(d, rep)
    # one process vs two workers differ only in float summation order in the third epoch
    assert losses(ep_on_two)[2] == pytest.approx(losses(rep)[2], rel=1e-4)


def test_expert_parallel_with_zero_is_refused_up_front(toy_data, toy_features, tmp_path):
    from moedist.errors import ConfigError
    from moedist.train.loop import DistContext, apply_expert_parallel

    c = hm4sr_cfg(toy_data, toy_features, tmp_path, "dist.workers=2", "dist.ep_size=2", "dist.zero_stage=1")
    with pytest.raises(ConfigError, match="zero_stage=0"):
        apply_expert_parallel(c, DistContext(rank=0, world=2))
    with pytest.raises(ConfigError, match="zero_stage=0"):  # by the launcher, before any worker starts
        launch(c, echo=lambda s: None)
    c = hm4sr_cfg(toy_data, toy_features, tmp_path, "dist.workers=3", "dist.ep_size=2")
    with pytest.raises(ConfigError, match="must divide"):
        apply_expert_parallel(c, DistContext(rank=0, world=3))
    with pytest.raises(ConfigError, match="must divide"):
        launch(c, echo=lambda s: None)
    assert not (tmp_path / "config.yaml").exists()  # nothing was started


def test_memory_per_worker_is_reserved_from_rays_memory_resource(toy_data, toy_features, tmp_path, ray_local):
    """``dist.memory_per_worker`` becomes each Ray Train worker's ``memory`` reservation, and a
    run whose workers cannot all fit the local cluster is refused instead of waiting forever."""
    from moedist.errors import ConfigError
    from moedist.train.launch import build_trainer, check_cluster_fits, worker_resources

    c = hm4sr_cfg(toy_data, toy_features, tmp_path, "dist.workers=2", "dist.memory_per_worker=0.5")
    res = worker_resources(c, use_gpu=False)
    assert res == {"CPU": 1.0, "memory": 0.5 * 2**30}
    trainer = build_trainer(c, use_gpu=False)
    assert trainer.scaling_config.resources_per_worker == res
    assert worker_resources(hm4sr_cfg(toy_data, toy_features, tmp_path), use_gpu=True) == {"CPU": 1.0, "GPU": 1.0}
    node_memory = ray_local.cluster_resources()["memory"]  # Ray's logical memory resource (bytes)
    check_cluster_fits({"CPU": 1.0, "memory": node_memory / 2}, 2)  # fits exactly
    with pytest.raises(ConfigError, match=r"3 worker\(s\) need memory .* GiB but the local Ray cluster has memory .* GiB; .*dist.memory_per_worker"):
        check_cluster_fits({"CPU": 1.0, "memory": node_memory / 2}, 3)
    with pytest.raises(ConfigError, match="need CPU 8 but the local Ray cluster has CPU 4"):
        check_cluster_fits({"CPU": 1.0}, 8)


def test_two_worker_runs_are_deterministic(toy_data, tmp_path, two_workers, ray_local):
    """The same seed and worker count give identical losses and metrics, not just close ones."""
    d = tmp_path / "again"
    res = launch(cfg(toy_data, d, "train.epochs=3", "dist.workers=2"), echo=lambda s: None)
    assert losses(d) == losses(two_workers[0])
    assert res["test"] == two_workers[1]["test"] and res["valid"] == two_workers[1]["valid"]


def _train_workers(n: int, running, timeout: float) -> list:
    """psutil handles of the run's ``n`` Ray Train worker processes, once they exist;
    ``running()`` says whether the run is still going."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in psutil.process_iter(["cmdline"])
                 if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
        if len(found) >= n:
            return found
        if not running():
            raise RuntimeError("the run ended before its workers were found")
        time.sleep(0.05)
    raise RuntimeError(f"fewer than {n} training workers after {timeout:.0f} s")


def _freeze_after_first_epoch(run_dir: Path, workers: list, running, timeout: float) -> int:
    """Leave the workers SIGSTOPped at a moment when at least one epoch is on disk; returns
    the number of epochs on disk then.

    The file is read only while every worker is stopped, so what it shows is where the run
    stays: a toy epoch takes tens of milliseconds, far less than a poll interval plus a
    process scan, so checking first and stopping afterwards can miss the whole run."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in workers:
            _quietly(p.suspend)
        n = metrics.read_text().count("\n") if metrics.is_file() else 0
        if n >= 1:
            return n
        if not running():
            raise RuntimeError("the run ended before epoch 0 was on disk")
        for p in workers:
            _quietly(p.resume)
        time.sleep(0.01)
    raise RuntimeError(f"no epoch in {metrics} after {timeout:.0f} s")


def _quietly(signal_process) -> None:
    """``signal_process()`` (a psutil ``suspend``/``resume``/``kill``), ignoring a process
    that has already exited."""
    import psutil

    try:
        signal_process()
    except psutil.NoSuchProcess:
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_driver_rerun_resumes_in_ray_mode(toy_data, tmp_path, two_workers, ray_local, sig):
    """``moedist train --workers 2`` interrupted after its first epoch (Ctrl-C, or the driver
    killed outright), then the same command again: it resumes from the last checkpoint, and the
    run ends with each epoch exactly once and the uninterrupted run's losses and weights."""
    import subprocess
    import sys

    d = tmp_path / "run"
    cmd = [sys.executable, "-m", "moedist.cli", "train", "--model", "sasrec", "--data", str(toy_data),
           "--run-dir", str(d), "--workers", "2", *BASE, "train.epochs=3"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = tmp_path / "first.log"
    with log.open("w") as out:  # a file, not a pipe: Ray's worker logs would fill a pipe and block
        first = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        paused = []
        try:
            running = lambda: first.poll() is None  # noqa: E731
            paused += _train_workers(2, running, timeout=600)
            _freeze_after_first_epoch(d, paused, running, timeout=600)
            first.send_signal(sig)
            try:
                first.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        finally:
            for p in paused:
                _quietly(p.kill)  # SIGKILL also ends a stopped process
            try:
                first.wait(timeout=120)
            finally:
                if first.poll() is None:
                    first.kill()
    assert first.returncode != 0, f"the interrupted driver reported success:\n{log.read_text()[-2000:]}"
    done = [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert done and done[-1] < 2, f"the driver was interrupted too late to test a resume: epochs {done}"

    again = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resumed from" in again.stdout
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert losses(d) == pytest.approx(losses(two_workers[0]), rel=1e-5)
    assert_same_weights(two_workers[0], d)
    res = json.loads((d / "results.json").read_text())
    assert res["test"] == pytest.approx(two_workers[1]["test"], abs=1e-9)


def test_router_lr_scale_is_honoured_by_deepspeed_with_expert_parallelism(toy_data, toy_features, tmp_path, ray_local):
    """train.router_lr_scale puts the MoE gates in Adam groups of their own: one process
    (torch Adam) and 2 DeepSpeed workers with sharded experts train the same model, and the
    gates end up elsewhere than with the papers' single learning rate."""
    one, two, base = tmp_path / "one", tmp_path / "two", tmp_path / "base"
    run_training(hm4sr_cfg(toy_data, toy_features, one, "train.epochs=2", "train.router_lr_scale=10"), echo=lambda s: None)
    launch(hm4sr_cfg(toy_data, toy_features, two, "train.epochs=2", "train.router_lr_scale=10", "dist.workers=2",
                     "dist.ep_size=2"), echo=lambda s: None)
    run_training(hm4sr_cfg(toy_data, toy_features, base, "train.epochs=2"), echo=lambda s: None)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(one, two)
    w_one, w_base = weights(one), weights(base)
    gate_keys = [k for k in w_one if ".gate" in k]
    assert gate_keys
    for k in gate_keys:
        assert (w_one[k] - w_base[k]).abs().max().item() > 1e-3, k


# evaluation every other epoch: epoch 1's routing statistics come from its last (sharded)
# training pass, epochs 0 and 2's from the evaluation pass
MAMEX_SMALL = ["mamex.embed_dim=8", "mamex.fusion_dropout=0.0", "train.eval_every=2", "train.patience=5"]


def mamex_cfg(data, features, run_dir, *extra):
    return load_experiment_config("mamex", None, [f"data={data}", f"features={features}", f"run_dir={run_dir}",
                                                  *BASE[:4], "dist.max_failures=0", "dist.cpus_per_worker=1",
                                                  *MAMEX_SMALL, *extra])


def test_mamex_two_workers_with_a_sharded_catalogue_equal_one_process(toy_data, toy_features, tmp_path, ray_local):
    """Two workers that each encode half of the item catalogue per step (the default) train
    MAMEX like one process encoding all of it, and like two workers that each encode all of it
    (``mamex.shard_catalogue=false``): losses, weights, routing statistics and test metrics."""
    one, two, whole = tmp_path / "one", tmp_path / "two", tmp_path / "whole"
    r1 = run_training(mamex_cfg(toy_data, toy_features, one, "train.epochs=3"), echo=lambda s: None)
    r2 = launch(mamex_cfg(toy_data, toy_features, two, "train.epochs=3", "dist.workers=2"), echo=lambda s: None)
    r3 = launch(mamex_cfg(toy_data, toy_features, whole, "train.epochs=3", "dist.workers=2",
                          "mamex.shard_catalogue=false"), echo=lambda s: None)
    assert (r1["catalogue_shards"], r2["catalogue_shards"], r3["catalogue_shards"]) == (1, 2, 1)
    for d in (two, whole):
        assert losses(d) == pytest.approx(losses(one), rel=1e-5)
        assert_same_weights(one, d)
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(ref) == 3
    for got, want in zip(records, ref):
        moe_keys = [k for k in want if k.startswith("moe/")]
        assert moe_keys and all(got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6) for k in moe_keys), got["epoch"]
    assert r2["workers"] == 2 and r2["test"] == pytest.approx(r1["test"], abs=1e-6)


def test_a_killed_worker_of_a_fresh_start_resumes_it_instead_of_starting_over(toy_data, tmp_path, two_workers,
                                                                                ray_local):
    """train.resume=false in a folder that an earlier run (another seed) used: Ray's snapshot of
    that run is removed, so the checkpoint Ray hands the workers after a killed worker is this
    run's own, and the retry continues it (epoch 0's log line, with its timings, stays as it
    was written) instead of training from scratch again, to the uninterrupted run's result."""
    d = tmp_path / "fresh"
    launch(cfg(toy_data, d, "train.epochs=2", "dist.workers=2", "train.seed=7"), echo=lambda s: None)
    assert (tmp_path / "ray" / "fresh").is_dir()
    # the killer below watches metrics.jsonl for this run's first epoch: not the earlier run's
    (d / "metrics.jsonl").unlink()
    done, killed = threading.Event(), []
    first_line = []

    def kill_and_remember():
        _kill_a_worker_after_first_epoch(d, done, killed)
        if killed and not isinstance(killed[0], Exception):
            first_line.append((d / "metrics.jsonl").read_text().splitlines()[0])

    t = threading.Thread(target=kill_and_remember, daemon=True)
    t.start()
    said: list[str] = []
    try:
        res = launch(cfg(toy_data, d, "train.epochs=3", "dist.workers=2", "dist.max_failures=2", "train.resume=false"),
                     echo=said.append)
    finally:
        done.set()
        t.join(5)
    assert killed and not isinstance(killed[0], Exception), killed
    assert any("removed Ray's snapshot of the earlier run" in s for s in said), said
    assert any("removed the earlier run's checkpoints" in s for s in said), said
    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    assert first_line and lines[0] == first_line[0]  # resumed, not retrained from epoch 0
    assert losses(d) == pytest.approx(losses(two_workers[0]), rel=1e-5)
    assert res["test"] == pytest.approx(two_workers[1]["test"], abs=1e-9)
