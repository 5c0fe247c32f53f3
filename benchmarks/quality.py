"""Model-quality comparison: each model and ablation on the same prepared data and features.

    python benchmarks/quality.py --data data/prepared/movielens-100k --features .../minilm+none \
        --models popularity sasrec hm4sr --out bench_results/quality-ml100k.json [key=value ...]

Every run is an ordinary ``moedist train`` run (its run directory under ``--runs``, resumed
if interrupted); this script only chooses the variants and collects their ``results.json``
into one JSON file and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moedist.config import atomic_write_text
from moedist.train.cli import load_experiment_config
from moedist.train.loop import run_training

# variant name -> (model, overrides)
VARIANTS = {
    "popularity": ("popularity", []),
    "sasrec": ("sasrec", []),
    "hm4sr": ("hm4sr", []),
    "hm4sr-authors": ("hm4sr", ["hm4sr.temporal_experts_trainable=false"]),
    "hm4sr -IMoE": ("hm4sr", ["hm4sr.use_imoe=false"]),
    "hm4sr -TMoE": ("hm4sr", ["hm4sr.use_tmoe=false"]),
    "hm4sr -CP": ("hm4sr", ["hm4sr.use_cp=false"]),
    "hm4sr -IDCL": ("hm4sr", ["hm4sr.use_idcl=false"]),
    "hm4sr -PCL": ("hm4sr", ["hm4sr.use_pcl=false"]),
    "content": ("content", []),
    "mamex": ("mamex", []),
    "mamex w/o MoE": ("mamex", ["mamex.use_moe=false"]),
    "mamex w/o Align": ("mamex", ["mamex.use_align=false"]),
    "mamex w/o MMF": ("mamex", ["mamex.use_fusion=false"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--features")
    p.add_argument("--models", nargs="+", default=["popularity", "sasrec", "hm4sr"], help=f"from {list(VARIANTS)}")
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-overrides", nargs="*", default=[], help="key=value for sequential models")
    p.add_argument("--cold-overrides", nargs="*", default=[], help="key=value for cold-start models")
    a = p.parse_args()
    out = Path(a.out)
    table = json.loads(out.read_text()) if out.is_file() else {}
    for name in a.models:
        model, extra = VARIANTS[name]
        common = a.seq_overrides if model in ("popularity", "sasrec", "hm4sr") else a.cold_overrides
        run_dir = Path(a.runs) / f"{Path(a.data).name}-{name.replace(' ', '').replace('/', '')}"
        overrides = [f"data={a.data}", f"run_dir={run_dir}", "train.progress=false", *common, *extra]
        if a.features:
            overrides.append(f"features={a.features}")
        cfg = load_experiment_config(model, None, overrides)
        t0 = time.time()
        res = run_training(cfg, echo=lambda s: print(f"[{name}] {s}", flush=True))
        res["seconds"] = round(time.time() - t0, 1)
        res["overrides"] = overrides
        table[name] = res
        atomic_write_text(out, json.dumps(table, indent=2))
    print(markdown(table))


def markdown(table: dict) -> str:
    first = next(iter(table.values()))
    cols = ["ndcg@10", "ndcg@20", "mrr@10", "hit@10"] if first["protocol"] == "loo" else ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]
    lines = ["| model | " + " | ".join(f"test {c}" for c in cols) + " | best epoch | seconds |", "|---" * (len(cols) + 3) + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['test'][c]:.4f}" for c in cols) + f" | {r['best_epoch']} | {r.get('seconds', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
