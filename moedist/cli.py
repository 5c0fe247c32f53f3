"""The ``moedist`` command line.

    moedist data prepare [--source S] [--input PATH] [--config data.yaml] [key=value ...]
    moedist data summary DATA_DIR
    moedist extract DATA_DIR [--out DIR] [--actors N] [--local]
    moedist train --model hm4sr|mamex|sasrec|popularity|content --data DATA_DIR [key=value ...]
    moedist tune ...  /  moedist report RUN_DIR
    moedist compare BASELINE_RUN RUN [RUN ...]   # paired significance tests on the same users
    moedist demo                          # the embedded default, end to end

Bad input and bad configuration print one ``error:`` line naming the file, row or key and
exit with status 2; a traceback means a bug in moedist.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moedist.errors import MoedistError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4%}" if 0 < v < 1 and v > 0.9 else f"{v:,.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_dataset_summary(manifest: dict, path: str | Path | None = None) -> None:
    s = manifest["stats"]
    t = Table(title=f"dataset {manifest.get('name')}" + (f"  ({path})" if path else ""), show_header=True)
    t.add_column("statistic")
    t.add_column("value", justify="right")
    rows = [
        ("users", s["users"]),
        ("items", s["items"]),
        ("interactions", s["interactions"]),
        ("sparsity", f"{s['sparsity']:.4%}"),
        ("avg actions / user", f"{s['avg_actions_per_user']:.2f}"),
        ("avg actions / item", f"{s['avg_actions_per_item']:.2f}"),
        ("items with image", s["items_with_image"]),
        ("items without metadata", s["items_without_metadata"]),
        (f"{s['kcore']}-core passes (raw interactions)", f"{s['kcore_passes']} ({s['raw_interactions']:,})"),
        ("duplicates removed", s["duplicates_removed"]),
        ("leave-one-out: train samples", s["loo"]["train_samples"]),
        ("leave-one-out: valid / test users", f"{s['loo']['valid_users']:,} / {s['loo']['test_users']:,}"),
        (
            "cold-start items: train / valid / test",
            f"{s['cold']['train_items']:,} / {s['cold']['valid_items']:,} / {s['cold']['test_items']:,}",
        ),
        (
            "cold-start interactions: train / valid / test",
            f"{s['cold']['train_interactions']:,} / {s['cold']['valid_interactions']:,} / {s['cold']['test_interactions']:,}",
        ),
        ("max interval (s, before k-core)", manifest.get("max_interval_seconds", 0)),
    ]
    skipped = manifest.get("skipped_lines") or {}
    if skipped:
        rows.append(("skipped input lines", ", ".join(f"{k}: {v}" for k, v in skipped.items())))
    for k, v in rows:
        t.add_row(k, _fmt(v))
    console.print(t)


# ----------------------------------------------------------------------------- commands


def _progress_bar(description: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed:,} lines"), TimeElapsedColumn(), console=err_console, transient=True)


def cmd_data_prepare(args) -> int:
    from moedist.config import load_config, save_config
    from moedist.data.api import DataConfig, prepare

    # flags are taken as given (argparse types the numeric ones), never parsed as YAML:
    # --name 0123 stays "0123", --out "exp #2" stays "exp #2"; they win over key=value
    flags = {
        flag: v
        for flag in ("source", "input", "meta", "out", "name", "size", "seed", "kcore", "image_root", "on_bad_line")
        if (v := getattr(args, flag)) is not None
    }
    if args.dedup:
        flags["dedup"] = True
    cfg = load_config(DataConfig, args.config, list(args.overrides), values=flags)
    with _progress_bar("parsing") as bar:
        task = bar.add_task("parse", total=None)
        manifest = prepare(
            cfg,
            log=lambda m: err_console.print(f"[dim]{escape(str(m))}[/dim]"),
            progress=lambda n: bar.update(task, completed=n),
        )
    out = cfg.out_dir()
    save_config(cfg, out / "data_config.yaml") if not manifest.get("reused") else None
    print_dataset_summary(manifest, out)
    console.print(("reused " if manifest.get("reused") else "wrote ") + str(out))
    return 0


def cmd_data_summary(args) -> int:
    from moedist.data.prepare import load_manifest

    manifest = load_manifest(args.data_dir)
    if args.json:
        console.print_json(json.dumps(manifest))
    else:
        print_dataset_summary(manifest, args.data_dir)
    return 0


def cmd_demo(args) -> int:
    """The embedded default end to end (on a local machine, no downloads)."""
    from moedist.demo import run_demo

    run_demo(size=args.size, seed=args.seed, workers=args.workers, epochs=args.epochs, samples=args.samples,
             echo=lambda m: console.print(m, highlight=False, soft_wrap=True, markup=False),
             rule=lambda title: console.rule(f"[bold]{title}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moedist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="raw source -> prepared Parquet tables + dataset.json")
    prep.add_argument("--config", help="YAML file with DataConfig keys")
    prep.add_argument("--source", help="synthetic | amazon | amazon2014 | amazon2018 | amazon2023 | atomic | atomic-seq")
    prep.add_argument("--input", help="raw file or folder")
    prep.add_argument("--meta", help="Amazon metadata file (default: found beside the reviews)")
    prep.add_argument("--image-root", dest="image_root", help="folder with <item_id>/<image> files")
    prep.add_argument("--out", help="output folder (default data/prepared/<name>)")
    prep.add_argument("--name")
    prep.add_argument("--size", help="synthetic size: tiny | small | medium | large")
    prep.add_argument("--seed", type=int)
    prep.add_argument("--kcore", type=int)
    prep.add_argument("--dedup", action="store_true", help="drop repeated (user, item) interactions")
    prep.add_argument("--on-bad-line", dest="on_bad_line", choices=["error", "skip"])
    prep.add_argument("overrides", nargs="*", help="key=value overrides of DataConfig")
    prep.set_defaults(func=cmd_data_prepare)
    summ = dsub.add_parser("summary", help="print the statistics of a prepared dataset")
    summ.add_argument("data_dir")
    summ.add_argument("--json", action="store_true")
    summ.set_defaults(func=cmd_data_summary)

    demo = sub.add_parser("demo", help="run the embedded default end to end")
    demo.add_argument("--size", default="small")
    demo.add_argument("--seed", type=int, default=2025)
    demo.add_argument("--workers", type=int, default=1, help="Ray Train workers per HM4SR trial")
    demo.add_argument("--samples", type=int, default=4, help="HM4SR tuning trials")
    demo.add_argument("--epochs", type=int, default=8, help="epochs of the sequential models")
    demo.set_defaults(func=cmd_demo)

    _add_optional_commands(sub)
    return p


def _add_optional_commands(sub) -> None:
    """Commands whose modules are imported lazily (they pull in torch)."""
    try:
        from moedist.train.cli import add_commands
    except ImportError as e:  # pragma: no cover - only when the train package is broken
        if "moedist.train.cli" not in str(e):
            raise
        return
    add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoedistError as e:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; completed outputs are kept and a rerun resumes")
        return 130


if __name__ == "__main__":
    sys.exit(main())
