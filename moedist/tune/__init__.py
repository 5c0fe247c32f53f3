"""Hyperparameter search with Ray Tune over Ray Train runs (ASHA early stopping).

    moedist tune --model hm4sr --data data/prepared/synthetic-small-2025 --samples 16 --workers 1

:mod:`moedist.tune.spaces` holds the papers' search spaces (dotted config keys, YAML
overrides); :func:`moedist.tune.run.run_tune` runs the search, writes the results table and
``best.yaml``, and retrains the best configuration.
"""
from moedist.tune.spaces import DEFAULT_SPACES, apply_overrides, default_space, resolve_space

__all__ = ["DEFAULT_SPACES", "apply_overrides", "default_space", "resolve_space", "run_tune"]


def __getattr__(name: str):
    if name == "run_tune":  # imports Ray lazily
        from moedist.tune.run import run_tune

        return run_tune
    raise AttributeError(name)
