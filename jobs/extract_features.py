"""Extract frozen item features (text + image) for a prepared dataset with Ray Data.

Locally (starts a private Ray instance, 4 logical CPUs, no dashboard)::

    python jobs/extract_features.py --data data/prepared/synthetic-small-2025

On a running cluster (``ray start --head ...``; with RAY_AUTH_MODE=disabled on a loopback test cluster)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/extract_features.py --data $PWD/data/prepared/synthetic-small-2025 --actors 2

(an absolute ``--data``: the job runs in an uploaded copy of the working dir, and ``data/`` is
git-ignored, so it is not uploaded; the driver reads the items and writes the shards there,
the actors read the images, so on a multi-node cluster both must be on shared storage.)

On GPUs, one encoder per GPU, CLIP features for MAMEX::

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/extract_features.py --data /data/prepared/amazon-baby --actors 4 --gpu \
        --text-encoder '{"backend": "open_clip", "model": "ViT-B-32", "pretrained": "/models/clip-vit-b-32.pt", "modality": "text"}' \
        --image-encoder '{"backend": "open_clip", "model": "ViT-B-32", "pretrained": "/models/clip-vit-b-32.pt", "modality": "image"}'

Output: ``<data>/features/<text>+<image>/`` (``--out`` to change) with ``shard-NNNNNN.tar``
WebDataset shards and ``manifest.json``; re-running resumes (complete shards are kept).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset folder (items.parquet)")
    p.add_argument("--out", default=None)
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--image-encoder", default="efficientnet_lite0")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ray-address", default=None)
    args = p.parse_args(argv)

    from moedist.features.pipeline import extract_features

    manifest = extract_features(
        args.data,
        args.out,
        text_encoder=args.text_encoder,
        image_encoder=args.image_encoder,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_actors=args.actors,
        use_gpu=args.gpu,
        ray_address=args.ray_address,
        progress=sys.stderr.isatty(),
        log=lambda m: print(m, file=sys.stderr),
    )
    summary = {k: manifest[k] for k in ("n_items", "dims", "run")}
    summary["missing"] = {m: v["reasons"] for m, v in manifest["missing"].items()}
    summary["shards"] = len(manifest["shards"])
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
