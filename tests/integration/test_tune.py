"""Ray Tune over Ray Train (``moedist.tune``): search spaces, a small ASHA search with its
results table, best config and retrained best; resume; and ``ray job submit`` of
``jobs/tune_hm4sr.py`` against a real head node started (and stopped) by the test.

Everything is tiny (HM4SR on IDs only, hidden size 16, 1-2 epochs, 1 worker per trial) so the
file fits a few minutes on a 2-core machine.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from moedist.config import load_config
from moedist.errors import ConfigError
from moedist.train.cli import load_experiment_config
from moedist.train.config import ExperimentConfig
from moedist.tune.spaces import apply_overrides, get_key, resolve_space, searched_keys, to_tune

REPO = Path(__file__).resolve().parents[2]
METRIC = "valid_ndcg@20"

SMALL = ["hm4sr.modalities=[id]", "hm4sr.hidden_size=16", "hm4sr.inner_size=32", "hm4sr.n_layers=1",
         "hm4sr.max_seq_len=10", "train.batch_size=64", "train.eval_batch_size=256", "train.progress=false",
         "dist.workers=1", "dist.max_failures=0"]


def small_cfg(data, *extra):
    return load_experiment_config("hm4sr", None, [f"data={data}", *SMALL, *extra])


# ----------------------------------------------------------------------------- (c) spaces


def test_default_spaces_are_the_papers():
    hm = resolve_space(None, small_cfg("/nowhere"))
    assert hm["hm4sr.k1"] == {"choice": [2, 4, 6, 8, 12]} and hm["hm4sr.k2"] == {"choice": [2, 4, 6, 8, 12]}
    assert hm["hm4sr.lambda_idcl"] == {"choice": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]}
    assert hm["hm4sr.lambda_pcl"] == {"choice": [0.1, 0.3, 0.5, 0.7, 1.0, 1.5]}
    assert hm["hm4sr.beta_pcl"] == {"choice": [0.1, 0.2, 0.3, 0.4, 0.5]}
    assert hm["hm4sr.tau_idcl"] == {"choice": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]}
    mx = resolve_space(None, load_experiment_config("mamex", None, []))
    assert mx == {"mamex.num_experts": {"choice": [4, 6, 8]}, "mamex.top_k": {"choice": [2, 3, 4]},
                  "mamex.lambda_adapter": {"choice": [1.0, 0.1, 0.01]}, "mamex.lambda_fusion": {"choice": [1.0, 0.1, 0.01]}}


def test_space_yaml_overrides_the_default_key_by_key(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("hm4sr.k1: {grid: [2, 4]}\n"
                    "hm4sr.lambda_pcl: null\n"          # dropped
                    "train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                    "hm4sr.lambda_idcl: {quniform: [0.25, 1.5, 0.25]}\n"
                    "hm4sr:\n  k2: 4\n")                 # nested form, a constant
    space = resolve_space(path, small_cfg("/nowhere"))
    assert space["hm4sr.k1"] == {"grid": [2, 4]}
    assert "hm4sr.lambda_pcl" not in space
    assert space["train.lr"] == {"loguniform": [1e-4, 1e-2]}
    assert space["hm4sr.k2"] == 4 and "hm4sr.k2" not in searched_keys(space)
    assert space["hm4sr.tau_idcl"] == {"choice": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]}  # kept from the default
    tuned = to_tune(space)
    assert tuned["hm4sr.k1"] == {"grid_search": [2, 4]}
    cfg = apply_overrides(small_cfg("/nowhere"), {"hm4sr.k1": 8, "train.lr": 0.003, "hm4sr.k2": 4})
    assert (cfg.hm4sr.k1, cfg.train.lr, cfg.hm4sr.k2) == (8, 0.003, 4)

    path.write_text("inherit: false\nhm4sr.k2: {choice: [2, 4]}\n")
    assert resolve_space(path, small_cfg("/nowhere")) == {"hm4sr.k2": {"choice": [2, 4]}}


def test_space_errors_name_the_key(tmp_path, toy_data):
    path = tmp_path / "bad.yaml"
    path.write_text("hm4sr.k1: {choice: [2, 4]}\nhm4sr.no_such_key: {choice: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'hm4sr\.no_such_key'"):
        resolve_space(path, small_cfg("/nowhere"))
    # refused up front, before any Ray cluster starts
    from moedist.tune.run import run_tune

    with pytest.raises(ConfigError, match="hm4sr.no_such_key"):
        run_tune(small_cfg(toy_data), space=path, num_samples=1, storage_path=tmp_path)
    # the CLI prints it as one error line
    from moedist.cli import main

    assert main(["tune", "--model", "hm4sr", "--data", str(toy_data), "--space", str(path)]) == 2

    path.write_text("hm4sr.k1: {choice: [2, many]}\n")
    with pytest.raises(ConfigError, match="hm4sr.k1.*'many'.*integer"):
        resolve_space(path, small_cfg("/nowhere"))
    path.write_text("hm4sr.k1: {uniform: [4, 2]}\n")
    with pytest.raises(ConfigError, match="hm4sr.k1.*lo < hi"):
        resolve_space(path, small_cfg("/nowhere"))
    path.write_text("hm4sr: {choice: [1, 2]}\n")
    with pytest.raises(ConfigError, match="section"):
        resolve_space(path, small_cfg("/nowhere"))


def test_mamex_top_k_never_exceeds_num_experts(tmp_path):
    from ray.tune.search.variant_generator import generate_variants

    cfg = load_experiment_config("mamex", None, [])
    path = tmp_path / "mx.yaml"
    path.write_text("mamex.top_k: {choice: [2, 6]}\n")
    tuned = to_tune(resolve_space(path, cfg), seed=3)
    pairs = [(v["mamex.num_experts"], v["mamex.top_k"]) for _ in range(30) for _, v in generate_variants(tuned)]
    assert all(k <= e for e, k in pairs)
    assert {k for _, k in pairs} == {2, 6}  # 6 is drawn when 8 experts allow it
    path.write_text("mamex.top_k: {grid: [2, 6]}\nmamex.num_experts: {grid: [4, 8]}\n")
    with pytest.raises(ConfigError, match="mamex.top_k"):
        resolve_space(path, cfg)


def test_concurrency_is_capped_by_what_a_trial_holds():
    from moedist.tune.run import max_concurrent_trials, trial_resources

    cfg = small_cfg("/nowhere", "dist.workers=2")
    need = trial_resources(cfg, use_gpu=False)
    assert need == {"CPU": pytest.approx(2.01)}
    assert max_concurrent_trials(need, {"CPU": 4.0}) == 1  # two would wait on each other's workers
    assert max_concurrent_trials(need, {"CPU": 16.0}) == 7
    assert max_concurrent_trials(trial_resources(cfg, use_gpu=True), {"CPU": 16.0, "GPU": 4.0}) == 2
    with pytest.raises(ConfigError, match="needs") as remote:
        max_concurrent_trials(need, {"CPU": 2.0})
    assert "autoscaling" in str(remote.value)  # a remote cluster may grow: max_concurrent lets trials wait
    with pytest.raises(ConfigError, match="needs") as local:
        max_concurrent_trials(need, {"CPU": 2.0}, local=True)
    assert "autoscaling" not in str(local.value)  # the local cluster this process started will not


def test_a_trial_killed_for_memory_is_named_with_the_remedy():
    from moedist.tune.run import _first_line

    # the shape of Ray 2.60's ControllerError text for workers its memory monitor killed
    err = RuntimeError(
        "Training failed due to controller error:\n"
        "7 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 10.0.0.2, "
        "ID: 3fc6e9) was 22.14GB used / 23.54GB limit (0.940664)\n"
        "OOM kill reason: Memory usage 24033521664B exceeded threshold of 24012259328B\n"
        "Top 10 memory users: PID\tMEM(GB)\tCOMMAND\n5666\t5.46\tray::RayTrainWorker\n"
        "Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/...\n")
    line = _first_line(err)
    assert line.startswith("out of memory: killed by Ray's memory monitor (node memory 22.14GB of 23.54GB)")
    assert "dist.memory_per_worker" in line and "\n" not in line
    assert _first_line(ValueError("a\n\nlast line\n")) == "last line"  # anything else: its last line
    assert _first_line(None) is None


def test_memory_reservation_caps_concurrency_by_the_node_memory():
    """Trials whose workers would together outgrow the node's RAM are not started at once
    (the demo's HM4SR workers peak at about 6 GB: three at once were OOM-killed on 24 GB)."""
    from moedist.tune.run import max_concurrent_trials, trial_resources

    gib = 2**30
    cfg = small_cfg("/nowhere", "dist.workers=1", "dist.memory_per_worker=6")
    need = trial_resources(cfg, use_gpu=False)
    assert need == {"CPU": pytest.approx(1.01), "memory": 6 * gib}
    node = {"CPU": 4.0, "memory": 15.5 * gib}  # a 24 GB machine: Ray's memory resource
    assert max_concurrent_trials(need, node) == 2  # CPUs alone would allow 3
    assert max_concurrent_trials(trial_resources(small_cfg("/nowhere"), use_gpu=False), node) == 3
    two = trial_resources(small_cfg("/nowhere", "dist.workers=2", "dist.memory_per_worker=6"), use_gpu=False)
    assert two["memory"] == 12 * gib and max_concurrent_trials(two, {"CPU": 8.0, "memory": 30 * gib}) == 2
    with pytest.raises(ConfigError, match=r"memory 6\.0 GiB.*memory 5\.0 GiB.*dist.memory_per_worker"):
        max_concurrent_trials(need, {"CPU": 4.0, "memory": 5 * gib})
    with pytest.raises(ConfigError, match="dist.memory_per_worker must be"):
        trial_resources(small_cfg("/nowhere", "dist.memory_per_worker=-1"), use_gpu=False)
    import argparse

    from moedist.tune.cli import add_tune_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_tune_arguments(p)
    args = p.parse_args(["--model", "hm4sr", "--data", "/nowhere", "--memory-per-worker", "5.5"])
    assert config_from_args(args, "hm4sr").dist.memory_per_worker == 5.5


# ----------------------------------------------------------------------------- (d) ray job submit


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ours(temp_dir: str):
    """Processes of the cluster rooted at ``temp_dir``: Ray's own name it on their command
    line, the job's driver runs in its uploaded working dir below it."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if p.pid == os.getpid():
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        cwd = p.info["cwd"] or ""
        if temp_dir in cmd or cwd.startswith(temp_dir):
            found.append(p)
    return found


def _stop_cluster(proc: subprocess.Popen, temp_dir: str) -> None:
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    procs += _ours(temp_dir)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # `ray start --block` then stops what it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    procs += _ours(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_head(tmp_path):
    """A real head node on loopback, started with the venv's ``ray`` and stopped by PID (never
    ``ray stop``, which would stop every Ray on the machine)."""
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray"
    if not ray_bin.exists():
        pytest.skip("no ray executable next to the interpreter")
    gcs, dash, agent_http, agent_grpc, metrics, client, env_agent = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rtj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    log = open(tmp_path / "ray_start.log", "w")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", f"--runtime-env-agent-port={env_agent}", "--num-cpus=4",
         f"--object-store-memory={256 * 1024**2}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{(tmp_path / 'ray_start.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray dashboard did not come up within 120 s")
            time.sleep(1)
        yield {"url": url, "env": env, "ray": str(ray_bin), "temp_dir": temp_dir}
    finally:
        _stop_cluster(proc, temp_dir)
        log.close()
        leaked = _ours(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leaked, f"processes of the test cluster survived: {[p.pid for p in leaked]}"


@pytest.mark.integration
def test_ray_job_submit_tune_hm4sr(ray_head, toy_data, tmp_path):
    storage = tmp_path / "jobruns"
    sub_id = f"moedist-tune-{os.getpid()}-{int(time.time())}"
    cmd = [ray_head["ray"], "job", "submit", "--address", ray_head["url"], "--submission-id", sub_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": [".git"]}), "--",
           "python", "jobs/tune_hm4sr.py", "--data", str(toy_data), "--samples", "2", "--epochs", "1",
           "--max-concurrent", "2", "--name", "job", "--storage", str(storage), *SMALL]
    try:
        out = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        subprocess.run([ray_head["ray"], "job", "stop", "--address", ray_head["url"], sub_id], env=ray_head["env"],
                       capture_output=True, timeout=60)
        pytest.fail(f"ray job submit did not finish in 300 s:\n{(e.stdout or b'')[-4000:]!r}")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert f"Job '{sub_id}' succeeded" in log, log[-3000:]
    exp = storage / "job"
    table = pd.read_csv(exp / "results.csv")
    assert len(table) == 2 and {"hm4sr.k1", "hm4sr.tau_idcl", f"best_{METRIC}", "stopped_by"} <= set(table.columns)
    assert (exp / "results.parquet").is_file()
    best = load_experiment_config("hm4sr", str(exp / "best.yaml"), [])
    assert best.hm4sr.hidden_size == 16 and best.data == str(toy_data)
    best_row = table.loc[table[f"best_{METRIC}"].idxmax()]
    assert best.hm4sr.k1 == best_row["hm4sr.k1"] and math.isclose(best.hm4sr.tau_idcl, best_row["hm4sr.tau_idcl"])
    assert "test" in json.loads((exp / "best" / "results.json").read_text())


# ----------------------------------------------------------------------------- (a) a small search


@pytest.fixture(scope="module")
def tuned(toy_data, tmp_path_factory, ray_local):
    storage = tmp_path_factory.mktemp("tune")
    kwargs = dict(space=None, num_samples=3, grace_period=1, experiment_name="toy", storage_path=storage, verbose=0,
                  echo=lambda s: None)
    t0 = time.perf_counter()
    res = run_small(toy_data, **kwargs)
    return res, kwargs, time.perf_counter() - t0


def run_small(toy_data, **kwargs):
    from moedist.tune.run import run_tune

    return run_tune(small_cfg(toy_data, "train.epochs=2"), **kwargs)


@pytest.mark.integration
def test_small_search_writes_table_best_config_and_retrained_best(tuned):
    res, _, _ = tuned
    keys = ["hm4sr.k1", "hm4sr.k2", "hm4sr.lambda_idcl", "hm4sr.lambda_pcl", "hm4sr.beta_pcl", "hm4sr.tau_idcl"]
    assert res["searched_keys"] == keys and not res["restored"] and res["complete"]
    table = pd.read_csv(res["results_csv"])
    assert len(table) == 3 and table["trial_id"].is_unique
    pq = pd.read_parquet(res["results_parquet"])
    assert list(pq.columns) == list(table.columns) and len(pq) == 3
    for col in [*keys, f"best_{METRIC}", "best_epoch", "epochs_run", "evaluations", "iterations", "status",
                "stopped_by", "asha_stopped", "early_stopped"]:
        assert col in table.columns, col
    assert set(table["status"]) == {"TERMINATED"}
    assert set(table["stopped_by"]) <= {"asha", "max_epochs", "early_stopping"}
    assert (table["asha_stopped"] == (table["stopped_by"] == "asha")).all()
    assert table["epochs_run"].between(1, 2).all() and table[f"best_{METRIC}"].between(0, 1).all()
    # every row's values are the ones its trial trained with
    for _, row in table.iterrows():
        trial_cfg = load_config(ExperimentConfig, Path(row["run_dir"]) / "config.yaml")
        for k in keys:
            assert get_key(trial_cfg, k) == pytest.approx(row[k]), k

    best_row = table.loc[table[f"best_{METRIC}"].idxmax()]
    assert res["best"]["trial_id"] == best_row["trial_id"]
    for best in (load_experiment_config("hm4sr", res["best_config"], []),
                 load_config(ExperimentConfig, res["best_config"])):
        for k in keys:
            assert get_key(best, k) == pytest.approx(best_row[k]), k
        assert best.hm4sr.hidden_size == 16 and best.hm4sr.modalities == ("id",) and best.train.epochs == 2
        assert best.run_dir is None  # training from best.yaml never writes into the search's best/
    best_dir = Path(res["experiment_dir"]) / "best"
    results = json.loads((best_dir / "results.json").read_text())
    assert results == res["best_results"]
    assert set(results["test"]) >= {"ndcg@20", "hit@10", "mrr@20"} and results["epochs_run"] == 2
    assert all(0.0 <= v <= 1.0 for v in results["test"].values())


@pytest.mark.integration
def test_rerun_restores_the_finished_experiment(tuned, toy_data):
    res, kwargs, _ = tuned
    exp = Path(res["experiment_dir"])
    stamps = {p: p.stat().st_mtime_ns for p in [*exp.glob("trials/*/metrics.jsonl"), exp / "best" / "results.json"]}
    assert len(stamps) == 4
    # the rerun asks for 5 epochs: a resumed search keeps the base config it started with
    from moedist.tune.run import run_tune

    again = run_tune(small_cfg(toy_data, "train.epochs=5"), **kwargs)
    assert again["restored"] and again["complete"]
    assert load_config(ExperimentConfig, exp / "base_config.yaml").train.epochs == 2
    assert [r["trial_id"] for r in again["trials"]] == [r["trial_id"] for r in res["trials"]]
    pd.testing.assert_frame_equal(pd.read_csv(again["results_csv"]), pd.read_csv(res["results_csv"]))
    assert again["best"] == res["best"] and again["best_results"] == res["best_results"]
    # nothing trained again: no trial, no retrain of the best
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(list(exp.glob("trials/*"))) == 3

    # a memory reservation is the one setting a resumed search takes from the call (for trials
    # that ran out of memory); one that no node could hold is refused before anything runs
    from moedist.errors import ConfigError

    said: list[str] = []
    with pytest.raises(ConfigError, match=r"one trial needs.*memory.*dist.memory_per_worker"):
        run_tune(small_cfg(toy_data), **{**kwargs, "memory_per_worker": 10_000.0})
    assert load_config(ExperimentConfig, exp / "base_config.yaml").dist.memory_per_worker == 0
    third = run_tune(small_cfg(toy_data, "train.epochs=5"), **{**kwargs, "echo": said.append, "memory_per_worker": 0.25})
    assert third["restored"] and third["best_results"] == res["best_results"]
    stored = load_config(ExperimentConfig, exp / "base_config.yaml")
    assert stored.dist.memory_per_worker == 0.25 and stored.train.epochs == 2
    assert any("reserve 0.25 GiB per worker" in line and "was 0" in line for line in said), said
    assert any("only --memory-per-worker applies" in line for line in said), said
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


# ----------------------------------------------------------------------------- (d) waiting and failing


def test_a_bad_worker_start_timeout_is_refused_before_anything_runs(monkeypatch, tmp_path):
    from moedist.tune.run import WORKER_START_TIMEOUT_ENV, run_tune

    monkeypatch.setenv(WORKER_START_TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=f"{WORKER_START_TIMEOUT_ENV}='soon' is not a number"):
        run_tune(small_cfg("/nowhere"), num_samples=1, storage_path=tmp_path)
    monkeypatch.delenv(WORKER_START_TIMEOUT_ENV)
    with pytest.raises(ConfigError, match="positive number of seconds"):
        run_tune(small_cfg("/nowhere"), num_samples=1, storage_path=tmp_path, worker_start_timeout_s=0)


def test_a_metric_the_trials_do_not_report_or_a_bad_base_config_is_refused_before_anything_runs(tmp_path):
    """Refused up front, before the data is read or Ray starts: else the first trial trained to
    its end before Tune failed the search, and a rerun restored the wrong metric (or the bad
    base config) from the experiment it had already written."""
    from moedist.tune.run import run_tune

    with pytest.raises(ConfigError, match=r"metric 'ndcg@20' is not reported.*valid_ndcg@20"):
        run_tune(small_cfg("/nowhere"), num_samples=1, storage_path=tmp_path, metric="ndcg@20")
    with pytest.raises(ConfigError, match=r"metric 'valid_ndcg@100' is not reported"):
        run_tune(small_cfg("/nowhere"), num_samples=1, storage_path=tmp_path, metric="valid_ndcg@100")
    with pytest.raises(ConfigError, match=r"train.valid_metric='ndcg@100'"):
        run_tune(small_cfg("/nowhere", "train.valid_metric=ndcg@100"), num_samples=1, storage_path=tmp_path)
    with pytest.raises(ConfigError, match=r"max_concurrent must be >= 1"):  # Tune would read 0 as no limit
        run_tune(small_cfg("/nowhere"), num_samples=1, storage_path=tmp_path, max_concurrent=0)
    assert list(tmp_path.iterdir()) == []


def test_tune_samples_flag_is_taken_as_given(capsys):
    from moedist.cli import main

    assert main(["tune", "--model", "hm4sr", "--data", "/nowhere", "--samples", "0"]) == 2
    assert "num_samples and grace_period must be >= 1 (got 0, 1)" in capsys.readouterr().err


def test_tune_path_flags_are_taken_as_given_not_parsed_as_yaml():
    import argparse

    from moedist.tune.cli import add_tune_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_tune_arguments(p)
    args = p.parse_args(["--model", "hm4sr", "--data", "/shared/exp #2/prepared", "--features", "0123",
                         "--workers", "2", "--epochs", "3", "dist.workers=5", "train.lr=0.01"])
    cfg = config_from_args(args, args.model)
    assert cfg.data == "/shared/exp #2/prepared" and cfg.features == "0123"  # were "/shared/exp" and "83"
    assert cfg.dist.workers == 2 and cfg.train.epochs == 3 and cfg.train.lr == 0.01 and cfg.model == "hm4sr"


def test_exit_codes_tell_a_failed_trial_from_an_interrupted_search():
    from moedist.tune.cli import exit_code

    assert exit_code({"complete": True, "errored": []}) == 0
    assert exit_code({"complete": False, "errored": ["a_00001"]}) == 1  # a RayJob's backoffLimit retries it
    assert exit_code({"complete": False, "errored": []}) == 130


@pytest.mark.integration
def test_a_trial_that_cannot_get_workers_fails_the_search_and_a_rerun_resumes_it(toy_data, tmp_path, ray_local):
    """The trial waits ``worker_start_timeout_s`` for its workers (handed to Ray Train's
    controller), then ends in an error: the search is not complete, nothing is retrained, and
    once the resources are free the same call resumes and finishes it."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from moedist.tune.cli import exit_code
    from moedist.tune.run import run_tune

    kwargs = dict(space=None, num_samples=1, max_concurrent=1, experiment_name="starved", storage_path=tmp_path,
                  verbose=0, echo=lambda s: None, worker_start_timeout_s=3)
    hog = placement_group([{"CPU": 3.5}])  # of the fixture's 4: a 1-CPU worker cannot be placed
    ray_local.get(hog.ready(), timeout=60)
    try:
        res = run_tune(small_cfg(toy_data, "train.epochs=1"), **kwargs)
    finally:
        remove_placement_group(hog)
    assert not res["complete"] and exit_code(res) == 1
    assert res["errored"] == [res["trials"][0]["trial_id"]]
    assert "timed out after 3.0 seconds" in res["trials"][0]["error"]
    assert res["best_results"] is None and not (Path(res["experiment_dir"]) / "best").exists()

    again = run_tune(small_cfg(toy_data, "train.epochs=1"), **{**kwargs, "worker_start_timeout_s": 600})
    assert again["restored"] and again["complete"] and exit_code(again) == 0 and again["errored"] == []
    assert again["trials"][0]["status"] == "TERMINATED"
    assert set(again["best_results"]["test"]) >= {"ndcg@20"}
