"""``moedist compare`` on real runs: the ranks a run records reproduce its reported metrics, and
the paired comparison is computed from them."""
import json

import numpy as np
import pytest

from moedist.cli import main
from moedist.report.compare import load_run_ranks, per_user_metric
from moedist.train.cli import load_experiment_config
from moedist.train.evaluate import EVAL_RANKS
from moedist.train.loop import run_training

pytestmark = pytest.mark.integration

FAST = ["train.batch_size=64", "train.eval_batch_size=64", "train.progress=false"]
SMALL_SEQ = ["sasrec.hidden_size=16", "sasrec.inner_size=32", "sasrec.n_layers=1", "sasrec.max_seq_len=10"]


def _train(model, data, run_dir, *extra):
    cfg = load_experiment_config(model, None, [f"data={data}", f"run_dir={run_dir}", *FAST, *extra])
    return run_training(cfg, echo=lambda s: None)


def test_recorded_ranks_reproduce_metrics_and_compare(toy_data, tmp_path, capsys):
    pop = _train("popularity", toy_data, tmp_path / "pop")
    seq = _train("sasrec", toy_data, tmp_path / "sasrec", "train.epochs=6", "train.lr=0.005", *SMALL_SEQ)
    for d, res in ((tmp_path / "pop", pop), (tmp_path / "sasrec", seq)):
        for split in ("valid", "test"):
            rr = load_run_ranks(d, split)
            for m in ("ndcg@10", "recall@20", "mrr@5"):
                assert per_user_metric(rr, m).mean() == pytest.approx(res[split][m], abs=1e-12)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tmp_path / "pop"), str(tmp_path / "sasrec"), "--json", str(out), "--resamples", "2000"]) == 0
    printed = capsys.readouterr().out
    assert "sasrec" in printed and "sign-flip" in printed
    cmp = json.loads(out.read_text())["comparisons"][0]
    assert cmp["diff"] == pytest.approx(seq["test"]["ndcg@10"] - pop["test"]["ndcg@10"], abs=1e-12)
    assert cmp["ci_low"] <= cmp["diff"] <= cmp["ci_high"]
    # the toy data's next item follows a ring, so sequence order wins by a wide margin
    assert cmp["diff"] > 0 and cmp["p_value"] < 0.01


def test_cold_start_ranks_and_missing_ranks_file(toy_data, toy_features, tmp_path, capsys):
    run = tmp_path / "content"
    res = _train("content", toy_data, run, f"features={toy_features}", "train.epochs=3")
    rr = load_run_ranks(run, "test")
    assert rr.protocol == "cold" and rr.ranks.ndim == 2
    assert per_user_metric(rr, "ndcg@10").mean() == pytest.approx(res["test"]["ndcg@10"], abs=1e-12)
    (run / EVAL_RANKS).unlink()
    assert main(["compare", str(run), str(run)]) == 2
    err = capsys.readouterr().err
    assert "eval_ranks.npz" in err and str(run) in err
    # rerunning the finished run re-evaluates its best checkpoint and records the ranks again
    again = _train("content", toy_data, run, f"features={toy_features}", "train.epochs=3")
    assert again["test"] == res["test"]
    assert np.array_equal(load_run_ranks(run, "test").ranks, rr.ranks)


def test_runs_evaluated_differently_or_still_training_are_refused(toy_data, tmp_path, capsys):
    base = tmp_path / "sasrec"
    _train("sasrec", toy_data, base, "train.epochs=1", *SMALL_SEQ)
    # the same model evaluated without the history items among the candidates: every rank
    # moves, so a "significant" difference would be the evaluation's
    masked = tmp_path / "sasrec-masked"
    _train("sasrec", toy_data, masked, "train.epochs=1", "train.mask_history=true", *SMALL_SEQ)
    assert main(["compare", str(base), str(masked), "--resamples", "200"]) == 2
    err = capsys.readouterr().err
    assert "train.mask_history=True vs False" in err and str(masked) in err
    # resumed with more epochs and interrupted: results.json and the ranks are the 1-epoch run's
    resumed = tmp_path / "sasrec-resumed"
    _train("sasrec", toy_data, resumed, "train.epochs=1", *SMALL_SEQ)
    old = {f: (resumed / f).read_bytes() for f in ("results.json", EVAL_RANKS)}
    _train("sasrec", toy_data, resumed, "train.epochs=3", *SMALL_SEQ)
    for f, b in old.items():  # what the directory holds while epochs 1 and 2 run
        (resumed / f).write_bytes(b)
    assert main(["compare", str(base), str(resumed), "--resamples", "200"]) == 2
    assert "earlier, shorter run" in capsys.readouterr().err
