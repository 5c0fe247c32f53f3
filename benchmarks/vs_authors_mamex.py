"""MAMEX side by side with the authors' released code, on identical data, features and batches.

    python benchmarks/vs_authors_mamex.py --authors /path/to/MAMEX \\
        --data data/prepared/movielens-100k data/prepared/movielens-100k-split1 ... \\
        --features data/prepared/movielens-100k/features/minilm+none \\
        --out benchmarks/results/vs-authors-mamex-ml100k.json

    # equivalence and speed only, at one point of the paper's grid (experts x top-k):
    python benchmarks/vs_authors_mamex.py --authors /path/to/MAMEX --data data/prepared/movielens-100k \
        --features data/prepared/movielens-100k/features/minilm+none --max-epochs 0 --speed-steps 40 \
        --experts 8 --top-k 2 --threads 1 --out benchmarks/results/vs-authors-mamex-speed/e8-k2-t1.json

``--authors`` is a checkout of github.com/Rec4Fun/MAMEX (checked at 928b614). Its ``model.py``
(``MOME_model``, ``MoE_Layer``) and ``criterion.py`` (``BPR``, ``MSE``) are imported unmodified:
they need only torch and numpy and already take the device from their ``env``. Their training
loss is the composition in ``session.py`` ``train_epoch``, repeated here in
:class:`AuthorsMAMEX` (that file also drives their data loader and FAISS evaluation, which
are not needed: both models are evaluated with moedist's exact cold-start evaluator).

Two parts, both in one process, for every prepared dataset given (each a different item split):

1. **equivalence** (first dataset only). moedist's MAMEX is built (seeded) and every weight is
   copied into the authors' model. On ``--check-batches`` real (user, pos, neg) batches, with
   the fusion dropout off, both compute the item table, each modality's adapter output, the
   BPR, regularisation, alignment, adapter-balance and fusion-balance terms, the total loss,
   and its gradient with respect to every mapped parameter. Reported: the largest absolute
   and relative differences.
2. **training.** Both models start from those same weights and train on the same batches in the
   same order (Adam, the authors' configuration; each code with its own trainer's Adam:
   moedist's fused kernel, the authors' plain ``torch.optim.Adam``). After every
   ``--eval-every`` epochs both are evaluated on valid and test; each code keeps its best
   validation epoch (strict improvement of valid NDCG@10, the authors' rule) and stops after
   ``--patience`` evaluations without one. Per split the JSON records each code's test metrics
   at its best epoch, the paired per-user comparison of those two checkpoints, and each code's
   seconds per training step. ``summary`` compares the codes over the splits (the independent
   units; sign-flip test over the split-level differences). Each code's fusion dropout draws
   from its own random stream, so the two runs are two samples of the same process, not bitwise
   twins. Each finished split is written (atomically) to ``--out``; rerunning the same command
   skips the splits already there.

Inputs match what the authors' model expects: their item table has no padding row, so
moedist's item ``i`` is their row ``i - 1``; the user table is the same size as moedist's (row 0,
a padding user, is never read). Their model always has an image and a text branch (fusion index
0 = image, 1 = text, as moedist's default modality order): when the features have no image table
(MovieLens, Amazon Scientific), both models get the text table as their image table as well.
``MOME_model`` builds its two adapters with 4 experts and top-2 routing, moedist's defaults;
``--experts`` / ``--top-k`` compare other points of the paper's grid (experts {4, 6, 8} x
top-k {2, 3, 4}) by replacing both adapters with the authors' own ``MoE_Layer`` built with
that expert count and k (the class takes both as arguments). Their balance losses
are ``F.kl_div(p̄.log(), U)``, i.e. KL(U ‖ p̄); moedist runs ``mamex.kl_direction=code`` here
so both optimise the same objective (``--kl-direction paper`` compares the paper's direction).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import platform
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moedist.io import atomic_write_json

AUTHORS_COMMIT = "928b614bbcdf6994ae82b71c4d8bd0f4c53ae2f5"
# sha256 of the two imported files at that commit: a different version fails loudly instead
# of silently comparing against something else
AUTHORS_FILES = ("model.py", "criterion.py")


# ------------------------------------------------------------------------ the authors' model


def load_authors_modules(repo: Path) -> dict[str, types.ModuleType]:
    """Import ``model.py`` and ``criterion.py`` from a checkout, unmodified, under private names."""
    mods = {}
    for name in AUTHORS_FILES:
        path = repo / name
        if not path.is_file():
            raise SystemExit(f"{path} not found: --authors must be a checkout of github.com/Rec4Fun/MAMEX")
        spec = importlib.util.spec_from_file_location(f"_mamex_authors_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[path.stem] = mod
    for attr, stem in (("MOME_model", "model"), ("MoE_Layer", "model"), ("BPR", "criterion"), ("MSE", "criterion")):
        if not hasattr(mods[stem], attr):
            raise SystemExit(f"{repo / (stem + '.py')} has no {attr}: not the MAMEX code this script was written for")
    return mods


def file_digests(repo: Path) -> dict[str, str]:
    return {name: hashlib.sha256((repo / name).read_bytes()).hexdigest()[:16] for name in AUTHORS_FILES}


def build_authors_model(
    mods, *, n_users: int, image: torch.Tensor, text: torch.Tensor, embed_dim: int, device,
    num_experts: int = 4, top_k: int = 2,
):
    """``MOME_model`` over the real items only (moedist rows 1..N-1 become rows 0..N-2). Other
    than 4 experts / top-2, both adapters are replaced by the authors' ``MoE_Layer`` with
    ``num_experts`` and ``top_k`` (``MOME_model`` fixes the count it passes, not the layer)."""
    env = types.SimpleNamespace(args=types.SimpleNamespace(free_emb_dimension=embed_dim), device=device)
    dataset = types.SimpleNamespace(
        n_user=n_users, m_item=text.shape[0] - 1,
        feature=text[1:].numpy(), image_feat=image[1:].numpy(), text_feat=text[1:].numpy(),
    )
    net = mods["model"].MOME_model(env, dataset)
    if (num_experts, top_k) != (net.image_linear.num_experts, net.image_linear.top_k):
        layer = mods["model"].MoE_Layer
        net.image_linear = layer(net.image_feat.shape[1], embed_dim, num_experts, top_k=top_k).to(device)
        net.text_linear = layer(net.text_feat.shape[1], embed_dim, num_experts, top_k=top_k).to(device)
    return net


class AuthorsMAMEX(torch.nn.Module):
    """The authors' model behind moedist's model contract (``calculate_loss`` /
    ``full_sort_predict``), with their loss exactly as ``session.py`` ``train_epoch`` composes it."""

    def __init__(self, net, criterion, cfg):
        super().__init__()
        self.net = net
        self.bpr = criterion.BPR()
        self.align = criterion.MSE()
        self.cfg = cfg

    def loss_parts(self, batch: dict) -> tuple[torch.Tensor, dict, tuple]:
        # forward() returns (..., image_emb, text_emb, ...); session.py unpacks them as
        # (text_emb, image_emb), swapped names that do not matter: the align loss is symmetric
        user_emb, item_emb, image_emb, text_emb, moe_balance, fusion_balance = self.net()
        align = self.align(item_emb, text_emb) + self.align(item_emb, image_emb)
        bpr, reg = self.bpr(user_emb, item_emb, batch["user"], batch["pos_item"] - 1, batch["neg_item"] - 1)
        c = self.cfg
        loss = bpr + c.reg_coeff * reg + c.lambda_align * align + c.lambda_adapter * moe_balance + c.lambda_fusion * fusion_balance
        parts = {"bpr": bpr, "reg": reg, "align": align, "adapter": moe_balance, "fusion": fusion_balance}
        return loss, parts, (item_emb, text_emb, image_emb)

    def calculate_loss(self, batch: dict):
        loss, parts, _ = self.loss_parts(batch)
        return loss, {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def full_sort_predict(self, batch: dict) -> torch.Tensor:
        user_emb, item_emb = self.net()[:2]
        scores = user_emb[batch["user"]] @ item_emb.T  # (B, N-1)
        return F.pad(scores, (1, 0), value=float("-inf"))  # column 0 = moedist's padding row


def parameter_map(ours, theirs) -> list[tuple]:
    """(name, our tensor, their tensor, to_theirs) for every trainable tensor of both models;
    ``to_theirs`` maps our value (or gradient) onto their layout."""
    ident = lambda t: t  # noqa: E731
    pairs = [("user_embedding", ours.user_embedding.weight, theirs.user_emb.weight, ident)]
    for m, layer in (("image", theirs.image_linear), ("text", theirs.text_linear)):
        moe = ours.adapters.moes[m]
        pairs.append((f"{m}.gate.weight", moe.gate.proj.weight, layer.gate.weight, ident))
        pairs.append((f"{m}.gate.bias", moe.gate.proj.bias, layer.gate.bias, ident))
        for e, expert in enumerate(layer.experts):
            pairs.append((f"{m}.expert{e}.weight", moe.experts.weight, expert.weight, lambda t, e=e: t[e].T))
            pairs.append((f"{m}.expert{e}.bias", moe.experts.bias, expert.bias, lambda t, e=e: t[e]))
    for i in (0, 3):
        pairs.append((f"fusion.{i}.weight", ours.fusion_gate[i].weight, theirs.gate[i].weight, ident))
        pairs.append((f"fusion.{i}.bias", ours.fusion_gate[i].bias, theirs.gate[i].bias, ident))
    theirs_params = {id(p) for p in theirs.parameters() if p.requires_grad}
    mapped = {id(t) for _, _, t, _ in pairs}
    if theirs_params != mapped:
        raise SystemExit(f"the authors' model has {len(theirs_params - mapped)} trainable tensors this script does not map")
    ours_params = {id(p) for p in ours.parameters() if p.requires_grad}
    if ours_params != {id(o) for _, o, _, _ in pairs}:
        raise SystemExit("moedist's MAMEX has trainable tensors the authors' model lacks")
    return pairs


@torch.no_grad()
def copy_weights(pairs) -> None:
    for name, ours, theirs, to_theirs in pairs:
        src = to_theirs(ours)
        if src.shape != theirs.shape:
            raise SystemExit(f"{name}: moedist {tuple(src.shape)} vs authors {tuple(theirs.shape)}")
        theirs.copy_(src)


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, that over the largest magnitude; 0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    scale = max(a.abs().max().item(), b.abs().max().item())
    absolute = (a - b).abs().max().item()
    return absolute, (absolute / scale if scale > 0 else 0.0)


def check_equivalence(ours, authors: AuthorsMAMEX, pairs, task, batches) -> dict:
    """Same weights, fusion dropout off: every output, loss term and gradient on real batches."""
    ours.eval()
    authors.eval()
    worst: dict[str, list[float]] = {}

    def note(key, a, b):
        old = worst.get(key, [0.0, 0.0])
        worst[key] = [max(x, y) for x, y in zip(old, _diff(a, b))]

    for idx in batches:
        batch = task.make_batch(idx)
        for p in ours.parameters():
            p.grad = None
        for p in authors.parameters():
            p.grad = None
        loss_o, parts_o = ours.calculate_loss(batch)
        e, z, _ = ours.item_representations()
        loss_t, parts_t, (item_t, text_t, image_t) = authors.loss_parts(batch)
        note("item table", e[1:], item_t)
        note("text adapter", z["text"][1:], text_t)
        note("image adapter", z["image"][1:], image_t)
        for k in ("bpr", "reg", "align", "adapter", "fusion"):
            note(f"loss {k}", parts_o[k], parts_t[k])
        note("loss total", loss_o, loss_t)
        loss_o.backward()
        loss_t.backward()
        for name, o, t, to_theirs in pairs:
            go = to_theirs(o.grad) if o.grad is not None else torch.zeros_like(t)
            note("gradients", go, t.grad if t.grad is not None else torch.zeros_like(t))
    for p in list(ours.parameters()) + list(authors.parameters()):
        p.grad = None
    ours.train()
    authors.train()
    return {"batches": len(batches), "batch_size": int(len(batches[0])),
            "largest_difference": {k: {"absolute": float(f"{a:.3g}"), "relative": float(f"{r:.3g}")}
                                   for k, (a, r) in worst.items()},
            "tensors_compared": len(pairs)}


# ------------------------------------------------------------------------ training


def train_step(model, opt, batch) -> tuple[float, float]:
    """One Adam step; returns (loss, seconds)."""
    t0 = time.perf_counter()
    loss, _ = model.calculate_loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), time.perf_counter() - t0


def optimizers(models: dict, cfg, lr: float) -> dict:
    """Each code's own optimizer: moedist's trainer's (:func:`moedist.train.distributed.make_adam`,
    fused Adam unless ``train.fused_adam=false``) and the authors' ``session.py`` one (plain
    ``torch.optim.Adam``), both at ``lr``."""
    from moedist.train.distributed import make_adam

    return {"moedist": make_adam([{"params": list(models["moedist"].parameters())}], cfg),
            "authors": torch.optim.Adam(models["authors"].parameters(), lr=lr)}


def time_steps(ours, authors, task, args, cfg) -> dict:
    """Seconds per training step of each code on the same batches, alternating step by step so
    both see the same machine load; from copies of the current weights (training is not
    affected). Median over ``--speed-steps`` steps after 3 warm-up steps each."""
    import copy

    models = {"moedist": copy.deepcopy(ours).train(), "authors": copy.deepcopy(authors).train()}
    opts = optimizers(models, cfg, args.lr)
    rng = np.random.default_rng(args.seed)
    batches = list(task.global_batches(rng, args.batch_size))
    times: dict[str, list[float]] = {who: [] for who in models}
    for step in range(args.speed_steps + 3):
        batch = task.make_batch(batches[step % len(batches)])
        for who, model in models.items():
            seconds = train_step(model, opts[who], batch)[1]
            if step >= 3:
                times[who].append(seconds)
    med = {who: float(np.median(v)) for who, v in times.items()}
    return {"steps": args.speed_steps, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "median_seconds_per_step": med, "authors_over_moedist": med["authors"] / med["moedist"]}


def evaluate_both(models: dict, task, ctx, batch_size: int) -> tuple[dict, dict]:
    from moedist.train.loop import evaluate_split

    metrics: dict = {}
    ranks: dict = {who: {} for who in models}
    for split in ("valid", "test"):
        metrics[split] = {who: evaluate_split(m, task, split, ctx, batch_size, ranks_out=ranks[who])
                          for who, m in models.items()}
    return metrics, ranks


def paired_test(ranks_o: torch.Tensor, ranks_t: torch.Tensor, seed: int) -> dict:
    """Per-user test metrics of two checkpoints on the same users (moedist − authors)."""
    from moedist.report.compare import bootstrap_ci, sign_flip_p_value
    from moedist.train.evaluate import cold_start_metric_values

    vo, keep = cold_start_metric_values(ranks_o, ks=(10, 20))
    vt, _ = cold_start_metric_values(ranks_t, ks=(10, 20))
    rng = np.random.default_rng(seed)
    out = {}
    for metric in ("ndcg@10", "recall@20"):
        d = (vo[metric] - vt[metric])[keep].numpy()
        lo, hi = bootstrap_ci(d, resamples=10_000, confidence=0.95, rng=rng)
        p, _ = sign_flip_p_value(d, resamples=100_000, rng=rng)
        out[metric] = {"mean_diff": float(d.mean()), "ci95": [lo, hi], "p_value": p, "users": int(d.size)}
    return out


def train_split(ours, authors, task, args, cfg) -> dict:
    """Train both on the same batches until each has spent its patience; see the module doc."""
    from moedist.train.loop import DistContext

    ctx = DistContext()
    models = {"moedist": ours, "authors": authors}
    opts = optimizers(models, cfg, args.lr)
    best = {who: {"valid": -math.inf, "epoch": None, "test": None, "ranks": None} for who in models}
    waited = {who: 0 for who in models}
    secs = {who: 0.0 for who in models}
    steps = 0
    curve = []
    epoch = -1
    for epoch in range(args.max_epochs):
        ours.train()
        authors.train()
        torch.manual_seed(args.seed + epoch)
        rng = np.random.default_rng(args.seed + epoch)
        losses = {who: 0.0 for who in models}
        n = 0
        for idx in task.global_batches(rng, args.batch_size):
            batch = task.make_batch(idx)
            for who, model in models.items():
                value, seconds = train_step(model, opts[who], batch)
                secs[who] += seconds
                if not math.isfinite(value):
                    raise SystemExit(f"epoch {epoch}: {who} loss is {value}")
                losses[who] += value
            n += 1
        steps += n
        if epoch % args.eval_every:
            continue
        metrics, ranks = evaluate_both(models, task, ctx, args.eval_batch_size)
        row = {"epoch": epoch, "train_loss": {k: v / n for k, v in losses.items()}}
        for who in models:
            v = metrics["valid"][who][args.select]
            row[who] = {"valid": v, "test": metrics["test"][who][args.select]}
            if v > best[who]["valid"]:  # strict, as both codes' early stopping
                best[who] = {"valid": v, "epoch": epoch, "test": metrics["test"][who], "ranks": ranks[who]["test"]}
                waited[who] = 0
            else:
                waited[who] += 1
        curve.append(row)
        print(f"  epoch {epoch}: valid {args.select} moedist {row['moedist']['valid']:.4f} authors "
              f"{row['authors']['valid']:.4f} | test moedist {row['moedist']['test']:.4f} authors "
              f"{row['authors']['test']:.4f} | s/step moedist {secs['moedist'] / steps:.3f} "
              f"authors {secs['authors'] / steps:.3f}", flush=True)
        if all(w >= args.patience for w in waited.values()):
            break
    return {
        "epochs_trained": epoch + 1,
        "best_epoch": {who: best[who]["epoch"] for who in models},
        "valid_at_best": {who: best[who]["valid"] for who in models},
        "test_at_best": {who: {k: best[who]["test"][k] for k in ("ndcg@10", "ndcg@20", "recall@10", "recall@20")}
                         for who in models},
        "paired_at_best": paired_test(best["moedist"]["ranks"], best["authors"]["ranks"], args.seed),
        "seconds_per_step": {who: secs[who] / max(steps, 1) for who in models},
        "curve": curve,
    }


def summarize(splits: dict, select: str) -> dict:
    """Over the splits: mean test metrics at each code's best epoch and a sign-flip test over the
    split-level differences (exact for up to 20 splits); with the per-epoch curves, the same
    comparison of the selection metric over every evaluated epoch (per-split means tested)."""
    from moedist.report.compare import sign_flip_p_value

    rows = list(splits.values())
    out: dict = {"splits": len(rows)}
    for metric in ("ndcg@10", "ndcg@20", "recall@10", "recall@20"):
        o = np.array([r["test_at_best"]["moedist"][metric] for r in rows])
        t = np.array([r["test_at_best"]["authors"][metric] for r in rows])
        p, exact = sign_flip_p_value(o - t, resamples=100_000, rng=np.random.default_rng(0))
        out[f"test {metric}"] = {"moedist": float(o.mean()), "authors": float(t.mean()), "mean_diff": float((o - t).mean()),
                                 "splits_moedist_ahead": int((o > t).sum()), "splits_authors_ahead": int((o < t).sum()),
                                 "p_value": p, "exact": exact}
    if rows and all(r.get("curve") for r in rows):
        # every evaluated epoch, not only the selected one: a difference between the two
        # models shows here too; one made by which epoch validation picks does not
        for split in ("test", "valid"):
            per_split = [np.array([e["moedist"][split] - e["authors"][split] for e in r["curve"]]) for r in rows]
            d = np.concatenate(per_split)
            means = np.array([x.mean() for x in per_split])
            p, exact = sign_flip_p_value(means, resamples=100_000, rng=np.random.default_rng(0))
            out[f"{split} {select} over all evaluated epochs"] = {
                "mean_diff": float(d.mean()), "evaluations": int(d.size),
                "moedist_ahead": int((d > 0).sum()), "authors_ahead": int((d < 0).sum()),
                "split_mean_diff_p_value": p, "exact": exact}
    vo = np.array([r["valid_at_best"]["moedist"] for r in rows])
    vt = np.array([r["valid_at_best"]["authors"] for r in rows])
    out[f"valid {select} at best"] = {"moedist": float(vo.mean()), "authors": float(vt.mean())}
    so = np.array([r["seconds_per_step"]["moedist"] for r in rows])
    st = np.array([r["seconds_per_step"]["authors"] for r in rows])
    out["seconds_per_step"] = {"moedist": float(so.mean()), "authors": float(st.mean()),
                               "authors_over_moedist": float((st / so).mean())}
    return out


# ------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", type=Path, required=True, help="checkout of github.com/Rec4Fun/MAMEX")
    p.add_argument("--data", nargs="+", required=True, help="prepared datasets, one per item split")
    p.add_argument("--features", required=True, help="features folder (moedist extract), shared by the splits")
    p.add_argument("--out", type=Path, required=True, help="JSON results; finished splits are skipped on rerun")
    p.add_argument("--max-epochs", type=int, default=1000, help="cap per split (0 = the equivalence check only)")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (the authors' code: 10)")
    p.add_argument("--patience", type=int, default=20, help="evaluations without a better valid metric")
    p.add_argument("--select", default="ndcg@10", help="validation metric both codes select on")
    p.add_argument("--check-batches", type=int, default=3)
    p.add_argument("--speed-steps", type=int, default=30,
                   help="time this many alternating steps of each code on the first dataset (0 = skip)")
    p.add_argument("--check-batch-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the authors' runs: 1)")
    p.add_argument("--experts", type=int, default=4, help="experts per modality adapter (the authors' model: 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per item (the authors' model: 2)")
    p.add_argument("--kl-direction", choices=("code", "paper"), default="code",
                   help="moedist's balance-loss direction (the authors' code computes KL(U || p̄) = 'code')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    from moedist.data.dataset import PreparedDataset
    from moedist.features.store import ItemFeatures, load_item_features
    from moedist.train.cli import load_experiment_config
    from moedist.train.loop import build_model, build_task

    repo = args.authors.resolve()
    mods = load_authors_modules(repo)
    out = args.out
    result = json.loads(out.read_text()) if out.is_file() else {}
    settings = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "threads": args.threads,
                "eval_every": args.eval_every, "patience": args.patience, "select": f"valid {args.select}",
                "kl_direction": args.kl_direction, "experts": args.experts, "top_k": args.top_k}
    old = result.get("settings", {})
    changed = sorted(k for k in settings if k in old and old[k] != settings[k])
    if changed and result.get("splits"):
        raise SystemExit(f"{out} holds splits run with other settings ({', '.join(changed)}): "
                         "give another --out, or remove the file to start over")
    if changed:  # no split yet, but the equivalence and speed checks there ran under the old settings: redo them
        result.pop("equivalence", None)
        result.pop("speed", None)
    result.update({
        "authors_code": {"repo": "github.com/Rec4Fun/MAMEX", "checked_at": AUTHORS_COMMIT, "files_sha256": file_digests(repo)},
        "features": str(args.features),
        "settings": settings,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    })
    splits = result.setdefault("splits", {})
    for k, data_dir in enumerate(args.data):
        cfg = load_experiment_config("mamex", None, [
            f"data={data_dir}", f"features={args.features}", "mamex.modalities=[image,text]",
            f"mamex.kl_direction={args.kl_direction}", f"train.lr={args.lr}",
            f"mamex.num_experts={args.experts}", f"mamex.top_k={args.top_k}",
        ])
        if (cfg.mamex.adapter, cfg.mamex.use_moe) != ("mamex", True):
            raise SystemExit("the authors' model has one MoE per modality (mamex.adapter=mamex, use_moe=true)")
        data = PreparedDataset(cfg.data)
        name = Path(data_dir).name
        if name in splits:
            print(f"{name}: done already ({out})", flush=True)
            continue
        feats = load_item_features(args.features, n_items=data.n_items, items=data.items, data_dir=data.path)
        if "text" not in feats.features:
            raise SystemExit(f"{args.features} has no text features")
        tables = dict(feats.features)
        image_is_text = "image" not in tables
        if image_is_text:
            tables["image"] = tables["text"]
        masks = {m: feats.mask.get(m, feats.mask["text"]) for m in ("image", "text")}
        if not all(bool(masks[m][1:].all()) for m in masks):
            raise SystemExit(f"{args.features}: some items lack a modality; the authors' model has no missing-modality handling")
        features = ItemFeatures({m: tables[m] for m in ("image", "text")}, masks)
        task = build_task(cfg, data)
        torch.manual_seed(args.seed)
        ours = build_model(cfg, data, features).to(device)
        net = build_authors_model(mods, n_users=data.n_users + 1, image=tables["image"], text=tables["text"],
                                  embed_dim=cfg.mamex.embed_dim, device=device,
                                  num_experts=args.experts, top_k=args.top_k)
        authors = AuthorsMAMEX(net, mods["criterion"], cfg.mamex)
        pairs = parameter_map(ours, net)
        copy_weights(pairs)
        print(f"{name}: {data.n_items} items, {task.n_train()} training interactions, "
              f"{len(task.candidates)} cold candidates", flush=True)
        if "equivalence" not in result:
            rng = np.random.default_rng(args.seed)
            perm = rng.permutation(task.n_train())
            task._triples = task.cold.epoch_triples(rng)
            batches = [perm[i * args.check_batch_size : (i + 1) * args.check_batch_size] for i in range(args.check_batches)]
            result["equivalence"] = {"data": name, **check_equivalence(ours, authors, pairs, task, batches)}
            copy_weights(pairs)  # unchanged, but make the starting point explicit
            print(json.dumps(result["equivalence"], indent=2), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out, result, indent=2)
        if args.speed_steps and "speed" not in result:
            result["speed"] = {"data": name, **time_steps(ours, authors, task, args, cfg)}
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out, result, indent=2)
            print(json.dumps(result["speed"], indent=2), flush=True)
        if args.max_epochs == 0:  # equivalence (and speed) only
            break
        t0 = time.time()
        row = train_split(ours, authors, task, args, cfg)
        row.update({"data": str(data_dir), "image_features": "text (none extracted)" if image_is_text else "image",
                    "n_items": data.n_items, "cold_candidates": int(len(task.candidates)),
                    "train_interactions": task.n_train(), "seconds": round(time.time() - t0, 1)})
        splits[name] = row
        result["summary"] = summarize(splits, args.select)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result, indent=2)
        t = row["test_at_best"]
        print(f"{name}: best epochs {row['best_epoch']} | test {args.select} moedist {t['moedist'][args.select]:.4f} "
              f"authors {t['authors'][args.select]:.4f} | {row['seconds']:.0f} s", flush=True)
    if splits:
        result["summary"] = summarize(splits, args.select)
        atomic_write_json(out, result, indent=2)
        print(json.dumps(result["summary"], indent=2), flush=True)


if __name__ == "__main__":
    main()
