"""Top-k expert kernels side by side: forward + backward of one top-k expert layer.

    python benchmarks/bench_experts.py --out bench_results/bench_experts.json

For each (experts, top-k) point, ``LinearExperts.forward_topk`` runs on the same tokens and
routing with three forms, and the median time of a forward and backward is reported:

* ``grouped_mm``   the selected experts, one ``torch.nn.functional.grouped_mm`` over the
                   expert-sorted rows (the CPU default)
* ``padded_bmm``   the selected experts, one bmm over a block padded to the busiest expert
                   (the GPU default)
* ``every_expert`` every expert on every token, unselected weights zero

Defaults are MAMEX's adapters on MovieLens-100K: 1,349 items, 384 → 128. Routing comes from
gate logits with a per-expert offset (``--skew``), so the busiest expert gets more than the
average share as in training (about 1.3x at the default). ``ratios`` divide every form's time
by ``grouped_mm``'s. The inputs need no gradient (frozen features), the weights do.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from moedist.io import atomic_write_json
from moedist.moe import LinearExperts


def median_ms(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def run_point(E: int, k: int, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.nn.functional.normalize(torch.randn(args.tokens, args.in_features, generator=gen), dim=-1)
    logits = torch.randn(args.tokens, E, generator=gen) + torch.linspace(0.0, args.skew, E)
    top_w, idx = logits.topk(k, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top_w, -1))
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    torch.manual_seed(args.seed)
    experts = LinearExperts(num_experts=E, in_features=args.in_features, out_features=args.out_features)
    forms = {"grouped_mm": ("grouped_mm", 1.0), "padded_bmm": ("padded_bmm", 1.0), "every_expert": ("grouped_mm", 0.0)}
    result: dict = {"busiest_over_mean": round(float(counts.max() / counts.float().mean()), 3)}
    outputs = {}
    for name, (kernel, fill) in forms.items():
        experts.sorted_kernel, experts.grouped_max_fill = kernel, fill

        def step():
            experts.zero_grad(set_to_none=True)
            out = experts.forward_topk(x, weights, idx)
            out.square().mean().backward()
            return out

        outputs[name] = step().detach()
        result[f"{name}_ms"] = round(median_ms(step, args.steps), 3)
    # the three forms compute the same thing
    for name in ("padded_bmm", "every_expert"):
        torch.testing.assert_close(outputs[name], outputs["grouped_mm"], rtol=1e-4, atol=1e-5)
    result["ratios"] = {name: round(result[f"{name}_ms"] / result["grouped_mm_ms"], 3) for name in forms}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="+", default=["4x2", "4x3", "6x2", "8x2", "8x4"],
                   help="experts x top-k, e.g. 8x2")
    p.add_argument("--tokens", type=int, default=1349)
    p.add_argument("--in-features", type=int, default=384)
    p.add_argument("--out-features", type=int, default=128)
    p.add_argument("--skew", type=float, default=0.6, help="gate-logit offset from the first to the last expert")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_results/bench_experts.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for point in args.points:
        try:
            E, k = (int(v) for v in point.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--points: {point!r} is not EXPERTSxTOPK (e.g. 8x2)") from None
        if not 1 <= k <= E:
            raise SystemExit(f"--points: {point!r} needs 1 <= top-k <= experts")
        results[point] = run_point(E, k, args)
        print(point, json.dumps(results[point]), flush=True)
    out = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
