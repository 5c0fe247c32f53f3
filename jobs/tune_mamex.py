"""Tune MAMEX over the paper's search space (experts, top-k, λ) with Ray Tune + ASHA.

Experts ∈ {4, 6, 8}, top-k ∈ {2, 3, 4} (never above the experts), and λ ∈ {1, 0.1, 0.01} for
the adapter and fusion balance weights (MODELS_SPEC A8). The embedded default end to end:
synthetic data -> features -> 4 trials of 40 epochs (validated every 5) -> the best config
retrained and tested::

    python jobs/tune_mamex.py
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_mamex.py --storage /shared/runs

Your data (absolute paths under ``ray job submit``; ``data/`` and ``runs/`` are not uploaded)::

    python jobs/tune_mamex.py --data data/prepared/baby --features data/prepared/baby/features/clip --samples 27
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_mamex.py --data /shared/prepared/baby --samples 27 --workers 2 \
        --storage s3://bucket/runs --name mamex-baby train.epochs=300

MAMEX validates every ``train.eval_every`` epochs (10 by default: epochs 0, 10, 20, ...), and
ASHA counts in evaluations: with ``--grace-period 3`` a trial runs at least to its epoch-20
evaluation (21 epochs) before it can be stopped. Outputs
and resume as for ``jobs/tune_hm4sr.py``.
"""
from __future__ import annotations

import sys

from tune_hm4sr import main as tune_main

if __name__ == "__main__":
    sys.exit(tune_main(model="mamex", doc=__doc__))
