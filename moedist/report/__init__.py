"""HTML reports of training runs, run collections and tuning experiments (``moedist report``).

    from moedist.report import write_report
    write_report("runs/hm4sr-synthetic-small-2025")   # -> Path(".../report/index.html")
"""
from moedist.report.runs import ReportError


def write_report(run_dir, out_dir=None, **kwargs):
    """See :func:`moedist.report.html.write_report` (imported lazily: it pulls in matplotlib)."""
    from moedist.report.html import write_report as _write

    return _write(run_dir, out_dir, **kwargs)


__all__ = ["ReportError", "write_report"]
