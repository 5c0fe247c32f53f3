"""Distributed evaluation (each worker ranks its share of the users) equals the
single-process evaluation exactly, for both protocols."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moedist.data.dataset import PreparedDataset
from moedist.train.cli import load_experiment_config
from moedist.train.distributed import free_port
from moedist.train.loop import DistContext, build_model, build_task, evaluate_split, load_features_for

pytestmark = pytest.mark.integration

CASES = {
    "sasrec": ["sasrec.hidden_size=16", "sasrec.inner_size=32", "sasrec.n_layers=1", "sasrec.max_seq_len=10"],
    "mamex": ["mamex.embed_dim=16"],
}


def _evaluate(rank, world, port, model_name, data, features, batch_size, out):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on every rank and in the reference
        cfg = load_experiment_config(model_name, None, [f"data={data}", f"features={features}", *CASES[model_name]])
        d = PreparedDataset(data)
        model = build_model(cfg, d, load_features_for(cfg, d))
        task = build_task(cfg, d)
        ctx = DistContext(rank=rank, world=world)
        res = {s: evaluate_split(model, task, s, ctx, batch_size) for s in ("valid", "test")}
        if rank == 0:
            out.put(res)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(world, model_name, data, features, batch_size):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    if world == 1:
        _evaluate(0, 1, 0, model_name, data, features, batch_size, q)
        return q.get(timeout=60)
    port = free_port()
    procs = [ctx.Process(target=_evaluate, args=(r, world, port, model_name, data, features, batch_size, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return res


@pytest.mark.parametrize("model_name", ["sasrec", "mamex"])
def test_two_workers_evaluate_exactly_like_one(model_name, toy_data, toy_features):
    one = run(1, model_name, toy_data, toy_features, batch_size=16)
    two = run(2, model_name, toy_data, toy_features, batch_size=7)  # uneven shares and batches
    for split in ("valid", "test"):
        assert two[split] == one[split]  # exact, not approximate
        assert any(v > 0 for v in one[split].values())
