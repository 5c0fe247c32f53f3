"""Expert-parallel dispatch and combine: send each token to the ranks owning its experts.

Every rank of an expert-parallel (EP) group of size ``P`` holds a contiguous slice of the
``E`` global experts (``experts_per_rank``, see :func:`moedist.moe.parallel.expert_split`).
:func:`expert_parallel_apply` takes this rank's tokens ``x [T, in]`` and, for every token, the
global indices of the experts it must visit ``expert_idx [T, k]``, and returns those experts'
outputs ``[T, k, out]`` in the same order. Steps (all ranks of the group, in lock step):

1. sort the ``T·k`` (token, expert) pairs by global expert, hence by owning rank;
2. exchange per-expert pair counts (``all_to_all_single`` on ``[E]`` integers);
3. send the token rows (autograd ``all_to_all_single`` with variable split sizes);
4. sort the received rows by local expert and run the local experts in **one call**
   (``LinearExperts.forward_pairs``: a grouped matmul, or one bmm over a padded block);
5. send the outputs back (the reverse all-to-all) and restore the pairs' original order.

The caller combines (``Σ_j w_tj · y_tj``) on the token's own rank, so gate gradients stay local.

Routing kinds
-------------
- **top-k (sparse)**: ``expert_idx = topk_idx [T, k]``: a token reaches only the ranks that
  own one of its k experts (MAMEX adapters).
- **dense**: every token must reach every expert (HM4SR's Interactive MoE, whose gates weight
  all experts): the same exchange with ``expert_idx = arange(E)`` for every token
  (:func:`dense_expert_idx`), i.e. each rank computes its expert shard on the tokens of the
  whole EP group and returns ``[T, E, out]``, exactly what ``LinearExperts.forward`` returns
  without expert parallelism.

Capacity: **dropless**. There is no capacity factor; every (token, expert) pair is computed.
Split sizes are whatever the routing produced, so uneven batches per rank and ranks with no
tokens at all work (they still take part in every collective, with zero-length splits). Where
step 4 uses the padded block (GPUs), its price is memory ``E_local · C · in`` on the
receiving rank, C the busiest local expert's count.

Rules that keep the collectives matched (otherwise: a hang):
- every rank of the EP group calls each expert-parallel layer the same number of times, in
  the same order, with the same ``torch.is_grad_enabled()`` (evaluation included: a rank with
  no more batches must still call the model with an empty batch);
- in training, every rank back-propagates through every EP layer's output (a loss that does
  not depend on it on one rank skips that rank's all-to-all backward).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

__all__ = ["all_to_all", "dense_expert_idx", "expert_parallel_apply", "gather_rows", "gather_rows_and_sum", "shard_bounds"]


class _AllToAllSingle(Function):
    """Autograd ``all_to_all_single`` along dim 0 with variable split sizes; the backward is
    the reverse exchange. Same as ``torch.distributed.nn.functional.all_to_all_single``
    (works on gloo and NCCL), which torch 2.14 deprecates with a warning on every call."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        x = x.contiguous()
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out, ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group=None) -> Tensor:
    """Differentiable all-to-all of the rows of ``x``: ``input_splits[r]`` rows go to group rank
    ``r``; ``output_splits[r]`` rows arrive from it. Returns ``[sum(output_splits), ...]``."""
    return _AllToAllSingle.apply(x, list(output_splits), list(input_splits), group)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``range(n)``; sizes differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class _GatherRowsAndSum(Function):
    """One all-gather: every rank's rows ``x [sizes[r], d]`` concatenated in rank order, and
    the sum over ranks of a vector ``extra [L]`` (carried in padding rows of the same message).
    Backward, one all-reduce: the summed gradients of the whole result, of which each rank
    keeps its rows, and that of the sum (reduce-scatter is not available on gloo)."""

    @staticmethod
    def forward(ctx, x: Tensor, extra: Tensor, sizes: list[int], group) -> tuple[Tensor, Tensor]:
        rank = dist.get_rank(group)
        ctx.group, ctx.lo, ctx.n, ctx.total = group, sum(sizes[:rank]), sizes[rank], sum(sizes)
        width, d, n_extra = max(sizes), x.shape[1], extra.numel()
        extra_rows = -(-n_extra // d) if d else 0
        # at least float32, so that sums and counts in `extra` keep their precision
        buf = x.new_zeros((width + extra_rows, d), dtype=torch.promote_types(x.dtype, torch.float32))
        buf[: x.shape[0]] = x
        buf[width:].view(-1)[:n_extra] = extra
        parts = [torch.empty_like(buf) for _ in sizes]
        dist.all_gather(parts, buf, group=group)
        rows = torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(x.dtype)
        summed = torch.stack([part[width:].reshape(-1)[:n_extra] for part in parts]).sum(0).to(extra.dtype)
        return rows, summed

    @staticmethod
    def backward(ctx, grad_rows: Tensor, grad_sum: Tensor):
        dtype = torch.promote_types(grad_rows.dtype, torch.float32)
        flat = torch.cat([grad_rows.reshape(-1).to(dtype), grad_sum.reshape(-1).to(dtype)])
        dist.all_reduce(flat, group=ctx.group)
        d = grad_rows.shape[1]
        mine = flat[ctx.lo * d : (ctx.lo + ctx.n) * d].view(ctx.n, d).to(grad_rows.dtype)
        return mine, flat[ctx.total * d :].to(grad_sum.dtype), None, None


def gather_rows_and_sum(x: Tensor, extra: Tensor, sizes: list[int], group=None) -> tuple[Tensor, Tensor]:
    """``(rows, summed)``: every rank's ``x [sizes[r], d]`` concatenated in rank order, and
    ``Σ_r extra_r`` for a 1-D ``extra`` of the same length on every rank, in one collective
    (differentiable; one all-reduce in backward). The ranks of ``group`` call it together
    with the same ``sizes`` and, in training, all back-propagate through it."""
    if x.dim() != 2 or extra.dim() != 1:
        raise ValueError(f"gather_rows_and_sum: x must be [n, d] and extra 1-D, got {tuple(x.shape)} and {tuple(extra.shape)}")
    if x.shape[0] != sizes[dist.get_rank(group)]:
        raise ValueError(f"gather_rows_and_sum: this rank has {x.shape[0]} rows, sizes say {sizes[dist.get_rank(group)]}")
    return _GatherRowsAndSum.apply(x, extra, list(sizes), group)


def gather_rows(x: Tensor, sizes: list[int], group=None) -> Tensor:
    """Every rank's ``x [sizes[r], ...]`` concatenated in rank order (see
    :func:`gather_rows_and_sum`)."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    rows, _ = gather_rows_and_sum(flat, flat.new_zeros(0), sizes, group)
    return rows.view(-1, *x.shape[1:])


def dense_expert_idx(num_tokens: int, num_experts: int, device=None) -> Tensor:
    """``[T, E]`` index for dense routing: every token visits every expert, in global order."""
    return torch.arange(num_experts, device=device).expand(num_tokens, num_experts)


def apply_grouped(
    x: Tensor,
    expert_of_pair: Tensor,
    k: int,
    num_experts: int,
    expert_fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    *,
    counts: Tensor | None = None,
) -> Tensor:
    """Every (row, expert) pair through its expert, all experts in one ``expert_fn`` call.

    ``x [T, in]``; ``expert_of_pair [T·k]`` (int64 in ``[0, num_experts)``): pair ``s`` is row
    ``s // k`` of ``x`` sent to expert ``expert_of_pair[s]``. The pairs are sorted by expert
    (stable: pair order kept within an expert), and
    ``expert_fn(x, rows [T·k], counts [num_experts], position [T·k]) -> [T·k, out]``
    (``LinearExperts.forward_pairs``) computes each expert on its consecutive run: sorted pair
    ``r`` reads row ``rows[r]`` of ``x``, and pair ``s`` is sorted pair ``position[s]``; it
    returns the outputs in pair order, gathering ``x`` and reordering the output once each.
    ``counts`` (pairs per expert) may be passed when the caller has it. ``expert_fn`` is always
    called, also with no pairs, so the autograd graph is the same on every rank of an
    expert-parallel group.
    """
    order, position = sort_pairs(expert_of_pair)
    if counts is None:
        counts = torch.bincount(expert_of_pair, minlength=num_experts)  # (E,)
    return expert_fn(x, order // k, counts, position)  # (T·k, out), pair order


@torch.no_grad()
def sort_pairs(expert_of_pair: Tensor) -> tuple[Tensor, Tensor]:
    """``(order, position)`` for pairs ``expert_of_pair [P]``: ``order`` lists the pairs sorted
    by expert (stable: pair order kept within an expert), ``position[s]`` is pair ``s``'s index
    in that order (the inverse permutation)."""
    order = torch.argsort(expert_of_pair, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return order, position


def padded_expert_rows(counts: Tensor, n: int) -> tuple[Tensor, Tensor, int]:
    """Layout of ``n`` expert-sorted rows in a padded ``[E, C, ·]`` block (C = the largest
    count): ``(src [E·C], slot [n], C)``: block slot ``j`` holds sorted row ``src[j]`` (padding
    slots hold row 0; their outputs are never read back, so their gradient is exactly zero),
    and sorted row ``r`` sits in slot ``slot[r]``."""
    with torch.no_grad():
        capacity = int(counts.max()) if n else 0
        E = counts.numel()
        first = counts.cumsum(0) - counts  # start of each expert's run
        expert = torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=n)
        slot = expert * capacity + (torch.arange(n, device=counts.device) - first[expert])
        src = torch.zeros(E * capacity, dtype=torch.long, device=counts.device)
        src[slot] = torch.arange(n, device=counts.device)
    return src, slot, capacity


def expert_parallel_apply(
    x: Tensor,
    expert_idx: Tensor,
    *,
    expert_fn: Callable[[Tensor], Tensor],
    experts_per_rank: list[int],
    ep_rank: int,
    group,
    out_features: int,
) -> Tensor:
    """Outputs of the selected experts for each token, computed on the experts' owners.

    x:          ``[T, in]`` this rank's tokens (T may differ between ranks, and may be 0).
    expert_idx: ``[T, k]`` int64 *global* expert indices per token (k = E for dense routing).
    expert_fn:  this rank's experts on (row, local expert) pairs, with the signature
                :func:`apply_grouped` calls (``LinearExperts.forward_pairs``).
    experts_per_rank: experts held by each rank of ``group`` (sums to E, contiguous slices in
                rank order); ``ep_rank`` is this rank's index in it.
    Returns ``[T, k, out]``: ``y[t, j] = Expert_{expert_idx[t, j]}(x[t])``. Collective over
    ``group``; differentiable w.r.t. ``x`` and the experts' parameters.
    """
    T, k = expert_idx.shape
    P = len(experts_per_rank)
    E = sum(experts_per_rank)
    E_local = experts_per_rank[ep_rank]
    device = x.device

    # 1. (token, expert) pairs sorted by global expert: contiguous slices per owning rank.
    flat_e = expert_idx.reshape(-1).to(torch.int64)  # (T·k,)
    order = torch.argsort(flat_e, stable=True)  # (T·k,)
    send_x = x[order // k]  # (T·k, in): each pair's token row
    count_per_expert = torch.bincount(flat_e, minlength=E)  # (E,)

    # 2. counts: rank r receives, from every source, the counts of r's own experts.
    recv_counts = count_per_expert.new_empty(P * E_local)
    dist.all_to_all_single(recv_counts, count_per_expert, [E_local] * P, experts_per_rank, group=group)
    recv_counts = recv_counts.view(P, E_local)  # (source rank, local expert)
    owner = torch.repeat_interleave(
        torch.arange(P, device=device), torch.tensor(experts_per_rank, device=device)
    )  # (E,) ep rank owning each global expert
    send_splits = count_per_expert.new_zeros(P).index_add_(0, owner, count_per_expert).tolist()
    recv_splits = recv_counts.sum(1).tolist()

    # 3. token rows to the experts' owners (ordered by source rank, then local expert).
    recv_x = all_to_all(send_x, recv_splits, send_splits, group)  # (R, in)

    # 4. sorted by local expert, all local experts in one call.
    local_e = torch.arange(E_local, device=device).repeat(P).repeat_interleave(
        recv_counts.reshape(-1).to(device)
    )  # (R,) local expert of each received row
    y_recv = apply_grouped(recv_x, local_e, 1, E_local, expert_fn)  # (R, out)

    # 5. results back to the tokens' ranks, then undo the sort.
    y_sorted = all_to_all(y_recv, send_splits, recv_splits, group)  # (T·k, out)
    y = y_sorted.new_zeros(T * k, out_features).index_copy(0, order, y_sorted)
    return y.view(T, k, out_features)
