"""Expert parallelism equals the single-process model (in the style of st-moe-pytorch's assert.py).

Each test spawns 2 or 4 CPU processes with gloo. Every rank builds the expert-parallel model and,
from the same seed, an ``ep_size = 1`` reference; ranks get *different* batch sizes (one may get
none). Checks, with ``L_r`` the loss of rank r's batch:

- outputs of rank r == reference outputs on rank r's slice of the concatenated batch;
- gradients: the reference runs on every rank's batch and back-propagates ``Σ_r L_r``; the
  expert-parallel run back-propagates ``L_r`` on rank r. Dense grads summed over ranks, expert
  grads summed over the expert-data-parallel group and all-gathered by *global* expert index
  (``gather_expert_state``-style) must equal the reference grads.
- checkpoints: ``gather_expert_state`` of the sharded model is the reference state dict, and
  ``load_sharded_state`` moves weights between ep_size 1 and 2.
- DeepSpeed (ZeRO 0, 1 and 2) with ``moe_param_groups``: see ``_deepspeed_worker``.

Collectives use a 60 s gloo timeout, so a mismatched collective fails instead of hanging.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ATOL, RTOL = 1e-5, 1e-4


# ------------------------------------------------------------------------------------ harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_BUILD_OPS="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    # forkserver: torch is imported once by the server, then each worker is a cheap fork of
    # a clean process (spawn would import torch once per worker: ~20 s for 4 on a busy 2-core box).
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "moedist.moe"])
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True,
                       start_method="forkserver")


def _close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _sum_over(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _split(sizes, *tensors):
    """Rank r's slice of each tensor (dim 0), for per-rank sizes."""
    rank = dist.get_rank()
    lo = sum(sizes[:rank])
    return [t[lo : lo + sizes[rank]] for t in tensors]


def check_grads(ep_model: nn.Module, ref_model: nn.Module, what: str, *, reduced: bool = False,
                scale: float = 1.0) -> int:
    """Reference grads (times ``scale``) == expert-parallel grads: dense ones summed over the
    world, expert shards summed over their expert-data-parallel group (both skipped when
    ``reduced``: already done by a trainer) and gathered by global expert index. Returns the
    number of expert tensors compared."""
    from moedist.moe import LinearExperts
    from moedist.moe.checkpoint import _all_gather_experts

    ref = dict(ref_model.named_parameters())
    expert_keys = {}
    for name, m in ep_model.named_modules():
        if isinstance(m, LinearExperts) and m.ep_size > 1:
            expert_keys[f"{name}.weight"] = m
            if m.bias is not None:
                expert_keys[f"{name}.bias"] = m
    n = 0
    for name, p in ep_model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        expected = ref[name].grad if ref[name].grad is not None else torch.zeros_like(ref[name])
        if name in expert_keys:
            m = expert_keys[name]
            if not reduced:
                g = _sum_over(g, m.ep.edp_group)
            g = _all_gather_experts(g, m)
            n += 1
        elif not reduced:
            g = _sum_over(g)
        _close(g, expected * scale, f"{what}: grad of {name}")
    return n


# ------------------------------------------------------------------------------- MoE layer


def _moe_layer_cases(world: int):
    # (num_experts, k, ep_size, per-rank batch sizes, gate bias or None)
    if world == 2:
        return [
            (4, 2, 2, [5, 0], None),  # top-k (MAMEX style), a rank with no tokens
            (4, None, 2, [3, 8], None),  # dense (HM4SR Interactive-MoE style)
            (5, 2, 2, [6, 2], None),  # experts not divisible by ep_size: 3 + 2
            (5, None, 2, [0, 4], None),
            (4, 2, 2, [4, 3], [10.0, 10.0, -10.0, -10.0]),  # all tokens to rank 0's experts
            (4, 1, 2, [7, 1], None),
        ]
    return [
        (4, 2, 2, [3, 0, 5, 2], None),  # two EP groups of 2, expert-data-parallel groups of 2
        (6, None, 2, [2, 4, 1, 3], None),
        (3, 2, 4, [4, 2, 0, 3], None),  # ep_size 4 with 3 experts: one rank holds none
        (6, 2, 4, [1, 5, 2, 2], None),  # 2 + 2 + 1 + 1
        (4, None, 4, [2, 2, 3, 0], None),
    ]


def _moe_layer_worker(rank: int, world: int) -> None:
    from moedist.moe import MoELayer, allreduce_gradients, gather_expert_state, init_expert_parallel, load_sharded_state

    with pytest.raises(ValueError, match="does not divide"):
        init_expert_parallel(world + 1)  # raises on every rank before any new_group: no hang
    groups = init_expert_parallel(2)
    assert groups.ep_ranks == tuple(range(rank - rank % 2, rank - rank % 2 + 2))
    assert groups.edp_ranks == tuple(range(rank % 2, world, 2)) and groups is init_expert_parallel(2)
    din, dgate, dout = 6, 5, 3
    for case_id, (E, k, ep_size, sizes, bias) in enumerate(_moe_layer_cases(world)):
        what = f"case {case_id} (E={E}, k={k}, ep={ep_size}, sizes={sizes})"
        kw = dict(in_features=din, out_features=dout, num_experts=E, k=k, gate_in_features=dgate, balance="paper")
        torch.manual_seed(case_id)
        ref = MoELayer(**kw)
        torch.manual_seed(case_id)
        ep = MoELayer(**kw, ep_size=ep_size)
        assert ep.experts.num_experts == ep.experts.experts_per_rank[ep.experts.ep.ep_rank]
        if bias is not None:
            with torch.no_grad():
                for layer in (ref, ep):
                    layer.gate.proj.weight.mul_(0.01)
                    layer.gate.proj.bias.copy_(torch.tensor(bias))
        # the same global batch on every rank; rank r uses its slice
        gen = torch.Generator().manual_seed(1000 + case_id)
        n = sum(sizes)
        X, G, R = torch.randn(n, din, generator=gen), torch.randn(n, dgate, generator=gen), torch.randn(n, dout, generator=gen)

        Xr = X.clone().requires_grad_(True)
        out_ref, _ = ref(Xr, gate_input=G)
        (out_ref * R).sum().backward()  # Σ_r L_r, L_r = Σ_{t in r} <out_t, R_t>

        x, g, r = _split(sizes, X, G, R)
        x = x.clone().requires_grad_(True)
        out, aux = ep(x, gate_input=g)
        (out * r).sum().backward()

        _close(out, _split(sizes, out_ref)[0], f"{what}: output")
        _close(x.grad, _split(sizes, Xr.grad)[0], f"{what}: input grad")
        assert aux.load.shape == (E,) and aux.gate_mean.shape == (E,)
        check_grads(ep, ref, what)
        # gathered state == the unsharded state
        full = gather_expert_state(ep)
        for key, value in ref.state_dict().items():
            _close(full[key], value, f"{what}: gathered {key}")
        # DeepSpeed-style averaging without DeepSpeed: grads of (1/W) Σ_r L_r everywhere
        allreduce_gradients(ep)
        check_grads(ep, ref, what + " after allreduce_gradients", reduced=True, scale=1.0 / world)
        # an ep_size=1 state loads into the sharded layer (any topology), outputs follow
        torch.manual_seed(50)  # the same perturbation on every rank
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn_like(p))
            load_sharded_state(ep, ref.state_dict())
            _close(ep(x, gate_input=g)[0], _split(sizes, ref(X, gate_input=G)[0])[0], f"{what}: after load")
        # no grad (evaluation) with a rank that has no tokens: must not hang
        with torch.no_grad():
            empty = ep(torch.zeros(0, din), gate_input=torch.zeros(0, dgate))[0] if rank == 0 else ep(x, gate_input=g)[0]
            assert empty.shape[-1] == dout


def test_moe_layer_ep2_topk_and_dense_match_single_process():
    spawn(_moe_layer_worker, 2)


def test_moe_layer_4_processes_ep2_and_ep4_uneven_experts():
    spawn(_moe_layer_worker, 4)


def test_single_process_helpers():
    from moedist.moe import MoELayer, expert_split, load_sharded_state, moe_param_groups

    assert expert_split(4, 2) == [2, 2] and expert_split(5, 2) == [3, 2] and expert_split(3, 4) == [1, 1, 1, 0]
    layer = MoELayer(in_features=3, out_features=2, num_experts=4, k=2)
    groups = moe_param_groups(layer, lr=0.1, weight_decay=0.0)  # ep_size 1: nothing to separate
    assert [g["name"] for g in groups] == ["dense"] and len(groups[0]["params"]) == 4
    assert not hasattr(layer, "_deepspeed_moe_ep1")
    load_sharded_state(layer, layer.state_dict())  # ep_size 1: identity
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed"):
            MoELayer(in_features=3, out_features=2, num_experts=4, k=2, ep_size=2)


# ------------------------------------------------------------------------------------ HM4SR


def _hm4sr_batch(gen: torch.Generator, B: int, L: int, n_items: int) -> dict:
    lens = torch.randint(1, L + 1, (B,), generator=gen)
    pos = torch.arange(L)[None, :]
    real = pos < lens[:, None]
    items = torch.randint(1, n_items, (B, L), generator=gen) * real
    gaps = torch.randint(0, 5 * 86400, (B, L), generator=gen)
    times = (1_300_000_000 + gaps.cumsum(1)) * real
    return {"item_seq": items, "item_seq_len": lens, "time_seq": times,
            "target": torch.randint(1, n_items, (B,), generator=gen), "user": torch.arange(B)}


def _hm4sr_worker(rank: int, world: int) -> None:
    from types import SimpleNamespace

    from moedist.models.hm4sr import HM4SR, HM4SRConfig
    from moedist.moe import gather_expert_state, load_sharded_state

    n_items, L, d = 30, 6, 8
    sizes = [3, 1]
    g0 = torch.Generator().manual_seed(0)
    feats = SimpleNamespace(features={"text": torch.randn(n_items, 12, generator=g0),
                                      "image": torch.randn(n_items, 10, generator=g0)}, mask={})
    cats = (torch.rand(n_items, 4, generator=g0) < 0.4).float()

    def build(ep_size: int, k1: int) -> HM4SR:
        cfg = HM4SRConfig(hidden_size=d, n_layers=1, n_heads=2, inner_size=16, max_seq_len=L, k1=k1, k2=3,
                          ep_size=ep_size)
        torch.manual_seed(7)
        model = HM4SR(cfg, n_items=n_items, n_users=10, item_features=feats, item_categories=cats,
                      max_interval_seconds=10 * 86400)
        return model.eval()  # dropout off; gradients still flow

    for k1 in (4, 3):  # 3 experts on 2 ranks: uneven split
        what = f"hm4sr k1={k1}"
        ref, ep = build(1, k1), build(2, k1)
        gen = torch.Generator().manual_seed(1)
        batches = [_hm4sr_batch(gen, B, L, n_items) for B in sizes]
        # outputs: reference on the concatenation, ep model on this rank's batch
        cat = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        with torch.no_grad():
            scores_ref = ref.full_sort_predict(cat)
            scores = ep.full_sort_predict(batches[rank])
        _close(scores, _split(sizes, scores_ref)[0], f"{what}: scores")
        # a rank with an empty batch still takes part (evaluation padding)
        with torch.no_grad():
            empty = {key: v[:0] for key, v in batches[rank].items()}
            out = ep.full_sort_predict(empty if rank == 1 else batches[rank])
            assert out.shape[1] == n_items
        # gradients of Σ_r L_r (batch-level losses: the reference sums per-rank losses)
        total = 0.0
        for r, batch in enumerate(batches):
            torch.manual_seed(100 + r)  # PCL's random placeholders: same draws as rank r
            total = total + ref.calculate_loss(batch)[0]
        total.backward()
        torch.manual_seed(100 + rank)
        loss, parts = ep.calculate_loss(batches[rank])
        loss.backward()
        assert check_grads(ep, ref, what) == 2  # interactive_moe.experts weight + bias
        assert ep.temporal_moe.experts.grad is not None  # replicated, compared as dense above

        # checkpoints: ep_size 2 -> 1 and 1 -> 2
        state = gather_expert_state(ep)
        assert state.keys() == ref.state_dict().keys()
        for key, value in ref.state_dict().items():
            _close(state[key], value, f"{what}: gathered {key}")
        torch.manual_seed(9)  # the same perturbation on every rank
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
        one = build(1, k1)
        one.load_state_dict(state)  # a plain ep_size=1 model loads it directly
        load_sharded_state(ep, ref.state_dict())  # and the sharded model loads an ep_size=1 one
        lo = ep.interactive_moe.experts.expert_offset
        _close(ep.interactive_moe.experts.weight,
               ref.interactive_moe.experts.weight[lo : lo + ep.interactive_moe.experts.num_experts], f"{what}: loaded")
        with torch.no_grad():
            _close(ep.full_sort_predict(batches[rank]), ref.full_sort_predict(batches[rank]), f"{what}: after load")


def test_hm4sr_ep2_matches_single_process():
    spawn(_hm4sr_worker, 2)


# ------------------------------------------------------------------------------------ MAMEX


def _bpr_batches(sizes: list[int], n_users: int, n_items: int) -> list[dict]:
    """One (user, pos_item, neg_item) batch per rank, of ``sizes[r]`` triples; the same on every rank."""
    gen = torch.Generator().manual_seed(5)
    return [
        {"user": torch.randint(1, n_users, (B,), generator=gen),
         "pos_item": torch.randint(1, n_items, (B,), generator=gen),
         "neg_item": torch.randint(1, n_items, (B,), generator=gen)}
        for B in sizes
    ]


def _mamex_worker(rank: int, world: int) -> None:
    from types import SimpleNamespace

    from moedist.models.mamex import MAMEX, MAMEXConfig
    from moedist.moe import gather_expert_state, load_sharded_state

    n_items, n_users = 25, 12
    sizes = [4, 1]
    g0 = torch.Generator().manual_seed(0)
    img_mask = torch.rand(n_items, generator=g0) > 0.2  # some items have no image
    feats = SimpleNamespace(
        features={"image": torch.randn(n_items, 10, generator=g0), "text": torch.randn(n_items, 8, generator=g0)},
        mask={"image": img_mask, "text": torch.ones(n_items, dtype=torch.bool)},
    )
    for adapter in ("mamex", "modality_router", "joint_router"):
        what = f"mamex adapter={adapter}"

        def build(ep_size: int) -> MAMEX:
            torch.manual_seed(3)
            cfg = MAMEXConfig(embed_dim=6, num_experts=4, top_k=2, adapter=adapter, ep_size=ep_size)
            return MAMEX(cfg, n_items=n_items, n_users=n_users, item_features=feats).eval()

        ref, ep = build(1), build(2)
        batches = _bpr_batches(sizes, n_users, n_items)
        with torch.no_grad():
            _close(ep.full_sort_predict(batches[rank]), ref.full_sort_predict(batches[rank]), f"{what}: scores")
        total = sum(ref.calculate_loss(b)[0] for b in batches)
        total.backward()
        loss, parts = ep.calculate_loss(batches[rank])
        _close(loss, ref.calculate_loss(batches[rank])[0], f"{what}: loss of rank {rank}")
        loss.backward()
        n = check_grads(ep, ref, what)
        assert n == (4 if adapter == "mamex" else 2), n  # weight + bias per expert set
        # stats stay over global experts; the routing entropy is the single-process one
        stats, ref_stats = ep.moe_stats(), ref.moe_stats()
        assert all(v.shape == (4,) for key, v in stats.items() if key.startswith("adapter.") and not key.endswith(".entropy"))
        entropies = [key for key in stats if key.startswith("adapter.") and key.endswith(".entropy")]
        assert entropies
        for key in entropies:
            _close(stats[key], ref_stats[key], f"{what}: {key}")

        state = gather_expert_state(ep)
        one = build(1)
        one.load_state_dict(state)
        with torch.no_grad():
            _close(one.full_sort_predict(batches[0]), ref.full_sort_predict(batches[0]), f"{what}: ep2 -> ep1")
            torch.manual_seed(9)  # the same perturbation on every rank
            for p in ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ep.train().eval()  # drop the cached item table
        load_sharded_state(ep, ref.state_dict())
        with torch.no_grad():
            _close(ep.full_sort_predict(batches[rank]), ref.full_sort_predict(batches[rank]), f"{what}: ep1 -> ep2")


def test_mamex_ep2_matches_single_process():
    spawn(_mamex_worker, 2)


def _mamex_catalogue_worker(rank: int, world: int, ep_size: int) -> None:
    """MAMEX with the catalogue sharded over the ranks (each encodes its share, the item table
    is all-gathered) against one process encoding everything: loss and loss terms of each
    rank's batch, gradients of the summed loss, statistics, and the unsharded evaluation."""
    from types import SimpleNamespace

    from moedist.models.mamex import MAMEX, MAMEXConfig

    n_items, n_users = 25, 12
    sizes = [4, 1, 3, 2][:world]
    g0 = torch.Generator().manual_seed(0)
    feats = {
        "complete": torch.ones(n_items, dtype=torch.bool),
        "missing": torch.rand(n_items, generator=g0) > 0.2,  # some items have no image
    }
    tables = {"image": torch.randn(n_items, 16, generator=g0), "text": torch.randn(n_items, 8, generator=g0)}
    cases = [
        ("mamex", True, True, "missing"), ("mamex", True, True, "complete"),
        ("modality_router", True, True, "complete"), ("joint_router", True, True, "missing"),
        ("mamex", False, True, "complete"), ("mamex", True, False, "missing"),
    ]
    for adapter, use_moe, use_fusion, image in cases:
        what = f"adapter={adapter} use_moe={use_moe} use_fusion={use_fusion} images={image} ep_size={ep_size}"
        item_features = SimpleNamespace(features=tables, mask={"image": feats[image], "text": feats["complete"]})

        def build(ep: int) -> MAMEX:
            torch.manual_seed(3)
            cfg = MAMEXConfig(embed_dim=8, num_experts=4, top_k=2, adapter=adapter, use_moe=use_moe,
                              use_fusion=use_fusion, fusion_dropout=0.0, ep_size=ep)
            return MAMEX(cfg, n_items=n_items, n_users=n_users, item_features=item_features).train()

        ref, sharded = build(1), build(ep_size)
        sharded.shard_catalogue(dist.group.WORLD)
        batches = _bpr_batches(sizes, n_users, n_items)
        # the reference encodes every item and back-propagates every rank's loss
        total = sum(ref.calculate_loss(b)[0] for b in batches)
        total.backward()
        with torch.no_grad():
            ref_loss, ref_parts = ref.calculate_loss(batches[rank])
        loss, parts = sharded.calculate_loss(batches[rank])
        e, z, aux = sharded.item_representations()
        assert aux.rows != slice(None) and z["text"].shape[0] == aux.rows.stop - aux.rows.start, what
        _close(loss, ref_loss, f"{what}: loss of rank {rank}")
        assert parts.keys() == ref_parts.keys()
        for k in parts:
            _close(parts[k], ref_parts[k], f"{what}: {k}")
        (loss + 0 * e.sum()).backward()
        check_grads(sharded, ref, what)
        stats, ref_stats = sharded.moe_stats(), ref.moe_stats()
        assert stats.keys() == ref_stats.keys() and stats, what
        for k in stats:
            _close(stats[k], ref_stats[k], f"{what}: {k}")
        # evaluation (no gradient) encodes the whole catalogue on every rank, without collectives
        sharded.eval()
        ref.eval()
        with torch.no_grad():
            _close(sharded.full_sort_predict(batches[rank]), ref.full_sort_predict(batches[rank]), f"{what}: scores")


@pytest.mark.parametrize("world,ep_size", [(2, 1), (3, 1), (2, 2), (4, 2)])
def test_mamex_sharded_catalogue_matches_single_process(world, ep_size):
    spawn(_mamex_catalogue_worker, world, ep_size)


# ------------------------------------------------------------------------------------ DeepSpeed


class _TinyMoENet(nn.Module):
    """Linear -> top-k MoE (sharded when ep_size > 1) -> ReLU -> dense MoE -> Linear."""

    def __init__(self, ep_size: int):
        super().__init__()
        from moedist.moe import MoELayer

        self.inp = nn.Linear(5, 8)
        self.sparse = MoELayer(in_features=8, out_features=8, num_experts=4, k=2, ep_size=ep_size)
        self.dense = MoELayer(in_features=8, out_features=6, num_experts=2, ep_size=ep_size)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h, aux1 = self.sparse(self.inp(x))
        h, aux2 = self.dense(torch.relu(h))
        return self.head(h).squeeze(-1), aux1.balance_loss + aux2.balance_loss


def _deepspeed_worker(rank: int, world: int) -> None:
    """One DeepSpeed step with ep_size=2 == one single-process Adam step.

    Rank r minimises its own mean loss L_r over its (uneven) batch. DeepSpeed averages dense
    grads over the data-parallel world (Σ_r ∇L_r / W) and expert grads over the
    expert-data-parallel group, also divided by W; expert shards already receive Σ_r ∇L_r from
    the all-to-all backward. So the reference is plain Adam on ``(1/W) Σ_r L_r``, computed in
    one process with each rank's batch. (The balance loss is per rank, as in data parallelism.)
    Adam's first step is ≈ lr·sign(g), blind to a wrong gradient scale, so eps=1.0 makes the
    step ≈ lr·g/(|g|+1); ZeRO 0 also compares the reduced gradients directly.
    """
    import deepspeed

    from moedist.moe import moe_param_groups
    from moedist.moe.checkpoint import _all_gather_experts

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the existing process group
    sizes = [5, 3]
    gen = torch.Generator().manual_seed(11)
    X, Y = torch.randn(sum(sizes), 5, generator=gen), torch.randn(sum(sizes), generator=gen)
    batches = [(X[lo : lo + n], Y[lo : lo + n]) for lo, n in zip([0, sizes[0]], sizes)]
    lr, wd, eps = 0.05, 0.01, 1.0

    def loss_of(model, x, y):
        pred, balance = model(x)
        return ((pred - y) ** 2).mean() + 0.1 * balance

    for stage in (0, 1, 2):
        torch.manual_seed(0)
        model = _TinyMoENet(ep_size=2)
        torch.manual_seed(0)
        ref = _TinyMoENet(ep_size=1)
        groups = moe_param_groups(model, lr=lr, weight_decay=wd)
        assert [g["name"] for g in groups] == ["dense", "ep_size_2"] and groups[1]["moe"]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.Adam(groups, lr=lr, weight_decay=wd, eps=eps),
            config={"train_micro_batch_size_per_gpu": sizes[rank], "gradient_accumulation_steps": 1,
                    "zero_optimization": {"stage": stage}, "steps_per_print": 10**9},
        )
        assert engine.has_moe_layers
        ref_opt = torch.optim.Adam(ref.parameters(), lr=lr, weight_decay=wd, eps=eps)
        for step in range(2):
            x, y = batches[rank]
            engine.backward(loss_of(engine, x, y))
            ref_opt.zero_grad()
            (sum(loss_of(ref, bx, by) for bx, by in batches) / world).backward()
            if stage == 0:  # the reduced grads sit in p.grad after engine.backward
                check_grads(model, ref, f"zero{stage} step {step}", reduced=True)
            engine.step()
            ref_opt.step()
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                mod = model.get_submodule(name.rsplit(".", 1)[0])
                got = _all_gather_experts(p.detach(), mod) if getattr(mod, "ep_size", 1) > 1 else p.detach()
                _close(got, ref_params[name].detach(), f"zero{stage} step {step}: {name}")
        del engine


def test_deepspeed_ep2_step_matches_single_process_adam():
    pytest.importorskip("deepspeed")
    spawn(_deepspeed_worker, 2)
