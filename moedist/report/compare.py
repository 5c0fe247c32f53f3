"""Paired significance tests between trained runs: ``moedist compare BASELINE RUN [RUN ...]``.

Two models evaluated on the same users differ by the mean of per-user metric differences.
With a few hundred users a single test metric moves by several thousandths from noise alone,
so "beats" needs the paired spread, not two means side by side. Each run directory written
by ``moedist train`` holds ``eval_ranks.npz``: the final (best-validation) model's rank of
every held-out item, per split and user. From them this module computes, for every run
against the first (the baseline):

* the per-user metric (e.g. NDCG@10), exactly as the training summary averages it;
* the mean paired difference and the relative change;
* a paired bootstrap confidence interval of the mean difference (users resampled with
  replacement, percentile interval);
* a two-sided paired sign-flip randomisation test of "no difference": the p-value is the
  share of sign assignments of the per-user differences whose mean is at least as far from 0
  as the observed one — enumerated exactly for up to 16 users that differ, sampled otherwise
  (``(1 + hits) / (1 + resamples)``, never 0).

Runs must share dataset (by name, and by the content of its interactions table where both
runs' best checkpoints record it), protocol, the settings that change ranks
(``train.rank_ties``; ``train.mask_history`` for leave-one-out), split users and their
held-out items' count; otherwise the comparison is refused with the mismatch named. A run
whose ``metrics.jsonl`` goes on past the epochs its ``results.json`` records (resumed, and
still training or interrupted) is refused too: its ranks are those of the earlier run.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moedist.errors import DataError
from moedist.train.evaluate import EVAL_RANKS
_EXACT_MAX = 16  # sign-flip test enumerated exactly up to this many nonzero differences


@dataclass
class RunRanks:
    run_dir: str
    model: str
    dataset: str
    protocol: str
    users: np.ndarray  # [U]
    ranks: np.ndarray  # [U] or [U, P]
    # settings of config.yaml that change the ranks (train.rank_ties, train.mask_history)
    settings: dict = field(default_factory=dict)
    # sha256 of the prepared dataset's interactions table, from the best checkpoint (None: not recorded)
    data_sha: str | None = None


@dataclass
class PairedResult:
    run: str
    model: str
    metric: str
    split: str
    users: int
    mean: float  # this run's mean
    baseline_mean: float
    diff: float  # mean(run - baseline) over users
    relative: float  # diff / baseline_mean (nan when the baseline mean is 0)
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    exact: bool  # p_value enumerated over all sign assignments
    wins: int  # users where the run is better
    losses: int  # users where the baseline is better


def load_run_ranks(run_dir: str | Path, split: str = "test") -> RunRanks:
    """The per-user ranks of ``split`` written at the end of ``moedist train``."""
    from moedist.report.runs import RUN_FILES, is_run_dir, read_run

    d = Path(run_dir)
    if not d.is_dir():
        raise DataError("no such run directory", path=d)
    if not is_run_dir(d):
        raise DataError(f"not a run directory written by `moedist train` (none of {', '.join(RUN_FILES)} found)",
                        path=d)
    res_path = d / "results.json"
    try:
        results = json.loads(res_path.read_text())
    except FileNotFoundError:
        raise DataError("no results.json: the run has not finished", path=d) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"unreadable results file ({e})", path=res_path) from None
    if not isinstance(results, dict):
        raise DataError("unreadable results file (not a JSON object)", path=res_path)
    info = read_run(d)
    stale = info.stale_results()
    if stale is not None and stale[0]:
        raise DataError(f"{stale[1]}; compare it once `moedist train` has finished it", path=d)
    path = d / EVAL_RANKS
    if not path.is_file():
        raise DataError(
            f"no {EVAL_RANKS}: rerun the same `moedist train` command with --run-dir {d} to re-evaluate its "
            "best checkpoint and record the ranks (finished epochs are not retrained)",
            path=d,
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zip/npy errors come in many types
        raise DataError(f"unreadable ranks file ({e})", path=path) from None
    if f"{split}_ranks" not in arrays or f"{split}_users" not in arrays:
        raise DataError(f"holds no {split!r} split (has: {sorted(arrays)})", path=path)
    users, ranks = arrays[f"{split}_users"], arrays[f"{split}_ranks"]
    if ranks.shape[0] != users.shape[0] or ranks.ndim not in (1, 2):
        raise DataError(f"{split}_ranks has shape {ranks.shape} for {users.shape[0]} users", path=path)
    protocol = str(arrays.get("protocol", np.array(results.get("protocol", "loo"))))
    train = info.config.get("train") if isinstance(info.config.get("train"), dict) else {}
    # defaults of TrainConfig, for config files written before these settings existed
    settings = {"train.rank_ties": str(train.get("rank_ties", "pessimistic"))}
    if protocol == "loo":  # the cold-start protocol ranks a fixed candidate set whatever mask_history says
        settings["train.mask_history"] = bool(train.get("mask_history", False))
    return RunRanks(str(d), str(results.get("model", d.name)), str(results.get("dataset", "?")), protocol, users, ranks,
                    settings=settings, data_sha=_interactions_sha(info))


def _interactions_sha(info) -> str | None:
    """The sha256 of ``interactions.parquet`` (every user, held-out item and split label) of
    the data the run was trained on, as its best checkpoint records it; None when not recorded."""
    ckpt = info.best_checkpoint
    if ckpt is None:
        return None
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        return None
    files = (state.get("dataset") or {}).get("files") if isinstance(state, dict) else None
    sha = files.get("interactions.parquet") if isinstance(files, dict) else None
    return str(sha) if sha else None


def per_user_metric(rr: RunRanks, metric: str) -> np.ndarray:
    """``metric`` (e.g. ``"ndcg@10"``) for each user of ``rr``, float64 ``[U]``; users without
    held-out items (padding rows of the cold-start protocol) are dropped."""
    import torch

    from moedist.train.evaluate import cold_start_metric_values, loo_metric_values

    name, _, k = metric.partition("@")
    if not k.isdigit() or int(k) < 1:
        raise DataError(f"metric must look like 'ndcg@10', got {metric!r}")
    ranks = torch.from_numpy(rr.ranks)
    if rr.protocol == "loo":
        values, keep = loo_metric_values(ranks, ks=[int(k)]), None
    else:
        values, keep = cold_start_metric_values(ranks, ks=[int(k)])
    if metric not in values:
        raise DataError(f"unknown metric {metric!r} for the {rr.protocol} protocol (have: {', '.join(values)})")
    v = values[metric].numpy()
    return v if keep is None else v[keep.numpy()]


def _held_out_counts(rr: RunRanks) -> np.ndarray:
    return np.ones(len(rr.users), np.int64) if rr.ranks.ndim == 1 else (rr.ranks > 0).sum(1)


def check_comparable(base: RunRanks, other: RunRanks) -> None:
    def refuse(what: str) -> DataError:
        return DataError(f"cannot compare with {base.run_dir}: {what}", path=other.run_dir)

    if (base.dataset, base.protocol) != (other.dataset, other.protocol):
        raise refuse(f"dataset/protocol {other.dataset}/{other.protocol} vs {base.dataset}/{base.protocol}")
    if base.data_sha and other.data_sha and base.data_sha != other.data_sha:
        raise refuse(f"trained on different data named {base.dataset} (interactions.parquet sha256 "
                     f"{other.data_sha[:12]}… vs {base.data_sha[:12]}…): prepared with other options or seed?")
    changed = [f"{k}={other.settings.get(k)} vs {base.settings.get(k)}"
               for k in sorted(set(base.settings) | set(other.settings)) if base.settings.get(k) != other.settings.get(k)]
    if changed:
        raise refuse(f"evaluated with other settings ({', '.join(changed)}), which change the ranks themselves")
    if base.users.shape != other.users.shape or not np.array_equal(base.users, other.users):
        raise refuse(f"the evaluated users differ ({len(other.users)} vs {len(base.users)}); different splits?")
    if not np.array_equal(_held_out_counts(base), _held_out_counts(other)):
        raise refuse("users hold different numbers of held-out items; different splits?")


def sign_flip_p_value(d: np.ndarray, *, resamples: int, rng: np.random.Generator) -> tuple[float, bool]:
    """Two-sided paired randomisation test of mean(d) = 0. Returns ``(p, exact)``."""
    d = np.asarray(d, np.float64)
    nz = d[d != 0]  # zero differences are the same under every sign
    if nz.size == 0:
        return 1.0, True
    observed = abs(nz.sum())
    tol = 1e-12 * max(1.0, np.abs(nz).sum())
    if nz.size <= _EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=nz.size)))  # [2^n, n]
        return float(np.mean(np.abs(signs @ nz) >= observed - tol)), True
    hits, done, chunk = 0, 0, max(1, min(resamples, 2_000_000 // nz.size))
    while done < resamples:
        m = min(chunk, resamples - done)
        signs = rng.integers(0, 2, size=(m, nz.size)) * 2.0 - 1.0
        hits += int((np.abs(signs @ nz) >= observed - tol).sum())
        done += m
    return (1 + hits) / (1 + resamples), False


def bootstrap_ci(d: np.ndarray, *, resamples: int, confidence: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile interval of the mean of ``d`` over ``resamples`` resamples with replacement."""
    n = d.size
    means = np.empty(resamples)
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    for s in range(0, resamples, chunk):
        m = min(chunk, resamples - s)
        means[s : s + m] = d[rng.integers(0, n, size=(m, n))].mean(1)
    lo = (1.0 - confidence) / 2.0
    return float(np.quantile(means, lo)), float(np.quantile(means, 1.0 - lo))


def paired_compare(
    base: RunRanks, other: RunRanks, *, metric: str = "ndcg@10", split: str = "test", resamples: int = 10_000,
    confidence: float = 0.95, seed: int = 0,
) -> PairedResult:
    if not 0.0 < confidence < 1.0:
        raise DataError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 100:
        raise DataError(f"resamples must be >= 100, got {resamples}")
    check_comparable(base, other)
    a, b = per_user_metric(base, metric), per_user_metric(other, metric)
    d = b - a
    rng = np.random.default_rng(seed)
    lo, hi = bootstrap_ci(d, resamples=resamples, confidence=confidence, rng=rng)
    p, exact = sign_flip_p_value(d, resamples=resamples, rng=rng)
    ma, mb = float(a.mean()), float(b.mean())
    return PairedResult(
        run=other.run_dir, model=other.model, metric=metric, split=split, users=int(d.size), mean=mb, baseline_mean=ma,
        diff=mb - ma, relative=(mb - ma) / ma if ma else float("nan"), ci_low=lo, ci_high=hi, confidence=confidence,
        p_value=p, exact=exact, wins=int((d > 0).sum()), losses=int((d < 0).sum()),
    )


def compare_runs(
    run_dirs: list[str | Path], *, metric: str = "ndcg@10", split: str = "test", resamples: int = 10_000,
    confidence: float = 0.95, seed: int = 0,
) -> list[PairedResult]:
    """Every run of ``run_dirs[1:]`` against ``run_dirs[0]``."""
    if len(run_dirs) < 2:
        raise DataError("give a baseline run and at least one run to compare with it")
    base = load_run_ranks(run_dirs[0], split)
    return [
        paired_compare(base, load_run_ranks(r, split), metric=metric, split=split, resamples=resamples,
                       confidence=confidence, seed=seed)
        for r in run_dirs[1:]
    ]


def results_json(results: list[PairedResult], baseline: str) -> str:
    return json.dumps({"baseline": baseline, "comparisons": [asdict(r) for r in results]}, indent=1) + "\n"
