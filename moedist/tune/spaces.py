"""Hyperparameter search spaces, keyed by dotted ExperimentConfig keys.

The defaults are the papers' search ranges (MODELS_SPEC 1.0 and 3.0)::

    HM4SR (P-HM §5.1.4)   hm4sr.k1, hm4sr.k2        {2, 4, 6, 8, 12}
                          hm4sr.lambda_idcl (λ2)    0.25 .. 1.5 in steps of 0.25
                          hm4sr.lambda_pcl  (λ3)    {0.1, 0.3, 0.5, 0.7, 1.0, 1.5}
                          hm4sr.beta_pcl    (β)     0.1 .. 0.5 in steps of 0.1
                          hm4sr.tau_idcl    (τ)     {0.1, 0.2, 0.3, 0.5, 0.7, 1.0}
    MAMEX (P-MX §4.1.3)   mamex.num_experts         {4, 6, 8}
                          mamex.top_k               {2, 3, 4}   (never more than num_experts)
                          mamex.lambda_adapter (λ2),
                          mamex.lambda_fusion  (λ3) {1, 0.1, 0.01}   (spec A8: which λ is unknown)

The stepped ranges are categorical over their exact grid points (a ``quniform`` draw would
give 0.30000000000000004). A YAML file overrides them key by key::

    hm4sr.k1: {grid: [2, 4]}                 # every value, each with every other grid value
    hm4sr.tau_idcl: {choice: [0.1, 0.2]}     # one value per sample
    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    hm4sr.lambda_idcl: {quniform: [0.25, 1.5, 0.25]}
    hm4sr.beta_pcl: {uniform: [0.1, 0.5]}
    hm4sr.k2: 4                              # a constant: fixed, not searched
    hm4sr.lambda_pcl: null                   # drop the key from the default space

Nested sections (``hm4sr: {k1: {grid: [...]}}``) are accepted too, and a top-level
``inherit: false`` starts from an empty space instead of the model's default. Every key and
value is checked against ExperimentConfig up front: an unknown key or a value of the wrong
type is a ConfigError naming the key (and the file).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

from moedist.errors import ConfigError

DOMAIN_KINDS = ("grid", "choice", "uniform", "quniform", "loguniform", "qloguniform", "randint")


def _steps(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 10) for i in range(n + 1)]


HM4SR_SPACE: dict[str, dict] = {
    "hm4sr.k1": {"choice": [2, 4, 6, 8, 12]},
    "hm4sr.k2": {"choice": [2, 4, 6, 8, 12]},
    "hm4sr.lambda_idcl": {"choice": _steps(0.25, 1.5, 0.25)},
    "hm4sr.lambda_pcl": {"choice": [0.1, 0.3, 0.5, 0.7, 1.0, 1.5]},
    "hm4sr.beta_pcl": {"choice": _steps(0.1, 0.5, 0.1)},
    "hm4sr.tau_idcl": {"choice": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]},
}

MAMEX_SPACE: dict[str, dict] = {
    "mamex.num_experts": {"choice": [4, 6, 8]},
    "mamex.top_k": {"choice": [2, 3, 4]},
    "mamex.lambda_adapter": {"choice": [1.0, 0.1, 0.01]},
    "mamex.lambda_fusion": {"choice": [1.0, 0.1, 0.01]},
}

DEFAULT_SPACES = {"hm4sr": HM4SR_SPACE, "mamex": MAMEX_SPACE}

# (smaller key, larger key): a sampled value of the first never exceeds the second
CONSTRAINTS = (("mamex.top_k", "mamex.num_experts"),)


# ----------------------------------------------------------------------------- config keys


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's samplers) -> Python values the typed config accepts."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_overrides(cfg, overrides: Mapping[str, Any]):
    """A copy of ``cfg`` with each dotted key set (typed and validated like ``key=value``)."""
    from moedist.config import load_config

    return load_config(type(cfg), base=copy.deepcopy(cfg), values={k: _plain(v) for k, v in overrides.items()})


def get_key(cfg, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_key(cfg, key: str, where: str) -> None:
    obj = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"{where}unknown key {key!r} in the search space (no {'.'.join(parts[: i + 1])!r} in ExperimentConfig)")
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        raise ConfigError(f"{where}search space key {key!r} is a section, not a value; name a key inside it")


# ----------------------------------------------------------------------------- specs


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not (len(v) == 1 and next(iter(v)) in DOMAIN_KINDS):
            if not v:
                raise ConfigError(f"search space key {key!r}: empty mapping")
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_spec(key: str, spec: Any) -> Any:
    """Normalise one entry: a ``{kind: args}`` mapping, a constant, or None (drop)."""
    if spec is None or not isinstance(spec, Mapping):
        return spec
    (kind, args), = spec.items()
    if kind in ("grid", "choice"):
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"search space key {key!r}: {kind} needs a non-empty list of values, got {args!r}")
        return {kind: list(args)}
    arity = {"uniform": (2,), "quniform": (3,), "loguniform": (2, 3), "qloguniform": (3, 4), "randint": (2,)}[kind]
    if not isinstance(args, (list, tuple)) or len(args) not in arity:
        raise ConfigError(f"search space key {key!r}: {kind} needs [{', '.join(['lo', 'hi', 'q', 'base'][: max(arity)])}]"
                          f" ({' or '.join(map(str, arity))} numbers), got {args!r}")
    try:
        nums = [float(a) for a in args]
    except (TypeError, ValueError):
        raise ConfigError(f"search space key {key!r}: {kind} bounds must be numbers, got {args!r}") from None
    if not nums[0] < nums[1]:
        raise ConfigError(f"search space key {key!r}: {kind} needs lo < hi, got {args!r}")
    if kind.startswith("log") or kind.startswith("qlog"):
        if nums[0] <= 0:
            raise ConfigError(f"search space key {key!r}: {kind} needs lo > 0, got {args!r}")
    return {kind: list(args)}


def _values_to_check(spec: Any) -> list:
    if not isinstance(spec, Mapping):
        return [spec]
    (kind, args), = spec.items()
    if kind in ("grid", "choice"):
        return list(args)
    if kind == "randint":
        return [int(args[0]), int(args[1]) - 1]
    return [float(args[0]), float(args[1])]


def _partner_values(key: str, space: Mapping[str, Any]) -> dict[str, Any]:
    """Values of constrained partner keys that let ``key``'s values be checked on their own
    (``mamex.top_k=4`` is valid when some ``mamex.num_experts`` in the space is >= 4)."""
    out = {}
    for small, large in CONSTRAINTS:
        other, pick = (large, max) if key == small else (small, min) if key == large else (None, None)
        if other in space:
            try:
                vals = _values_to_check(_check_spec(other, space[other]))
                out[other] = pick(vals)
            except (ConfigError, TypeError, ValueError):
                pass
    return out


def validate_space(space: Mapping[str, Any], cfg, *, source: str | None = None) -> dict[str, Any]:
    """Check every key and value of a (flat, spec-form) space against ``cfg``'s type."""
    where = f"{source}: " if source else ""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        try:
            spec = _check_spec(key, spec)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        _check_key(cfg, key, where)
        partners = _partner_values(key, space)
        for value in _values_to_check(spec):
            try:
                apply_overrides(cfg, {**partners, key: value})
            except ConfigError as e:
                raise ConfigError(f"{where}search space key {key!r}, value {value!r}: {e}") from None
        out[key] = spec
    return out


def load_space_file(path: str | Path) -> tuple[dict[str, Any], bool]:
    """A space YAML -> (flat spec mapping, inherit the model's default space?)."""
    from moedist.config import read_yaml

    data = read_yaml(path)
    inherit = data.pop("inherit", True)
    if not isinstance(inherit, bool):
        raise ConfigError(f"{path}: inherit must be true or false, got {inherit!r}")
    try:
        return _flatten(data), inherit
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def default_space(model: str) -> dict[str, Any]:
    if model not in DEFAULT_SPACES:
        raise ConfigError(f"no default search space for model {model!r} (defaults exist for "
                          f"{', '.join(DEFAULT_SPACES)}); pass a space file with --space")
    return copy.deepcopy(DEFAULT_SPACES[model])


def resolve_space(space: str | Path | Mapping[str, Any] | None, cfg) -> dict[str, Any]:
    """The model's default space, overridden by ``space`` (a YAML path or a mapping in the
    same form); validated against ``cfg``. Returns a flat mapping key -> spec (or constant)."""
    source = None
    inherit = True
    if space is None:
        entries: dict[str, Any] = {}
    elif isinstance(space, (str, Path)):
        source = str(space)
        entries, inherit = load_space_file(space)
    else:
        entries = dict(space)
        inherit = bool(entries.pop("inherit", True))
        entries = _flatten(entries)
    merged = default_space(cfg.model) if inherit and cfg.model in DEFAULT_SPACES else {}
    if inherit and cfg.model not in DEFAULT_SPACES and not entries:
        default_space(cfg.model)  # raises: nothing to search
    for key, spec in entries.items():
        if spec is None:
            merged.pop(key, None)
        else:
            merged[key] = spec
    if not any(isinstance(s, Mapping) for s in merged.values()):
        raise ConfigError(f"{source + ': ' if source else ''}the search space has no searched key")
    out = validate_space(merged, cfg, source=source)
    _check_constraints(out, cfg, source)
    return out


# ----------------------------------------------------------------------------- Ray Tune


def _values(spec: Any) -> list | None:
    if isinstance(spec, Mapping):
        (kind, args), = spec.items()
        return list(args) if kind in ("grid", "choice") else None
    return [spec]


def _check_constraints(space: dict, cfg, source: str | None) -> None:
    where = f"{source}: " if source else ""
    for small, large in CONSTRAINTS:
        s_vals = _values(space[small]) if small in space else [get_key(cfg, small)]
        l_vals = _values(space[large]) if large in space else [get_key(cfg, large)]
        if s_vals is None or l_vals is None:
            raise ConfigError(f"{where}{small} and {large} must be discrete (grid/choice/constant) when searched together")
        if max(s_vals) <= min(l_vals):
            continue
        if min(s_vals) > max(l_vals) or not any(v <= min(l_vals) for v in s_vals):
            raise ConfigError(f"{where}no value of {small} ({s_vals}) is <= every {large} ({l_vals})")
        if isinstance(space.get(small), Mapping) and "grid" in space[small] or isinstance(space.get(large), Mapping) and "grid" in space[large]:
            raise ConfigError(f"{where}{small} grid {s_vals} has values above some {large} ({l_vals}); "
                              f"use choice (sampled under the constraint) or a grid that respects {small} <= {large}")


def _constrained_choice(values: list, bound_key: str, seed: int):
    """``tune.sample_from``: a uniform choice among ``values`` that do not exceed the trial's
    ``bound_key`` value (Tune resolves that key first: this one depends on it). The draws
    come from a seeded generator of their own, so a seeded search repeats them."""
    import random

    from ray import tune

    rng = random.Random(seed)

    def sample(config) -> Any:
        bound = config[bound_key]
        return rng.choice([v for v in values if v <= bound])

    return tune.sample_from(sample)


def to_tune(space: Mapping[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """Flat spec mapping -> Ray Tune ``param_space`` (keys stay dotted, one level)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, Mapping):
            out[key] = spec
            continue
        (kind, args), = spec.items()
        if kind == "grid":
            out[key] = tune.grid_search(list(args))
        elif kind == "choice":
            out[key] = tune.choice(list(args))
        elif kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "quniform":
            out[key] = tune.quniform(float(args[0]), float(args[1]), float(args[2]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(*(float(a) for a in args))
        elif kind == "qloguniform":
            out[key] = tune.qloguniform(*(float(a) for a in args))
        elif kind == "randint":
            out[key] = tune.randint(int(args[0]), int(args[1]))
    for small, large in CONSTRAINTS:
        spec_s, spec_l = space.get(small), space.get(large)
        if not (isinstance(spec_s, Mapping) and "choice" in spec_s and isinstance(spec_l, Mapping)):
            continue
        if max(spec_s["choice"]) > min(_values(spec_l) or [math.inf]):
            out[small] = _constrained_choice(list(spec_s["choice"]), large, seed)
    return out


def searched_keys(space: Mapping[str, Any]) -> list[str]:
    """Keys that vary between trials (constants are applied but not searched)."""
    return [k for k, s in space.items() if isinstance(s, Mapping)]


def describe(space: Mapping[str, Any]) -> str:
    lines = []
    for key, spec in space.items():
        if isinstance(spec, Mapping):
            (kind, args), = spec.items()
            lines.append(f"  {key}: {kind} {list(args)}")
        else:
            lines.append(f"  {key} = {spec!r} (fixed)")
    return "\n".join(lines)
