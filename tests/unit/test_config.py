from dataclasses import dataclass, field
from typing import Literal

import pytest

from moedist.config import load_config, parse_override, save_config, read_yaml
from moedist.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    ks: tuple[int, ...] = (5, 10)
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    epochs: int = 3
    flag: bool = False
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\ninner:\n  lr: 0.5\n  ks: [1, 2, 3]\n")
    cfg = load_config(Outer, f, ["inner.lr=0.25", "flag=true", "path=/tmp/x"])
    assert cfg.epochs == 7
    assert cfg.inner.lr == 0.25
    assert cfg.inner.ks == (1, 2, 3)
    assert cfg.inner.mode == "a"  # untouched nested default survives a partial section
    assert cfg.flag is True and cfg.path == "/tmp/x"


def test_unknown_key_names_the_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*inner\.lrr"):
        load_config(Outer, f)
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_config(Outer, None, ["epoch=3"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("epochs=three", "epochs: expected an integer"),
        ("epochs=2.5", "epochs: expected an integer"),
        ("flag=1", "flag: expected true/false"),
        ("inner.lr=fast", "inner.lr: expected a number"),
        ("inner.mode=c", "inner.mode: expected one of"),
        ("inner.ks=[1, x]", r"inner.ks\[1\]: expected an integer"),
        ("inner=3", "inner: expected a mapping"),
        ("epochs", "not of the form key=value"),
    ],
)
def test_wrong_types_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, None, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("epochs: 3\ninner: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        read_yaml(f)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["inner.ks=[7]", "name=run"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Outer, tmp_path / "out" / "config.yaml")
    assert again == cfg


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert load_config(Inner, None, ["lr=1e-3"]).lr == 1e-3
    assert parse_override("--x-y=[id, text]") == (["x_y"], ["id", "text"])


def test_each_worker_resolves_its_own_gpu(monkeypatch):
    import torch

    from moedist.errors import ConfigError
    from moedist.train.loop import resolve_device

    assert resolve_device("cpu", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", 2) == torch.device("cuda", 2)
    # "cuda" without an index is the worker's own GPU, not GPU 0 for every worker of a node
    assert resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", 3) == torch.device("cuda", 1)


def test_a_restored_adam_step_sits_where_torchs_adam_keeps_it():
    """Fused (and capturable) Adam keeps ``step`` as a float32 tensor on the parameter's device;
    the plain one as a CPU scalar. A checkpoint restores it the same way, so a resumed fused
    Adam on a GPU is not handed a CPU step."""
    import torch

    from moedist.train.checkpoint import adam_step_tensor

    on_meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    plain = torch.nn.Parameter(torch.zeros(3))

    class _Opt:
        param_groups = [{"params": [on_meta], "fused": True, "capturable": False},
                        {"params": [plain], "fused": None, "capturable": False}]

    s = adam_step_tensor(_Opt, on_meta, 7)
    assert s.device.type == "meta" and s.dtype == torch.float32 and s.shape == ()
    s = adam_step_tensor(_Opt, plain, 7)
    assert s.device.type == "cpu" and float(s) == 7.0
    # the same placement as torch's own fused Adam after one step
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], fused=True)
    p.grad = torch.ones(3)
    opt.step()
    mine = adam_step_tensor(opt, p, 1)
    assert mine.device == opt.state[p]["step"].device and mine.dtype == opt.state[p]["step"].dtype


def test_typed_values_are_not_parsed_as_yaml_and_win_over_overrides():
    """``values`` (e.g. command-line flags) are taken as given: "0123", "1.10", "12:30",
    "exp #2" and "null" stay strings; they are applied after the key=value overrides."""
    for raw in ("0123", "1.10", "12:30", "exp #2", "null", "yes", "[a]"):
        cfg = load_config(Outer, None, ["name=other", "epochs=5"], values={"name": raw, "path": raw})
        assert cfg.name == raw and cfg.path == raw and cfg.epochs == 5
    assert load_config(Outer, None, values={"epochs": 9, "flag": True}).epochs == 9
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        load_config(Outer, None, values={"epochs": "9"})
    with pytest.raises(ConfigError, match="unknown key 'nme'"):
        load_config(Outer, None, values={"nme": "x"})
