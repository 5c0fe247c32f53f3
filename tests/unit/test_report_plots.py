"""The report's figures with names that users choose: run and trial names, categories."""
import pytest
from matplotlib.cbook import is_math_text

from moedist.report import plots
from moedist.report.runs import RunInfo


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, instead of PNG files."""
    figs = []

    def save(fig, path):
        fig.canvas.draw()  # what savefig does: lays out and renders every text
        figs.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", save)
    return figs


def _legend(fig) -> list[str]:
    leg = fig.axes[0].get_legend()
    return [] if leg is None else [t.get_text() for t in leg.get_texts()]


def test_every_run_of_a_folder_is_named_in_its_curves(drawn, tmp_path):
    curves = [(name, [0, 1, 2], [0.1, 0.2, 0.3 + i / 10]) for i, name in enumerate(["sasrec", "hm4sr", "_old"])]
    plots.trial_curves(curves, "valid_ndcg@20", None, label_all=True, unit="run", path=tmp_path / "x.png")
    # a leading underscore would drop the line from the legend
    assert [s.strip() for s in _legend(drawn[-1])] == ["sasrec", "hm4sr", "_old"]
    assert "one line per run" in drawn[-1].axes[0].get_title()
    # a tuning folder keeps naming only the best of its many trials
    plots.trial_curves(curves, "valid_ndcg@20", "hm4sr", path=tmp_path / "y.png")
    assert _legend(drawn[-1]) == ["hm4sr (best)"]


@pytest.mark.parametrize("name", [r"a$\frac{x$", "lr$1e-3$_k$4$"])
def test_dollar_signs_in_names_are_drawn_as_written(drawn, tmp_path, name):
    # matplotlib parses text between two $ as mathtext: a syntax error sank the whole figure
    records = [{"epoch": e, "loss": 1.0 / (e + 1), "valid_ndcg@10": 0.1 * e} for e in range(3)]
    plots.learning_curves(records, ["loss"], ["valid_ndcg@10"], 1, path=tmp_path / "c.png", title=name)
    title = drawn[-1]._suptitle.get_text()
    assert not is_math_text(title) and title.replace("\\$", "$") == name  # drawn as written, not as math
    plots.trial_curves([(name, [0, 1], [0.1, 0.2])], "valid_ndcg@10", None, label_all=True, path=tmp_path / "t.png")
    plots.tuning_scatter([name, "b"], [0.1, 0.2], f"hm4sr.{name}", "valid_ndcg@10", 0, path=tmp_path / "s.png")


def test_results_older_than_the_logged_epochs_are_recognised(tmp_path):
    run = RunInfo(path=tmp_path, results={"epochs_run": 2, "best_epoch": 1},
                  records=[{"epoch": e} for e in range(5)])
    certain, why = run.stale_results()
    assert certain and "goes on to epoch 4" in why
    run.records = [{"epoch": 0}]  # started over (train.resume=false) and not finished
    certain, why = run.stale_results()
    assert not certain and "started over" in why
    run.records = [{"epoch": e} for e in range(2)]
    assert run.stale_results() is None
    assert RunInfo(path=tmp_path, results=None, records=run.records).stale_results() is None
