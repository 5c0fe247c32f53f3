"""``moedist report RUN_DIR [--out DIR]``: write the HTML report and print the path of index.html."""
from __future__ import annotations


def cmd_report(args) -> int:
    from moedist.report.html import write_report

    path = write_report(args.run_dir, args.out, embed_images=not args.no_embed, metric=args.metric, mode=args.mode,
                        probe_models=not args.no_model)
    print(path, flush=True)
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
