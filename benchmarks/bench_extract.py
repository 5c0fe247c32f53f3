"""Feature-extraction throughput: Ray Data with 1 and 2 CPU actors vs the plain single-process loop.

    python benchmarks/bench_extract.py                        # 192 generated items, minilm + efficientnet_lite0
    python benchmarks/bench_extract.py --items 512 --batch-size 32 --out bench_extract.json
    python benchmarks/bench_extract.py --data data/prepared/synthetic-small-2025

Same encoders, batch size and items in every run; each run writes a fresh output folder and
is timed end to end (model loading included: each Ray actor loads its own encoders, the
local loop loads them once) and in steady state (items after the first result batch / time
after it, i.e. without start-up). Ray is started once before the Ray runs (its start-up is
reported separately, not counted). Peak memory is the RSS of the whole process tree (this
process, Ray's GCS / raylet / workers; RSS counts shared libraries once per process, USS
does not), sampled every 0.25 s during each run, plus the driver's own ``ru_maxrss``. The
local loop is also run with ``torch.set_num_threads(1)``, as each Ray actor runs. Prints one JSON object (and writes it with ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


class TreeRSS:
    """Samples the summed RSS of this process and all its descendants in a thread."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def sample(self) -> tuple[int, int, list]:
        """(summed RSS, summed USS, per process): RSS counts shared pages (torch's libraries) once per process."""
        rss = uss = 0
        per = []
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                m = p.memory_full_info()
                rss += m.rss
                uss += m.uss
                per.append((p.name()[:40], round(m.uss / 2**20)))
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return rss, uss, per

    def _update(self):
        rss, uss, per = self.sample()
        self.peak = max(self.peak, rss)
        if uss > self.peak_uss:
            self.peak_uss = uss
            self.breakdown = sorted(per, key=lambda x: -x[1])[:8]

    def __enter__(self):
        self.peak = self.peak_uss = 0
        self.breakdown = []
        self._update()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self._update()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()


def make_items(root: Path, n: int, seed: int = 0) -> Path:
    """A small synthetic items table with real JPEG files (about 1 in 20 images missing)."""
    import pandas as pd
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    imgs = root / "images"
    imgs.mkdir(parents=True, exist_ok=True)
    nouns = "bike lamp mug camera lens kettle chair tent jacket drone speaker watch".split()
    adjs = "red blue green black steel wooden compact wireless vintage foldable".split()
    rows = []
    for i in range(1, n + 1):
        text = f"{rng.choice(adjs).capitalize()} {rng.choice(adjs)} {rng.choice(nouns)}. Home Garden {rng.choice(nouns).capitalize()}s. Brand{i % 17}. "
        image = None
        if rng.random() > 0.05:
            im = Image.new("RGB", (320, 240), tuple(int(c) for c in rng.integers(0, 255, 3)))
            d = ImageDraw.Draw(im)
            for _ in range(6):
                x, y = rng.integers(0, 280), rng.integers(0, 200)
                d.ellipse((x, y, x + rng.integers(10, 60), y + rng.integers(10, 60)), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            p = imgs / f"{i}.jpg"
            im.save(p, quality=85)
            image = str(p)
        rows.append({"item_idx": i, "item_id": f"S{i:06d}", "text": text, "image": image})
    pd.DataFrame(rows).to_parquet(root / "items.parquet", index=False)
    return root


def actor_torch_threads() -> int:
    import ray

    @ray.remote(num_cpus=0.5)
    def threads():
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="prepared dataset folder (default: generate --items items)")
    ap.add_argument("--items", type=int, default=192)
    ap.add_argument("--text-encoder", default="minilm")
    ap.add_argument("--image-encoder", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    ap.add_argument("--no-local-1-thread", dest="local_1_thread", action="store_false", help="skip the extra local run with torch.set_num_threads(1)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    from moedist.features.pipeline import extract_features, extract_features_local, read_items

    load0 = os.getloadavg()[0]  # other work on the machine skews every number below
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        data = Path(args.data) if args.data else make_items(work / "data", args.items)
        n_items = len(read_items(data))
        common = dict(text_encoder=args.text_encoder, image_encoder=args.image_encoder, shard_size=args.shard_size, batch_size=args.batch_size, progress=False, image_cache_dir=work / "cache")
        runs = {}

        def record(name, fn):
            out = work / name
            with TreeRSS() as mem:
                t0 = time.perf_counter()
                manifest = fn(out)
                seconds = time.perf_counter() - t0
            runs[name] = {
                "seconds": round(seconds, 2),
                "items_per_s": round(n_items / seconds, 2),
                # after the first batch came back: without Ray / actor / model start-up
                "steady_items_per_s": manifest["run"].get("steady_items_per_s"),
                "first_result_s": manifest["run"].get("first_result_s"),
                "peak_rss_mb": round(mem.peak / 2**20, 1),
                "peak_uss_mb": round(mem.peak_uss / 2**20, 1),
                "largest_processes_at_peak_uss_mb": mem.breakdown,
                "missing_images": manifest["missing"].get("image", {}).get("total"),
                "dims": manifest["dims"],
            }
            print(f"{name}: {runs[name]}", file=sys.stderr)
            return out

        import torch

        local_dir = record("local", lambda out: extract_features_local(data, out, **common))
        runs["local"]["torch_threads"] = torch.get_num_threads()
        if args.local_1_thread and torch.get_num_threads() > 1:
            # the Ray actors run torch with 1 thread each (num_cpus=0.5): the same loop, like for like
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            record("local_1_thread", lambda out: extract_features_local(data, out, **common))
            runs["local_1_thread"]["torch_threads"] = 1
            torch.set_num_threads(threads)

        import ray

        from moedist.ray_auth import private_auth_token

        private_auth_token()
        t0 = time.perf_counter()
        ray.init(num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        actor_threads = actor_torch_threads()
        try:
            for k in [int(a) for a in args.actors.split(",")]:
                out = record(f"ray_{k}_actor{'s' if k > 1 else ''}", lambda out, k=k: extract_features(data, out, num_actors=k, **common))
                name = f"ray_{k}_actor{'s' if k > 1 else ''}"
                runs[name]["torch_threads_per_actor"] = actor_threads
                # same features as the local loop
                from moedist.features.store import load_item_features

                a, b = load_item_features(local_dir), load_item_features(out)
                runs[name]["max_abs_diff_vs_local"] = float(max((a.features[m] - b.features[m]).abs().max() for m in a.features))
        finally:
            ray.shutdown()

        base = runs["local"]["items_per_s"]
        result = {
            "benchmark": "feature extraction items/s: Ray Data actor pool vs single-process loop",
            "items": n_items,
            "text_encoder": args.text_encoder,
            "image_encoder": args.image_encoder,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
            "ray_init_seconds": round(ray_init_s, 2),
            "runs": runs,
            "ratios_vs_local": {k: round(v["items_per_s"] / base, 3) for k, v in runs.items() if k != "local"},
            "steady_ratios_vs_local": {
                k: round(v["steady_items_per_s"] / runs["local"]["steady_items_per_s"], 3)
                for k, v in runs.items()
                if k != "local" and v.get("steady_items_per_s") and runs["local"].get("steady_items_per_s")
            },
            "load_average_1m_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "driver_ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "note": "end-to-end seconds include model loading (per actor for Ray); ray.init is excluded",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        from moedist.io import atomic_write_json

        atomic_write_json(args.out, result, indent=1)  # its folder made if missing (bench_results/ is not in git)
    return 0


if __name__ == "__main__":
    sys.exit(main())
