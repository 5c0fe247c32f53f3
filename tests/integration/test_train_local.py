"""The single-process training loop end to end on a small prepared dataset."""
import json
import math
from pathlib import Path

import pytest
import torch

from moedist.errors import ConfigError
from moedist.train.cli import load_experiment_config
from moedist.train.loop import TrainingDiverged, run_training

pytestmark = pytest.mark.integration

FAST = ["train.batch_size=64", "train.eval_batch_size=64", "train.progress=false"]
SMALL_SEQ = ["sasrec.hidden_size=16", "sasrec.inner_size=32", "sasrec.n_layers=1", "sasrec.max_seq_len=10"]
SMALL_HM4SR = ["hm4sr.hidden_size=16", "hm4sr.inner_size=32", "hm4sr.n_layers=1", "hm4sr.max_seq_len=10"]


def cfg_for(model, data, run_dir, *extra):
    return load_experiment_config(model, None, [f"data={data}", f"run_dir={run_dir}", *FAST, *extra])


def lines(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_metrics(toy_data, tmp_path):
    a = run_training(cfg_for("sasrec", toy_data, tmp_path / "a", "train.epochs=3", *SMALL_SEQ), echo=lambda s: None)
    b = run_training(cfg_for("sasrec", toy_data, tmp_path / "b", "train.epochs=3", *SMALL_SEQ), echo=lambda s: None)
    c = run_training(cfg_for("sasrec", toy_data, tmp_path / "c", "train.epochs=3", "train.seed=7", *SMALL_SEQ), echo=lambda s: None)
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    assert a["test"] != c["test"]
    assert [r["loss"] for r in lines(tmp_path / "a")] == [r["loss"] for r in lines(tmp_path / "b")]


def test_interrupted_run_resumes_without_lost_or_repeated_epochs(toy_data, tmp_path):
    whole = run_training(cfg_for("hm4sr", toy_data, tmp_path / "whole", "train.epochs=4", "hm4sr.modalities=[id]", *SMALL_HM4SR), echo=lambda s: None)
    run_training(cfg_for("hm4sr", toy_data, tmp_path / "part", "train.epochs=2", "hm4sr.modalities=[id]", *SMALL_HM4SR), echo=lambda s: None)
    resumed = run_training(cfg_for("hm4sr", toy_data, tmp_path / "part", "train.epochs=4", "hm4sr.modalities=[id]", *SMALL_HM4SR), echo=lambda s: None)
    assert [r["epoch"] for r in lines(tmp_path / "part")] == [0, 1, 2, 3]
    assert [r["loss"] for r in lines(tmp_path / "part")] == pytest.approx([r["loss"] for r in lines(tmp_path / "whole")], rel=1e-6)
    assert resumed["test"] == pytest.approx(whole["test"], abs=1e-9)


def test_best_epoch_is_reloaded_for_test(toy_data, tmp_path):
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=5", *SMALL_SEQ), echo=lambda s: None)
    recs = lines(tmp_path / "r")
    vals = [r["valid_ndcg@20"] for r in recs]
    best = max(range(len(vals)), key=lambda i: (round(vals[i], 5), i))  # ties count as improvement
    assert res["best_epoch"] == best
    assert res["valid"]["ndcg@20"] == pytest.approx(vals[best], abs=1e-12)


def test_early_stopping_respects_patience(toy_data, tmp_path):
    # lr 0 never improves after epoch 0 (strict improvement): stops after patience + 1 bad evals
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=20", "train.lr=0.0",
                               "train.patience=2", "train.ties_improve=false", *SMALL_SEQ), echo=lambda s: None)
    assert res["epochs_run"] == 4 and res["best_epoch"] == 0


def test_nan_loss_stops_naming_step_and_parts(toy_data, tmp_path):
    cfg = cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=3", "train.lr=1e30", *SMALL_SEQ)
    with pytest.raises(TrainingDiverged, match=r"epoch \d+, step \d+.*ce="):
        run_training(cfg, echo=lambda s: None)


def test_truncated_checkpoint_falls_back_to_previous(toy_data, tmp_path):
    cfg = cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=3", *SMALL_SEQ)
    run_training(cfg, echo=lambda s: None)
    f = tmp_path / "r" / "checkpoints" / "last" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    said = []
    cfg4 = cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=4", *SMALL_SEQ)
    run_training(cfg4, echo=said.append)
    assert any("model.safetensors" in s and "warning" in s for s in said)
    assert any("resumed from" in s and "last-previous" in s for s in said)
    assert [r["epoch"] for r in lines(tmp_path / "r")] == [0, 1, 2, 3]


def test_features_are_required_with_a_clear_error(toy_data, tmp_path):
    cfg = cfg_for("mamex", toy_data.parent / "nofeat", tmp_path / "r")
    with pytest.raises(Exception, match="dataset.json|features"):
        run_training(cfg, echo=lambda s: None)


def test_popularity_and_trained_models_share_protocol(toy_data, tmp_path):
    pop = run_training(cfg_for("popularity", toy_data, tmp_path / "p"), echo=lambda s: None)
    seq = run_training(cfg_for("sasrec", toy_data, tmp_path / "s", "train.epochs=8", "train.lr=0.005", *SMALL_SEQ), echo=lambda s: None)
    # the toy data's next item is always 1-2 steps along a ring: order beats popularity
    assert seq["test"]["ndcg@10"] > 1.5 * pop["test"]["ndcg@10"]


def test_unknown_override_is_a_config_error(toy_data, tmp_path):
    with pytest.raises(ConfigError, match="hm4sr.kk1"):
        cfg_for("hm4sr", toy_data, tmp_path / "r", "hm4sr.kk1=3")


def test_nan_loss_keeps_the_last_good_checkpoint(toy_data, tmp_path):
    """A run that diverges after good epochs stops naming the step, and leaves the last good
    checkpoint (and the per-epoch log) exactly as they were: a rerun can resume from it."""
    from safetensors.torch import load_file

    run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=2", *SMALL_SEQ), echo=lambda s: None)
    last = tmp_path / "r" / "checkpoints" / "last"
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    log_before = (tmp_path / "r" / "metrics.jsonl").read_text()
    diverging = cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=4", "train.lr=1e30", *SMALL_SEQ)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d+.*ce="):
        run_training(diverging, echo=lambda s: None)
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == log_before


_BF16_RUNS = """
import json, sys
from moedist.train.cli import load_experiment_config
from moedist.train.loop import run_training
model, data, out, common = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def cfg(run_dir, epochs):
    return load_experiment_config(model, None, [f"data={data}", f"run_dir={out}/{run_dir}", f"train.epochs={epochs}", *common])
whole = run_training(cfg("whole", 4), echo=lambda s: None)
run_training(cfg("part", 2), echo=lambda s: None)
resumed = run_training(cfg("part", 4), echo=lambda s: None)
print(json.dumps({"whole": whole["test"], "resumed": resumed["test"]}))
"""


@pytest.mark.parametrize("model, extra", [
    ("sasrec", SMALL_SEQ),
    ("hm4sr", ["hm4sr.modalities=[id,text]", *SMALL_HM4SR]),
    ("mamex", ["mamex.modalities=[text]", "train.eval_every=1"]),
])
def test_a_bf16_deepspeed_run_resumes_to_the_uninterrupted_result(model, extra, toy_data, toy_features, tmp_path):
    """bf16 through a DeepSpeed engine (what GPUs run; here forced on the CPU): the module holds
    bf16 weights, DeepSpeed's wrapper float32 masters and the Adam moments. A checkpoint keeps
    the masters and moments, so an interrupted run continues exactly where it stopped instead of
    restarting from bf16-rounded weights with fresh moments (or, worse, stale masters). In a
    process of its own: DeepSpeed keeps its process group and group caches for the process's life."""
    import subprocess
    import sys

    common = [*FAST, f"features={toy_features}", "dist.deepspeed=true", "dist.precision=bf16", *extra]
    proc = subprocess.run([sys.executable, "-c", _BF16_RUNS, model, str(toy_data), str(tmp_path), json.dumps(common)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["epoch"] for r in lines(tmp_path / "part")] == [0, 1, 2, 3]
    losses = [r["loss"] for r in lines(tmp_path / "whole")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert [r["loss"] for r in lines(tmp_path / "part")] == pytest.approx(losses, rel=1e-6)
    assert res["resumed"] == pytest.approx(res["whole"], abs=1e-9)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "part" / "checkpoints" / "last" / "model.safetensors"))
    moments = load_file(str(tmp_path / "part" / "checkpoints" / "last" / "optimizer.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    # float32 masters, not the module's bf16 copies: some value is not a bf16 number
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in weights.values() if t.is_floating_point())
    assert moments and any(k.startswith("exp_avg_sq/") for k in moments)


# ----------------------------------------------------------------------------- resume safety


def _snapshot(run_dir):
    """Every file of a run directory but TensorBoard's, by content."""
    run_dir = Path(run_dir)
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "tb" not in p.relative_to(run_dir).parts}


def test_resume_with_another_model_size_is_refused_and_the_run_is_kept(toy_data, tmp_path):
    """A checkpoint that does not fit the model is not 'corrupt': no silent fresh start that
    overwrites config.yaml and deletes metrics.jsonl, but an error before anything changes."""
    small = [*SMALL_SEQ, "train.epochs=3"]
    run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *small), echo=lambda s: None)
    before = _snapshot(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"sasrec\.hidden_size: 16 in the checkpoint, 32 now(.|\n)*train\.resume=false"):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *small, "sasrec.hidden_size=32"), echo=lambda s: None)
    assert _snapshot(tmp_path / "r") == before
    # a checkpoint of an older moedist records no config: the tensors' shapes still refuse it
    for c in ("last", "last-previous"):
        f = tmp_path / "r" / "checkpoints" / c / "state.json"
        state = json.loads(f.read_text())
        f.write_text(json.dumps({k: v for k, v in state.items() if k not in ("config", "dataset", "features")}))
    before = _snapshot(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"does not match the model(.|\n)*train\.resume=false"):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *small, "sasrec.hidden_size=32"), echo=lambda s: None)
    assert _snapshot(tmp_path / "r") == before
    # starting fresh on purpose works
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *small, "sasrec.hidden_size=32", "train.resume=false"),
                       echo=lambda s: None)
    assert res["epochs_run"] == 3 and [r["epoch"] for r in lines(tmp_path / "r")] == [0, 1, 2]


def test_a_fresh_start_clears_the_earlier_runs_results_before_it_trains(toy_data, tmp_path):
    """With ``train.resume=false`` the folder's earlier results.json and eval ranks are gone as
    soon as the new run starts: an interrupted new run never shows the old run's metrics
    (``moedist report`` / ``moedist compare`` would read them as this run's)."""
    small = [*SMALL_SEQ, "train.epochs=2"]
    run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *small), echo=lambda s: None)
    assert (tmp_path / "r" / "results.json").is_file() and (tmp_path / "r" / "eval_ranks.npz").is_file()

    def stop_at_first_epoch(line: str) -> None:
        if line.lstrip().startswith("epoch"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *small, "train.resume=false"), echo=stop_at_first_epoch)
    assert not (tmp_path / "r" / "results.json").exists() and not (tmp_path / "r" / "eval_ranks.npz").exists()


@pytest.fixture(scope="module")
def other_toy_data(tmp_path_factory):
    """Another dataset with the same numbers of users and items (same tensor shapes)."""
    from moedist.data.dataset import PreparedDataset
    from moedist.data.prepare import PrepareOptions, prepare_dataset
    from tests.conftest import toy_source

    out = tmp_path_factory.mktemp("toy2") / "prepared"
    prepare_dataset(toy_source(seed=1), out, options=PrepareOptions(kcore=3))
    return out


def test_resume_refuses_other_settings_or_data_and_allows_safe_changes(toy_data, other_toy_data, tmp_path):
    from moedist.data.dataset import PreparedDataset

    a, b = PreparedDataset(toy_data), PreparedDataset(other_toy_data)
    assert (a.n_items, a.n_users) == (b.n_items, b.n_users)  # nothing but the content tells them apart
    run = [*SMALL_SEQ, "train.epochs=2"]
    run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *run), echo=lambda s: None)
    before = _snapshot(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"train\.valid_metric: 'ndcg@20' in the checkpoint, 'mrr@5' now"):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *run, "train.valid_metric=mrr@5"), echo=lambda s: None)
    with pytest.raises(ConfigError, match=r"dataset: other content"):
        run_training(cfg_for("sasrec", other_toy_data, tmp_path / "r", *run), echo=lambda s: None)
    with pytest.raises(ConfigError, match=r"train\.seed"):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *run, "train.seed=7"), echo=lambda s: None)
    assert _snapshot(tmp_path / "r") == before
    # more epochs, another evaluation batch, patience, learning rate: the same run continues
    said = []
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *SMALL_SEQ, "train.epochs=3", "train.eval_batch_size=7",
                               "train.patience=4", "train.lr=0.0005"), echo=said.append)
    assert any("resumed from" in s for s in said)
    assert any("changed settings" in s and "train.lr 0.001 -> 0.0005" in s for s in said)
    assert res["epochs_run"] == 3 and [r["epoch"] for r in lines(tmp_path / "r")] == [0, 1, 2]


def test_a_model_without_training_reuses_its_checkpoint_only_for_the_same_data(toy_data, other_toy_data, tmp_path):
    fresh_b = run_training(cfg_for("popularity", other_toy_data, tmp_path / "b"), echo=lambda s: None)
    first = run_training(cfg_for("popularity", toy_data, tmp_path / "p"), echo=lambda s: None)
    assert run_training(cfg_for("popularity", toy_data, tmp_path / "p"), echo=lambda s: None)["test"] == first["test"]
    # other data, or other evaluation settings: nothing to resume, the counts are rebuilt
    again = run_training(cfg_for("popularity", other_toy_data, tmp_path / "p"), echo=lambda s: None)
    assert again["test"] == fresh_b["test"] and again["test"] != first["test"]
    back = run_training(cfg_for("popularity", toy_data, tmp_path / "p", "train.topk=[5,10]"), echo=lambda s: None)
    assert back["test"]["ndcg@10"] == first["test"]["ndcg@10"] and "ndcg@20" not in back["test"]
    assert run_training(cfg_for("popularity", toy_data, tmp_path / "p", "train.resume=false"),
                        echo=lambda s: None)["test"] == first["test"]


def test_a_missing_best_checkpoint_is_an_error_not_the_last_weights(toy_data, tmp_path):
    import shutil

    from moedist.errors import CheckpointError

    # validated at epoch 0 only: the best epoch (0) is not the last one (1)
    args = ("train.epochs=2", "train.eval_every=2", *SMALL_SEQ)
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args), echo=lambda s: None)
    assert res["best_epoch"] == 0
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "best")
    results_before = (tmp_path / "r" / "results.json").read_text()
    said: list[str] = []
    with pytest.raises(CheckpointError, match=r"best is missing(.|\n)*epoch 0 was the best"):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args), echo=said.append)
    assert (tmp_path / "r" / "results.json").read_text() == results_before
    # said when the run resumes, before any remaining epoch would train
    assert any("warning" in s and "epoch 0 was the best" in s for s in said), said


def test_a_fallback_to_an_older_last_retrains_to_the_uninterrupted_result(toy_data, tmp_path):
    """'last' damaged: the run resumes from 'last-previous' while 'best' may hold the later
    epoch; the epoch is trained again and the run ends with the uninterrupted run's result."""
    args = ("train.epochs=3", *SMALL_SEQ)
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args), echo=lambda s: None)
    weights = tmp_path / "r" / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    said: list[str] = []
    again = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args), echo=said.append)
    assert any("resumed from" in line and "epoch 1" in line for line in said), said
    assert again["best_epoch"] == res["best_epoch"] and again["test"] == res["test"] and again["valid"] == res["valid"]
    if res["best_epoch"] == 2:  # 'best' held the epoch trained again
        assert any("chosen again among the epochs trained from here" in line for line in said), said


def test_a_best_checkpoint_lost_after_its_epochs_last_was_saved_is_restored(toy_data, tmp_path):
    """An epoch saves 'last' and then, if it improved, 'best': after a crash between the two
    the resumed weights are the best epoch's, and the resume writes 'best' from them."""
    args = ("train.epochs=1", *SMALL_SEQ)  # one evaluation: epoch 0 is the best and the last
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args), echo=lambda s: None)
    import shutil

    shutil.rmtree(tmp_path / "r" / "checkpoints" / "best")
    said: list[str] = []
    again = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args), echo=said.append)
    assert any("restored it from the resumed weights" in line for line in said), said
    assert again["best_epoch"] == res["best_epoch"] == 0 and again["test"] == res["test"] and again["valid"] == res["valid"]


def test_when_no_checkpoint_loads_the_fresh_run_is_a_new_run(toy_data, tmp_path):
    """A 'last' whose weights are fine but whose optimizer state is incomplete, and no older one:
    the run starts over from the seeded initial model, exactly as a new run would."""
    import shutil

    from safetensors.torch import load_file, save_file

    new = run_training(cfg_for("sasrec", toy_data, tmp_path / "new", "train.epochs=2", *SMALL_SEQ), echo=lambda s: None)
    run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=2", *SMALL_SEQ), echo=lambda s: None)
    ckpt = tmp_path / "r" / "checkpoints"
    f = ckpt / "last" / "optimizer.safetensors"
    moments = load_file(str(f))
    del moments[next(k for k in moments if k.startswith("exp_avg_sq/"))]
    save_file(moments, str(f))
    shutil.rmtree(ckpt / "last-previous")
    said = []
    res = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=2", *SMALL_SEQ), echo=said.append)
    assert any("warning" in s and "optimizer.safetensors" in s for s in said) and not any("resumed from" in s for s in said)
    assert [r["loss"] for r in lines(tmp_path / "r")] == [r["loss"] for r in lines(tmp_path / "new")]
    assert res["test"] == new["test"]


def test_a_fresh_start_never_tests_the_earlier_runs_best_weights(toy_data, tmp_path, monkeypatch):
    """``train.resume=false`` in a folder whose earlier run's best epoch was 0: a crash of the
    new run between its epoch 0's 'last' and 'best' saves, then a resume, must test the new
    run's epoch 0, not the earlier run's 'best' that has the same epoch number."""
    import moedist.train.loop as loop

    args = ("train.epochs=1", *SMALL_SEQ)
    ref = run_training(cfg_for("sasrec", toy_data, tmp_path / "ref", *args, "train.seed=2"), echo=lambda s: None)
    old = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args, "train.seed=1"), echo=lambda s: None)
    assert old["best_epoch"] == ref["best_epoch"] == 0 and old["test"] != ref["test"]
    save = loop.save_checkpoint

    def crash_before_best(directory, *a, **k):
        if Path(directory).name == "best":
            raise KeyboardInterrupt("crash between the two saves")
        return save(directory, *a, **k)

    monkeypatch.setattr(loop, "save_checkpoint", crash_before_best)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args, "train.seed=2", "train.resume=false"),
                     echo=lambda s: None)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    again = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", *args, "train.seed=2"), echo=lambda s: None)
    assert again["best_epoch"] == 0 and again["test"] == ref["test"] and again["valid"] == ref["valid"]


def _prepared_with_users_of(n_per_user: int, out: Path) -> Path:
    """Every user has exactly ``n_per_user`` interactions (a leave-one-out split without
    training samples for 3, and without validation users for 2)."""
    import numpy as np
    import pandas as pd

    from moedist.data.prepare import PrepareOptions, prepare_dataset
    from moedist.data.schema import RawSource

    rows = [(f"u{u:03d}", f"i{(u + j) % 10:03d}", 1_300_000_000 + 86400 * j) for u in range(30) for j in range(n_per_user)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"user_id": "string", "item_id": "string"})
    inter["rating"] = np.nan
    ids = sorted(inter["item_id"].unique())
    items = pd.DataFrame({"item_id": ids, "title": ids, "brand": pd.NA, "categories": [["Root", "a"]] * len(ids),
                          "image": pd.NA, "text": ids})
    prepare_dataset(RawSource("few", inter, items), out, options=PrepareOptions(kcore=1))
    return out


@pytest.mark.parametrize("model, per_user, split", [("sasrec", 3, "train"), ("popularity", 2, "valid")])
def test_an_empty_leave_one_out_split_is_a_data_error_before_the_run_starts(model, per_user, split, tmp_path):
    from moedist.errors import DataError

    data = _prepared_with_users_of(per_user, tmp_path / "data")
    with pytest.raises(DataError, match=rf"{data}: the leave-one-out {split} split is empty"):
        run_training(cfg_for(model, data, tmp_path / "r", "train.epochs=2", *SMALL_SEQ), echo=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_an_empty_cold_start_validation_split_is_a_data_error(tmp_path):
    import numpy as np

    from moedist.data.dataset import PreparedDataset
    from moedist.data.prepare import PrepareOptions, prepare_dataset
    from moedist.errors import DataError
    from moedist.features.store import write_feature_arrays
    from tests.conftest import toy_source

    data = tmp_path / "data"
    prepare_dataset(toy_source(), data, options=PrepareOptions(kcore=3, cold_valid_frac=0.0))
    items = PreparedDataset(data).items["item_id"].tolist()
    rng = np.random.default_rng(0)
    write_feature_arrays(data / "features" / "toy", item_ids=items,
                         arrays={m: rng.normal(size=(len(items), 8)).astype(np.float32) for m in ("text", "image")})
    with pytest.raises(DataError, match=r"the cold-start valid split is empty(.|\n)*cold_valid_frac"):
        run_training(cfg_for("content", data, tmp_path / "r", "train.epochs=2"), echo=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_more_epochs_for_an_early_stopped_run_say_that_nothing_is_trained(toy_data, tmp_path):
    """Early stopping is final on resume: a higher train.epochs trains nothing, and says so
    instead of silently reporting the old results as if the epochs had run."""
    args = (*SMALL_SEQ, "train.lr=0", "train.patience=0", "train.ties_improve=false")  # nothing changes: epoch 1 stops
    first = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=4", *args), echo=lambda s: None)
    assert first["epochs_run"] == 2
    said: list[str] = []
    again = run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=6", *args), echo=said.append)
    assert again["epochs_run"] == 2 and again["test"] == first["test"]
    assert any("stopped early at epoch 1" in s and "train.epochs=6 trains nothing more" in s for s in said), said


def test_a_crash_between_the_ranks_and_the_results_leaves_no_old_results_beside_new_ranks(toy_data, tmp_path,
                                                                                         monkeypatch):
    """A resumed run (more epochs) writes its eval ranks and then results.json: killed between
    the two, the folder must not hold the earlier run's results.json beside the new ranks, which
    `moedist compare` would pair as one model."""
    import moedist.train.loop as loop

    args = (*SMALL_SEQ,)
    run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=1", *args), echo=lambda s: None)
    assert (tmp_path / "r" / "results.json").is_file()
    real = loop.atomic_write_text

    def crash_at_results(path, text):
        if Path(path).name == "results.json":
            raise KeyboardInterrupt("killed between the two writes")
        return real(path, text)

    monkeypatch.setattr(loop, "atomic_write_text", crash_at_results)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg_for("sasrec", toy_data, tmp_path / "r", "train.epochs=2", *args), echo=lambda s: None)
    assert (tmp_path / "r" / "eval_ranks.npz").is_file() and not (tmp_path / "r" / "results.json").exists()
