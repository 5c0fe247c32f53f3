"""Train MAMEX (multimodal cold-start item recommendation) on Ray Train + DeepSpeed.

The embedded default end to end (synthetic data -> features -> 2 workers)::

    python jobs/train_mamex.py
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_mamex.py --run-dir /shared/runs/mamex-synthetic

Your data and CLIP features (absolute paths under ``ray job submit``: ``data/`` and ``runs/``
are git-ignored, so they are not uploaded with the working dir)::

    python jobs/train_mamex.py --data data/prepared/baby --features data/prepared/baby/features/clip --workers 4 --ep-size 2
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_mamex.py --data /shared/prepared/baby --workers 4 --run-dir /shared/runs/mamex-baby mamex.num_experts=8

Defaults are ``moedist/configs/mamex.yaml`` (the authors' code); ``--config best.yaml`` reruns a
tuned configuration (``jobs/tune_mamex.py``). Rerunning resumes from the last checkpoint.
"""
from __future__ import annotations

import sys

from train_hm4sr import main as train_main

if __name__ == "__main__":
    sys.exit(train_main(model="mamex", doc=__doc__))
