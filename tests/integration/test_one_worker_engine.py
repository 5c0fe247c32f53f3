"""Distributed settings that used to be accepted and then ignored or failed deep inside a run.

``--workers 1``: a single Ray Train worker has nobody to reduce with; it used to train with
the plain torch optimizer even when ``dist.precision=bf16`` (or a ``dist.deepspeed_config``)
asked for a DeepSpeed engine, silently training float32. The worker body runs here with
Ray Train's context faked (no Ray), in a process of its own: DeepSpeed keeps its process
group for the process's life.
"""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SMALL = ["train.batch_size=64", "train.eval_batch_size=64", "train.progress=false", "train.epochs=1",
         "sasrec.hidden_size=16", "sasrec.inner_size=32", "sasrec.n_layers=1", "sasrec.max_seq_len=10"]

# one Ray Train worker of a --workers 1 run: _worker_loop with ray.train's context faked
_ONE_WORKER = r"""
import json, sys
import ray.train

class _Context:
    def get_world_rank(self): return 0
    def get_world_size(self): return 1
    def get_local_rank(self): return 0

ray.train.get_context = lambda: _Context()
ray.train.get_checkpoint = lambda: None
ray.train.report = lambda metrics, checkpoint=None: None
from moedist.config import to_dict
from moedist.train.cli import load_experiment_config
from moedist.train.launch import _worker_loop

cfg = load_experiment_config("sasrec", None, json.loads(sys.argv[1]))
_worker_loop({"cfg": to_dict(cfg), "threads": 1})
"""


def _one_worker(overrides: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-c", _ONE_WORKER, json.dumps(overrides)],
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("precision, engine", [("bf16", "(deepspeed, bfloat16)"), ("auto", "(torch, float32)")])
def test_one_worker_honours_dist_precision(precision, engine, toy_data, tmp_path):
    out = _one_worker([f"data={toy_data}", f"run_dir={tmp_path / 'run'}", *SMALL, "dist.workers=1",
                       f"dist.precision={precision}"])
    line = next(x for x in out.splitlines() if "trainable parameters" in x)
    assert engine in line, line  # fp32 on the CPU keeps the plain optimizer: the same numbers as before
