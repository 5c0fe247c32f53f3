"""HTML reports (``moedist report``) of real tiny runs: HM4SR with text + image features,
MAMEX, a popularity baseline (no epochs), a folder of runs, and a hand-written tuning folder."""
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from moedist.report import ReportError, write_report
from moedist.train.cli import load_experiment_config
from moedist.train.loop import run_training

pytestmark = pytest.mark.integration

FAST = ["train.batch_size=64", "train.eval_batch_size=64", "train.progress=false"]
TINY_HM4SR = ["hm4sr.hidden_size=16", "hm4sr.inner_size=32", "hm4sr.n_layers=1", "hm4sr.max_seq_len=10",
              "hm4sr.modalities=[id,text,image]"]
TINY_MAMEX = ["mamex.embed_dim=16", "train.eval_every=1"]


@pytest.fixture(scope="module")
def runs(toy_data, toy_features, tmp_path_factory) -> Path:
    """runs/{hm4sr,mamex,popularity}: three real run directories side by side."""
    root = tmp_path_factory.mktemp("report") / "runs"
    for name, model, extra in (
        ("hm4sr", "hm4sr", ["train.epochs=3", *TINY_HM4SR]),
        ("mamex", "mamex", ["train.epochs=2", *TINY_MAMEX]),
        ("popularity", "popularity", []),
    ):
        cfg = load_experiment_config(model, None, [f"data={toy_data}", f"features={toy_features}",
                                                   f"run_dir={root / name}", *FAST, *extra])
        run_training(cfg, echo=lambda s: None)
    return root


def check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 2000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 300 and h >= 200, (path, im.size)
        colours = im.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 20, f"{path} is (nearly) a single flat colour"


def pngs(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.png")}


def check_report(index: Path, expected: set[str]) -> str:
    assert index.name == "index.html" and index.is_file()
    page = index.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert pngs(index.parent) == expected
    for name in expected:
        check_png(index.parent / name)
        assert f'href="{name}"' in page and f'alt="{name}"' in page  # linked and shown
    assert page.count("data:image/png;base64,") == len(expected)  # self-contained
    return page


def test_hm4sr_report_has_every_plot_and_the_results_table(runs):
    index = write_report(runs / "hm4sr")
    assert index == runs / "hm4sr" / "report" / "index.html"
    page = check_report(index, {"learning_curves.png", "expert_load.png", "moe_scalars.png",
                                "modality_contributions.png", "temporal_gate.png"})
    assert "0 skipped" in page
    # the results table lists the sibling runs (baseline and the cold-start model)
    for name in ("hm4sr", "mamex", "popularity"):
        assert re.search(rf"<td>{name}( <em>\(this run\)</em>)?</td>", page), name
    assert "(this run)" in page
    # per-modality contributions add up to the model's scores
    assert re.search(r"add up to the model&#x27;s scores within [0-9.e-]+", page)
    for m in ("id", "text", "image"):
        assert f"<td>{m}</td>" in page


def test_mamex_report_has_fusion_weights_by_category(runs, tmp_path):
    out = tmp_path / "mamex-report"
    index = write_report(runs / "mamex", out)
    assert index == out / "index.html"
    page = check_report(index, {"learning_curves.png", "expert_load.png", "moe_scalars.png", "fusion_weights.png"})
    assert "0 skipped" in page
    assert "adapter.image" in page and "verdict" in page  # collapse table


def test_popularity_report_skips_what_it_lacks_with_notes(runs, tmp_path):
    index = write_report(runs / "popularity", tmp_path / "pop")
    page = index.read_text()
    assert pngs(index.parent) == set()
    assert "learning curves: skipped" in page and "metrics.jsonl" in page
    assert "3 skipped" in page
    assert "popularity" in page and "test ndcg@10" in page  # still the results table


def test_moved_data_and_torn_metrics_degrade_gracefully(runs, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(runs / "mamex", run, ignore=shutil.ignore_patterns("report"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(tmp_path / "gone")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss": 0.5, "lo')  # a line torn by a crash
    page = write_report(run).read_text()
    assert "fusion weights: skipped" in page and "gone" in page and "not found" in page
    assert "learning_curves.png" in pngs(run / "report") and "fusion_weights.png" not in pngs(run / "report")
    assert "not JSON" in page


def test_folder_of_runs_gives_one_results_table(runs, tmp_path):
    index = write_report(runs, tmp_path / "all")
    page = index.read_text()
    tables = re.findall(r'<table class="results">.*?</table>', page, flags=re.DOTALL)
    assert len(tables) == 2  # one per protocol: leave-one-out (hm4sr, popularity), cold start (mamex)
    loo = next(t for t in tables if "hm4sr" in t)
    assert "popularity" in loo and "test ndcg@10" in loo
    assert "mamex" in next(t for t in tables if "hm4sr" not in t)
    assert pngs(index.parent)  # validation curves of the runs
    for p in index.parent.glob("*.png"):
        check_png(p)


def test_rerun_replaces_the_previous_report(runs, tmp_path):
    out = tmp_path / "r"
    write_report(runs / "mamex", out, probe_models=False)
    (out / "stale.png").write_bytes(b"x")
    write_report(runs / "mamex", out, probe_models=False)
    assert "stale.png" not in pngs(out) and "fusion_weights.png" not in pngs(out)


@pytest.mark.parametrize("what", ["empty", "missing", "file"])
def test_not_a_run_dir_is_a_clear_error(tmp_path, what):
    target = tmp_path / "x"
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("hello")
    with pytest.raises(ReportError, match=re.escape(str(target))) as e:
        write_report(target)
    assert "run directory" in str(e.value)
    assert not (tmp_path / "x" / "report").exists()


def test_cli_prints_the_path(runs, tmp_path, capsys):
    from moedist.cli import main

    out = tmp_path / "cli"
    assert main(["report", str(runs / "popularity"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tuning folders


def _fake_trial(root: Path, name: str, template: Path, curve: list[float]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    shutil.copy(template / "config.yaml", d / "config.yaml")
    records = [{"epoch": e, "loss": 5.0 - v, "loss_ce": 4.0 - v, "valid_ndcg@20": v} for e, v in enumerate(curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def test_tuning_folder_report(runs, tmp_path):
    """The layout of ``moedist tune``: trials/<trial_id>/ run directories and results.csv with
    the searched keys, best_valid_<metric>, status columns and each trial's run_dir."""
    exp = tmp_path / "tune-hm4sr"
    trials = exp / "trials"
    trials.mkdir(parents=True)
    # the best trial is a real run (its full report is included); the others are hand-written
    shutil.copytree(runs / "hm4sr", trials / "t0", ignore=shutil.ignore_patterns("report"))
    best = json.loads((trials / "t0" / "results.json").read_text())["valid"]["ndcg@20"]
    rows = [("t0", 4, 1e-3, True, best)]
    for i, (k1, lr, imoe, v) in enumerate([(2, 1e-4, False, 0.1), (8, 3e-2, True, 0.2), (4, 1e-2, False, 0.05)], start=1):
        _fake_trial(trials, f"t{i}", runs / "hm4sr", [v * 0.5, v * 0.8, v])
        rows.append((f"t{i}", k1, lr, imoe, min(v, best / 2)))
    header = ("trial_id,hm4sr.k1,config/train.lr,hm4sr.use_imoe,hm4sr.mu,best_valid_ndcg@20,last_valid_ndcg@20,"
              "epochs_run,status,stopped_by,run_dir")
    lines = [header]
    # run_dir as written by the tuner: a path where the experiment was (it has moved since)
    lines += [f"{t},{k1},{lr},{imoe},100.0,{v},{v},3,TERMINATED,max_epochs,/elsewhere/tune-hm4sr/trials/{t}"
              for t, k1, lr, imoe, v in rows]
    lines.append("t4,16,0.001,True,100.0,,,0,ERROR,error,/elsewhere/tune-hm4sr/trials/t4")  # failed: no metric, no dir
    (exp / "results.csv").write_text("\n".join(lines) + "\n")

    index = write_report(exp)
    page = check_report(index, {
        "tuning_hm4sr.k1.png", "tuning_train.lr.png", "tuning_hm4sr.use_imoe.png", "tuning_curves.png",
        "best_learning_curves.png", "best_expert_load.png", "best_moe_scalars.png",
        "best_modality_contributions.png", "best_temporal_gate.png",
    })
    assert "<b>best_valid_ndcg@20</b> (higher is better)" in page
    assert "hm4sr.mu = 100.0 in every trial: not searched" in page
    assert "1 trial(s) without a metric" in page
    assert "Best trial: t0" in page
    for t in ("t0", "t1", "t2", "t3"):
        assert f"<td>{t}</td>" in page


def test_tuning_table_without_a_metric_column_is_an_error(tmp_path):
    exp = tmp_path / "tune"
    exp.mkdir()
    (exp / "results.csv").write_text("hm4sr.k1,notes\n4,a\n8,b\n")
    with pytest.raises(ReportError, match="results.csv.*metric"):
        write_report(exp)
    (exp / "results.csv").write_text("hm4sr.k1,loss\n4,0.5\n8,0.3\n")
    page = write_report(exp, metric="loss").read_text()  # chosen explicitly; lower is better
    assert "lower is better" in page


def test_runs_on_other_datasets_get_their_own_results_table(runs, tmp_path):
    """Bold "best" values across two datasets compared nothing: one table per dataset and protocol."""
    folder = tmp_path / "mixed"
    for name in ("hm4sr", "popularity"):
        shutil.copytree(runs / name, folder / name, ignore=shutil.ignore_patterns("report"))
    shutil.copytree(runs / "popularity", folder / "popularity-other", ignore=shutil.ignore_patterns("report"))
    res = json.loads((folder / "popularity-other" / "results.json").read_text())
    res["dataset"] = "other-data"
    res["test"] = {k: 0.987654 for k in res["test"]}  # better at everything, on other data
    (folder / "popularity-other" / "results.json").write_text(json.dumps(res))
    page = write_report(folder / "hm4sr", tmp_path / "out", probe_models=False).read_text()
    tables = re.findall(r'<table class="results">.*?</table>', page, flags=re.DOTALL)
    assert len(tables) == 2
    toy = next(t for t in tables if "popularity-other" not in t)
    assert "hm4sr" in toy and "0.9877" not in toy
    assert "Dataset <b>other-data</b>" in page


def test_a_resumed_run_still_training_is_not_reported_as_finished(runs, tmp_path):
    """A finished run resumed with a higher train.epochs: until it finishes, results.json is the
    earlier run's, while metrics.jsonl already has the new epochs."""
    run = tmp_path / "resumed"
    shutil.copytree(runs / "hm4sr", run, ignore=shutil.ignore_patterns("report"))
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    with open(run / "metrics.jsonl", "a") as f:
        for e in range(last["epoch"] + 1, last["epoch"] + 4):
            f.write(json.dumps({**last, "epoch": e}) + "\n")
    page = write_report(run, probe_models=False).read_text()
    assert "results.json is from an earlier, shorter run" in page
    assert f"goes on to epoch {last['epoch'] + 3}" in page


def test_a_report_link_planted_in_the_run_folder_is_not_followed(runs, tmp_path):
    """The default output, RUN_DIR/report, may be a link someone else put into a shared run
    folder: the report is refused there (naming the link), the link's target is untouched, and
    --out still writes where it is told."""
    run = tmp_path / "hm4sr"
    shutil.copytree(runs / "hm4sr", run)
    shutil.rmtree(run / "report", ignore_errors=True)
    target = tmp_path / "someone-elses"
    target.mkdir()
    (target / "keep.png").write_bytes(b"not a report figure")
    (run / "report").symlink_to(target)
    with pytest.raises(ReportError, match="symbolic link"):
        write_report(run, probe_models=False)
    assert [p.name for p in target.iterdir()] == ["keep.png"]
    index = write_report(run, tmp_path / "out", probe_models=False)
    assert index.is_file() and (run / "report").is_symlink()


def test_model_probe_refuses_features_other_than_the_trained_ones(runs, toy_data, toy_features, tmp_path):
    """The fusion-weight analysis rebuilds the model from config.yaml's paths. Features
    re-extracted there with other weights (same items, same widths) are not what the checkpoint
    was trained on: the section is skipped, naming the reason, instead of analysing them."""
    import numpy as np

    from moedist.data.dataset import PreparedDataset
    from moedist.features.store import load_item_features, write_feature_arrays

    ids = PreparedDataset(toy_data).items["item_id"].tolist()
    feats = load_item_features(toy_features)
    other = tmp_path / "features-again"
    write_feature_arrays(other, item_ids=ids,
                         arrays={m: np.ascontiguousarray(t[1:].numpy()[::-1]) for m, t in feats.features.items()})
    run = tmp_path / "mamex"
    shutil.copytree(runs / "mamex", run, ignore=shutil.ignore_patterns("report"))
    page = write_report(run).read_text()
    assert "fusion_weights.png" in pngs(run / "report")  # the same features: analysed
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["features"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    page = write_report(run).read_text()
    assert "fusion weights: skipped" in page and "other item features" in page
    assert "fusion_weights.png" not in pngs(run / "report")
