"""Prepare a dataset (and, with ``--extract``, its item features): the first step of every job.

The embedded default (synthetic Amazon-2018-style data with real JPEG images, no downloads)::

    python jobs/prepare_data.py --extract
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_data.py --extract --out $PWD/data/prepared/synthetic-small-2025

Real data (``--input`` and ``--out`` absolute under ``ray job submit``: the job runs in an
uploaded copy of the working dir, and ``data/`` is git-ignored, so it is not uploaded)::

    python jobs/prepare_data.py --source amazon --input raw/Industrial_and_Scientific_5.json.gz --extract
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_data.py --source atomic --input /shared/data/movielens-100k --out /shared/prepared/ml-100k

Any DataConfig key can be given as ``key=value`` (``kcore=5 cold_valid_frac=0.1``). Both steps
are resumable: an unchanged input is not prepared again, complete feature shards are kept.
The other jobs import :func:`prepare_default` from here for their embedded default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a ``ray job submit`` runs us on (RAY_ADDRESS is set), else start a
    local Ray (4+ logical CPUs: Tune-over-Train and Ray Data pools deadlock on fewer; the
    dashboard on loopback: Train V2 frees a stopped trial's resources through it)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
        return
    # auth stays as the caller set it (Ray's default for a new local cluster: a token): its
    # GCS and raylets listen on every interface, not only on loopback
    from moedist.ray_auth import private_auth_token

    private_auth_token()
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}})


def prepare(cfg, *, extract: bool, actors: int = 1, text_encoder="minilm", image_encoder="efficientnet_lite0") -> tuple[Path, Path | None]:
    """Prepare ``cfg`` (a DataConfig); with ``extract`` also encode the item features with Ray
    Data. Returns (prepared folder, features folder or None), both absolute."""
    from moedist.data.api import prepare as prepare_data

    manifest = prepare_data(cfg, log=log)
    data = cfg.out_dir().resolve()
    log(f"{'reused' if manifest.get('reused') else 'prepared'} {data}: {manifest['stats']['users']:,} users, "
        f"{manifest['stats']['items']:,} items, {manifest['stats']['interactions']:,} interactions")
    if not extract:
        return data, None
    from moedist.features.pipeline import default_out_dir, extract_features

    connect_ray()
    fman = extract_features(data, text_encoder=text_encoder, image_encoder=image_encoder, num_actors=actors,
                            batch_size=32, progress=False, log=log)
    features = default_out_dir(data, text_encoder, image_encoder).resolve()
    log(f"features {features}: {fman['n_items']:,} items, dims {fman['dims']}")
    return data, features


def prepare_default(size: str = "small", seed: int = 2025, *, out: str | None = None) -> tuple[Path, Path]:
    """The embedded default: the synthetic dataset, prepared, with MiniLM + EfficientNet features."""
    from moedist.data.api import DataConfig

    data, features = prepare(DataConfig(source="synthetic", size=size, seed=seed, out=out), extract=True)
    assert features is not None
    return data, features


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="synthetic", help="synthetic | amazon | atomic (default synthetic)")
    p.add_argument("--input", help="raw file or folder (amazon, atomic)")
    p.add_argument("--out", help="prepared folder (default data/prepared/<name>)")
    p.add_argument("--size", default="small", help="synthetic size: tiny | small | medium | large")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--extract", action="store_true", help="also extract item features (Ray Data)")
    p.add_argument("--actors", type=int, default=1, help="encoder actors for --extract")
    p.add_argument("overrides", nargs="*", help="DataConfig key=value overrides")
    args = p.parse_args(argv)

    from moedist.config import load_config
    from moedist.data.api import DataConfig

    overrides = [f"source={args.source}", f"size={args.size}", f"seed={args.seed}", *args.overrides]
    paths = {k: v for k, v in (("input", args.input), ("out", args.out)) if v is not None}  # as given, not YAML
    data, features = prepare(load_config(DataConfig, None, overrides, values=paths), extract=args.extract,
                             actors=args.actors)
    print(json.dumps({"data": str(data), "features": str(features) if features else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
