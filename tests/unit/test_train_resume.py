"""Resume safety of the training loop's checkpoints, the config checks before training, and
history masking: moedist.train.checkpoint / identity / config / loop, without training."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from moedist.config import to_dict
from moedist.errors import CheckpointError, ConfigError
from moedist.train.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from moedist.train.cli import load_experiment_config
from moedist.train.config import validate_experiment
from moedist.train.identity import check_resume, config_differences, dataset_differences, run_identity


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.a = torch.nn.Linear(3, width)
        self.b = torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _trained(width: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    m = Tiny(width)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    return m, opt


# ----------------------------------------------------------------------------- RNG states


def test_checkpoint_restores_torch_numpy_and_python_random_states(tmp_path):
    """A resumed run draws the same random numbers as the uninterrupted one from every global
    generator, not only torch's CPU generator."""
    m, opt = _trained()
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    save_checkpoint(tmp_path / "c", m, opt, {"epoch": 0})
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(2), random.random(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(98), random.seed(97)  # what a fresh process would have
    m2, opt2 = _trained(seed=5)
    load_checkpoint(tmp_path / "c", m2, opt2)
    got = (torch.rand(4), np.random.rand(4), np.random.randn(2), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])
    assert got[3] == expected[3] and got[4] == expected[4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_restores_the_cuda_generator_of_the_models_device(tmp_path):
    """Dropout on a GPU draws from that device's CUDA generator."""
    dev = torch.device("cuda", torch.cuda.current_device())
    m, opt = _trained()
    m = m.to(dev)
    torch.cuda.manual_seed(21)
    save_checkpoint(tmp_path / "c", m, None, {"epoch": 0})
    expected = torch.rand(8, device=dev)
    torch.cuda.manual_seed(22)
    load_checkpoint(tmp_path / "c", m, None)
    assert torch.equal(torch.rand(8, device=dev), expected)


def test_checkpoints_of_older_moedist_with_torch_rng_only_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    m, opt = _trained()
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c", m, opt, {"epoch": 0})
    expected = torch.rand(3)
    rng = load_file(str(tmp_path / "c" / "rng.safetensors"))
    save_file({"rank0": rng["rank0"]}, str(tmp_path / "c" / "rng.safetensors"))  # the old layout
    torch.manual_seed(4)
    load_checkpoint(tmp_path / "c", m, opt)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- mismatch vs damage


def test_a_checkpoint_of_another_shape_is_a_mismatch_and_loads_nothing(tmp_path):
    m, opt = _trained(width=4)
    save_checkpoint(tmp_path / "c", m, opt, {"epoch": 0})
    other, other_opt = _trained(width=8, seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match=r"a\.weight \(4, 3\) in the checkpoint, \(8, 3\) in the model"):
        load_checkpoint(tmp_path / "c", other, other_opt)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_truncated_checkpoint_is_damage_not_a_mismatch(tmp_path):
    m, opt = _trained()
    save_checkpoint(tmp_path / "c", m, opt, {"epoch": 0})
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:60])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated") as e:
        load_checkpoint(tmp_path / "c", *_trained())
    assert not isinstance(e.value, CheckpointMismatch)


def _identity(tmp_path, *overrides):
    cfg = load_experiment_config("sasrec", None, ["data=x", *overrides])
    return run_identity(cfg, {"name": "d", "fingerprint": "f1", "files": {"interactions.parquet": "aa"}})


def _resume_candidates(tmp_path, candidates, model, opt, identity):
    from moedist.train.loop import TorchStepper, _resume

    class Stepper:
        optimizer = opt

    warned = []
    src, state = _resume(candidates, model, Stepper(), warned.append, identity)
    return src, state, warned


def test_a_checkpoint_that_does_not_fit_refuses_to_resume_instead_of_falling_back(tmp_path):
    """Written by another model (an older checkpoint without a recorded config): a ConfigError
    saying how to start fresh, not a warning and a silent fresh start over the old run."""
    m, opt = _trained(width=4)
    save_checkpoint(tmp_path / "last", m, opt, {"epoch": 2}, keep_previous=True)
    save_checkpoint(tmp_path / "last", m, opt, {"epoch": 3}, keep_previous=True)
    other, other_opt = _trained(width=8, seed=1)
    with pytest.raises(ConfigError, match=r"does not match the model.*train\.resume=false.*--run-dir"):
        _resume_candidates(tmp_path, [tmp_path / "last", tmp_path / "last-previous"], other, other_opt, _identity(tmp_path))


def test_when_every_checkpoint_is_damaged_the_model_stays_as_initialised(tmp_path):
    """Each file is checked before anything is loaded: a checkpoint whose weights are fine but
    whose optimizer state is incomplete leaves the seeded initial model untouched."""
    from safetensors.torch import load_file, save_file

    m, opt = _trained()
    save_checkpoint(tmp_path / "last", m, opt, {"epoch": 1})
    f = tmp_path / "last" / "optimizer.safetensors"
    moments = load_file(str(f))
    del moments["exp_avg_sq/a.weight"]
    save_file(moments, str(f))
    fresh, fresh_opt = Tiny(), None
    fresh_opt = torch.optim.Adam(fresh.parameters())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    src, state, warned = _resume_candidates(tmp_path, [tmp_path / "last", tmp_path / "last-previous"], fresh, fresh_opt,
                                            _identity(tmp_path))
    assert src is None and state == {}
    assert any("lacks exp_avg_sq of a.weight" in w for w in warned)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not fresh_opt.state


@pytest.mark.parametrize("damage", [b"\xff\xfe{", b"[1]", b"null"], ids=["not-utf8", "json-list", "json-null"])
def test_a_damaged_state_json_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    """A state.json that is not UTF-8 or not a JSON object (a damaged file) is an incomplete
    checkpoint, like a truncated one: the resume takes 'last-previous', not a traceback."""
    from moedist.train.checkpoint import latest_complete, read_checkpoint, read_state

    m, opt = _trained()
    save_checkpoint(tmp_path / "last", m, opt, {"epoch": 2}, keep_previous=True)
    save_checkpoint(tmp_path / "last", m, opt, {"epoch": 3}, keep_previous=True)
    (tmp_path / "last" / "state.json").write_bytes(damage)
    assert latest_complete(tmp_path / "last", tmp_path / "last-previous") == tmp_path / "last-previous"
    for read in (read_state, read_checkpoint):
        with pytest.raises(CheckpointError, match=r"last/state\.json: (unreadable|not a JSON object)"):
            read(tmp_path / "last")
    src, state, _ = _resume_candidates(tmp_path, [tmp_path / "last", tmp_path / "last-previous"], *_trained(),
                                       _identity(tmp_path))
    assert src == tmp_path / "last-previous" and state["epoch"] == 2


def test_an_optimizer_moment_of_another_shape_is_a_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    m, opt = _trained()
    save_checkpoint(tmp_path / "c", m, opt, {"epoch": 1})
    f = tmp_path / "c" / "optimizer.safetensors"
    moments = load_file(str(f))
    moments["exp_avg/b.bias"] = torch.zeros(7)
    save_file(moments, str(f))
    fresh = Tiny()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match="exp_avg of b.bias has shape"):
        load_checkpoint(tmp_path / "c", fresh, torch.optim.Adam(fresh.parameters()))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


# ----------------------------------------------------------------------------- config / dataset identity


def test_config_differences_ignore_safe_keys_and_other_models_sections():
    a = to_dict(load_experiment_config("sasrec", None, ["data=a"]))
    b = to_dict(load_experiment_config("sasrec", None, [
        "data=/elsewhere/a", "run_dir=r", "train.epochs=500", "train.patience=3", "train.progress=false",
        "train.eval_batch_size=7", "train.device=cpu", "dist.workers=4", "dist.zero_stage=2", "dist.grad_accum=2",
        "hm4sr.n_layers=7", "mamex.ep_size=3",
    ]))
    assert config_differences(a, b) == []
    h = to_dict(load_experiment_config("hm4sr", None, ["data=a"]))
    assert config_differences(h, to_dict(load_experiment_config("hm4sr", None, ["data=a", "hm4sr.ep_size=2", "dist.ep_size=2"]))) == []
    c = to_dict(load_experiment_config("sasrec", None, [
        "data=a", "train.valid_metric=mrr@5", "train.weight_decay=0.5", "sasrec.hidden_size=8",
        "dist.deepspeed_config=x.json", "train.lr=0.5",
    ]))
    diffs = config_differences(a, c)
    assert [d.split(":")[0] for d in diffs] == ["dist.deepspeed_config", "sasrec.hidden_size", "train.valid_metric",
                                                "train.weight_decay"]
    assert "'ndcg@20' in the checkpoint, 'mrr@5' now" in diffs[-2]


def test_dataset_differences_compare_content_not_paths():
    same = {"name": "d", "fingerprint": "f", "files": {"a.parquet": "1", "b.parquet": "2"}}
    assert dataset_differences(same, dict(same)) == []
    other = {"name": "e", "fingerprint": "g", "files": {"a.parquet": "1", "b.parquet": "3"}}
    (d,) = dataset_differences(same, other)
    assert "b.parquet" in d and "a.parquet" not in d and "'d' in the checkpoint, 'e' now" in d
    assert dataset_differences(None, other) == []  # nothing recorded: nothing to compare


def test_check_resume_lists_every_difference_and_how_to_start_fresh(tmp_path):
    stored = _identity(tmp_path)
    now = _identity(tmp_path, "train.valid_metric=mrr@5", "train.seed=1")
    now["dataset"] = dict(now["dataset"], files={"interactions.parquet": "bb"})
    with pytest.raises(ConfigError) as e:
        check_resume(dict(stored, epoch=3), now, tmp_path / "last")
    msg = str(e.value)
    for part in ("dataset", "train.valid_metric", "train.seed", "train.resume=false", "--run-dir"):
        assert part in msg
    assert check_resume(dict(stored, epoch=3), _identity(tmp_path, "train.epochs=900"), tmp_path) is True
    assert check_resume({"epoch": 3}, now, tmp_path) is False  # an older checkpoint: nothing recorded


# ----------------------------------------------------------------------------- validation up front


@pytest.mark.parametrize("override, key", [
    ("train.eval_every=0", "train.eval_every"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("train.topk=[0,5]", "train.topk"),
    ("train.topk=[]", "train.topk"),
    ("train.epochs=-1", "train.epochs"),
    ("train.patience=-1", "train.patience"),
    ("train.lr=-0.1", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.max_steps_per_epoch=-2", "train.max_steps_per_epoch"),
    ("dist.grad_accum=0", "dist.grad_accum"),
    ("train.valid_metric=ndcg@30", "train.valid_metric"),
    ("train.valid_metric=auc", "train.valid_metric"),
])
def test_bad_train_settings_are_config_errors_naming_the_key(override, key):
    cfg = load_experiment_config("sasrec", None, ["data=x", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_experiment(cfg)


def test_valid_metric_is_checked_against_the_protocol():
    validate_experiment(load_experiment_config("mamex", None, ["data=x"]))
    with pytest.raises(ConfigError, match="mrr@10.*cold-start"):  # no MRR in the cold-start protocol
        validate_experiment(load_experiment_config("mamex", None, ["data=x", "train.valid_metric=mrr@10"]))
    validate_experiment(load_experiment_config("sasrec", None, ["data=x", "train.valid_metric=mrr@5"]))
    validate_experiment(load_experiment_config("popularity", None, ["data=x", "train.topk=[5]"]))  # nothing to select


def test_run_training_refuses_a_bad_setting_before_training(toy_data, tmp_path):
    from moedist.train.loop import run_training

    cfg = load_experiment_config("sasrec", None, [f"data={toy_data}", f"run_dir={tmp_path / 'r'}", "train.eval_every=0"])
    with pytest.raises(ConfigError, match="train.eval_every"):
        run_training(cfg, echo=lambda s: None)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- CLI


def test_train_overrides_may_come_before_and_after_options():
    from moedist.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "sasrec", "a=1", "--epochs", "3", "b=2"])
    assert (args.model, args.epochs, args.overrides) == ("sasrec", 3, ["a=1", "b=2"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--bogus", "a=1"])


# ----------------------------------------------------------------------------- history masking


class _ById(torch.nn.Module):
    """Scores item i as i: high ids first."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def full_sort_predict(self, batch):
        return torch.arange(self.n, dtype=torch.float32).expand(batch["item_seq"].shape[0], -1).clone()


def test_mask_history_removes_the_whole_history_not_just_the_last_max_seq_len(toy_data):
    from moedist.data.dataset import PreparedDataset
    from moedist.train.evaluate import full_sort_ranks
    from moedist.train.loop import SequentialTask

    data = PreparedDataset(toy_data)
    cfg = load_experiment_config("sasrec", None, [f"data={toy_data}", "train.mask_history=true", "sasrec.max_seq_len=3"])
    task = SequentialTask(data, cfg, max_len=3)
    model = _ById(data.n_item_rows)
    for split in ("valid", "test"):
        samples = task.splits[split]
        idx = np.arange(task.eval_units(split))
        full = samples.history_items(idx)
        assert max(len(h) for h in full) > 3  # the test means something: histories longer than max_seq_len
        hist = torch.zeros(len(idx), max(len(h) for h in full), dtype=torch.long)
        for i, h in enumerate(full):
            hist[i, : len(h)] = torch.from_numpy(h.astype(np.int64))
        batch = samples.batch(idx)
        want = full_sort_ranks(model.full_sort_predict(batch), batch["target"], history=hist)
        assert torch.equal(task.eval_ranks(model, split, idx, "cpu"), want)
        # each worker ranks its own share of the users (distributed evaluation): the same ranks
        halves = np.array_split(idx, 3)
        assert torch.equal(torch.cat([task.eval_ranks(model, split, h, "cpu") for h in halves]), want)


def test_the_same_raw_data_prepared_in_another_folder_is_the_same_dataset(tmp_path):
    """Prepared tables store local image paths absolute: preparing a copy of the raw folder
    elsewhere (e.g. on a cluster volume) changes items.parquet's file hash but not what the
    models read, so a resume and the features' item check accept it; other text does not."""
    import shutil

    from moedist.data.api import DataConfig, prepare
    from moedist.data.dataset import PreparedDataset
    from moedist.features.store import items_digest
    from moedist.train.identity import dataset_differences, dataset_identity

    a = prepare(DataConfig(source="synthetic", size="tiny", out=str(tmp_path / "a")))
    raw_b = tmp_path / "elsewhere" / "raw"
    shutil.copytree(tmp_path / "a-raw", raw_b)
    b = prepare(DataConfig(source="amazon2018", input=str(raw_b), name=a["name"], out=str(tmp_path / "b")))
    da, db = PreparedDataset(tmp_path / "a"), PreparedDataset(tmp_path / "b")
    assert a["files"]["items.parquet"] != b["files"]["items.parquet"]  # absolute image paths differ
    assert a["files"]["interactions.parquet"] == b["files"]["interactions.parquet"]
    assert dataset_differences(dataset_identity(da.manifest, da.items), dataset_identity(db.manifest, db.items)) == []
    assert dataset_differences(dataset_identity(da.manifest), dataset_identity(db.manifest))  # by file hash alone: differ
    ia, ib = (items_digest(d.items["item_id"], d.items["text"], d.items["image"]) for d in (da, db))
    assert ia == ib
    changed = db.items.copy()
    changed.loc[0, "text"] = "another title"
    diff = dataset_differences(dataset_identity(da.manifest, da.items), dataset_identity(db.manifest, changed))
    assert diff and "items.parquet (ids, text, categories or images)" in diff[0]


def test_a_save_killed_between_its_renames_keeps_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """Replacing 'last' takes two renames; killed between them, the checkpoint it replaced must
    be the one the resume finds (as 'last-previous'), not the one before it. The files are on
    disk before the renames, and what a killed save left behind is removed by the next one."""
    import os

    import moedist.train.checkpoint as ck
    from moedist.train.checkpoint import latest_complete, read_state

    m, opt = _trained()
    last = tmp_path / "last"
    for epoch in (2, 3):
        save_checkpoint(last, m, opt, {"epoch": epoch}, keep_previous=True)
    synced: list[str] = []
    real_fsync, real_replace = getattr(ck, "fsync_path", None), os.replace
    monkeypatch.setattr(ck, "fsync_path", lambda p: (synced.append(os.path.basename(p)), real_fsync(p)), raising=False)
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(last, m, opt, {"epoch": 4}, keep_previous=True)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    found = latest_complete(last, tmp_path / "last-previous")
    assert found is not None and read_state(found)["epoch"] == 3
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"} <= set(synced)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the killed save's leftovers
    save_checkpoint(last, m, opt, {"epoch": 4}, keep_previous=True)
    assert read_state(last)["epoch"] == 4 and read_state(tmp_path / "last-previous")["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "last-previous"]


def test_train_options_are_taken_as_given_and_win_over_overrides():
    """``--data "exp #2"`` used to become ``exp`` (a YAML comment) and ``--run-dir 0123`` the
    number 83 (YAML octal); options are typed by argparse, never parsed as YAML."""
    from moedist.cli import build_parser
    from moedist.train.cli import config_from_train_args

    args = build_parser().parse_args(["train", "--model", "sasrec", "--data", "/shared/exp #2/prepared",
                                      "--run-dir", "0123", "--features", "yes", "--epochs", "3", "--workers", "2",
                                      "dist.workers=5", "train.epochs=9", "train.lr=0.01", "--device", "cpu"])
    cfg = config_from_train_args(args)
    assert cfg.data == "/shared/exp #2/prepared" and cfg.run_dir == "0123" and cfg.features == "yes"
    assert cfg.train.epochs == 3 and cfg.dist.workers == 2 and cfg.train.lr == 0.01 and cfg.train.device == "cpu"
    assert cfg.model == "sasrec"
    local = config_from_train_args(build_parser().parse_args(["train", "--model", "sasrec", "--local", "dist.workers=3"]))
    assert local.dist.workers == 0
