"""The embedded default, end to end on this machine: ``moedist demo`` (``make run``).

1. generate the synthetic dataset (raw Amazon-2018 files + JPEG images) and prepare it;
2. extract text (MiniLM) and image (EfficientNet-Lite0) features with Ray Data;
3. tune HM4SR with Ray Tune (the paper's search space, ASHA early stopping): every trial is a
   Ray Train run with a DeepSpeed engine; the best configuration is retrained and tested;
4. train popularity and SASRec for reference on the same split;
5. train MAMEX on the cold-start split against the content-mapping baseline;
6. print the comparison tables.

Every step is resumable: a second ``moedist demo`` reuses what is already complete.
"""
from __future__ import annotations

import math
from typing import Callable

from moedist.data.api import DataConfig, prepare


# GiB of Ray's memory resource each HM4SR trial worker reserves (its measured peak RSS on CPU)
DEMO_WORKER_GIB = 6.0


def run_demo(*, size: str = "small", seed: int = 2025, workers: int = 1, epochs: int = 8, samples: int = 4,
             cold_epochs: int = 60, runs: str = "runs/demo", echo: Callable[[str], None] = print,
             rule: Callable[[str], None] | None = None) -> dict:
    rule = rule or (lambda title: echo(f"\n== {title}"))
    from moedist.cli import print_dataset_summary

    rule("1. prepare the embedded synthetic dataset")
    cfg = DataConfig(source="synthetic", size=size, seed=seed)
    manifest = prepare(cfg, log=echo)
    data = cfg.out_dir()
    print_dataset_summary(manifest, data)

    rule("2. extract item features with Ray Data (MiniLM text, EfficientNet-Lite0 images)")
    import ray

    from moedist.features.pipeline import default_out_dir, extract_features

    started = not ray.is_initialized()
    if started:
        from moedist.ray_auth import private_auth_token

        private_auth_token()
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        fman = extract_features(data, num_actors=1, batch_size=32, progress=False, log=echo)
        features = default_out_dir(data)
        missing = ", ".join(f"{m}: {v['total']}" for m, v in fman.get("missing", {}).items())
        echo(f"features: {fman['n_items']} items, dims {fman['dims']}, missing {missing}")

        from moedist.train.cli import load_experiment_config
        from moedist.train.loop import format_results, run_training

        quiet = lambda s: None  # noqa: E731
        results: dict[str, dict] = {}
        rule(f"3. tune HM4SR with Ray Tune + ASHA ({samples} trials of up to {epochs} epochs, Ray Train + DeepSpeed each)")
        from moedist.tune.run import run_tune

        common = [f"data={data}", f"features={features}", "train.progress=false"]
        # Each trial's worker peaks at about 5 GB RSS here (batch 1,024, three branches): the
        # memory reservation keeps Tune from starting more trials than the RAM holds (one at
        # a time where Ray's memory resource is below one worker's share).
        memory = math.floor(min(DEMO_WORKER_GIB, ray.cluster_resources().get("memory", 0.0) / 2**30) * 100) / 100
        base = load_experiment_config("hm4sr", None, [*common, f"train.epochs={epochs}", f"dist.workers={workers}",
                                                      f"dist.memory_per_worker={memory:.2f}"])
        tuned = run_tune(base, num_samples=samples, experiment_name=f"tune-hm4sr-{data.name}",
                         storage_path=runs, seed=seed, echo=quiet, verbose=0)
        best = tuned["best_results"]
        if best is None:
            from moedist.errors import MoedistError

            failed = ", ".join(tuned.get("errored") or []) or "none"
            raise MoedistError(f"the HM4SR search ended without a retrained best configuration (trials that "
                               f"ended in an error: {failed}; see {tuned['results_csv']}); run `moedist demo` "
                               "again to resume it")
        results["hm4sr (tuned)"] = best
        echo(f"best trial {tuned['best']['trial_id']}: " + ", ".join(f"{k}={v}" for k, v in tuned["best"]["config"].items()))
        echo(f"hm4sr (best config retrained): test ndcg@10 {best['test']['ndcg@10']:.4f}  hit@10 {best['test']['hit@10']:.4f}")
        echo(f"trials table: {tuned['results_csv']}; best config: {tuned['best_config']}")
        rule("4. baselines on the same split: popularity, SASRec")
        for name, model, extra in (("popularity", "popularity", []), ("sasrec", "sasrec", [f"train.epochs={epochs}"])):
            c = load_experiment_config(model, None, [*common, f"run_dir={runs}/{data.name}/{name}", *extra])
            res = run_training(c, echo=quiet)
            results[name] = res
            echo(f"{name}: test ndcg@10 {res['test']['ndcg@10']:.4f}  hit@10 {res['test']['hit@10']:.4f}  (best epoch {res['best_epoch']})")
        rule("5. cold-start items: MAMEX vs content mapping")
        for name, model in (("content", "content"), ("mamex", "mamex")):
            c = load_experiment_config(model, None, [*common, f"run_dir={runs}/{data.name}/{name}", f"train.epochs={cold_epochs}", "train.eval_every=5"])
            res = run_training(c, echo=quiet)
            results[name] = res
            echo(f"{name}: test recall@20 {res['test']['recall@20']:.4f}  ndcg@20 {res['test']['ndcg@20']:.4f}  (best epoch {res['best_epoch']})")
    finally:
        if started:
            ray.shutdown()
    rule("6. results (test split)")
    for name, res in results.items():
        echo(format_results(res, [10, 20]))
    echo(f"\nrun directories: {runs}/{data.name}/<model> (config.yaml, metrics.jsonl, tb/, checkpoints/, results.json)")
    return results
