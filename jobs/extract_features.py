"""Extract frozen item features (text + image) for a prepared dataset with Ray Data.

Locally (starts a private Ray instance, at least 4 logical CPUs, no dashboard)::

    python jobs/extract_features.py --data data/prepared/synthetic-small-2025

On a running cluster (``ray start --head ...``)::

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
import sys


def main(argv: list[str] | None = None) -> int:
    from moedist.features.cli import add_extract_arguments, cmd_extract

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_extract_arguments(p, data_option=True)
    return cmd_extract(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
