"""Exact full-ranking metrics for both evaluation protocols, chunked over items.

Two protocols (``reference/MODELS_SPEC.md`` 1.2 and 3.5):

- **Leave-one-out** (HM4SR, SASRec): one positive (``target``) per row, ranked against all
  N item ids. Column 0 (padding) is masked (as if ``-inf``); items already in the user's history
  are *not* removed unless ``history`` is given (the authors' code does not remove them,
  G-HM-12). Metrics: NDCG@K, MRR@K, Recall@K (= Hit@K with one positive), Hit@K,
  Precision@K.
- **Cold start** (MAMEX, content baselines): every user with >= 1 held-out item in the split
  ranks a candidate item set (the cold items, val ∪ test, for *both* splits: G-MX-1), with
  several positives per user. Recall@K = hits / |T_u|, NDCG@K with IDCG over
  min(K, |T_u|) positives (G-MX-10), Hit@K (>= 1 hit), Precision@K = hits / K.

Ranks are computed *exactly* by counting, for each positive, the candidates ordered ahead
of it: ``rank = 1 + #(score > s_pos) + #(tied candidates the policy puts first)``. Counting
needs no sort and no top-k, so it works chunk by chunk over the item axis with bounded
memory and gives bit-identical ranks for any chunk size (``torch.topk`` orders ties
differently on CPU and GPU, so it is not used).

Tie policy (``ties=``), each of which is a full ordering of the candidates:

- ``"pessimistic"`` (default): ties are broken *against* the positives — every tied
  non-positive is ranked first; tied positives among themselves go by column index. A
  collapsed model that scores everything equal therefore gets the worst metrics, not
  metrics that depend on item ids.
- ``"optimistic"``: tied positives go before every tied non-positive (among themselves by
  column index).
- ``"index"``: ties are broken by column index (lower index first), whatever the labels —
  what a stable descending sort would give.

With one positive these read: pessimistic = 1 + #(>) + #(== , not the target);
optimistic = 1 + #(>); index = 1 + #(>) + #(== and index < target).

NaN scores are treated as ``-inf`` so a diverged model ranks its targets last instead of
first (every comparison with NaN is False, which would otherwise give rank 1).

Every batch function returns **sums** (float64) plus a ``count`` so distributed workers
can all-reduce sums and divide once (:class:`MetricAccumulator`). Values are rounded only
for display (:meth:`MetricAccumulator.format`, or :func:`round_metrics` for HM4SR's
5-decimal early stopping).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
TIE_POLICIES: tuple[str, ...] = ("pessimistic", "optimistic", "index")
LOO_METRICS: tuple[str, ...] = ("ndcg", "mrr", "recall", "hit", "precision")
COLD_METRICS: tuple[str, ...] = ("ndcg", "recall", "hit", "precision")

# Bound on the [B, P, chunk] comparison tensors when the caller gives no chunk size.
_DEFAULT_CELLS = 1 << 24

ScoreFn = Callable[[int, int], Tensor]  # (col_start, col_end) -> scores [B, col_end - col_start]


# --------------------------------------------------------------------------------------
# core: exact ranks of several positives per row, chunk by chunk
# --------------------------------------------------------------------------------------


EVAL_RANKS = "eval_ranks.npz"  # per-run file of final ranks (see moedist.train.loop.write_eval_ranks)


def _check_ties(ties: str) -> None:
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive ints, got {ks!r}")
    return ks


def _default_chunk(batch: int, n_pos: int, n_cols: int) -> int:
    return max(1, min(n_cols, _DEFAULT_CELLS // max(1, batch * n_pos)))


def _gather_positive_scores(
    score_fn: ScoreFn, pos_cols: Tensor, *, n_columns: int, chunk_size: int
) -> Tensor:
    """First pass: the score of every positive, read from the same chunks pass 2 uses."""
    out: Tensor | None = None
    valid = pos_cols >= 0
    for start in range(0, n_columns, chunk_size):
        end = min(start + chunk_size, n_columns)
        chunk = score_fn(start, end)  # [B, end - start]
        if out is None:
            out = torch.full(pos_cols.shape, float("nan"), dtype=chunk.dtype, device=chunk.device)
        inside = valid & (pos_cols >= start) & (pos_cols < end)  # [B, P]
        rows, slots = inside.nonzero(as_tuple=True)
        out[rows, slots] = chunk[rows, pos_cols[rows, slots] - start]
    assert out is not None
    return out


def positive_ranks(
    score_fn: ScoreFn,
    pos_cols: Tensor,
    *,
    n_columns: int,
    chunk_size: int | None = None,
    ties: str = "pessimistic",
    positive_scores: Tensor | None = None,
    column_mask_fn: Callable[[int, int], Tensor | None] | None = None,
) -> Tensor:
    """Exact 1-based rank of each positive among ``n_columns`` candidate columns.

    Args:
        score_fn: ``score_fn(start, end) -> [B, end - start]`` scores of columns
            ``start:end``. Called once per chunk (twice when ``positive_scores`` is None:
            a first pass reads the positives' own scores).
        pos_cols: ``[B, P]`` int64 column index of each positive; ``-1`` = no positive in
            this slot. Positives of one row must be distinct.
        n_columns: number of candidate columns.
        chunk_size: columns per chunk (any value >= 1; it need not divide ``n_columns``).
        ties: tie policy, see the module docstring.
        positive_scores: ``[B, P]`` scores of the positives, if the caller has them. They
            must equal what ``score_fn`` gives for those columns for exact equality with
            the unchunked computation.
        column_mask_fn: ``(start, end) -> BoolTensor[B, end - start] | None``; True =
            column removed from the candidates (never counted ahead of a positive, the
            same as scoring it ``-inf`` except that it cannot tie with a ``-inf``
            positive). A row's own positives are never removed.

    Returns:
        ``[B, P]`` int64 ranks, 0 where ``pos_cols == -1``.
    """
    _check_ties(ties)
    if pos_cols.dim() != 2:
        raise ValueError(f"pos_cols must be [B, P], got shape {tuple(pos_cols.shape)}")
    batch, n_pos = pos_cols.shape
    if chunk_size is None:
        chunk_size = _default_chunk(batch, n_pos, n_columns)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if positive_scores is None:
        positive_scores = _gather_positive_scores(
            score_fn, pos_cols, n_columns=n_columns, chunk_size=chunk_size
        )
    neg_inf = float("-inf")
    # NaN -> -inf only: nan_to_num's defaults would also turn a real +-inf into the largest
    # finite float, tying it with an item that really scores that much
    pos_s = torch.nan_to_num(positive_scores, nan=neg_inf, posinf=float("inf"), neginf=neg_inf)  # [B, P]
    valid = pos_cols >= 0
    ahead = torch.zeros(pos_cols.shape, dtype=torch.long, device=pos_cols.device)  # [B, P]
    for start in range(0, n_columns, chunk_size):
        end = min(start + chunk_size, n_columns)
        s = torch.nan_to_num(score_fn(start, end), nan=neg_inf, posinf=float("inf"), neginf=neg_inf)  # [B, c]
        cols = torch.arange(start, end, device=s.device)  # [c]
        is_self = pos_cols[:, :, None] == cols  # [B, P, c]: column c is positive p itself
        is_pos = is_self.any(dim=1)  # [B, c]: column is one of the row's positives
        removed = column_mask_fn(start, end) if column_mask_fn is not None else None
        s3 = s[:, None, :]  # [B, 1, c]
        p3 = pos_s[:, :, None].to(s.dtype)  # [B, P, 1]
        # the positive's own column never counts, even if score_fn recomputed it slightly
        # differently from positive_scores
        count = (s3 > p3) & ~is_self
        eq = s3 == p3
        if ties == "index":
            count |= eq & (cols < pos_cols[:, :, None])
        elif ties == "optimistic":
            count |= eq & is_pos[:, None, :] & (cols < pos_cols[:, :, None])
        else:  # pessimistic: tied non-positives first, tied positives by index
            count |= eq & (~is_pos[:, None, :] | (cols < pos_cols[:, :, None]))
        if removed is not None:
            # removed columns are not candidates at all (not merely scored -inf, which
            # would still tie with a -inf positive)
            count &= ~(removed & ~is_pos)[:, None, :]
        ahead += count.sum(dim=2)
    return torch.where(valid, ahead + 1, torch.zeros_like(ahead))


# --------------------------------------------------------------------------------------
# leave-one-out (one positive per row, all N items)
# --------------------------------------------------------------------------------------


def _loo_mask_fn(
    batch: int,
    *,
    mask_padding: bool,
    history: Tensor | None,
    device: torch.device,
) -> Callable[[int, int], Tensor | None] | None:
    """Column-removal mask: padding column 0 and, optionally, the user's history.

    ``history`` is either a BoolTensor ``[B, N]`` (True = remove) or an int64 ``[B, H]`` of
    item ids padded with 0 (e.g. ``item_seq``).
    """
    if not mask_padding and history is None:
        return None

    def mask_fn(start: int, end: int) -> Tensor | None:
        m = torch.zeros(batch, end - start, dtype=torch.bool, device=device)
        if mask_padding and start == 0:
            m[:, 0] = True
        if history is not None:
            if history.dtype == torch.bool:
                m |= history[:, start:end].to(device)
            else:
                h = history.to(device)
                inside = (h >= start) & (h < end) & (h != 0)  # [B, H]
                rows, slots = inside.nonzero(as_tuple=True)
                m[rows, h[rows, slots] - start] = True
        return m

    return mask_fn


def full_sort_ranks(
    scores: Tensor,
    targets: Tensor,
    *,
    ties: str = "pessimistic",
    mask_padding: bool = True,
    history: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Rank ``[B]`` of each row's ``target`` in ``scores [B, N]`` (leave-one-out).

    Column 0 is removed (as if scored ``-inf``) when ``mask_padding``; ``history`` (off by default, as
    in the authors' code) additionally removes the user's past items — never the target
    itself, so a repeated item stays rankable.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"need scores [B, N] and targets [B], got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    return chunked_full_sort_ranks(
        lambda a, b: scores[:, a:b],
        targets,
        n_items=scores.shape[1],
        chunk_size=chunk_size,
        ties=ties,
        mask_padding=mask_padding,
        history=history,
        target_scores=scores.gather(1, targets[:, None].to(scores.device))[:, 0],
    )


def chunked_full_sort_ranks(
    score_fn: ScoreFn,
    targets: Tensor,
    *,
    n_items: int,
    chunk_size: int | None = None,
    ties: str = "pessimistic",
    mask_padding: bool = True,
    history: Tensor | None = None,
    target_scores: Tensor | None = None,
) -> Tensor:
    """:func:`full_sort_ranks` with the scores produced chunk by chunk.

    ``score_fn(start, end)`` returns ``[B, end - start]`` scores of item ids
    ``start:end`` (e.g. ``lambda a, b: user_emb @ item_emb[a:b].T``). Without
    ``target_scores`` a first pass over the chunks reads the targets' scores, so the
    result equals the unchunked one exactly whatever ``chunk_size``.
    """
    targets = targets.long()
    if mask_padding and bool((targets == 0).any()):
        raise ValueError("a target is item 0 (padding), which mask_padding removes")
    ranks = positive_ranks(
        score_fn,
        targets[:, None],
        n_columns=n_items,
        chunk_size=chunk_size,
        ties=ties,
        positive_scores=None if target_scores is None else target_scores[:, None],
        column_mask_fn=_loo_mask_fn(
            targets.shape[0], mask_padding=mask_padding, history=history, device=targets.device
        ),
    )
    return ranks[:, 0]


def loo_metric_values(ranks: Tensor, *, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Tensor]:
    """Per-sample one-positive metrics from ``ranks [B]`` (1-based), float64 ``[B]`` each.

    NDCG@K = 1/log2(rank+1), MRR@K = 1/rank, Recall@K = Hit@K = [rank <= K],
    Precision@K = [rank <= K]/K — each 0 when rank > K.
    """
    ks = _check_ks(ks)
    r = ranks.to(torch.float64)
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = (r <= k).to(torch.float64)
        out[f"ndcg@{k}"] = hit / torch.log2(r + 1.0)
        out[f"mrr@{k}"] = hit / r
        out[f"recall@{k}"] = hit
        out[f"hit@{k}"] = hit
        out[f"precision@{k}"] = hit / k
    return out


def loo_metric_sums(ranks: Tensor, *, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Tensor]:
    """Per-batch sums of :func:`loo_metric_values` (float64 scalars keyed ``"ndcg@10"`` etc.)
    plus ``"count"`` (= B)."""
    out = {n: v.sum() for n, v in loo_metric_values(ranks, ks=ks).items()}
    out["count"] = torch.tensor(float(ranks.numel()), dtype=torch.float64, device=ranks.device)
    return out


def full_sort_metric_sums(
    scores: Tensor,
    targets: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "pessimistic",
    mask_padding: bool = True,
    history: Tensor | None = None,
) -> dict[str, Tensor]:
    """Leave-one-out metric sums for one batch of ``scores [B, N]`` and ``targets [B]``."""
    ranks = full_sort_ranks(
        scores, targets, ties=ties, mask_padding=mask_padding, history=history
    )
    return loo_metric_sums(ranks, ks=ks)


# --------------------------------------------------------------------------------------
# cold start (several positives per user, candidate item set)
# --------------------------------------------------------------------------------------


def pad_item_lists(lists: Iterable[Sequence[int]], *, device: torch.device | str | None = None) -> Tensor:
    """``[[3, 7], [5]] -> tensor([[3, 7], [5, 0]])``: held-out items per user, 0-padded.

    Duplicates within a list are dropped (a user counts an item once) and ids are sorted.
    """
    rows = [sorted(set(int(i) for i in items)) for items in lists]
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), max(width, 1), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device) if device is not None else out


def candidate_columns(positives: Tensor, candidates: Tensor, *, n_items: int | None = None) -> Tensor:
    """Map item ids ``[B, P]`` (0 = none) to column indices into ``candidates`` (-1 = none).

    Raises if a positive is not a candidate: it could never be hit, which means the
    candidate set and the split disagree.
    """
    candidates = candidates.long().to(positives.device)
    size = int(max(int(candidates.max()) if candidates.numel() else 0, int(positives.max())) + 1)
    if n_items is not None:
        size = max(size, n_items)
    col_of = torch.full((size,), -1, dtype=torch.long, device=positives.device)
    col_of[candidates] = torch.arange(candidates.numel(), device=positives.device)
    cols = torch.where(positives > 0, col_of[positives], torch.full_like(positives, -1))
    if bool(((positives > 0) & (cols < 0)).any()):
        bad = positives[(positives > 0) & (cols < 0)][:5].tolist()
        raise ValueError(f"held-out items {bad} are not in the candidate set")
    return cols


def cold_start_ranks(
    scores: Tensor,
    positives: Tensor,
    *,
    candidates: Tensor,
    ties: str = "pessimistic",
    chunk_size: int | None = None,
) -> Tensor:
    """Ranks ``[B, P]`` of each user's held-out items among the candidate items.

    Args:
        scores: ``[B, N]`` scores over all items (``full_sort_predict``'s output).
        positives: ``[B, P]`` held-out item ids, 0-padded (see :func:`pad_item_lists`).
        candidates: ``[C]`` item ids ranked (the cold items, val ∪ test). The ``"index"``
            tie policy uses the position in this tensor, so pass it sorted.
    Returns:
        ``[B, P]`` ranks among the C candidates, 0 in padding slots.
    """
    cand = candidates.long().to(scores.device)
    cand_scores = scores.index_select(1, cand)  # [B, C]
    cols = candidate_columns(positives.to(scores.device), cand, n_items=scores.shape[1])
    return positive_ranks(
        lambda a, b: cand_scores[:, a:b],
        cols,
        n_columns=cand.numel(),
        chunk_size=chunk_size,
        ties=ties,
    )


def chunked_cold_start_ranks(
    score_fn: ScoreFn,
    positives: Tensor,
    *,
    candidates: Tensor,
    chunk_size: int | None = None,
    ties: str = "pessimistic",
) -> Tensor:
    """:func:`cold_start_ranks` with ``score_fn(start, end) -> [B, end - start]`` giving the
    scores of candidate *positions* ``start:end`` (i.e. items ``candidates[start:end]``)."""
    cols = candidate_columns(positives, candidates)
    return positive_ranks(
        score_fn, cols, n_columns=candidates.numel(), chunk_size=chunk_size, ties=ties
    )


def cold_start_metric_values(ranks: Tensor, *, ks: Sequence[int] = DEFAULT_KS) -> tuple[dict[str, Tensor], Tensor]:
    """Per-user multi-positive metrics from ``ranks [B, P]`` (0 = padding slot).

    Per user with |T_u| = number of nonzero ranks >= 1: Recall@K = hits/|T_u|; NDCG@K =
    Σ_hits 1/log2(rank+1) ÷ Σ_{r=1..min(K,|T_u|)} 1/log2(r+1); Hit@K = [hits >= 1];
    Precision@K = hits/K. Returns ``(values, users)``: float64 ``[B]`` per metric, and the
    ``[B]`` mask of rows that are users (rows without positives are 0 and must be skipped).
    """
    ks = _check_ks(ks)
    valid = ranks > 0  # [B, P]
    n_pos = valid.sum(dim=1).to(torch.float64)  # [B]
    users = n_pos > 0
    r = ranks.to(torch.float64)
    # discount[j] = 1/log2(j+2): the gain of rank j+1, for the ideal DCG
    width = max(max(ks), 1)
    discount = 1.0 / torch.log2(torch.arange(width, dtype=torch.float64, device=ranks.device) + 2.0)
    idcg_cum = torch.cumsum(discount, 0)  # idcg_cum[m-1] = IDCG with m positives
    out: dict[str, Tensor] = {}
    safe_n = n_pos.clamp(min=1.0)
    for k in ks:
        in_top = valid & (r <= k)  # [B, P]
        hits = in_top.sum(dim=1).to(torch.float64)  # [B]
        dcg = torch.where(in_top, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).sum(dim=1)
        ideal_m = torch.minimum(n_pos, torch.tensor(float(k), dtype=torch.float64, device=r.device))
        idcg = idcg_cum[(ideal_m.long() - 1).clamp(min=0)]
        out[f"ndcg@{k}"] = torch.where(users, dcg / idcg, torch.zeros_like(dcg))
        out[f"recall@{k}"] = torch.where(users, hits / safe_n, torch.zeros_like(hits))
        out[f"hit@{k}"] = (users & (hits > 0)).to(torch.float64)
        out[f"precision@{k}"] = torch.where(users, hits / k, torch.zeros_like(hits))
    return out, users


def cold_start_metric_sums(ranks: Tensor, *, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Tensor]:
    """Per-batch sums of :func:`cold_start_metric_values` over the rows that are users, plus
    ``"count"`` (the number of such users; rows without positives are not counted)."""
    values, users = cold_start_metric_values(ranks, ks=ks)
    out = {n: v.sum() for n, v in values.items()}
    out["count"] = users.to(torch.float64).sum()
    return out


def cold_start_metric_sums_from_scores(
    scores: Tensor,
    positives: Tensor,
    *,
    candidates: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "pessimistic",
) -> dict[str, Tensor]:
    """Cold-start metric sums for one batch of ``scores [B, N]`` over all items."""
    ranks = cold_start_ranks(scores, positives, candidates=candidates, ties=ties)
    return cold_start_metric_sums(ranks, ks=ks)


# --------------------------------------------------------------------------------------
# accumulation across batches and workers
# --------------------------------------------------------------------------------------


def metric_names(ks: Sequence[int] = DEFAULT_KS, *, protocol: str = "loo") -> list[str]:
    """The keys the batch functions return (``"count"`` excluded), in a fixed order."""
    ks = _check_ks(ks)
    if protocol not in ("loo", "cold"):
        raise ValueError(f"protocol must be 'loo' or 'cold', got {protocol!r}")
    metrics = LOO_METRICS if protocol == "loo" else COLD_METRICS
    return [f"{m}@{k}" for m in metrics for k in ks]


class MetricAccumulator:
    """Adds per-batch metric sums; divides by the summed ``count`` only at the end.

    Give ``names`` (see :func:`metric_names`) when the sums will be all-reduced: every rank
    then reduces the same vector even if it saw no batch.
    """

    def __init__(self, names: Sequence[str] | None = None):
        self._sums: dict[str, Tensor] = {}
        self._count = torch.zeros((), dtype=torch.float64)
        if names is not None:
            for n in names:
                self._sums[n] = torch.zeros((), dtype=torch.float64)

    def add(self, sums: Mapping[str, Tensor | float]) -> None:
        """Add one batch's sums (must contain ``"count"``)."""
        if "count" not in sums:
            raise KeyError("metric sums need a 'count' entry")
        names = list(sums)
        tensors = [sums[n] for n in names if isinstance(sums[n], Tensor)]
        # one device -> host copy per batch instead of one per metric
        moved = (
            iter(torch.stack([t.detach().reshape(()).to(tensors[0].device, torch.float64) for t in tensors]).cpu())
            if tensors
            else iter(())
        )
        flat = [
            next(moved) if isinstance(sums[n], Tensor) else torch.tensor(float(sums[n]), dtype=torch.float64)
            for n in names
        ]
        for name, v in zip(names, flat):
            if name == "count":
                self._count = self._count + v
            else:
                self._sums[name] = self._sums.get(name, torch.zeros((), dtype=torch.float64)) + v

    @property
    def count(self) -> float:
        return float(self._count)

    @property
    def names(self) -> list[str]:
        return list(self._sums)

    def sums(self) -> dict[str, float]:
        return {n: float(v) for n, v in self._sums.items()} | {"count": self.count}

    def to_tensor(self) -> tuple[list[str], Tensor]:
        """``(names, [len(names) + 1] float64)``: the sums then the count, for all-reduce."""
        names = sorted(self._sums)
        vec = torch.stack([self._sums[n] for n in names] + [self._count])
        return names, vec

    def load_tensor(self, names: Sequence[str], vec: Tensor) -> None:
        vec = vec.detach().to("cpu", torch.float64)
        self._sums = {n: vec[i].clone() for i, n in enumerate(names)}
        self._count = vec[len(names)].clone()

    def all_reduce(self, *, group=None, device: torch.device | str = "cpu") -> None:
        """Sum over all ranks in place (no-op without an initialised process group).

        ``device`` must suit the backend (``"cuda"`` for NCCL, ``"cpu"`` for gloo).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        names, vec = self.to_tensor()
        vec = vec.to(device)
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
        self.load_tensor(names, vec)

    def means(self) -> dict[str, float]:
        """Sum / count per metric, unrounded (NaN when nothing was counted)."""
        c = self.count
        return {n: (float(v) / c if c > 0 else math.nan) for n, v in self._sums.items()}

    def format(self, digits: int = 5) -> str:
        return "  ".join(f"{n}={v:.{digits}f}" for n, v in self.means().items())


def round_metrics(means: Mapping[str, float], digits: int = 5) -> dict[str, float]:
    """Round for display or for RecBole-style early stopping (5 decimals, spec 1.2)."""
    return {n: round(v, digits) for n, v in means.items()}


# --------------------------------------------------------------------------------------
# model-level loops (one worker's share; call MetricAccumulator.all_reduce afterwards)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_full_sort(
    model,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "pessimistic",
    mask_history: bool = False,
    device: torch.device | str | None = None,
) -> MetricAccumulator:
    """Leave-one-out evaluation of ``model.full_sort_predict`` over sequential batches.

    ``mask_history`` removes the user's earlier items from the candidates (off by default, as
    in the authors' code): ``batch["history"]`` (``[B, H]`` item ids, 0-padded: the whole
    history) when the batch has it, else ``batch["item_seq"]`` (only the last ``max_seq_len``).
    """
    acc = MetricAccumulator(metric_names(ks, protocol="loo"))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if device is not None:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            scores = model.full_sort_predict(batch)  # [B, N]
            history = batch.get("history", batch["item_seq"]) if mask_history else None
            acc.add(
                full_sort_metric_sums(
                    scores, batch["target"], ks=ks, ties=ties, history=history
                )
            )
    finally:
        model.train(was_training)
    return acc


@torch.no_grad()
def evaluate_cold_start(
    model,
    heldout: Mapping[int, Sequence[int]],
    *,
    candidates: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "pessimistic",
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> MetricAccumulator:
    """Cold-start evaluation of ``model.full_sort_predict({"user": ...})``.

    ``heldout`` maps each user of this split (this worker's share) to their held-out items;
    users with an empty list are skipped. ``candidates`` = the cold items (val ∪ test).
    """
    acc = MetricAccumulator(metric_names(ks, protocol="cold"))
    users = sorted(u for u, items in heldout.items() if len(items) > 0)
    cand = candidates.long().sort().values
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(users), batch_size):
            chunk = users[i : i + batch_size]
            user = torch.tensor(chunk, dtype=torch.long, device=device)
            positives = pad_item_lists([heldout[u] for u in chunk], device=device)
            scores = model.full_sort_predict({"user": user})  # [B, N]
            acc.add(
                cold_start_metric_sums_from_scores(
                    scores, positives, candidates=cand.to(scores.device), ks=ks, ties=ties
                )
            )
    finally:
        model.train(was_training)
    return acc
