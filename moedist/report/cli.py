"""``moedist report RUN_DIR [--out DIR]``: write the HTML report and print the path of index.html.
``moedist compare BASELINE RUN [RUN ...]``: paired significance tests of runs against a baseline."""
from __future__ import annotations


def cmd_report(args) -> int:
    from moedist.report.html import write_report

    path = write_report(args.run_dir, args.out, embed_images=not args.no_embed, metric=args.metric, mode=args.mode,
                        probe_models=not args.no_model)
    print(path, flush=True)
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from moedist.io import atomic_write_text
    from moedist.report.compare import compare_runs, results_json

    results = compare_runs(args.runs, metric=args.metric, split=args.split, resamples=args.resamples,
                           confidence=args.confidence, seed=args.seed)
    pct = f"{args.confidence:.0%}"
    base = results[0]
    t = Table(title=f"{args.split} {args.metric} against {Path(args.runs[0]).name} "
                    f"(mean {base.baseline_mean:.5f}, {base.users:,} users), paired per user")
    for c in ("run", "model", "mean", "diff", "rel.", f"{pct} CI", "p", "wins/losses"):
        t.add_column(c, justify="left" if c in ("run", "model") else "right", no_wrap=c != "run", overflow="fold")
    for r in results:
        t.add_row(Path(r.run).name, r.model, f"{r.mean:.5f}", f"{r.diff:+.5f}", f"{r.relative:+.1%}",
                  f"{r.ci_low:+.4f}..{r.ci_high:+.4f}", f"{r.p_value:.4f}" + ("" if r.exact else "*"),
                  f"{r.wins}/{r.losses}")
    Console(highlight=False, width=max(Console().width, 132)).print(t)  # numbers are never cut
    if not all(r.exact for r in results):
        print(f"p: two-sided paired sign-flip test; * = from {args.resamples:,} random sign assignments")
    if args.json:
        atomic_write_text(args.json, results_json(results, str(args.runs[0])))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report of a run directory, a folder of runs or a tuning folder",
        description="Write <RUN_DIR>/report/index.html (or --out DIR): learning curves, expert load, modality "
        "weights, temporal gate, results table of sibling runs, tuning scatter plots. Prints the path.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (moedist train), folder of runs, or tuning folder (results.csv)")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--metric", help="tuning folders: the results.csv column to plot (default: guessed, e.g. valid_ndcg@20)")
    p.add_argument("--mode", choices=["max", "min"], help="tuning folders: whether higher or lower metric is better")
    p.add_argument("--no-embed", dest="no_embed", action="store_true", help="link the PNGs instead of embedding them")
    p.add_argument("--no-model", dest="no_model", action="store_true", help="do not rebuild the model from its checkpoint")
    p.set_defaults(func=cmd_report)

    c = sub.add_parser(
        "compare",
        help="paired significance tests of runs against a baseline run (same data and split)",
        description="Per-user metrics of each run against the first run's, on the same users: mean difference, "
        "paired bootstrap confidence interval and a two-sided sign-flip randomisation p-value. Needs the "
        "eval_ranks.npz that moedist train writes (rerun train on an older run directory to add it).",
    )
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="baseline run directory, then the runs to compare with it")
    c.add_argument("--metric", default="ndcg@10", help="per-user metric, e.g. ndcg@10, recall@20, mrr@10 (default ndcg@10)")
    c.add_argument("--split", default="test", choices=["test", "valid"])
    c.add_argument("--resamples", type=int, default=10_000, help="bootstrap and sign-flip resamples (default 10000)")
    c.add_argument("--confidence", type=float, default=0.95, help="confidence level of the interval (default 0.95)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", metavar="FILE", help="also write the comparisons as JSON")
    c.set_defaults(func=cmd_compare)
