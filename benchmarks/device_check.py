"""Does the training code compute the same thing on an accelerator as on the CPU? One run, one JSON.

    python benchmarks/device_check.py --data data/prepared/movielens-100k \\
        --features data/prepared/movielens-100k/features/minilm+none --out bench_results/device_check.json

Several of moedist's layers take another code path on a GPU than on a CPU: attention and
dropout use the fused kernels (the CPU computes them block by block with a cheaper dropout
mask), the feed-forward and HM4SR's Interactive MoE run in one pass, the selected experts of a
top-k layer run as one padded ``bmm`` instead of ``grouped_mm``, small gate softmaxes run along
the last dimension, and DeepSpeed trains in bf16 over NCCL instead of fp32 over gloo. The
tests run where there is no GPU; this script checks those paths on ``--device`` (default
``cuda``) against the CPU, for each of ``--models`` (HM4SR, SASRec, MAMEX and the content-mapping
baseline), in three parts:

1. **same weights** (``same_weights``): the model is built once (seeded) on the CPU and copied
   to the device. With dropout set to 0 (and the same PCL placeholder positions on both sides),
   both compute the loss, each of its parts and the gradient of every trainable tensor on
   ``--batches`` real training batches, in float32 with TF32 off. Reported: the largest
   relative differences (gradients relative to each tensor's largest entry, floored at 1e-6
   of the largest gradient anywhere). They must be float rounding: loss and parts < 1e-4,
   gradients < 1e-3.
2. **training** (``training``): from those same weights, ``--steps`` training steps on the same
   batches (dropout on), once in local mode (a torch Adam, float32) and once through a
   one-process DeepSpeed engine (``dist.precision=auto``: bf16 over NCCL on a GPU, fp32 over
   gloo on the CPU; ``--deepspeed-precision bf16`` runs bf16 on the CPU too). Reported: each
   step's loss for both, samples/s over the steps after the first two, peak memory. Every loss
   must be finite; the local run must have changed every trainable tensor, and the DeepSpeed
   run must have moved the weights at least half as far in all (Euclidean norm over every
   tensor); the DeepSpeed run's final weights must lie nearer the local run's than 0.8 of the
   distance the local run moved (two unrelated moves would be about 1.4 apart); and the two
   runs' mean losses over the second half must agree to ``--train-rtol`` (default 2% where
   DeepSpeed runs in bf16, and 1e-4 where both are float32 with the same dropout draws).
3. **evaluation** (``evaluation``): the local run's trained weights are evaluated on the
   validation split (exact full ranking) on the device and, copied back, on the CPU: every
   metric must agree to 1e-3 (only exact score ties can move a rank). The DeepSpeed run's
   model is evaluated on the device as the trainer would (bf16 on a GPU); its metrics must be
   finite and are reported beside the others.

With ``--device cpu`` (what the test suite runs) the device side, training included, is the
CPU with every GPU-only form forced on: fused attention and ``F.dropout``, one-pass
feed-forward and Interactive MoE, padded-``bmm`` experts, last-dimension softmaxes; so the
checks compare the CPU's forms with the GPU's forms of the same computation. The script exits
with status 1 when a check fails (``ok`` in the JSON says which), after writing the JSON
atomically.

On a GPU machine without moedist's environment, PyTorch alone runs parts 1 and 3 and the local
half of part 2; the DeepSpeed half needs ``deepspeed`` importable (and is reported as
skipped otherwise). ``scripts/device_wheels.sh`` gathers the wheels it needs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing (a bare GPU machine)
    sys.path.insert(0, str(ROOT))

from moedist.io import atomic_write_json  # noqa: E402

MODELS = ("hm4sr", "sasrec", "mamex", "content")
DROPOUT_OFF = {
    "hm4sr": ["hm4sr.hidden_dropout_prob=0", "hm4sr.attn_dropout_prob=0"],
    "sasrec": ["sasrec.hidden_dropout_prob=0", "sasrec.attn_dropout_prob=0"],
    "mamex": ["mamex.fusion_dropout=0"],
    "content": ["content.dropout=0", "content.modality_dropout=0"],
}
LOSS_RTOL, GRAD_RTOL, METRIC_ATOL = 1e-4, 1e-3, 1e-3


@contextlib.contextmanager
def gpu_forms(model: torch.nn.Module, on: bool):
    """With ``on``, every layer takes the form it takes on a GPU even on the CPU."""
    import moedist.models.common as common
    import moedist.models.hm4sr as hm4sr
    import moedist.moe.gates as gates
    from moedist.moe.experts import LinearExperts

    if not on:
        yield
        return
    saved = (hm4sr.FFN_BLOCK_ROWS, hm4sr.ATTN_BLOCK_SEQS, hm4sr.IMOE_BLOCK_ROWS, common.FAST_CPU_DROPOUT,
             gates.SMALL_SOFTMAX_MAX)
    experts = [m for m in model.modules() if isinstance(m, LinearExperts)]
    kernels = [m.sorted_kernel for m in experts]
    hm4sr.FFN_BLOCK_ROWS = hm4sr.ATTN_BLOCK_SEQS = hm4sr.IMOE_BLOCK_ROWS = 0
    common.FAST_CPU_DROPOUT = False
    gates.SMALL_SOFTMAX_MAX = 0
    for m in experts:
        m.sorted_kernel = "padded_bmm"
    try:
        yield
    finally:
        (hm4sr.FFN_BLOCK_ROWS, hm4sr.ATTN_BLOCK_SEQS, hm4sr.IMOE_BLOCK_ROWS, common.FAST_CPU_DROPOUT,
         gates.SMALL_SOFTMAX_MAX) = saved
        for m, k in zip(experts, kernels):
            m.sorted_kernel = k


def _config(model: str, args, extra: list[str]):
    from moedist.train.cli import load_experiment_config

    overrides = [f"data={args.data}", f"train.batch_size={args.batch_size}", f"train.seed={args.seed}", *extra]
    if args.features:
        overrides.append(f"features={args.features}")
    if model != "sasrec" and args.features:  # the modalities the features have (MovieLens: text only)
        from moedist.features.store import read_manifest

        have = set(read_manifest(args.features)["modalities"])
        if model == "hm4sr":
            overrides.append("hm4sr.modalities=[" + ",".join(["id", *(m for m in ("text", "image") if m in have)]) + "]")
        else:
            overrides.append(f"{model}.modalities=[" + ",".join(m for m in ("image", "text") if m in have) + "]")
    return load_experiment_config(model, None, overrides)


def _build(cfg, data):
    from moedist.train.loop import build_model, load_features_for, seed_everything

    seed_everything(cfg.train.seed)
    return build_model(cfg, data, load_features_for(cfg, data))


def _batches(task, cfg, n: int) -> list[dict]:
    rng = np.random.default_rng(cfg.train.seed)
    out = []
    for idx in task.global_batches(rng, cfg.train.batch_size):
        out.append(task.make_batch(idx))
        if len(out) == n:
            break
    return out


def _fixed_placeholders(model, gen: torch.Generator):
    """HM4SR draws PCL's placeholder positions on the model's device; both sides get the CPU's."""
    if not hasattr(model, "placeholder_mask"):
        return None
    draw = type(model).placeholder_mask

    def mask(item_seq_len, seq_len):
        with torch.random.fork_rng(devices=[]):  # the CPU's global stream, left as it was
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            m = draw(model, item_seq_len.cpu(), seq_len)
        return m.to(item_seq_len.device)

    return mask


def _loss_and_grads(model, batch, device, mask_fn):
    if mask_fn is not None:
        model.placeholder_mask = mask_fn
    try:
        for p in model.parameters():
            p.grad = None
        loss, parts = model.calculate_loss({k: v.to(device) for k, v in batch.items()})
        loss.backward()
    finally:
        if mask_fn is not None:
            del model.placeholder_mask
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), {k: float(v.detach()) for k, v in parts.items()}, grads


def check_same_weights(model_name: str, args, data, device: torch.device) -> dict:
    from moedist.train.loop import build_task

    cfg = _config(model_name, args, DROPOUT_OFF[model_name])
    ref = _build(cfg, data)
    dev = copy.deepcopy(ref).to(device)
    ref.train()
    dev.train()
    task = build_task(cfg, data)
    worst = {"loss": 0.0, "parts": 0.0, "gradients": 0.0}
    where = {"parts": None, "gradients": None}
    compared = 0
    for b, batch in enumerate(_batches(task, cfg, args.batches)):
        seed = args.seed + b
        l_ref, parts_ref, g_ref = _loss_and_grads(ref, batch, torch.device("cpu"),
                                                  _fixed_placeholders(ref, torch.Generator().manual_seed(seed)))
        with gpu_forms(dev, device.type == "cpu"):
            l_dev, parts_dev, g_dev = _loss_and_grads(dev, batch, device,
                                                      _fixed_placeholders(dev, torch.Generator().manual_seed(seed)))
        worst["loss"] = max(worst["loss"], abs(l_dev - l_ref) / max(abs(l_ref), 1e-12))
        for k, v in parts_ref.items():
            r = abs(parts_dev[k] - v) / max(abs(v), 1e-6)
            if r >= worst["parts"]:
                worst["parts"], where["parts"] = r, k
        if set(g_ref) != set(g_dev):
            raise SystemExit(f"{model_name}: gradients of {sorted(set(g_ref) ^ set(g_dev))} on one side only")
        scale = max(g.abs().max().item() for g in g_ref.values())
        for n, g in g_ref.items():
            r = (g_dev[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-6 * scale)
            if r >= worst["gradients"]:
                worst["gradients"], where["gradients"] = r, n
        compared = len(g_ref)
    ok = worst["loss"] < LOSS_RTOL and worst["parts"] < LOSS_RTOL and worst["gradients"] < GRAD_RTOL
    return {"batches": args.batches, "batch_size": cfg.train.batch_size, "tensors_compared": compared,
            "max_rel_diff": worst, "worst": where, "ok": bool(ok)}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train(model, cfg, task, device: torch.device, deepspeed: bool, steps: int) -> dict:
    from moedist.train.loop import DeepSpeedStepper, DistContext, TorchStepper, seed_everything, train_one_epoch

    ctx = DistContext(rank=0, world=1, device=device)
    stepper = DeepSpeedStepper(model, cfg, ctx) if deepspeed else TorchStepper(model, cfg)
    cfg.train.max_steps_per_epoch = 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(cfg.train.seed)
    state = {"global_step": 0}
    losses, seconds = [], []
    for step in range(steps):  # one step per "epoch": each the first batch of another shuffle
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = train_one_epoch(stepper, task, cfg, ctx, step, state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(out["loss"])
    timed = seconds[2:] or seconds
    return {"model": stepper.model, "losses": losses, "step_ms": 1000 * float(np.mean(timed)),
            "samples_per_second": cfg.train.batch_size / float(np.mean(timed)),
            "peak_memory_mb": _peak_memory_mb(device),
            "dtype": str(next(stepper.model.parameters()).dtype).replace("torch.", "")}


def _evaluate(model, cfg, task, device: torch.device) -> dict:
    from moedist.train.loop import DistContext, evaluate_split

    return evaluate_split(model, task, "valid", DistContext(rank=0, world=1, device=device), cfg.train.eval_batch_size)


def _weights(model, names) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the named parameters (a bf16 module's included)."""
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if n in names}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Euclidean distance between two sets of weights, over every tensor."""
    return math.sqrt(sum(float((a[n] - b[n]).pow(2).sum()) for n in a))


def check_training(model_name: str, args, data, device: torch.device) -> tuple[dict, dict]:
    from moedist.train.distributed import use_bf16
    from moedist.train.loop import build_task

    cfg = _config(model_name, args, [f"train.device={device}", f"dist.precision={args.deepspeed_precision}"])
    base = _build(cfg, data)
    task = build_task(cfg, data)  # one task for both runs and every evaluation
    # on the CPU both runs take the GPU forms (F.dropout draws the same masks in both)
    local_model = copy.deepcopy(base).to(device)
    with gpu_forms(local_model, device.type == "cpu"):
        local = _train(local_model, copy.deepcopy(cfg), task, device, False, args.steps)
    try:
        import deepspeed  # noqa: F401

        ds_model = copy.deepcopy(base).to(device)
        with gpu_forms(ds_model, device.type == "cpu"):
            ds = _train(ds_model, copy.deepcopy(cfg), task, device, True, args.steps)
    except ImportError as e:
        ds = {"skipped": f"deepspeed is not importable here ({e})"}
    rtol = args.train_rtol if args.train_rtol is not None else (0.02 if use_bf16(cfg, device) else 1e-4)
    half = max(1, args.steps // 2)
    rows = {}
    ok = True
    for name, run in (("local", local), ("deepspeed", ds)):
        if "losses" not in run:
            rows[name] = run
            continue
        losses = run["losses"]
        finite = all(math.isfinite(v) for v in losses)
        ok &= finite
        rows[name] = {k: v for k, v in run.items() if k != "model"} | {
            "finite": finite, "second_half_below_first_step": finite and float(np.mean(losses[half:])) < losses[0]}
    # the local run updated every trainable tensor; the DeepSpeed run moved its weights at
    # least half as far in all, and ended nearer the local run's weights than the local run
    # moved (two unrelated moves of that size would be about 1.4 apart; bf16 rounding and
    # dropout noise in small gradients part the two runs by about 0.1-0.5 in 12 steps here).
    # Per tensor, bf16 may move some much less: a gradient that is zero in exact arithmetic
    # (a bias that cancels in BPR's score difference) is bf16 rounding noise there, and Adam
    # turns noise into a random walk; those are listed, not failed.
    init = _weights(base, {n for n, p in base.named_parameters() if p.requires_grad})
    after = _weights(local["model"], init)
    unchanged = sorted(n for n in init if torch.equal(init[n], after[n]))
    rows["local"]["tensors_not_updated"] = unchanged
    ok &= not unchanged
    if "losses" in ds:
        a, b = float(np.mean(local["losses"][half:])), float(np.mean(ds["losses"][half:]))
        rows["mean_loss_rel_diff"] = abs(a - b) / abs(a)
        rows["rtol"] = rtol
        ok &= rows["mean_loss_rel_diff"] < rtol
        theirs = _weights(ds["model"], init)
        moved = _distance(after, init)
        rows["weights_apart_over_moved"] = _distance(theirs, after) / max(moved, 1e-30)
        rows["deepspeed_moved_over_local_moved"] = _distance(theirs, init) / max(moved, 1e-30)
        rows["deepspeed"]["tensors_moved_less_than_half"] = sorted(
            n for n in init if float((theirs[n] - init[n]).norm()) < 0.5 * float((after[n] - init[n]).norm()))
        ok &= rows["weights_apart_over_moved"] < 0.8 and rows["deepspeed_moved_over_local_moved"] > 0.5
        rows["deepspeed_vs_local_speed"] = ds["samples_per_second"] / local["samples_per_second"]
    rows["ok"] = bool(ok)

    # evaluation: the local run's weights on the device and on the CPU; the DeepSpeed model as trained
    with gpu_forms(local["model"], device.type == "cpu"):
        on_device = _evaluate(local["model"], cfg, task, device)
    on_cpu = _evaluate(copy.deepcopy(local["model"]).to("cpu"), cfg, task, torch.device("cpu"))
    diff = max(abs(on_device[k] - on_cpu[k]) for k in on_cpu)
    ev = {"valid_on_device": on_device, "valid_on_cpu": on_cpu, "max_abs_diff": diff, "atol": METRIC_ATOL}
    eok = diff < METRIC_ATOL
    if "model" in ds:
        with gpu_forms(ds["model"], device.type == "cpu"):
            ds_metrics = _evaluate(ds["model"], cfg, task, device)
        ev["valid_deepspeed_on_device"] = ds_metrics
        eok &= all(math.isfinite(v) for v in ds_metrics.values())
    ev["ok"] = bool(eok)
    return rows, ev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset (moedist data prepare)")
    p.add_argument("--features", help="feature set (moedist extract); needed by all but SASRec")
    p.add_argument("--out", type=Path, required=True, help="JSON results")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (GPU forms forced on the CPU)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--batches", type=int, default=2, help="batches for the same-weights check")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--deepspeed-precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the DeepSpeed run's dist.precision (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--train-rtol", type=float, default=None,
                   help="largest relative difference of the two runs' mean losses (default 0.02 with bf16, else 1e-4)")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if not args.features and set(models) - {"sasrec"}:
        p.error("--features is needed for " + ", ".join(sorted(set(models) - {"sasrec"})))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --device cpu for the CPU-side check)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 comparisons, not TF32's 10-bit mantissa
    torch.backends.cudnn.allow_tf32 = False

    from moedist.data.dataset import PreparedDataset

    data = PreparedDataset(args.data)
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu (GPU forms), {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "deepspeed": ds_version, "data": str(args.data), "features": args.features,
        "settings": {k: getattr(args, k) for k in ("batch_size", "batches", "steps", "seed", "deepspeed_precision")},
        "models": {},
    }
    for m in models:
        print(f"[{m}] same weights, CPU vs {device} ...", flush=True)
        row = {"same_weights": check_same_weights(m, args, data, device)}
        print(f"[{m}] training {args.steps} steps, local and DeepSpeed, on {device} ...", flush=True)
        row["training"], row["evaluation"] = check_training(m, args, data, device)
        row["ok"] = all(row[k]["ok"] for k in ("same_weights", "training", "evaluation"))
        result["models"][m] = row
        sw, tr = row["same_weights"]["max_rel_diff"], row["training"]
        print(f"[{m}] loss {sw['loss']:.1e}  parts {sw['parts']:.1e}  gradients {sw['gradients']:.1e}  | "
              f"local {tr['local']['samples_per_second']:.0f}/s"
              + (f", deepspeed {tr['deepspeed']['samples_per_second']:.0f}/s ({tr['deepspeed']['dtype']}), "
                 f"mean-loss diff {tr['mean_loss_rel_diff']:.1e}" if "mean_loss_rel_diff" in tr else
                 f", deepspeed {tr['deepspeed'].get('skipped', 'failed')}")
              + f"  | valid diff {row['evaluation']['max_abs_diff']:.1e}  -> {'ok' if row['ok'] else 'FAILED'}", flush=True)
        atomic_write_json(args.out, result)
    result["ok"] = all(r["ok"] for r in result["models"].values())
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}: {'all checks passed' if result['ok'] else 'some checks FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
