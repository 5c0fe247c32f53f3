"""Batched expert networks and the generic MoE layer.

:class:`LinearExperts` holds ``E`` independent ``Linear(in → out)`` experts as one stacked
weight ``[E, in, out]`` and evaluates all of them in a single einsum, or, for top-k routing,
only each token's selected experts, sorted by expert and computed in one call (a grouped
matmul, or one bmm over a padded block; no Python loop over experts either way).
:class:`MoELayer` combines it with a dense or top-k gate.

Expert parallelism
------------------
Experts are addressed by *global* index. A ``LinearExperts`` built with
``expert_offset=o, num_global_experts=G`` holds the shard of global experts ``o .. o+E-1``
(``global_expert_ids`` buffer). Initialisation draws all ``G`` experts from the RNG and keeps
this shard's slice, so with the same seed a run sharded over ``ep_size`` ranks starts from
exactly the same weights as an unsharded one, and checkpoints can be keyed by global expert
index (``moe/checkpoint.py``).

``ep_size`` is a property of the layer: ``LinearExperts(num_experts=E, ..., ep_size=P)`` (and
``MoELayer(..., ep_size=P)``) holds only its ep rank's slice of the E global experts
(``moe/parallel.py``: E // P each, the first E % P ranks one more) on the expert-parallel group
(``ep_group``, default: consecutive ranks, see ``init_expert_parallel``). The dispatch layer
(``moe/dispatch.py``) routes tokens to the owning rank with all-to-all and calls
:meth:`LinearExperts.forward_pairs` on the received rows, by local expert. The
*results* do not depend on ``ep_size``: :meth:`LinearExperts.forward` still returns every (global) expert on every token,
:meth:`LinearExperts.forward_selected` the selected experts, and gradients reach the expert
shards from the tokens of every rank of the group. With ``ep_size = 1`` (the default) there is
no communication.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedist.moe.dispatch import (
    apply_grouped,
    dense_expert_idx,
    expert_parallel_apply,
    padded_expert_rows,
    sort_pairs,
)
from moedist.moe.gates import (
    BalanceDirection,
    DenseGate,
    MoEAux,
    TopKGate,
    balance_from_sums,
    balance_token_sums,
)
from moedist.moe.parallel import ExpertParallelGroups, expert_split, init_expert_parallel, mark_expert_params


# False = the grouped_mm top-k path combines through forward_selected and elementwise autograd
# ops instead of LinearExperts._topk_grouped (benchmarks/bench_train.py compares)
FUSED_TOPK_COMBINE = True

_CPU_GROUPED_MM: bool | None = None


def cpu_grouped_mm_available() -> bool:
    """Whether this PyTorch has ``F.grouped_mm`` with a CPU float32 kernel (recent releases;
    moedist also runs on older ones, which then take the padded-bmm path). Probed once."""
    global _CPU_GROUPED_MM
    if _CPU_GROUPED_MM is None:
        try:
            y = F.grouped_mm(torch.ones(4, 4), torch.ones(2, 4, 4), offs=torch.tensor([1, 4], dtype=torch.int32))
            _CPU_GROUPED_MM = bool(y.shape == (4, 4) and float(y[0, 0]) == 4.0)
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _CPU_GROUPED_MM = False
    return _CPU_GROUPED_MM


class LinearExperts(nn.Module):
    """``E`` independent linear experts, stacked.

    Parameters: ``weight [E, in, out]``, ``bias [E, out]`` (stored input-major so the forward is
    ``x @ W_e``; expert ``e`` equals ``nn.Linear`` with ``weight = self.weight[e].T``).

    Two ways to shard:
    - ``ep_size > 1`` (or an ``ep_group``): ``num_experts`` is the *global* count; this rank
      keeps its ep rank's slice (``expert_offset`` and the local count are derived) and
      :meth:`forward` / :meth:`forward_selected` exchange tokens over the group. The
      parameters are marked for DeepSpeed (``allreduce=False, group_name="ep_size_{P}"``).
    - ``expert_offset`` / ``num_global_experts`` by hand: a static shard with no
      communication (``num_experts`` = local count).

    After construction ``num_experts`` is always the number of experts *held here*
    (``weight.shape[0]``) and ``num_global_experts`` the total.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        expert_offset: int = 0,
        num_global_experts: int | None = None,
        ep_size: int = 1,
        ep_group=None,
    ):
        super().__init__()
        if ep_group is not None:
            ep = ExpertParallelGroups.from_group(ep_group)
            if ep_size not in (1, ep.ep_size):
                raise ValueError(f"ep_size={ep_size} but ep_group has {ep.ep_size} ranks")
        else:
            ep = init_expert_parallel(ep_size)
        self.ep = ep  # this rank's expert-parallel groups (ep_size 1: none)
        self.ep_size = ep.ep_size
        if self.ep_size > 1:
            if expert_offset != 0 or num_global_experts not in (None, num_experts):
                raise ValueError("with ep_size > 1 the shard is derived: leave expert_offset / num_global_experts")
            self.experts_per_rank = expert_split(num_experts, self.ep_size)
            num_global_experts = num_experts
            expert_offset = sum(self.experts_per_rank[: ep.ep_rank])
            num_experts = self.experts_per_rank[ep.ep_rank]
        num_global_experts = num_experts if num_global_experts is None else num_global_experts
        if not 0 <= expert_offset <= num_global_experts - num_experts:
            raise ValueError(
                f"experts {expert_offset}..{expert_offset + num_experts - 1} do not fit in "
                f"{num_global_experts} global experts"
            )
        self.num_experts = num_experts
        self.num_global_experts = num_global_experts
        self.expert_offset = expert_offset
        self.in_features = in_features
        self.out_features = out_features
        # How forward_pairs runs each expert on its run of rows: "grouped_mm" (one
        # torch.nn.functional.grouped_mm over the jagged runs, no padding), "padded_bmm" (one
        # bmm over a [E, C, in] block padded to the busiest expert's count C) or "auto":
        # grouped_mm on CPU, where it is measured, when in/out rows are multiples of 16 bytes
        # (its layout rule); padded_bmm otherwise and on GPUs (grouped_mm's GPU kernels are
        # documented for bfloat16 on recent GPUs only).
        self.sorted_kernel: str = "auto"
        # forward_topk computes the selected experts only while the rows that costs (T·k, or
        # E·C with the padded block) are at most this fraction of every expert on every token
        # (E·T); that also pays for gathering the rows. Above it (k near E, or the skewed
        # routing of freshly initialised gates with the padded block) it evaluates every
        # expert. Measured on MAMEX CPU steps (README "Top-k experts"): selecting is 11-14%
        # faster at a fill of 1/2 (6 / 3, 8 / 4), every expert 4-8% faster at 2/3 and 3/4
        # (6 / 4, 4 / 3). 1.0 always selects (tests).
        self.grouped_max_fill = 0.6
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        # Not persistent: checkpoints store tensors keyed by global index themselves.
        self.register_buffer(
            "global_expert_ids", torch.arange(expert_offset, expert_offset + num_experts), persistent=False
        )
        self.reset_parameters()
        if self.ep_size > 1:
            mark_expert_params(
                self.parameters(), self.ep_size, ep_group=ep.ep_group, experts_per_rank=self.experts_per_rank
            )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Same init, draw for draw, as ``[nn.Linear(in, out) for _ in range(G)]``.

        nn.Linear draws kaiming_uniform(a=√5) on its ``[out, in]`` weight (= U(±1/√in)) and
        then its bias U(±1/√in); we replay that per *global* expert and keep our shard, so the
        values do not depend on how experts are sharded.
        """
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        lo, hi = self.expert_offset, self.expert_offset + self.num_experts
        for g in range(self.num_global_experts):  # init-time loop only
            w = torch.empty(self.out_features, self.in_features, device=self.weight.device)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            b = torch.empty(self.out_features, device=self.weight.device).uniform_(-bound, bound)
            if lo <= g < hi:
                self.weight[g - lo].copy_(w.T)
                if self.bias is not None:
                    self.bias[g - lo].copy_(b)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear]) -> "LinearExperts":
        """Stack existing ``nn.Linear`` modules (same shapes) into one ``LinearExperts``."""
        first = linears[0]
        experts = cls(
            num_experts=len(linears),
            in_features=first.in_features,
            out_features=first.out_features,
            bias=first.bias is not None,
        )
        with torch.no_grad():
            experts.weight.copy_(torch.stack([lin.weight.T for lin in linears]))
            if experts.bias is not None:
                experts.bias.copy_(torch.stack([lin.bias for lin in linears]))
        return experts

    def forward(self, x: Tensor) -> Tensor:
        """Every expert on every token: ``x [..., in] -> [..., E, out]`` (E global: with
        ``ep_size > 1`` dense routing, each rank computing its shard on the group's tokens)."""
        if self.ep_size > 1:
            lead = x.shape[:-1]
            flat = x.reshape(-1, self.in_features)  # (T, in)
            idx = dense_expert_idx(flat.shape[0], self.num_global_experts, device=x.device)
            return self._dispatch(flat, idx).view(*lead, self.num_global_experts, self.out_features)
        y = torch.einsum("...i,eio->...eo", x, self.weight)  # y: (..., E, out)
        if self.bias is not None:
            y = y + self.bias
        return y

    def forward_selected(self, x: Tensor, expert_idx: Tensor, *, counts: Tensor | None = None) -> Tensor:
        """The selected experts only: ``x [..., in]``, global ``expert_idx [..., k]`` ->
        ``[..., k, out]`` with ``y[..., j] = Expert_{expert_idx[..., j]}(x)``. With
        ``ep_size > 1`` each token is sent only to the ranks owning its k experts (top-k
        routing). With ``ep_size = 1`` the (token, expert) pairs are sorted by expert and all
        experts computed in one call (:meth:`forward_pairs`), so top-k of E costs about k/E
        of evaluating every expert (``counts``: the pairs per expert, when the caller has them)."""
        k = expert_idx.shape[-1]
        flat = x.reshape(-1, self.in_features)  # (T, in)
        if self.ep_size > 1:
            y = self._dispatch(flat, expert_idx.reshape(-1, k))  # (T, k, out)
            return y.view(*x.shape[:-1], k, self.out_features)
        if self.num_experts != self.num_global_experts:
            raise ValueError("forward_selected on a static shard: use ep_size instead")
        y = apply_grouped(flat, expert_idx.reshape(-1), k, self.num_experts, self.forward_pairs, counts=counts)
        return y.view(*x.shape[:-1], k, self.out_features)  # y was (T·k, out)

    def _kernel(self, x: Tensor) -> str:
        if self.sorted_kernel not in ("auto", "grouped_mm", "padded_bmm"):
            raise ValueError(f"sorted_kernel must be 'auto', 'grouped_mm' or 'padded_bmm', got {self.sorted_kernel!r}")
        if self.sorted_kernel != "auto":
            return self.sorted_kernel
        # grouped_mm needs row strides that are multiples of 16 bytes
        size = x.element_size()
        aligned = (self.in_features * size) % 16 == 0 and (self.out_features * size) % 16 == 0
        return "grouped_mm" if x.device.type == "cpu" and aligned and cpu_grouped_mm_available() else "padded_bmm"

    def forward_pairs(self, x: Tensor, rows: Tensor, counts: Tensor, position: Tensor) -> Tensor:
        """Each expert on its own (row, expert) pairs, all experts in one call (see
        ``sorted_kernel``). ``x [T, in]``; the pairs sorted by expert: sorted pair ``r`` reads
        row ``rows[r]`` of ``x``, ``counts [E]`` pairs per expert (consecutive runs); pair ``s``
        (in the caller's order) is sorted pair ``position[s]``. Returns ``[R, out]`` in the
        caller's pair order (:func:`~moedist.moe.dispatch.apply_grouped` builds the arguments)."""
        if self._kernel(x) == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)  # end of each expert's run
            y = F.grouped_mm(x.index_select(0, rows), self.weight, offs=offs)  # (R, out), sorted
            if self.bias is not None:
                y = y + self.bias.repeat_interleave(counts, dim=0, output_size=rows.shape[0])
            return y.index_select(0, position)
        src, slot, capacity = padded_expert_rows(counts, rows.shape[0])
        block = x.index_select(0, rows[src]).view(self.num_experts, capacity, x.shape[-1])  # one gather
        y = self.forward_grouped(block)  # (E, C, out)
        return y.reshape(-1, y.shape[-1]).index_select(0, slot[position])  # (R, out), pair order

    def forward_topk(self, x: Tensor, weights: Tensor, topk_idx: Tensor) -> Tensor:
        """The top-k combination ``Σ_j w_j · Expert_{topk_idx[..., j]}(x)`` -> ``[..., out]``.

        ``weights [..., E]``: combine weights over all experts, zero outside ``topk_idx
        [..., k]``. Only the selected experts are computed (:meth:`forward_selected`) while the
        rows that costs (T·k with grouped_mm, E·C with the padded block) are at most
        ``grouped_max_fill`` of every expert on every token (E·T); above that (k close to E,
        or the padded block under skewed routing) every expert is evaluated on every token,
        which is then cheaper. Same values and gradients either way. With ``ep_size > 1``
        always the expert-parallel dispatch."""
        counts = None
        if self.ep_size == 1:
            if self.num_experts != self.num_global_experts:
                raise ValueError("forward_topk on a static shard: use ep_size instead")
            k = topk_idx.shape[-1]
            T = topk_idx.numel() // k
            with torch.no_grad():
                counts = torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts)  # (E,)
                if self._kernel(x) == "grouped_mm":
                    rows = T * k
                else:  # padded to the busiest expert
                    rows = self.num_experts * (int(counts.max()) if T else 0)
            if rows > self.grouped_max_fill * self.num_experts * T:
                y = self.forward(x)  # (..., E, out)
                return torch.einsum("...e,...eo->...o", weights.to(y.dtype), y)
            if self._kernel(x) == "grouped_mm" and FUSED_TOPK_COMBINE:
                return self._topk_grouped(x, weights, topk_idx, counts)
        y = self.forward_selected(x, topk_idx, counts=counts)  # (..., k, out)
        w = weights.gather(-1, topk_idx).to(y.dtype)  # (..., k)
        # elementwise, not einsum: that becomes a bmm of T tiny [1, k] x [k, out] products
        return (w.unsqueeze(-1) * y).sum(-2)

    def _topk_grouped(self, x: Tensor, weights: Tensor, topk_idx: Tensor, counts: Tensor) -> Tensor:
        """:meth:`forward_topk` with ``ep_size = 1`` and the grouped_mm kernel, in fewer passes
        over the ``[T·k, out]`` pair outputs: the products without bias (sorted by expert),
        the weighted sum over each token's k outputs in one autograd node
        (:class:`_TopKCombine`: its backward gathers the output gradient straight into
        expert order), and the biases as one ``[T, E] @ [E, out]`` product of the kept weights
        (``Σ_j w_j b_{e_j}``). Same values and gradients as the general path."""
        k = topk_idx.shape[-1]
        flat = x.reshape(-1, self.in_features)  # (T, in)
        idx = topk_idx.reshape(-1, k)  # (T, k)
        order, position = sort_pairs(idx.reshape(-1))  # pairs sorted by expert, and back
        offs = counts.cumsum(0).to(torch.int32)  # end of each expert's run
        y_sorted = F.grouped_mm(flat.index_select(0, order // k), self.weight, offs=offs)  # (T·k, out)
        w_all = weights.reshape(-1, weights.shape[-1])  # (T, E), 0 outside the top k
        w = w_all.gather(-1, idx).to(y_sorted.dtype)  # (T, k) kept weights
        out = _TopKCombine.apply(y_sorted, w, order, position)  # (T, out)
        if self.bias is not None:  # + Σ_j w_j b_{e_j}, read from the kept weights only
            kept = torch.zeros_like(w_all, dtype=w.dtype).scatter(-1, idx, w)  # (T, E)
            out = torch.addmm(out, kept, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _dispatch(self, x: Tensor, expert_idx: Tensor) -> Tensor:
        return expert_parallel_apply(
            x, expert_idx, expert_fn=self.forward_pairs, experts_per_rank=self.experts_per_rank,
            ep_rank=self.ep.ep_rank, group=self.ep.ep_group, out_features=self.out_features,
        )

    def forward_grouped(self, x: Tensor) -> Tensor:
        """Each expert on its own block of rows: ``x [E, C, in] -> [E, C, out]`` (the padded
        form of :meth:`forward_pairs`)."""
        if self.bias is not None:
            return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)  # (E, C, out), bias fused
        return torch.bmm(x, self.weight)  # y: (E, C, out)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}, "
            f"global_experts={self.expert_offset}..{self.expert_offset + self.num_experts - 1}"
            f"/{self.num_global_experts}" + (f", ep_size={self.ep_size}" if self.ep_size > 1 else "")
        )


class _TopKCombine(torch.autograd.Function):
    """``out[t] = Σ_j w[t, j] · y_sorted[position[t·k + j]]``: each token's weighted sum of its
    k expert outputs, from the outputs in expert order (``order``: the pairs in that order,
    ``position``: its inverse). The backward writes ``dL/dy_sorted[r] = w_r · g[order[r] // k]``
    with one gather in expert order, instead of building the gradient in pair order and
    scattering it into zeros."""

    @staticmethod
    def forward(ctx, y_sorted: Tensor, w: Tensor, order: Tensor, position: Tensor) -> Tensor:
        T, k = w.shape
        yk = y_sorted.index_select(0, position).view(T, k, y_sorted.shape[-1])  # (T, k, out), pair order
        out = yk[:, 0] * w[:, :1]
        for j in range(1, k):
            out.addcmul_(yk[:, j], w[:, j : j + 1])
        ctx.save_for_backward(yk, w, order)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        yk, w, order = ctx.saved_tensors
        k = w.shape[1]
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            w_sorted = w.reshape(-1).index_select(0, order)  # (T·k,) weight of each sorted pair
            grad_y = g.index_select(0, order // k).mul_(w_sorted.unsqueeze(-1))  # (T·k, out)
        if ctx.needs_input_grad[1]:
            grad_w = (yk * g.unsqueeze(1)).sum(-1)  # (T, k)
        return grad_y, grad_w, None, None


class MoELayer(nn.Module):
    """Gate + linear experts: ``y = Σ_e w_e(gate_input) · Expert_e(x)``.

    Dense softmax gate when ``k is None``, sparse top-k gate otherwise (MAMEX: K=4, k=2).
    The gate reads ``gate_input`` (defaults to ``x``), because some MoEs route on something
    other than their expert input. ``balance`` selects the balance loss on the dense gate
    probabilities averaged over tokens: ``"paper"`` = KL(p̄‖U), ``"code"`` = KL(U‖p̄), None = 0.

    With ``ep_size = 1`` a dense gate evaluates all E experts on all tokens (one einsum); a
    top-k gate computes only each token's k experts (:meth:`LinearExperts.forward_topk`:
    sorted by expert, one call, no capacity drops), about k/E of the dense work, unless that
    would cost nearly as much as every expert; the combined output is ``Σ_j w_j y_j`` over
    the kept experts either way. With ``ep_size > 1`` the experts are sharded over the
    expert-parallel group (``ep_group``, default: consecutive ranks): a dense gate sends every
    token to every expert, a top-k gate only to the owners of its k experts; routing is
    dropless either way (``moe/dispatch.py``). Gate, balance loss and statistics are
    computed per rank on its own tokens, as in plain data parallelism; outputs and gradients
    equal ``ep_size = 1``.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        num_experts: int,
        k: int | None = None,
        gate_in_features: int | None = None,
        noise_std: float = 0.0,
        balance: BalanceDirection | None = "paper",
        bias: bool = True,
        ep_size: int = 1,
        ep_group=None,
    ):
        super().__init__()
        if balance not in ("paper", "code", None):
            raise ValueError(f"balance must be 'paper', 'code' or None, got {balance!r}")
        gate_in = in_features if gate_in_features is None else gate_in_features
        self.num_experts = num_experts
        self.k = k
        self.balance = balance
        # Top-k gates compute only the selected experts; False evaluates every expert and
        # zeroes the unselected ones (same result up to float rounding; kept for benchmarks).
        self.sparse_topk = True
        if k is None:
            self.gate: DenseGate = DenseGate(in_features=gate_in, num_experts=num_experts, noise_std=noise_std)
        else:
            self.gate = TopKGate(in_features=gate_in, num_experts=num_experts, k=k, noise_std=noise_std)
        self.experts = LinearExperts(
            num_experts=num_experts, in_features=in_features, out_features=out_features, bias=bias,
            ep_size=ep_size, ep_group=ep_group,
        )

    def forward(
        self, x: Tensor, gate_input: Tensor | None = None, *, mask: Tensor | None = None,
        balance_sums: bool = False,
    ) -> tuple[Tensor, MoEAux]:
        """x: ``[..., in]``; gate_input: ``[..., gate_in]``; mask: optional bool ``[...]`` of the
        tokens that count for the balance loss and statistics. Returns ``([..., out], aux)``.

        ``balance_sums=True`` leaves the balance loss to the caller: ``aux.balance_sums`` holds
        the differentiable token sums it is computed from (:func:`balance_token_sums`), e.g. to
        add those of other ranks first, and ``aux.balance_loss`` is 0."""
        g = self.gate(x if gate_input is None else gate_input)  # weights/probs: (..., E)
        if g.topk_idx is not None and self.sparse_topk:
            # only the k selected experts (on their owners when ep_size > 1)
            out = self.experts.forward_topk(x, g.weights, g.topk_idx)  # (..., out)
        else:
            expert_out = self.experts(x)  # (..., E, out)
            out = torch.einsum("...e,...eo->...o", g.weights.to(expert_out.dtype), expert_out)
        sums = None
        if self.balance is None:
            balance_loss = out.new_zeros(())
        else:
            sums = balance_token_sums(g.probs, mask)
            balance_loss = out.new_zeros(()) if balance_sums else balance_from_sums(*sums, direction=self.balance)
        aux = MoEAux(balance_loss, weights=g.weights, probs=g.probs, mask=mask)
        aux.balance_sums = sums if balance_sums else None
        return out, aux
