"""Model-quality comparison: each model and ablation on the same prepared data and features.

    python benchmarks/quality.py --data data/prepared/movielens-100k --features .../minilm+none \
        --models popularity sasrec hm4sr --out bench_results/quality-ml100k.json [key=value ...]
    # cold start, averaged over 3 item splits (datasets prepared with split_seed=...) x 2 seeds
    python benchmarks/quality.py --data DATA DATA-split1 DATA-split2 --features DATA/features/minilm+none \
        --models content mamex "mamex w/o MoE" --seeds 2 --out bench_results/quality-cold.json

    # choose MoE hyperparameters on validation: every grid point on every split, the one with
    # the best mean valid NDCG@10 is compared (on test) with the other models
    python benchmarks/quality.py --data DATA DATA-split1 ... --features ... --seed-values 0 \
        --models "mamex w/o MoE" mamex --grid mamex.num_experts=4,6,8 mamex.top_k=2,3,4 --out grid.json

Every run is an ordinary ``moedist train`` run (its run directory under ``--runs``, resumed
if interrupted); this script only chooses the variants and collects their ``results.json``
into one JSON file and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import re
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
    p.add_argument("--data", required=True, nargs="+",
                   help="prepared dataset(s); several = the same data under other split seeds, averaged")
    p.add_argument("--features")
    p.add_argument("--models", nargs="+", default=["popularity", "sasrec", "hm4sr"], help=f"from {list(VARIANTS)}")
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-overrides", nargs="*", default=[], help="key=value for sequential models")
    p.add_argument("--cold-overrides", nargs="*", default=[], help="key=value for cold-start models")
    p.add_argument("--seeds", type=int, default=1,
                   help="train each variant with seeds 0..N-1 (train.seed) and report mean ± std; "
                        "on small test sets one seed's ranking of close variants is mostly noise")
    p.add_argument("--seed-values", type=int, nargs="+",
                   help="these train.seed values instead of --seeds' 0..N-1 (run directories are named "
                        "the same way, so seed 0 of an earlier --seeds 2 run is reused)")
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2",
                   help="expand the last of --models into every combination of these values (top_k is "
                        "never above num_experts), then select the combination with the best mean "
                        "validation --select-metric over all runs; the grid point equal to the model's "
                        "defaults is the plain variant")
    p.add_argument("--select-metric", default="ndcg@10")
    a = p.parse_args()
    seeds = a.seed_values if a.seed_values else list(range(a.seeds))
    seeded = bool(a.seed_values) or a.seeds > 1
    out = Path(a.out)
    table = json.loads(out.read_text()) if out.is_file() else {}
    variants = {name: VARIANTS[name] for name in a.models}
    grid_names: list[str] = []
    if a.grid:
        base = a.models[-1]
        for name, spec in grid_variants(base, *VARIANTS[base], a.grid).items():
            variants[name] = spec
            grid_names.append(name)
    for name, (model, extra) in variants.items():
        common = a.seq_overrides if model in ("popularity", "sasrec", "hm4sr") else a.cold_overrides
        runs = []
        for data, seed in [(d, s) for d in a.data for s in seeds]:
            tag = f"{Path(data).name}-{re.sub(r'[^A-Za-z0-9_.=-]', '', name)}" + (f"-seed{seed}" if seeded else "")
            overrides = [f"data={data}", f"run_dir={Path(a.runs) / tag}", "train.progress=false", *common, *extra]
            if seeded:
                overrides.append(f"train.seed={seed}")
            if a.features:
                overrides.append(f"features={a.features}")
            cfg = load_experiment_config(model, None, overrides)
            t0 = time.time()
            res = run_training(cfg, echo=lambda s, n=name: print(f"[{n}] {s}", flush=True))
            res["seconds"] = round(time.time() - t0, 1)  # this invocation (a finished run is only re-evaluated)
            res["train_seconds"] = round(logged_train_seconds(Path(a.runs) / tag), 1)
            res["overrides"] = overrides
            runs.append(res)
        table[name] = summarize(runs)
        atomic_write_text(out, json.dumps(table, indent=2))
    compared = list(variants)
    if grid_names:
        table["selection"] = select_best({n: table[n] for n in grid_names}, a.select_metric)
        best = table["selection"]["best"]
        compared = [n for n in variants if n not in grid_names or n in a.models]
        compared += [best] if best not in compared else []
        print(f"selected on valid {a.select_metric}: {best}")
    paired = paired_across_splits({n: table[n] for n in compared if "per_seed" in table[n]})
    if paired:
        table["paired"] = paired
        atomic_write_text(out, json.dumps(table, indent=2))
    print(markdown(table))


def grid_variants(base: str, model: str, extra: list[str], grid: list[str]) -> dict:
    """``base`` expanded over every combination of the grid values: name -> (model, overrides).

    The grid point whose values are the model's defaults keeps the name ``base`` (its runs are
    the plain variant's runs); a ``top_k`` above ``num_experts`` is skipped."""
    from itertools import product

    from moedist.tune.spaces import CONSTRAINTS, get_key

    keys, values = [], []
    for item in grid:
        key, sep, vals = item.partition("=")
        if not sep or not vals:
            raise SystemExit(f"--grid: expected KEY=V1,V2,..., got {item!r}")
        keys.append(key)
        values.append(vals.split(","))
    defaults = load_experiment_config(model, None, list(extra))
    out = {}
    for combo in product(*values):
        point = dict(zip(keys, combo))
        if any(small in point and large in point and float(point[small]) > float(point[large])
               for small, large in CONSTRAINTS):
            continue
        cfg = load_experiment_config(model, None, [*extra, *(f"{k}={v}" for k, v in point.items())])
        if all(get_key(cfg, k) == get_key(defaults, k) for k in keys):
            out[base] = (model, list(extra))
        else:
            label = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
            out[f"{base} [{label}]"] = (model, [*extra, *(f"{k}={v}" for k, v in point.items())])
    return out


def select_best(variants: dict, metric: str = "ndcg@10") -> dict:
    """The variant with the highest mean validation ``metric`` over its runs (ties: the first).

    Test metrics are listed beside it, but never used to choose."""
    rows = {name: {"valid": r["valid"][metric], "test": r["test"][metric],
                   "runs": len(r.get("per_seed", [r]))} for name, r in variants.items()}
    best = max(rows, key=lambda n: rows[n]["valid"])
    return {"metric": metric, "chosen_on": "valid", "best": best, "variants": rows}


def paired_across_splits(variants: dict, metric: str = "ndcg@10") -> dict:
    """Every pair of variants, compared on the same users (B minus A, test ``metric``).

    * per dataset split: the mean per-user difference, averaged over seeds;
    * ``p_value``: a two-sided sign-flip test over the split-level differences (exact; the
      splits are the independent units, seeds within a split share its test users), which
      needs 6 or more splits to go below 0.05;
    * ``p_value_users``: the same test over every (split, user) difference (seeds averaged
      per user), i.e. a paired test stratified by split, with far more power.
    """
    from itertools import combinations

    import numpy as np

    from moedist.report.compare import check_comparable, load_run_ranks, per_user_metric, sign_flip_p_value

    out = {}
    for a, b in combinations(variants, 2):
        by_split: dict[str, list[np.ndarray]] = {}
        for ra, rb in zip(variants[a]["per_seed"], variants[b]["per_seed"]):
            x, y = load_run_ranks(ra["run_dir"]), load_run_ranks(rb["run_dir"])
            check_comparable(x, y)
            by_split.setdefault(x.dataset, []).append(per_user_metric(y, metric) - per_user_metric(x, metric))
        per_user = {k: np.mean(v, axis=0) for k, v in by_split.items()}  # seeds averaged per user
        diffs = np.array([d.mean() for d in per_user.values()])
        pooled = np.concatenate(list(per_user.values()))
        rng = np.random.default_rng(0)
        p, exact = sign_flip_p_value(diffs, resamples=100_000, rng=rng)
        p_users, _ = sign_flip_p_value(pooled, resamples=100_000, rng=rng)
        out[f"{b} vs {a}"] = {
            "metric": f"test {metric}", "splits": len(diffs), "mean_diff": float(diffs.mean()),
            "splits_won": int((diffs > 0).sum()), "splits_lost": int((diffs < 0).sum()), "p_value": p, "exact": exact,
            "users": int(pooled.size), "p_value_users": p_users,
            "per_split_diff": {k: float(v) for k, v in zip(per_user, diffs)},
        }
    return out


def summarize(runs: list[dict]) -> dict:
    """One variant's result: the first run, plus per-run (dataset split x seed) test metrics with
    their mean and (population) standard deviation when there are several runs."""
    import numpy as np

    res = dict(runs[0])
    if len(runs) > 1:
        res["per_seed"] = [{"run_dir": r["overrides"][1].split("=", 1)[1], "best_epoch": r["best_epoch"],
                            "test": r["test"], "valid": r["valid"]} for r in runs]
        for split in ("test", "valid"):
            res[split] = {k: float(np.mean([r[split][k] for r in runs])) for k in runs[0][split]}
            res[f"{split}_std"] = {k: float(np.std([r[split][k] for r in runs])) for k in runs[0][split]}
        res["seconds"] = round(sum(r["seconds"] for r in runs), 1)
        res["train_seconds"] = round(sum(r.get("train_seconds", 0.0) for r in runs), 1)
    return res


def logged_train_seconds(run_dir: Path) -> float:
    """Seconds spent in training steps, summed over the epochs in the run's ``metrics.jsonl``
    (resumed and re-evaluated runs included, each epoch once)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    total = 0.0
    for line in path.read_text().splitlines():
        if line.strip():
            total += float(json.loads(line).get("train_seconds", 0.0))
    return total


def _p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def markdown(table: dict) -> str:
    first = next(v for k, v in table.items() if k not in ("paired", "selection"))
    cols = ["ndcg@10", "ndcg@20", "mrr@10", "hit@10"] if first["protocol"] == "loo" else ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]

    def cell(r: dict, c: str) -> str:
        std = r.get("test_std")
        return f"{r['test'][c]:.4f}" + (f" ± {std[c]:.4f}" if std else "")

    lines = ["| model | " + " | ".join(f"test {c}" for c in cols) + " | best epoch | train seconds |", "|---" * (len(cols) + 3) + "|"]
    paired = table.get("paired", {})
    for name, r in table.items():
        if name in ("paired", "selection"):
            continue
        best = "/".join(str(x["best_epoch"]) for x in r["per_seed"]) if "per_seed" in r else r["best_epoch"]
        lines.append(f"| {name} | " + " | ".join(cell(r, c) for c in cols) + f" | {best} | {r.get('train_seconds', '')} |")
    sel = table.get("selection")
    if sel:
        lines += ["", f"| grid point | valid {sel['metric']} (chooses) | test {sel['metric']} | runs |", "|---|---|---|---|"]
        for name, r in sorted(sel["variants"].items(), key=lambda kv: -kv[1]["valid"]):
            mark = " **(selected)**" if name == sel["best"] else ""
            lines.append(f"| {name}{mark} | {r['valid']:.4f} | {r['test']:.4f} | {r['runs']} |")
    if paired:
        lines += ["", "| comparison | mean difference | splits won / lost | p (over splits) | p (over split x user) |",
                  "|---|---|---|---|---|"]
        for name, r in paired.items():
            lines.append(f"| {name} ({r['metric']}) | {r['mean_diff']:+.4f} | {r['splits_won']} / {r['splits_lost']} "
                         f"| {r['p_value']:.3f} | {_p(r.get('p_value_users', float('nan')))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
