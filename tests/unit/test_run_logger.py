"""RunLogger: metrics.jsonl and TensorBoard events agree with the checkpoint after a resume or
a fresh start in the same run folder."""
import json

import pytest

from moedist.train.loop import RunLogger

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _run(run_dir, epochs, loss_of, resumed_epoch=None):
    log = RunLogger(run_dir, enabled=True, resumed_epoch=resumed_epoch)
    if resumed_epoch is not None:
        log.keep_epochs_upto(resumed_epoch)
    for e in epochs:
        log.log({"epoch": e, "loss": loss_of(e)})
    log.close()


def _tb_losses(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(ev.step, round(ev.value, 6)) for ev in acc.Scalars("loss")]


def test_resume_hides_the_earlier_events_of_retrained_epochs(tmp_path):
    # the first run logged epochs 0-3, but its last checkpoint holds epoch 1: epochs 2 and 3
    # are trained again, and TensorBoard must show them once, with the new values
    _run(tmp_path, range(4), lambda e: 10.0 + e)
    _run(tmp_path, [2, 3], lambda e: 20.0 + e, resumed_epoch=1)
    assert _tb_losses(tmp_path) == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["loss"]) for r in lines] == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0)]


def test_fresh_start_removes_an_earlier_runs_events(tmp_path):
    _run(tmp_path, range(3), lambda e: 10.0 + e)
    (tmp_path / "metrics.jsonl").unlink()  # as the loop does on a fresh start
    _run(tmp_path, range(2), lambda e: 30.0 + e)
    assert _tb_losses(tmp_path) == [(0, 30.0), (1, 31.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    _run(tmp_path, range(2), lambda e: 1.0)  # rank 0
    before = sorted(p.name for p in (tmp_path / "tb").iterdir())
    log = RunLogger(tmp_path, enabled=False)  # another rank, same folder: must not clear rank 0's events
    log.log({"epoch": 2, "loss": 5.0})
    log.close()
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == before
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
