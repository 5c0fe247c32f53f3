"""``moedist extract``: item texts / images -> frozen feature shards.

    moedist extract DATA_DIR [--out DIR] [--text-encoder minilm] [--image-encoder efficientnet_lite0]
                    [--actors N] [--shard-size 1000] [--batch-size 64] [--gpu] [--local]

Encoders are a name (``minilm``, ``efficientnet_lite0``, ``none``), a JSON spec
(``'{"backend": "open_clip", "model": "ViT-B-32", "pretrained": "/ckpt/clip.pt", "modality": "image"}'``)
or a JSON file holding one. The default output folder is
``<DATA_DIR>/features/<text encoder>+<image encoder>``; a re-run resumes.
"""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="encode item texts / images into feature shards (Ray Data or --local)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_extract_arguments(p)
    p.set_defaults(func=cmd_extract)


def add_extract_arguments(p: argparse.ArgumentParser, *, data_option: bool = False) -> None:
    """The options of ``moedist extract`` (also used by ``jobs/extract_features.py``)."""
    if data_option:  # the job recipes' convention: --data DIR
        p.add_argument("--data", dest="data_dir", required=True, help="prepared dataset folder (with items.parquet)")
    else:
        p.add_argument("data_dir", help="prepared dataset folder (with items.parquet)")
    p.add_argument("--out", help="output folder (default <DATA_DIR>/features/<text>+<image>)")
    p.add_argument("--text-encoder", dest="text_encoder", default="minilm", help="name, JSON spec or JSON file; 'none' to skip (default minilm)")
    p.add_argument("--image-encoder", dest="image_encoder", default="efficientnet_lite0", help="name, JSON spec or JSON file; 'none' to skip (default efficientnet_lite0)")
    p.add_argument("--actors", type=int, default=1, help="encoder actors in the Ray Data pool (default 1)")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=1000, help="items per shard (default 1000)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="items per encoder batch (default 64)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--ray-address", dest="ray_address", help="existing Ray cluster (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--local", action="store_true", help="single process, no Ray")
    p.add_argument("--image-cache", dest="image_cache", help="folder for downloaded images (default <DATA_DIR>/features/.image-cache)")
    p.add_argument("--fetch-workers", dest="fetch_workers", type=int, default=8, help="concurrent image downloads per actor")
    p.add_argument("--fetch-timeout", dest="fetch_timeout", type=float, default=10.0, help="seconds per image request")
    p.add_argument("--no-retry-missing", dest="retry_missing", action="store_false",
                   help="on a re-run, keep shards whose images failed for temporary reasons (timeouts, connection errors, "
                        "HTTP 5xx, files not found that are there now) instead of rebuilding them")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def print_extract_summary(manifest: dict, out_dir) -> None:
    run = manifest.get("run", {})
    t = Table(title=f"item features  ({out_dir})")
    t.add_column("", style="bold")
    t.add_column("value")
    t.add_row("items", f"{manifest['n_items']:,}")
    for m in manifest["modalities"]:
        enc = manifest["encoders"].get(m, {})
        model = str(enc.get("model", ""))
        t.add_row(f"{m} encoder", str(enc.get("backend")) + (f" {model}" if model and model != enc.get("backend") else ""))
        t.add_row(f"{m} dim", str(manifest["dims"].get(m)))
        miss = manifest.get("missing", {}).get(m, {})
        detail = ", ".join(f"{r}: {c:,}" for r, c in miss.get("reasons", {}).items())
        t.add_row(f"missing {m}", f"{miss.get('total', 0):,}" + (f" ({detail})" if detail else ""))
    t.add_row("shards", f"{len(manifest['shards'])} x {manifest['shard_size']:,} items (built {run.get('shards_built', 0)}, kept {run.get('shards_skipped', 0)})")
    t.add_row("mode", str(run.get("mode")) + (f", {run['num_actors']} actor(s)" if run.get("num_actors") else ""))
    t.add_row("seconds", f"{run.get('seconds', 0):.1f}")
    ips = run.get("items_per_s")
    t.add_row("items/s", f"{ips:,.1f}" if ips else "-")
    console.print(t)
    for w in manifest.get("warnings", []):
        err_console.print(f"[bold red]WARNING:[/bold red] {escape(str(w))}")


def cmd_extract(args) -> int:
    from moedist.features.pipeline import extract_features, extract_features_local

    common = dict(
        text_encoder=args.text_encoder,
        image_encoder=args.image_encoder,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        progress=args.progress,
        image_cache_dir=args.image_cache,
        fetch_workers=args.fetch_workers,
        fetch_timeout=args.fetch_timeout,
        retry_missing=getattr(args, "retry_missing", True),
        log=lambda m: err_console.print(f"[dim]{escape(str(m))}[/dim]"),
    )
    if args.local:
        manifest = extract_features_local(args.data_dir, args.out, **common)
    else:
        manifest = extract_features(args.data_dir, args.out, num_actors=args.actors, use_gpu=args.gpu, ray_address=args.ray_address, **common)
    from moedist.features.pipeline import default_out_dir

    out = args.out or default_out_dir(args.data_dir, manifest["encoder_specs"].get("text"), manifest["encoder_specs"].get("image"))
    print_extract_summary(manifest, out)
    return 0
