"""Distributed settings refused up front, naming the key, instead of failing inside a run
(a KeyError / gloo 'connection closed' after the first epoch) or being silently ignored."""
import pytest

from moedist.errors import ConfigError
from moedist.train.cli import load_experiment_config
from moedist.train.config import validate_experiment
from moedist.train.loop import check_expert_parallel


def cfg(model, *overrides):
    return load_experiment_config(model, None, ["data=x", *overrides])


def test_a_global_batch_smaller_than_the_workers_is_refused():
    # the last worker never got a sample: its epoch totals had no keys and the loss all-reduce
    # failed after the first epoch (KeyError: 'loss' on one rank, connection closed on the others)
    with pytest.raises(ConfigError, match=r"train.batch_size=2 is smaller than dist.workers=3"):
        validate_experiment(cfg("sasrec", "dist.workers=3", "train.batch_size=2"))
    validate_experiment(cfg("sasrec", "dist.workers=3", "train.batch_size=3"))
    validate_experiment(cfg("sasrec", "train.batch_size=1"))  # local mode: one process takes it all
    validate_experiment(cfg("popularity", "dist.workers=3", "train.batch_size=2"))  # nothing trains


@pytest.mark.parametrize("setting", ["dist.precision=bf16", "dist.deepspeed_config=ds.json"])
def test_local_mode_refuses_deepspeed_settings_it_would_ignore(setting):
    with pytest.raises(ConfigError, match="needs a DeepSpeed engine.*dist.deepspeed=true"):
        validate_experiment(cfg("sasrec", setting))
    validate_experiment(cfg("sasrec", setting, "dist.deepspeed=true"))
    validate_experiment(cfg("sasrec", setting, "dist.workers=1"))  # the worker turns its engine on
    validate_experiment(cfg("sasrec", "dist.precision=fp32"))  # what local mode trains anyway
    validate_experiment(cfg("sasrec", "dist.zero_stage=2"))  # no effect on the numbers: a Ray run's config resumes locally


@pytest.mark.parametrize("model, ablation", [("hm4sr", "hm4sr.use_imoe=false"), ("mamex", "mamex.use_moe=false")])
def test_expert_parallelism_without_experts_is_refused(model, ablation):
    # was accepted: the run trained replicated while its checkpoints said ep_size 2
    with pytest.raises(ConfigError, match=f"dist.ep_size=2: {ablation}.*no experts to shard"):
        check_expert_parallel(cfg(model, ablation, "dist.workers=2", "dist.ep_size=2"), 2)
    check_expert_parallel(cfg(model, "dist.workers=2", "dist.ep_size=2"), 2)
    check_expert_parallel(cfg(model, ablation, "dist.workers=2"), 2)  # ep_size 1: nothing to check


def test_one_worker_needs_an_engine_only_for_what_the_torch_optimizer_cannot_do():
    import torch

    from moedist.train.distributed import needs_deepspeed_engine

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not needs_deepspeed_engine(cfg("sasrec", "dist.workers=1"), cpu)
    assert not needs_deepspeed_engine(cfg("sasrec", "dist.workers=1", "dist.zero_stage=2"), cpu)
    assert needs_deepspeed_engine(cfg("sasrec", "dist.workers=1"), gpu)  # auto: bf16 on a GPU, as for N workers
    assert not needs_deepspeed_engine(cfg("sasrec", "dist.workers=1", "dist.precision=fp32"), gpu)
    assert needs_deepspeed_engine(cfg("sasrec", "dist.workers=1", "dist.precision=bf16"), cpu)
    assert needs_deepspeed_engine(cfg("sasrec", "dist.workers=1", "dist.deepspeed_config=ds.json"), cpu)


def test_a_cpu_run_on_a_cluster_with_gpus_reserves_none():
    """train.device=cpu: the workers take no GPU and use gloo (before, a cluster with GPUs made
    them reserve one each and pick NCCL while the model stayed on the CPU)."""
    from moedist.train.launch import resolve_use_gpu

    assert resolve_use_gpu(cfg("sasrec", "train.device=cpu")) is False  # decided without asking Ray
    assert resolve_use_gpu(cfg("sasrec", "train.device=cpu", "dist.use_gpu=true")) is True  # an explicit choice wins
