"""The report's tables of runs whose results or MoE statistics hold NaN (a diverged run) or null."""
import json
import re

import yaml

from moedist.report.html import write_report


def _run(d, test: dict, load: list[float]):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": "sasrec", "train": {"valid_metric": "ndcg@10"}}))
    recs = [{"epoch": e, "loss": 1.0 / (e + 1), "valid_ndcg@10": 0.1 * e, "moe/layer0/load": load} for e in range(2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))  # NaN written as NaN, as json does
    (d / "results.json").write_text(json.dumps({"model": "sasrec", "dataset": "toy", "protocol": "loo", "best_epoch": 1,
                                                "epochs_run": 2, "valid": {"ndcg@10": 0.2}, "test": test}))
    return d


def _results_rows(page: str) -> dict[str, list[str]]:
    table = re.search(r'<table class="results">.*?</table>', page).group(0)
    rows = re.findall(r"<tr><td>(.*?)</td></tr>", table)
    return {r.split("</td><td>")[0]: r.split("</td><td>")[3:] for r in rows}


def test_a_nan_or_null_result_neither_wins_its_column_nor_sinks_the_page(tmp_path):
    nan = float("nan")
    _run(tmp_path / "a_diverged", {"ndcg@10": nan, "recall@10": 0.5}, [0.7, 0.3])
    _run(tmp_path / "b", {"ndcg@10": 0.3, "recall@10": 0.4}, [0.7, 0.3])
    _run(tmp_path / "c_null", {"ndcg@10": None, "recall@10": 0.45}, [0.7, 0.3])
    rows = _results_rows(write_report(tmp_path, probe_models=False).read_text())
    # the NaN came first and made every comparison false: b's 0.3000 was not marked as the best
    assert rows["a_diverged"] == ["–", "<b>0.5000</b>"]
    assert rows["b"] == ["<b>0.3000</b>", "0.4000"]
    assert rows["c_null"] == ["–", "0.4500"]  # a null made max() raise TypeError


def test_non_finite_expert_statistics_get_no_verdict(tmp_path):
    nan = float("nan")
    run = _run(tmp_path / "diverged", {"ndcg@10": 0.1}, [nan, nan])
    page = write_report(run, probe_models=False).read_text()
    row = re.search(r"<tr><td>layer0</td><td>load</td>.*?</tr>", page).group(0)
    # was: max share "nan%", entropy 0.00 and the verdict "skewed"
    assert "nan" not in row and "skewed" not in row and "collapsed" not in row and "not finite" in row
