"""Train HM4SR (time-aware multimodal sequential recommendation) on Ray Train + DeepSpeed.

The embedded default end to end (synthetic data -> features -> 2 workers)::

    python jobs/train_hm4sr.py
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_hm4sr.py --run-dir /shared/runs/hm4sr-synthetic

Your data (absolute paths under ``ray job submit``: ``data/`` and ``runs/`` are git-ignored,
so they are not uploaded with the working dir; on a multi-node cluster both must be on
storage every node sees)::

    python jobs/train_hm4sr.py --data data/prepared/games --workers 4 --ep-size 2 hm4sr.k1=8
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_hm4sr.py --data /shared/prepared/games --workers 4 --run-dir /shared/runs/hm4sr-games

Defaults are ``moedist/configs/hm4sr.yaml`` (the authors' Games settings); ``--config
best.yaml`` reruns a tuned configuration (``jobs/tune_hm4sr.py``). Rerunning resumes from the
run directory's last checkpoint.
"""
from __future__ import annotations

import argparse
import sys

MODEL = "hm4sr"


def main(argv: list[str] | None = None, model: str = MODEL, doc: str | None = __doc__) -> int:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared dataset folder (default: --config's, else the embedded synthetic dataset)")
    p.add_argument("--features", help="feature shards folder (default: the one under <data>/features)")
    p.add_argument("--config", help="YAML with ExperimentConfig keys, e.g. a tuned best.yaml")
    p.add_argument("--run-dir", dest="run_dir", help="output folder (default runs/<model>-<dataset>)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (0: local mode, this process)")
    p.add_argument("--ep-size", dest="ep_size", type=int, help="expert-parallel group size")
    p.add_argument("--zero-stage", dest="zero_stage", type=int, choices=[0, 1, 2])
    p.add_argument("--epochs", type=int)
    p.add_argument("--size", default="small", help="embedded default: synthetic size (tiny | small | ...)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=5e-4")
    args = p.parse_args(argv)

    from prepare_data import connect_ray, prepare_default

    from moedist.train.cli import load_experiment_config
    from moedist.train.launch import launch

    if args.workers > 0:
        connect_ray()
    data, features = (args.data, args.features)
    if data is None and not load_experiment_config(model, args.config, list(args.overrides)).data:
        # no dataset named (--data, --config, data=): the embedded one
        data, features = (str(p) if p is not None else None for p in prepare_default(args.size))
    # options are taken as given, never parsed as YAML (--data "exp #2" stays that path); a
    # data= or dist.workers= override wins over --data / --workers (whose default is 2), the
    # other options win over overrides
    given = {o.split("=", 1)[0].strip() for o in args.overrides if "=" in o}
    flags = {key: value for key, value in (
        ("data", None if "data" in given else data), ("dist.workers", None if "dist.workers" in given else args.workers),
        ("features", features), ("run_dir", args.run_dir), ("train.epochs", args.epochs),
        ("dist.ep_size", args.ep_size), ("dist.zero_stage", args.zero_stage)) if value is not None}
    cfg = load_experiment_config(model, args.config, ["train.progress=false", *args.overrides, f"model={model}"], flags)
    launch(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
