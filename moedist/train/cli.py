"""``moedist train`` (and the other torch-side commands), registered lazily by moedist.cli."""
from __future__ import annotations

import argparse


MODELS = ("hm4sr", "mamex", "sasrec", "popularity", "content")


def load_experiment_config(model: str, config: str | None, overrides: list[str], flags: dict | None = None):
    """Packaged ``configs/<model>.yaml`` <- user YAML <- ``key=value`` overrides <- ``flags``:
    dotted keys with values already typed (command-line options), never parsed as YAML, so
    ``--data "exp #2"`` or ``--run-dir 0123`` stay those strings."""
    from moedist.config import load_config, packaged_config
    from moedist.train.config import ExperimentConfig

    cfg = load_config(ExperimentConfig, packaged_config(model))
    if config:
        cfg = load_config(ExperimentConfig, config, base=cfg)
    return load_config(ExperimentConfig, None, overrides, base=cfg, values=flags)


def config_from_train_args(args):
    """The ExperimentConfig of parsed ``moedist train`` arguments."""
    # options are taken as given (argparse types the numbers) and win over key=value overrides
    flags = {key: value for key, value in (
        ("data", args.data), ("features", args.features), ("run_dir", args.run_dir),
        ("train.device", args.device or None), ("train.epochs", args.epochs), ("dist.workers", args.workers),
        ("dist.ep_size", args.ep_size), ("dist.zero_stage", args.zero_stage)) if value is not None}
    if args.local:
        flags["dist.workers"] = 0
    model = args.model
    if args.config and model is None:
        from moedist.config import read_yaml

        model = read_yaml(args.config).get("model")
    return load_experiment_config(model or "hm4sr", args.config, list(args.overrides) + [f"model={model or 'hm4sr'}"],
                                  flags)


def cmd_train(args) -> int:
    from moedist.cli import console
    from moedist.train.launch import launch

    cfg = config_from_train_args(args)
    launch(cfg, echo=lambda s: console.print(s, highlight=False, soft_wrap=True, markup=False))
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """A sub-command parser that takes options and ``key=value`` positionals in any order
    (``--model sasrec a=1 --epochs 3 b=2``): argparse's default parsing stops collecting a
    ``nargs="*"`` positional at the first option after it."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls parse_known_args itself
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_commands(sub) -> None:
    tr = sub.add_parser("train", help="train a model (single process; see --help)")
    tr.__class__ = _IntermixedParser  # the parent parser builds its sub-parsers from its own class
    tr.add_argument("--model", choices=MODELS, help="model to train (default hm4sr, or the config's model)")
    tr.add_argument("--data", help="prepared dataset directory")
    tr.add_argument("--features", help="feature shards directory (default: the one under <data>/features)")
    tr.add_argument("--run-dir", dest="run_dir", help="output directory (default runs/<model>-<dataset>)")
    tr.add_argument("--config", help="YAML with ExperimentConfig keys (on top of the model's defaults)")
    tr.add_argument("--device", help="auto | cpu | cuda")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--workers", type=int, help="Ray Train workers (DeepSpeed engine each); default: local mode")
    tr.add_argument("--ep-size", dest="ep_size", type=int, help="expert-parallel group size")
    tr.add_argument("--zero-stage", dest="zero_stage", type=int, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    tr.add_argument("--local", action="store_true", help="local debugging mode: this process, no Ray (pdb works)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=5e-4 hm4sr.k1=8")
    tr.set_defaults(func=cmd_train)
    try:
        from moedist.features.cli import add_commands as add_feature_commands
    except ImportError as e:
        if "moedist.features.cli" not in str(e):
            raise
    else:
        add_feature_commands(sub)
    try:
        from moedist.tune.cli import add_commands as add_tune_commands
    except ImportError as e:
        if "moedist.tune.cli" not in str(e):
            raise
    else:
        add_tune_commands(sub)
    try:
        from moedist.report.cli import add_commands as add_report_commands
    except ImportError as e:
        if "moedist.report" not in str(e):
            raise
    else:
        add_report_commands(sub)
