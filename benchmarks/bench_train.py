"""Training throughput and peak memory of HM4SR and MAMEX, as ratios in one run.

    python benchmarks/bench_train.py --data data/prepared/movielens-100k \
        --features data/prepared/movielens-100k/features/minilm+none --out bench_results/bench_train.json

Variants (each the real training loop on real batches, ``--steps`` timed steps after
``--warmup``):

* ``local``      one process, torch Adam (the local debugging mode)
* ``ds-1``       one worker with a DeepSpeed engine
* ``dp-2``       two workers, data parallel (DeepSpeed, gloo on CPU / NCCL on GPU)
* ``ep-2``       two workers, experts sharded with ep_size=2 (all-to-all dispatch)
* ``local-torch-dropout``  ``local`` with ``F.dropout`` on CPU instead of moedist's cheaper
                 CPU dropout mask (``moedist.models.common.dropout``)
* ``local-uniform-dropout``  ``local`` with the dropout-0.5 mask drawn as one uniform number per
                 element (as for other rates) instead of one random bit per element
                 (``moedist.models.common.fair_bits``)
* ``local-dense-topk``  ``local`` with every top-k MoE layer evaluating all its experts and
                 zeroing the unselected ones (``MoELayer.sparse_topk = False``), instead of
                 computing only the selected experts (HM4SR's gates are dense: no change there)
* ``local-plain-adam``  ``local`` with torch's default (single-tensor) Adam instead of its fused
                 kernel (``train.fused_adam=false``)
* ``local-composed-ops``  ``local`` with MAMEX's BPR + regulariser and the top-k combination of
                 the selected experts' outputs built from elementwise autograd ops instead of
                 one autograd node each (``moedist.models.common.bpr_and_reg``,
                 ``LinearExperts._topk_grouped``); also the content-mapping baseline's BPR
* ``local-ffn-one-pass``  ``local`` with HM4SR's (and SASRec's) CPU feed-forward as one
                 ordinary pass that stores its ``[B·L, inner]`` intermediate instead of blocks of
                 rows recomputed in the backward (``moedist.models.hm4sr.FFN_BLOCK_ROWS = 0``)
* ``local-attention-one-pass``  ``local`` with the CPU attention-with-dropout computed over the
                 whole batch at once, storing its ``[B, h, L, L]`` softmax, mask and dropped
                 probabilities, instead of blocks of sequences recomputed in the backward
                 (``moedist.models.hm4sr.ATTN_BLOCK_SEQS = 0``)
* ``local-imoe-one-pass``  ``local`` with HM4SR's Interactive MoE evaluating every expert on every
                 token in one einsum, storing those outputs, instead of blocks of tokens
                 recomputed in the backward (``moedist.models.hm4sr.IMOE_BLOCK_ROWS = 0``)
* ``dp-2-whole-catalogue``, ``ep-2-whole-catalogue``  MAMEX only: ``dp-2`` / ``ep-2`` with
                 every worker encoding the whole item catalogue in each step
                 (``mamex.shard_catalogue=false``) instead of its share of it

Models run at the papers' defaults (HM4SR: hidden 64, batch 1024, max length 50; MAMEX:
d 128, batch 2048) unless overridden. Reported per variant: samples/s over the whole global
batch, mean step time, the share of step time spent inside all-to-all calls, and peak RSS
per worker; ``ratios`` compare every variant with ``local``. Workers are plain
``torch.multiprocessing`` processes (the same code Ray Train runs, without Ray's start-up).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moedist.io import atomic_write_json

VARIANTS = {"local": (1, 1, False), "ds-1": (1, 1, True), "dp-2": (2, 1, True), "ep-2": (2, 2, True),
            "local-torch-dropout": (1, 1, False), "local-uniform-dropout": (1, 1, False), "local-dense-topk": (1, 1, False),
            "local-plain-adam": (1, 1, False), "local-composed-ops": (1, 1, False), "local-ffn-one-pass": (1, 1, False),
            "local-attention-one-pass": (1, 1, False), "local-imoe-one-pass": (1, 1, False),
            "dp-2-whole-catalogue": (2, 1, True), "ep-2-whole-catalogue": (2, 2, True)}


def _worker(rank, world, port, model, variant, args, queue):
    from moedist.data.dataset import PreparedDataset
    from moedist.train.cli import load_experiment_config
    from moedist.train.loop import (DeepSpeedStepper, DistContext, TorchStepper, apply_catalogue_sharding,
                                    apply_expert_parallel, build_model, build_task, load_features_for,
                                    train_one_epoch)

    if variant == "local-torch-dropout":
        import moedist.models.common

        moedist.models.common.FAST_CPU_DROPOUT = False
    if variant == "local-uniform-dropout":
        import moedist.models.common

        moedist.models.common.FAIR_BIT_DROPOUT = False
    if variant == "local-ffn-one-pass":
        import moedist.models.hm4sr

        moedist.models.hm4sr.FFN_BLOCK_ROWS = 0
    if variant == "local-attention-one-pass":
        import moedist.models.hm4sr

        moedist.models.hm4sr.ATTN_BLOCK_SEQS = 0
    if variant == "local-imoe-one-pass":
        import moedist.models.hm4sr

        moedist.models.hm4sr.IMOE_BLOCK_ROWS = 0
    if variant == "local-composed-ops":
        import moedist.models.common
        import moedist.moe.experts

        moedist.models.common.FUSED_BPR = False
        moedist.moe.experts.FUSED_TOPK_COMBINE = False
    threads = max(1, args.threads // world)
    torch.set_num_threads(threads)
    world_, ep, use_ds = VARIANTS[variant]
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if world > 1 or use_ds:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    a2a = {"seconds": 0.0, "calls": 0}
    original = dist.all_to_all_single

    def timed(*a, **kw):  # time every all-to-all of the expert dispatch
        t0 = time.perf_counter()
        out = original(*a, **kw)
        a2a["seconds"] += time.perf_counter() - t0
        a2a["calls"] += 1
        return out

    dist.all_to_all_single = timed
    overrides = [f"data={args.data}", f"dist.ep_size={ep}", *args.overrides.get(model, [])]
    if args.features:
        overrides.append(f"features={args.features}")
    if variant.endswith("-whole-catalogue"):
        overrides.append("mamex.shard_catalogue=false")
    if variant == "local-plain-adam":
        overrides.append("train.fused_adam=false")
    cfg = load_experiment_config(model, None, overrides)
    cfg.train.max_steps_per_epoch = args.warmup
    ctx = DistContext(rank=rank, world=world, device=device)
    apply_expert_parallel(cfg, ctx)
    data = PreparedDataset(cfg.data)
    torch.manual_seed(0)
    net = build_model(cfg, data, load_features_for(cfg, data)).to(device)
    apply_catalogue_sharding(net, cfg, ctx)
    if variant == "local-dense-topk":
        from moedist.moe import MoELayer

        for layer in net.modules():
            if isinstance(layer, MoELayer):
                layer.sparse_topk = False
    task = build_task(cfg, data)
    stepper = DeepSpeedStepper(net, cfg, ctx) if use_ds else TorchStepper(net, cfg)
    state = {"global_step": 0}
    train_one_epoch(stepper, task, cfg, ctx, 0, state)  # warm-up (allocations, DeepSpeed buckets)
    cfg.train.max_steps_per_epoch = args.steps
    a2a.update(seconds=0.0, calls=0)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    stats = train_one_epoch(stepper, task, cfg, ctx, 1, state)
    secs = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "rank": rank, "seconds": secs, "samples": stats["samples_per_second"] * stats["train_seconds"],
        "a2a_seconds": a2a["seconds"], "a2a_calls": a2a["calls"], "peak_rss_mb": rss_mb,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "loss": stats["loss"],
    }
    queue.put(result)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_variant(model: str, variant: str, args) -> dict:
    from moedist.train.distributed import free_port

    world = VARIANTS[variant][0]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, model, variant, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(q.get(timeout=2))
        except queue.Empty:  # a worker that died (its traceback is above) would otherwise be waited on forever
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.terminate()
                raise SystemExit(f"{model} {variant}: a worker exited with code {failed[0]}")
    for p in procs:
        p.join(120)
    secs = max(r["seconds"] for r in results)
    samples = results[0]["samples"]  # the global batch count (all-reduced in the loop)
    return {
        "workers": world, "ep_size": VARIANTS[variant][1], "deepspeed": VARIANTS[variant][2],
        "samples_per_second": samples / secs, "step_ms": 1000 * secs / args.steps,
        "all_to_all_share": max(r["a2a_seconds"] for r in results) / secs,
        "all_to_all_calls_per_step": results[0]["a2a_calls"] / args.steps,
        "peak_rss_mb_per_worker": max(r["peak_rss_mb"] for r in results),
        "peak_gpu_mb_per_worker": results[0]["peak_gpu_mb"],
        "loss": results[0]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset")
    p.add_argument("--features", help="feature shards (default: the one under <data>/features)")
    p.add_argument("--models", nargs="+", default=["hm4sr", "mamex"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, split over workers")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hm4sr", nargs="*", default=[], help="key=value overrides for HM4SR")
    p.add_argument("--mamex", nargs="*", default=[], help="key=value overrides for MAMEX")
    p.add_argument("--out", default="bench_results/bench_train.json")
    args = p.parse_args()
    args.overrides = {"hm4sr": args.hm4sr, "mamex": args.mamex}
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "torch": torch.__version__},
        "data": args.data, "features": args.features, "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "overrides": {m: args.overrides[m] for m in args.models}, "results": {}, "ratios": {},
    }
    for model in args.models:
        report["results"][model] = {}
        for variant in args.variants:
            if variant.endswith("-whole-catalogue") and model != "mamex":
                continue  # only MAMEX encodes a catalogue in its training step
            r = run_variant(model, variant, args)
            report["results"][model][variant] = r
            print(f"{model:6s} {variant:6s} {r['samples_per_second']:9.1f} samples/s  step {r['step_ms']:8.1f} ms  "
                  f"all-to-all {100 * r['all_to_all_share']:5.1f}%  peak RSS {r['peak_rss_mb_per_worker']:7.0f} MB/worker", flush=True)
        base = report["results"][model].get("local")
        if base:
            report["ratios"][model] = {v: r["samples_per_second"] / base["samples_per_second"] for v, r in report["results"][model].items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report, indent=2)
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
