"""Tune HM4SR over the paper's search space (k1, k2, λ2, λ3, β, τ) with Ray Tune + ASHA.

The embedded default end to end: synthetic data -> features -> 4 trials of 8 epochs -> the
best config retrained and tested::

    python jobs/tune_hm4sr.py
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_hm4sr.py --storage /shared/runs

Your data (absolute ``--data`` / ``--storage`` under ``ray job submit``: ``data/`` and
``runs/`` are git-ignored, so not uploaded; on a multi-node cluster use shared storage, or an
``s3://`` URI for ``--storage`` with ``--local-dir`` on a folder every node shares: the
trials' run directories and the retrained best are written there)::

    python jobs/tune_hm4sr.py --data data/prepared/games --samples 32 --workers 1 --space space.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_hm4sr.py --data /shared/prepared/games --samples 32 --workers 2 \
        --storage s3://bucket/runs --name hm4sr-games train.epochs=50

Outputs in ``<storage>/<name>`` (default ``runs/tune-hm4sr-<dataset>``): ``results.csv`` /
``results.parquet`` (one row per trial), ``best.yaml`` (``python jobs/train_hm4sr.py --config
best.yaml`` or ``moedist train --config best.yaml``) and ``best/results.json`` (test metrics).
Rerunning the same command resumes the search. With ``--data`` a missing feature set is
extracted first; ``hm4sr.modalities=[id]`` needs none.
"""
from __future__ import annotations

import argparse
import json
import sys

MODEL = "hm4sr"


def main(argv: list[str] | None = None, model: str = MODEL, doc: str | None = __doc__) -> int:
    from moedist.tune.cli import add_tune_arguments, config_from_args, tune_from_args

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(p, model_required=False)
    p.add_argument("--size", default="small", help="embedded default: synthetic size (tiny | small | ...)")
    args = p.parse_args(argv)

    from prepare_data import connect_ray, prepare_default

    connect_ray()
    # no dataset named (by --data, --config or data=): the embedded default, with a budget that fits a laptop
    if args.data is None and not config_from_args(args, model).data:
        args.data, args.features = map(str, prepare_default(args.size))
        args.samples = 4 if args.samples is None else args.samples
        if model == "mamex":  # validates every eval_every epochs: 40 epochs, 8 evaluations
            args.epochs = 40 if args.epochs is None else args.epochs
            if not any(o.startswith("train.eval_every=") for o in args.overrides):
                args.overrides.append("train.eval_every=5")
        else:
            args.epochs = 8 if args.epochs is None else args.epochs
    else:
        from moedist.train.loop import find_features, model_needs_features

        cfg = config_from_args(args, model)
        if model_needs_features(cfg) and find_features(cfg) is None:
            from prepare_data import log

            from moedist.features.pipeline import extract_features

            log(f"no item features under {cfg.data}/features: extracting them first")
            extract_features(cfg.data, progress=False, batch_size=32, log=log)
    out = tune_from_args(args, model)
    summary = {"experiment": out["experiment_path"], "results": out["results_csv"], "best_config": out["best_config"],
               "best_test": (out["best_results"] or {}).get("test")}
    print(json.dumps(summary, indent=1))
    from moedist.tune.cli import exit_code

    return exit_code(out)  # 1: a trial failed, 130: interrupted; a rerun resumes either


if __name__ == "__main__":
    sys.exit(main())
