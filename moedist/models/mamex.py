"""MAMEX: Multi-modal Adaptive Mixture of Experts for cold-start item recommendation.

CIKM'25 (``shared/reference/papers/MAMEX_CIKM2025.md``); this file follows the code-level
spec ``shared/reference/MODELS_SPEC.md`` Part 3 and gotchas G-MX-*.

Every item, warm or cold, is represented from content alone (no item-ID embedding), which
is what lets brand-new items be scored (``M`` = number of modalities, ``d`` = embed_dim,
``N`` = item rows including the padding row 0):

1. frozen, L2-normalised features ``h_m [N, D_m]`` (buffers, never trained);
2. modality adapters ``z_m = Σ_{k∈top-k} ĝ_k(h_m) E_k(h_m)`` ``[N, d]`` — by default one
   sparse MoE per modality (K linear experts, top-k gate renormalised over the kept
   logits); balance loss KL(p̄, U) on the *dense* gate softmax averaged over all catalogue
   items (G-MX-2);
3. fusion ``α = softmax(MLP([z_1; …; z_M]))`` ``[N, M]`` (2d→d, ReLU, Dropout, d→M; a dense
   softmax, G-MX-3), ``e_i = Σ_m α_m z_m``; balance loss KL(mean α, U);
4. user ``e_u`` = free embedding, ``s_ui = e_u · e_i``.

Loss per minibatch, recomputing the whole item table (G-MX-4):
``BPR + reg_coeff·reg + λ_align·align + λ_adapter·adapter + λ_fusion·fusion``.

Missing modalities (not in the authors' data, which has none, but real catalogues do): an
item whose modality ``m`` is absent gets ``z_m = 0`` and its fusion logit for ``m`` masked
to ``-inf``, so ``α_m = 0`` and its score cannot depend on the missing row; it is left out
of ``m``'s adapter balance statistics and of ``m``'s alignment term. The padding row 0 has
no modality: ``e_0 = 0`` and it is left out of every statistic.

Launch: built by the trainer from a YAML config (``moedist train --model mamex ...``); it
only needs ``calculate_loss`` / ``full_sort_predict`` (docs/contracts.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moedist.errors import ConfigError
from moedist.models.common import Dropout, bpr_and_reg_rows, check_config, modality_table
from moedist.moe import LinearExperts, MoEAux, MoELayer, TopKGate
from moedist.moe.dispatch import gather_rows, gather_rows_and_sum, shard_bounds
from moedist.moe.gates import balance_from_sums, balance_token_sums, softmax

AdapterDesign = Literal["mamex", "joint_router", "modality_router"]


class _ItemFeatures(Protocol):
    features: dict[str, Tensor]
    mask: dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class MAMEXConfig:
    """MAMEX hyperparameters. Defaults = the authors' code (spec 3.0), except
    ``kl_direction``: the balance losses follow the paper's KL(p̄ ‖ U) by default, and
    ``kl_direction="code"`` gives the code's KL(U ‖ p̄) for comparing numbers with it."""

    embed_dim: int = 128  # d (free_emb_dimension)
    num_experts: int = 4  # K experts per adapter (hard-coded 4 in the authors' code)
    top_k: int = 2  # experts kept per item (MoE_Layer default)
    fusion_dropout: float = 0.1  # dropout inside the fusion gate MLP
    lambda_align: float = 1.0  # λ1
    lambda_adapter: float = 1.0  # λ2, expert balance
    lambda_fusion: float = 1.0  # λ3, modality balance
    reg_coeff: float = 1e-6  # λ4, on the batch's squared embedding norms (G-MX-6)
    user_init_std: float = 0.1  # user embedding ~ N(0, std²)
    # "paper" = KL(p̄ ‖ U) as Eq. 4/7 write it; "code" = KL(U ‖ p̄) as the authors'
    # F.kl_div call computes it (spec A4)
    kl_direction: Literal["paper", "code"] = "paper"
    # Figure 3: "mamex" = router + experts per modality; "modality_router" = a router per
    # modality over one shared expert set; "joint_router" = one router on the concatenated
    # modalities over one shared expert set
    adapter: AdapterDesign = "mamex"
    use_moe: bool = True  # False = "w/o MoE": one plain Linear(D_m → d) per modality
    use_align: bool = True  # False = "w/o Align"
    use_fusion: bool = True  # False = "w/o MMF": simple average of the present modalities
    modalities: tuple[str, ...] = field(default=("image", "text"))  # fusion order: image = 0
    # Expert parallelism: the adapter experts are sharded over groups of ep_size ranks and each
    # item visits only the ranks owning its top_k experts (moe/dispatch.py). 1 = replicated.
    # Needs torch.distributed with a world size divisible by ep_size.
    ep_size: int = 1
    # Data-parallel training: each worker encodes only its share of the catalogue and the item
    # table is all-gathered (MAMEX.shard_catalogue); false = every worker encodes all of it.
    shard_catalogue: bool = True

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"mamex.modalities must be non-empty and unique, got {self.modalities!r}")
        if self.kl_direction not in ("paper", "code"):
            raise ConfigError(f"mamex.kl_direction must be 'paper' or 'code', got {self.kl_direction!r}")
        if self.adapter not in ("mamex", "joint_router", "modality_router"):
            raise ConfigError(
                f"mamex.adapter must be 'mamex', 'joint_router' or 'modality_router', got {self.adapter!r}"
            )
        if self.num_experts < 1:
            raise ConfigError(f"mamex.num_experts={self.num_experts!r}: must be an integer >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"mamex.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.embed_dim < 1:
            raise ConfigError(f"mamex.embed_dim must be >= 1, got {self.embed_dim}")
        if not 0.0 <= self.fusion_dropout < 1.0:
            raise ConfigError(f"mamex.fusion_dropout must be in [0, 1), got {self.fusion_dropout}")
        if self.ep_size < 1:
            raise ConfigError(f"mamex.ep_size must be >= 1, got {self.ep_size}")
        check_config("mamex", self, nonneg=("lambda_align", "lambda_adapter", "lambda_fusion", "reg_coeff", "user_init_std"))


# --------------------------------------------------------------------------------------------
# Modality adapters (the three designs of the paper's Figure 3, plus "w/o MoE")
# --------------------------------------------------------------------------------------------


class ModalityAdapters(nn.Module):
    """Maps each modality's features ``h_m [N, D_m]`` to ``z_m [N, d]``.

    ``forward(h, present)`` returns ``(z, balance_loss, stats)``; ``present[m] [N]`` bool says
    which rows have modality ``m``. Absent rows give ``z_m = 0`` and do not count in the
    balance loss or statistics.

    Designs (``adapter``):
    - ``"mamex"``: per modality a :class:`MoELayer` (own gate, own K experts); balance loss
      summed over modalities (spec 3.2).
    - ``"modality_router"``: per modality a :class:`TopKGate`, one shared set of K experts;
      balance loss summed over the per-modality gates.
    - ``"joint_router"``: one :class:`TopKGate` reading the concatenation of all modalities
      (one routing decision per item), the same shared K experts applied to every modality
      with those weights; one balance term over items with any modality.
    Shared experts need one input width: inputs are zero-padded to ``max_m D_m`` (a no-op
    for CLIP features, where every modality has the same width). With ``use_moe=False``
    each modality gets a plain ``nn.Linear(D_m → d)`` and no balance loss.

    ``ep_size > 1`` shards every expert set over the expert-parallel group; items are sent
    only to the owners of their top-k experts, so each expert sees the items of every rank of
    its group (all of them, or each rank's share under ``MAMEX.shard_catalogue``).
    """

    def __init__(
        self,
        *,
        in_dims: dict[str, int],
        embed_dim: int,
        num_experts: int,
        top_k: int,
        adapter: AdapterDesign,
        use_moe: bool,
        kl_direction: str,
        ep_size: int = 1,
    ):
        super().__init__()
        self.modalities = tuple(in_dims)
        self.design = adapter if use_moe else "linear"
        self.kl_direction = kl_direction
        self.max_dim = max(in_dims.values())
        if self.design == "linear":
            self.linears = nn.ModuleDict({m: nn.Linear(D, embed_dim) for m, D in in_dims.items()})
        elif self.design == "mamex":
            self.moes = nn.ModuleDict(
                {
                    m: MoELayer(
                        in_features=D, out_features=embed_dim, num_experts=num_experts, k=top_k,
                        balance=kl_direction, ep_size=ep_size,
                    )
                    for m, D in in_dims.items()
                }
            )
        else:
            self.experts = LinearExperts(
                num_experts=num_experts, in_features=self.max_dim, out_features=embed_dim, ep_size=ep_size
            )
            if self.design == "modality_router":
                self.gates = nn.ModuleDict(
                    {m: TopKGate(in_features=D, num_experts=num_experts, k=top_k) for m, D in in_dims.items()}
                )
            else:  # joint_router
                self.gate = TopKGate(in_features=sum(in_dims.values()), num_experts=num_experts, k=top_k)

    def _shared_expert_out(self, h: Tensor, weights: Tensor, topk_idx: Tensor) -> Tensor:
        x = F.pad(h, (0, self.max_dim - h.shape[1]))  # x: (N, D_max)
        # only the top-k experts of each item (on their owners when ep_size > 1)
        return self.experts.forward_topk(x, weights, topk_idx)  # (N, d)

    def forward(
        self, h: dict[str, Tensor], present: dict[str, Tensor], *, complete: bool = False
    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]], dict[str, MoEAux]]:
        """``complete=True`` promises that every row has every modality (``present`` all
        true): the masking steps are then skipped, with the same result. Returns ``z``, the
        token sums ``(Σ p [K], n [1])`` of every gate's balance loss (:func:`balance_token_sums`:
        the caller adds those of other ranks when the catalogue is sharded, then takes
        :func:`balance_from_sums`), and the routing statistics."""
        z: dict[str, Tensor] = {}
        stats: dict[str, MoEAux] = {}
        sums: list[tuple[Tensor, Tensor]] = []
        if complete:
            present = {m: None for m in self.modalities}
        else:
            # Absent rows are zeroed *before* use, so nothing downstream can read them.
            h = {m: h[m] * present[m][:, None] for m in self.modalities}
        if self.design == "linear":
            for m in self.modalities:
                z[m] = self.linears[m](h[m])  # (N, d)
        elif self.design == "mamex":
            for m in self.modalities:
                z[m], aux = self.moes[m](h[m], mask=present[m], balance_sums=True)  # (N, d)
                sums.append(aux.balance_sums)
                stats[m] = aux
        elif self.design == "modality_router":
            for m in self.modalities:
                g = self.gates[m](h[m])  # weights/probs: (N, K)
                z[m] = self._shared_expert_out(h[m], g.weights, g.topk_idx)
                sums.append(balance_token_sums(g.probs, present[m]))
                stats[m] = MoEAux(g.probs.new_zeros(()), weights=g.weights, probs=g.probs, mask=present[m])
        else:  # joint_router
            any_present = None if complete else torch.stack([present[m] for m in self.modalities]).any(0)  # (N,)
            g = self.gate(torch.cat([h[m] for m in self.modalities], dim=-1))  # (N, K)
            for m in self.modalities:
                z[m] = self._shared_expert_out(h[m], g.weights, g.topk_idx)
            sums.append(balance_token_sums(g.probs, any_present))
            stats["joint"] = MoEAux(g.probs.new_zeros(()), weights=g.weights, probs=g.probs, mask=any_present)
        if not complete:
            # biases make z nonzero even for zero input: zero absent rows explicitly
            z = {m: z[m] * present[m][:, None].to(z[m].dtype) for m in self.modalities}
        return z, sums, stats


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class MAMEXAux:
    """Item-side by-products of one pass over the catalogue.

    adapter_loss: scalar, Σ_m KL balance of the adapters (0 without MoE).
    fusion_loss:  scalar, KL balance of mean α (0 without the learned fusion).
    alpha:        ``[N, M]`` fusion weights (rows of absent modalities are 0; row 0 all 0).
    adapters:     per-modality (or ``"joint"``) :class:`MoEAux`.
    align_loss:   scalar, the alignment term (:meth:`MAMEX.align_loss`; 0 without it).
    rows:         the catalogue rows that ``alpha``, ``adapters`` and the ``z`` returned beside
                  this cover: all of them, or this rank's share when the catalogue is sharded.
    """

    adapter_loss: Tensor
    fusion_loss: Tensor
    alpha: Tensor
    adapters: dict[str, MoEAux]
    align_loss: Tensor | None = None
    rows: slice = field(default_factory=lambda: slice(None))


class MAMEX(nn.Module):
    """MAMEX (spec 3.2–3.3).

    ``n_items`` = N = item rows including the padding row 0 (scores are ``[B, N]``);
    ``n_users`` = user rows including the padding row 0 (user ids index the table
    directly); ``item_features.features[m] [N, D_m]`` and ``item_features.mask[m] [N]`` for
    every ``m`` in ``config.modalities``.
    """

    def __init__(self, config: MAMEXConfig, *, n_items: int, n_users: int, item_features: _ItemFeatures | None):
        super().__init__()
        cfg = self.config = config
        self.n_items = n_items
        self.n_users = n_users
        self.modalities = cfg.modalities
        d = cfg.embed_dim

        # Frozen features as non-persistent buffers: no gradient, move with .to(device), and
        # not copied into every checkpoint (they are data, reloaded from the shards).
        in_dims: dict[str, int] = {}
        for m in self.modalities:
            table, present = modality_table(item_features, m, n_items, owner="mamex", modalities=self.modalities)
            # G-MX-7: rows are L2-normalised (zero rows stay zero: F.normalize clamps the norm)
            table = F.normalize(table, dim=-1) * present[:, None]
            self.register_buffer(f"feat_{m}", table.contiguous(), persistent=False)
            self.register_buffer(f"present_{m}", present, persistent=False)
            in_dims[m] = table.shape[1]
        # Every real item has every modality (the common case): the catalogue pass then runs
        # on rows 1.. without any masking, and row 0 (padding) is added back as zeros.
        self._complete = all(bool(self.present(m)[1:].all()) for m in self.modalities)

        self.user_embedding = nn.Embedding(n_users, d)
        nn.init.normal_(self.user_embedding.weight, std=cfg.user_init_std)
        self.adapters = ModalityAdapters(
            in_dims=in_dims, embed_dim=d, num_experts=cfg.num_experts, top_k=cfg.top_k,
            adapter=cfg.adapter, use_moe=cfg.use_moe, kl_direction=cfg.kl_direction, ep_size=cfg.ep_size,
        )
        M = len(self.modalities)
        # A single modality has nothing to fuse (α = 1): no gate and no fusion loss.
        self.learned_fusion = cfg.use_fusion and M > 1
        self.fusion_gate = (
            nn.Sequential(
                nn.Linear(M * d, d), nn.ReLU(), Dropout(cfg.fusion_dropout), nn.Linear(d, M)
            )
            if self.learned_fusion
            else None
        )
        self._last_pass: tuple | None = None
        self._item_cache: tuple[tuple, Tensor] | None = None
        self._catalogue_group = None  # shard_catalogue()

    # ---- item side --------------------------------------------------------------------

    def features(self, m: str) -> Tensor:
        """Normalised frozen features ``[N, D_m]`` of modality ``m``, in the parameters' dtype
        (a float32 buffer; bf16 training casts the parameters only)."""
        return self.get_buffer(f"feat_{m}").to(self.user_embedding.weight.dtype)

    def present(self, m: str) -> Tensor:
        """Bool ``[N]``: which rows have modality ``m`` (row 0 never)."""
        return self.get_buffer(f"present_{m}")

    def _fusion_weights(self, z: dict[str, Tensor], present: Tensor | None) -> Tensor:
        """α ``[N, M]`` from z; ``present [N, M]``, or None when every row has every modality.
        Rows with no modality get α = 0."""
        any_z = z[self.modalities[0]]
        if self.fusion_gate is None:
            # "w/o MMF" (and M = 1): plain average over the modalities the item has
            if present is None:
                return any_z.new_full((any_z.shape[0], len(self.modalities)), 1.0 / len(self.modalities))
            alpha = present.to(any_z.dtype)
            return alpha / alpha.sum(dim=1, keepdim=True).clamp(min=1.0)
        logits = self.fusion_gate(torch.cat([z[m] for m in self.modalities], dim=-1))  # (N, M)
        if present is None:
            return softmax(logits)
        # Absent modality -> -inf logit -> α_m = 0. Rows with no modality at all are left
        # unmasked (an all -inf softmax is NaN, and NaN would leak into the gradients)
        # and zeroed afterwards.
        any_present = present.any(dim=1, keepdim=True)  # (N, 1)
        keep = present | ~any_present
        alpha = softmax(logits.masked_fill(~keep, float("-inf")))
        return alpha * any_present

    def shard_catalogue(self, group) -> None:
        """Data-parallel training with the catalogue split over ``group`` (a process group, e.g.
        ``dist.group.WORLD``; None = off): in a training pass each rank encodes only its
        contiguous share of the items, the item table is all-gathered, and the catalogue-wide
        terms (adapter and fusion balance, alignment) sum over the group. Each rank's loss, and
        the gradients summed over the ranks, are those of every rank encoding the whole
        catalogue, for 1/world of the encoding work, and every item gets one fusion-dropout
        draw per step instead of one per rank. Passes without gradient (evaluation) encode the
        whole catalogue on every rank. Every rank of the group must run the same number of
        training passes and back-propagate through each (as data parallelism does anyway), and
        call :meth:`moe_stats` together."""
        self._catalogue_group = group
        self._item_cache = None

    def _shard_rows(self, first: int, group) -> tuple[slice, list[int] | None]:
        """This rank's rows of ``first..N-1`` and every rank's row count (None: unsharded)."""
        if group is None:
            return slice(first, self.n_items), None
        world = dist.get_world_size(group)
        bounds = [shard_bounds(self.n_items - first, r, world) for r in range(world)]
        lo, hi = bounds[dist.get_rank(group)]
        return slice(first + lo, first + hi), [b - a for a, b in bounds]

    def item_representations(self) -> tuple[Tensor, dict[str, Tensor], MAMEXAux]:
        """The whole catalogue: ``e [N, d]``, ``z {m: [rows, d]}`` and the balance and alignment
        terms (``aux.rows``: all rows, or this rank's share under :meth:`shard_catalogue`)."""
        present = {m: self.present(m) for m in self.modalities}
        present_nm = torch.stack([present[m] for m in self.modalities], dim=1)  # (N, M)
        items = present_nm.any(dim=1)  # real items with >= 1 modality (pad excluded)
        group = self._catalogue_group if self.training and torch.is_grad_enabled() else None
        # complete catalogue: rows 1.. (views, no copy) and no masking; row 0 is added back below
        first = 1 if self._complete else 0
        rows, sizes = self._shard_rows(first, group)
        h = {m: self.features(m)[rows] for m in self.modalities}
        present_rows = {m: p[rows] for m, p in present.items()}
        keep = None if self._complete else present_rows
        z, balance_sums, adapter_stats = self.adapters(h, present_rows, complete=self._complete)
        alpha = self._fusion_weights(z, None if self._complete else present_nm[rows])  # (rows, M)
        e = sum(alpha[:, i : i + 1] * z[m] for i, m in enumerate(self.modalities))  # (rows, d)
        real = items[rows]
        # Catalogue-wide terms from sums over rows, so that shards can add theirs up:
        # each gate's (Σ p, n), the fusion's (Σ α, n) and the alignment's (Σ (e - z_m)², n_m).
        sums = list(balance_sums)
        if self.learned_fusion:
            fused = alpha if self._complete else alpha[real]  # the real items' α
            sums.append((fused.float().sum(0), fused.new_full((1,), fused.shape[0], dtype=torch.float32)))
        if self.config.use_align:
            sums.append(self._align_sums(e, z, keep))
        if group is not None:  # one collective: every rank's rows of e, and the summed sums
            parts = [t.reshape(-1).float() for pair in sums for t in pair]
            flat = torch.cat(parts) if parts else e.new_zeros(0, dtype=torch.float32)
            e, flat = gather_rows_and_sum(e, flat, sizes, group)  # e: (N - first, d)
            pieces = flat.split([t.numel() for t in parts])
            sums = list(zip(pieces[0::2], pieces[1::2]))  # back into (sum, count) pairs
        direction = self.config.kl_direction
        n_gates = len(balance_sums)
        adapter_loss = sum((balance_from_sums(t, n, direction=direction) for t, n in sums[:n_gates]), e.new_zeros(()))
        rest = iter(sums[n_gates:])
        fusion_loss = balance_from_sums(*next(rest), direction=direction) if self.learned_fusion else e.new_zeros(())
        align = self._align_from_sums(*next(rest), e.shape[-1]) if self.config.use_align else e.new_zeros(())
        if self._complete:  # row 0 (padding) back in, all zeros
            e = F.pad(e, (0, 0, 1, 0))
            if group is None:
                alpha = F.pad(alpha, (0, 0, 1, 0))
                z = {m: F.pad(t, (0, 0, 1, 0)) for m, t in z.items()}
                rows, real = slice(None), items
        # kept, not computed: moe_stats() derives the statistics when the trainer logs them
        self._last_pass = (alpha.detach(), real, {n: a.detached() for n, a in adapter_stats.items()}, sizes, group)
        aux = MAMEXAux(adapter_loss=adapter_loss, fusion_loss=fusion_loss, alpha=alpha, adapters=adapter_stats,
                       align_loss=align, rows=rows)
        return e, z, aux

    def _align_sums(self, e: Tensor, z: dict[str, Tensor], keep: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``(Σ (e − z_m)² [M], n_m [M])`` over the rows where ``keep[m]`` (None: all rows),
        in float32 (sums over a whole catalogue)."""
        sq, n = [], []
        for m in self.modalities:
            diff = (e - z[m]).float().pow(2).sum(-1)  # (rows,)
            if keep is None:
                sq.append(diff.sum())
                n.append(diff.new_tensor(float(diff.shape[0])))
            else:
                sq.append((diff * keep[m]).sum())
                n.append(keep[m].sum().to(diff.dtype))
        return torch.stack(sq), torch.stack(n)

    @staticmethod
    def _align_from_sums(sq: Tensor, n: Tensor, d: int) -> Tensor:
        """Σ_m of the mean over (items having m) × d of (e − z_m)² (A6); a modality no item has adds 0."""
        return (sq / (n * d).clamp_min(1.0)).sum()

    def _version_key(self) -> tuple:
        # Optimiser steps and load_state_dict modify parameters in place, which bumps
        # their _version; a device move changes data_ptr. Either invalidates the cache.
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def item_embeddings(self) -> Tensor:
        """``e [N, d]``. In eval mode the table is cached until a parameter changes, so
        evaluating many user batches encodes the catalogue once."""
        if self.training:
            return self.item_representations()[0]
        key = self._version_key()
        if self._item_cache is not None and self._item_cache[0] == key:
            return self._item_cache[1]
        with torch.no_grad():
            e = self.item_representations()[0]
        self._item_cache = (key, e)
        return e

    def train(self, mode: bool = True):
        self._item_cache = None
        return super().train(mode)

    @torch.no_grad()
    def fusion_weights(self) -> Tensor:
        """α per item ``[N, M]`` (columns in ``config.modalities`` order), dropout off.
        Rows of absent modalities are 0; row 0 (padding) is all 0."""
        was_training = self.training
        self.eval()
        try:
            return self.item_representations()[2].alpha
        finally:
            self.train(was_training)

    # ---- contract ---------------------------------------------------------------------

    def calculate_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch``: ``user``, ``pos_item``, ``neg_item`` ``[B]``. Returns the total loss
        and the *unweighted* terms (detached); ablated terms are absent from ``parts``."""
        cfg = self.config
        e, z, aux = self.item_representations()  # whole catalogue, every minibatch (G-MX-4)
        e_u = self.user_embedding(batch["user"])  # (B, d)
        parts: dict[str, Tensor] = {}
        # BPR = mean softplus(s_uj − s_ui) = −ln σ(s_ui − s_uj) over the batch, with e_i, e_j
        # the rows pos_item / neg_item of e; A7/G-MX-6: reg = mean squared norms of the batch's
        # final embeddings (e_u, e_i, e_j), not weight decay. One fused pass (bpr_and_reg).
        parts["bpr"], parts["reg"] = bpr_and_reg_rows(e_u, e, batch["pos_item"], batch["neg_item"])
        loss = parts["bpr"] + cfg.reg_coeff * parts["reg"]
        if cfg.use_align:
            parts["align"] = aux.align_loss
            loss = loss + cfg.lambda_align * parts["align"]
        if cfg.use_moe:
            parts["adapter"] = aux.adapter_loss
            loss = loss + cfg.lambda_adapter * parts["adapter"]
        if self.learned_fusion:
            parts["fusion"] = aux.fusion_loss
            loss = loss + cfg.lambda_fusion * parts["fusion"]
        return loss, {k: v.detach() for k, v in parts.items()}

    def align_loss(self, e: Tensor, z: dict[str, Tensor]) -> Tensor:
        """The alignment term from whole tables ``e [N, d]``, ``z {m: [N, d]}``: Σ_m mean over
        (items having m) × d of (e − z_m)² (A6); gradient reaches both e (hence α) and z_m.
        :meth:`item_representations` computes it with the rest of the catalogue terms."""
        sums = self._align_sums(e, z, {m: self.present(m) for m in self.modalities})
        return self._align_from_sums(*sums, e.shape[-1])

    def full_sort_predict(self, batch: dict[str, Tensor]) -> Tensor:
        """``batch["user"] [B]`` -> scores ``[B, N]`` over all items (the evaluator keeps the
        cold-item columns)."""
        e_u = self.user_embedding(batch["user"])  # (B, d)
        return e_u.float() @ self.item_embeddings().float().T  # (B, N), float32 for the ranking

    def moe_stats(self) -> dict:
        """Last item pass: ``adapter.<m>.load`` / ``adapter.<m>.gate_mean`` ``[K]`` and
        ``adapter.<m>.entropy`` (:func:`~moedist.moe.routing_entropy`) per modality
        (``adapter.joint.*`` for the joint router) and ``fusion.alpha_mean.<m>`` /
        ``fusion.alpha_std.<m>`` over real items. After a sharded pass (:meth:`shard_catalogue`)
        the ranks' rows are gathered first, so every rank of the group must call it."""
        if self._last_pass is None:
            return {}
        alpha, items, adapter_stats, sizes, group = self._last_pass
        if group is not None:  # every rank's rows: the statistics are over the whole catalogue

            def whole(t: Tensor) -> Tensor:
                if t.dtype == torch.bool:  # as bytes: not every backend gathers bool
                    return gather_rows(t.to(torch.uint8), sizes, group).bool()
                return gather_rows(t, sizes, group)

            alpha, items = whole(alpha), whole(items)
            adapter_stats = {n: a.map_tokens(whole) for n, a in adapter_stats.items()}
        stats: dict[str, Tensor] = {}
        for name, aux in adapter_stats.items():
            stats[f"adapter.{name}.load"] = aux.load
            stats[f"adapter.{name}.gate_mean"] = aux.gate_mean
            stats[f"adapter.{name}.entropy"] = aux.entropy
        a = alpha[items]  # (n_items_real, M)
        for i, m in enumerate(self.modalities):
            if a.shape[0]:
                stats[f"fusion.alpha_mean.{m}"] = a[:, i].mean()
                stats[f"fusion.alpha_std.{m}"] = a[:, i].std(unbiased=False)
        return {k: v.detach().cpu() for k, v in stats.items()}
