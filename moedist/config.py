"""Typed configuration: dataclasses, YAML files and ``key=value`` overrides.

Every configurable part of moedist is a dataclass. :func:`load_config` builds one from
defaults, an optional YAML file and command-line overrides (``train.lr=1e-3``,
``model.modalities=[id,text]``), checking every key and value against the dataclass field
types: an unknown key or a value of the wrong type is a :class:`~moedist.errors.ConfigError`
naming the key (and the file), never a silent default.

:func:`save_config` writes the resolved config next to an output so every run directory
records exactly what produced it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from moedist.errors import ConfigError
from moedist.io import atomic_write_text  # noqa: F401  (re-exported: older imports use moedist.config)

T = TypeVar("T")

CONFIG_DIR = Path(__file__).parent / "configs"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type[T], data: dict, *, prefix: str = "", base: T | None = None) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        import difflib

        known = ", ".join(sorted(fields))
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=3, cutoff=0.75)
        hint = f"did you mean {' or '.join(repr(prefix + c) for c in close)}? " if close else ""
        raise ConfigError(f"unknown key {prefix + unknown[0]!r} ({hint}known keys in {prefix or 'the top level'}: {known})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        current = getattr(base, name) if base is not None else None
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and current is not None:
            kwargs[name] = _from_dict(tp, value, prefix=f"{prefix}{name}.", base=current)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.replace("-", "_").split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = nxt
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: T | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """Defaults of ``cls`` (or ``base``) <- YAML file ``path`` <- ``key=value`` overrides <-
    ``values``: keys (dotted for nested sections, e.g. ``train.epochs``) with values already
    typed (e.g. command-line flags from argparse), checked against the field types but not
    parsed as YAML, so ``"0123"`` or ``"exp #2"`` stays that string."""
    cfg = base if base is not None else cls()
    if path is not None:
        try:
            cfg = _from_dict(cls, read_yaml(path), base=cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        tree: dict = {}
        for text in overrides:
            keys, value = parse_override(text)
            _set_path(tree, keys, value)
        cfg = _from_dict(cls, tree, base=cfg)
    if values:
        tree = {}
        for key, value in values.items():
            _set_path(tree, key.split("."), value)
        cfg = _from_dict(cls, tree, base=cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return convert(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def packaged_config(name: str) -> Path:
    """Path of a YAML file shipped in ``moedist/configs`` (``"hm4sr"`` -> ``hm4sr.yaml``)."""
    path = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no packaged config {name!r} (available: {options})")
    return path
