"""HM4SR side by side with the authors' released code, on identical data, features and batches.

    python benchmarks/vs_authors_hm4sr.py --authors /path/to/HM4SR --extra-path /tmp/authors-deps \\
        --data data/prepared/movielens-100k --features data/prepared/movielens-100k/features/minilm+none \\
        --epochs 60 --patience 10 --out benchmarks/results/vs-authors-hm4sr-ml100k.json

``--authors`` is a checkout of github.com/SStarCCat/HM4SR (checked at f1c0a15). Its bundled
RecBole imports colorlog, colorama, texttable and thop; install those *beside* moedist's
environment, not into it: ``pip install --no-deps --target /tmp/authors-deps colorlog colorama
texttable thop``, then pass ``--extra-path /tmp/authors-deps``.

Two parts, both in one process:

1. **equivalence.** moedist's HM4SR is built (seeded) and every weight is copied into the
   authors' model. On ``--check-batches`` real training batches, with dropout off, both compute
   the full score matrix, CE, IDCL, CP and PCL (PCL on the same placeholder positions: the
   authors' ``random.sample`` is handed moedist's mask), the total loss, and its gradient with
   respect to every mapped parameter. Reported: the largest absolute and relative differences.
2. **training.** Both models start from those same weights and train on the same batches in the
   same order (Adam, the authors' configuration; moedist with its trainer's fused Adam), one
   epoch at a time; after each epoch both are evaluated on valid and test with moedist's exact
   full-ranking evaluator, and each code's seconds per training step are recorded, with the
   paired comparison of that epoch (``paired``: per-user NDCG on the same users, bootstrap
   interval, sign-flip p-value); ``final_paired`` repeats it after the last epoch. With
   ``--patience P`` training stops once both codes have gone P epochs without a better valid
   NDCG@20 (``--epochs`` stays the cap), and ``at_best`` compares each code at its own best
   validation epoch, which is what each code's early-stopping trainer would test. Dropout and
   PCL draw from each code's own random stream, so the two curves are two samples of the same
   process, not bitwise twins. Every epoch's result is written (atomically) to ``--out`` and
   both models' state to ``<out>.state.pt``; rerunning the same command continues after the
   last finished epoch. 3. **time input** (``--time-input-check``, after training): the last
   saved moedist weights are evaluated with exact-second and with float32-rounded times
   (``hm4sr.time_float32``, the authors' RecBole pipeline), beside the authors' model, and the
   share of interval buckets the rounding moves is counted (``time_input_check``). It also
   splits the users by whether the rounding moves the interval bucket at the last position of
   their input, and gives each group's mean paired test/valid NDCG@10 difference over the first
   and the second half of the epochs whose ranks were stored (``by_bucket_move``): a gap that
   comes from the time input should sit with the users whose input the rounding changes. 4.
   **dropout on** (``--dropout-check N``, after the above): moedist's last saved weights are
   copied into the authors' model, and both compute the training loss in train mode (dropout
   and PCL placeholders drawn afresh) ``N`` times on each of ``--dropout-check-batches``
   training batches; moedist once with exact and once with float32-rounded times. Part 1 has
   dropout off, so only this shows that the two codes drop out in the same places at the same
   rates: with the same inputs the expected losses must agree within their standard error
   (``dropout_check``). 5. **another moedist curve** (``--moedist-only --draw-seed K
   --reference <side-by-side JSON>``): moedist alone from the same initial weights on the same
   batches, with another stream of dropout and PCL draws (``--override`` settings change the
   model instead). ``against_reference`` sets its curve beside both curves of the reference
   run, epoch by epoch and over epochs 0-25 and 26 on: how far two moedist curves drift apart
   is the yardstick for the gap between moedist's and the authors' curve. ``--authors-only``
   does the same for the authors' model: another authors' curve from the same weights and
   batches, the control for how far the authors' own curve moves with its draws. Even with
   ``--draw-seed 0`` the draws are not the side-by-side run's, where both codes' steps share
   one random stream.

Adaptations of the authors' code, applied to its source text as it is loaded (each must apply
exactly as expected, so a different commit fails loudly instead of silently):

* ``.to('cuda')`` becomes the chosen device (the released code runs only on CUDA);
* the feature projections ``nn.Linear(768, d)`` take the width of the features given;
* the text, image and category tables and the interval-table size are passed in, instead of
  being read from ``./dataset/<name>/*.pt`` and pickles;
* CP (MODELS_SPEC G-HM-18): the ``[B·L, C]`` score and target matrices are viewed as
  ``[B, L, C]`` before they are indexed with the (b, l) pairs of non-padding positions, i.e. the per-item multi-label BCE
  the code means (with 19 MovieLens genres and 50 positions the released indexing crashes).

Inputs are what RecBole would hand the authors' model: ``timestamp_list`` as float32 seconds,
except that padding positions repeat the last real time; the released code takes log2 of the
negative gap to the first pad (NaN) and, on CPU, fails when indexing with it. Real positions are
untouched, and nothing at a real position reads a pad. The authors' model always has an image
branch: when the features have no image table (MovieLens), both models get the text table as
their image table as well. moedist runs with ``temporal_experts_trainable=false`` (the released
code never optimises the temporal experts, G-HM-1); everything else is the moedist default,
which is the authors' Games configuration.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import platform
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moedist.io import atomic_write_bytes, atomic_write_json

AUTHORS_COMMIT = "f1c0a15f0193846e6af71c2a02ae324fd647eeaf"


# ------------------------------------------------------------------------ the authors' model


def _patch(src: str, old: str, new: str, count: int) -> str:
    found = src.count(old)
    if found != count:
        raise SystemExit(f"authors' HM4SR.py: expected {count} occurrence(s) of {old!r}, found {found}; "
                         f"this script was checked against commit {AUTHORS_COMMIT}")
    return src.replace(old, new)


def load_authors_module(repo: Path, device: torch.device) -> types.ModuleType:
    """The authors' ``recbole_model/HM4SR.py`` with the adaptations listed in the module docstring."""
    path = repo / "recbole_model" / "HM4SR.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --authors must be a checkout of github.com/SStarCCat/HM4SR")
    sys.path.insert(0, str(repo))  # its bundled recbole package
    src = path.read_text(encoding="utf-8")
    src = _patch(src, ".to('cuda')", ".to(_DEVICE)", 5)
    src = _patch(src, "nn.Linear(768, self.hidden_size)", "nn.Linear(_TABLES[_NEXT_DIM()].shape[1], self.hidden_size)", 2)
    src = _patch(src, "torch.load(f'./dataset/{self.data_name}/txt_emb.pt')", "_TABLES['txt']", 1)
    src = _patch(src, "torch.load(f'./dataset/{self.data_name}/img_emb.pt')", "_TABLES['img']", 1)
    src = _patch(src, "torch.load(f'./dataset/{self.data_name}/cat.pt')", "_TABLES['cat']", 1)
    src = _patch(src, "with open(f'./dataset/{self.data_name}/interval_num', 'rb') as f: return pickle.load(f)",
                 "return _INTERVAL_NUM", 1)
    for name in ("item_attribute_score", "item_attribute_target"):
        src = _patch(src, f"{name}[nonzero_idx]", f"{name}.view(*input_idx.shape, -1)[nonzero_idx]", 1)
    module = types.ModuleType("authors_hm4sr")
    module.__file__ = str(path)
    module.__dict__["_DEVICE"] = device
    exec(compile(src, str(path), "exec"), module.__dict__)
    return module


class _AuthorsConfig(dict):
    """What the authors' constructor reads from RecBole's Config (config/data.yaml + Games.yaml)."""

    def __init__(self, moedist_cfg, device, name: str):
        c = moedist_cfg
        super().__init__(
            USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list", ITEM_LIST_LENGTH_FIELD="item_length",
            NEG_PREFIX="neg_", MAX_ITEM_LIST_LENGTH=c.max_seq_len, device=device, dataset=name,
            n_layers=c.n_layers, n_heads=c.n_heads, hidden_size=c.hidden_size, inner_size=c.inner_size,
            hidden_dropout_prob=c.hidden_dropout_prob, attn_dropout_prob=c.attn_dropout_prob, hidden_act="gelu",
            layer_norm_eps=c.layer_norm_eps, initializer_range=c.initializer_range, initializer_weight=list(c.alpha_init),
            loss_type="CE", temperature=c.tau_idcl, beta=c.beta_pcl, phcl_temperature=c.tau_pcl, phcl_weight=c.lambda_pcl,
            expert_num=c.k1, gate_selection="softmax", start_expert_num=c.k1, start_gate_selection="softmax",
            temporal_expert_num=c.k2, temporal_gate_selection="softmax", interval_scale=c.mu,
        )


class _AuthorsDataset:
    def __init__(self, n_items: int):
        self._n = n_items

    def num(self, field: str) -> int:
        return self._n


def build_authors_model(module, moedist_cfg, *, n_items: int, tables: dict, max_interval_seconds: int, device):
    order = iter(["txt", "img"])
    module.__dict__.update(
        _TABLES=tables, _NEXT_DIM=lambda: next(order),
        # the pickle the released preprocessing writes: log2(largest gap + 1), a float
        _INTERVAL_NUM=float(torch.log2(torch.tensor(float(max_interval_seconds)) + 1).item()),
    )
    model = module.HM4SR(_AuthorsConfig(moedist_cfg, device, "moedist"), _AuthorsDataset(n_items))
    return model.to(device)


def authors_interaction(batch: dict) -> dict:
    """moedist batch -> the RecBole interaction the authors' model reads."""
    item_seq, lengths = batch["item_seq"], batch["item_seq_len"]
    times = batch["time_seq"].clone()
    last = times.gather(1, (lengths - 1).clamp_min(0)[:, None])  # [B, 1]
    pad = torch.arange(item_seq.shape[1], device=item_seq.device)[None, :] >= lengths[:, None]
    times = torch.where(pad, last.expand_as(times), times)
    return {"item_id_list": item_seq, "item_length": lengths, "timestamp_list": times.to(torch.float32),
            "item_id": batch["target"]}


class AuthorsAdapter(torch.nn.Module):
    """The authors' model behind moedist's model contract (for moedist's evaluator)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def full_sort_predict(self, batch: dict) -> torch.Tensor:
        return self.net.full_sort_predict(authors_interaction(batch))

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        return self.net.calculate_loss(authors_interaction(batch))


# ------------------------------------------------------------------------ weight mapping


def parameter_map(ours, theirs) -> list[tuple]:
    """``(name, ours, theirs, grad_of_ours)`` for every weight: ``ours`` is moedist's tensor in the
    authors' layout (transposed where needed), ``grad_of_ours()`` its gradient in that layout."""
    pairs = []

    def add(name, a, b, leaf=None, index=None, transpose=False):
        def grad(a=a, leaf=leaf, index=index, transpose=transpose):
            g = a.grad if leaf is None else (None if leaf.grad is None else leaf.grad[index])
            return None if g is None else (g.T if transpose else g)
        pairs.append((name, a.T if transpose else a, b, grad))

    add("item_embedding", ours.item_embedding.weight, theirs.item_embedding.weight)
    add("position_embedding", ours.position_embedding.weight, theirs.position_embedding.weight)
    enc = {"id": theirs.item_seq, "text": theirs.txt_seq, "image": theirs.img_seq}
    ln = {"id": theirs.item_ln, "text": theirs.txt_ln, "image": theirs.img_ln}
    proj = {"text": theirs.txt_projection, "image": theirs.img_projection}
    gates = {"id": theirs.start_moe.gate_id, "text": theirs.start_moe.gate_txt, "image": theirs.start_moe.gate_img}

    def add_module(name, a, b):
        for pname, param in a.named_parameters():
            add(f"{name}.{pname}", param, b.get_parameter(pname))

    for m in ours.modalities:
        for i, layer in enumerate(ours.encoders[m].layers):
            tl = enc[m].layer[i]
            a, fa = layer.attention, tl.multi_head_attention
            for sub in ("query", "key", "value", "dense"):
                add_module(f"{m}.l{i}.{sub}", getattr(a, sub), getattr(fa, sub))
            add_module(f"{m}.l{i}.attn_ln", a.layer_norm, fa.LayerNorm)
            f, ff = layer.feed_forward, tl.feed_forward
            for sub in ("dense_1", "dense_2"):
                add_module(f"{m}.l{i}.{sub}", getattr(f, sub), getattr(ff, sub))
            add_module(f"{m}.l{i}.ffn_ln", f.layer_norm, ff.LayerNorm)
        add_module(f"{m}.ln", ours.layer_norms[m], ln[m])
        if m != "id":
            add_module(f"{m}.projection", ours.projections[m], proj[m])
            ph = {"text": theirs.placeholder_txt, "image": theirs.placeholder_img}[m]
            add_module(f"{m}.placeholder", ours.placeholders[m], ph)
    imoe = ours.interactive_moe
    for k, m in enumerate(ours.modalities):
        add_module(f"imoe.gate_{m}", imoe.gates[k].proj, gates[m])
    for e, expert in enumerate(theirs.start_moe.expert):
        add(f"imoe.expert{e}.weight", imoe.experts.weight[e], expert.weight, leaf=imoe.experts.weight, index=e, transpose=True)
        add(f"imoe.expert{e}.bias", imoe.experts.bias[e], expert.bias, leaf=imoe.experts.bias, index=e)
    add("imoe.alpha", imoe.alpha, theirs.start_moe.weight)
    tm = ours.temporal_moe
    add_module("tmoe.gate", tm.gate.proj, theirs.time_moe.gate)
    add_module("tmoe.absolute_w", tm.absolute_w, theirs.time_moe.absolute_w)
    add("tmoe.time_embedding", tm.time_embedding.weight, theirs.time_moe.time_embedding.weight)
    for e, vec in enumerate(theirs.time_moe.expert):  # frozen in both: no gradient to compare
        pairs.append((f"tmoe.expert{e}", tm.experts[e : e + 1], vec, lambda: None))
    add_module("cp", ours.cat_linear, theirs.cat_linear)
    return pairs


def copy_weights(pairs) -> None:
    with torch.no_grad():
        for name, a, b, _ in pairs:
            if a.shape != b.shape:
                raise SystemExit(f"{name}: moedist {tuple(a.shape)} vs authors {tuple(b.shape)}")
            b.copy_(a)


# ------------------------------------------------------------------------ part 1: equivalence


class _GivenPositions:
    """Stands in for the ``random`` module inside the authors' PCL: ``sample`` returns the
    placeholder positions moedist chose for the same row."""

    def __init__(self, mask: torch.Tensor):
        self.rows = [torch.nonzero(r).flatten().tolist() for r in mask.cpu()]
        self.i = 0

    def sample(self, population, k):
        row = self.rows[self.i]
        self.i += 1
        if len(row) != k or any(p not in population for p in row):
            raise AssertionError(f"row {self.i - 1}: authors want {k} of {population}, moedist chose {row}")
        return row


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - b.double()).abs().max().item()
    return diff, diff / max(b.double().abs().max().item(), 1e-30)


def placeholder_positions(lengths: torch.Tensor, seq_len: int, beta: float, gen: torch.Generator) -> torch.Tensor:
    """floor(beta·len) distinct real positions per row (bool ``[B, L]``), from ``gen``."""
    real = torch.arange(seq_len)[None, :] < lengths[:, None]
    num = torch.floor(lengths.to(torch.float32) * beta).long()
    keys = torch.rand(real.shape, generator=gen).masked_fill(~real, float("inf"))
    return keys.argsort(1).argsort(1) < num[:, None]


def check_equivalence(ours, theirs, module, task, batches, seed: int) -> dict:
    """Both models on the same batches, dropout off, moedist's weights in both."""
    from moedist.models.hm4sr import interval_bucket

    ours.eval()
    theirs.eval()
    pairs = parameter_map(ours, theirs)
    worst: dict[str, list] = {}
    grad_worst = [0.0, 0.0, ""]
    compared = 0
    buckets = {"positions": 0, "differ_raw_seconds": 0}
    gen = torch.Generator().manual_seed(seed)
    for idx in batches:
        batch = task.make_batch(idx)
        inter = authors_interaction(batch)
        # RecBole stores the time field as float32, so the authors' model sees seconds rounded to
        # float32 (64 s steps around 1e9). How many interval buckets that moves is reported;
        # moedist is then given the same rounded seconds so the comparison is of the code alone.
        real = torch.arange(batch["item_seq"].shape[1])[None, :] < batch["item_seq_len"][:, None]
        rounded = inter["timestamp_list"].to(torch.float64).round().to(torch.int64).masked_fill(~real, 0)
        b_raw = interval_bucket(batch["time_seq"], batch["item_seq_len"], ours.config.mu)
        b_f32 = interval_bucket(rounded, batch["item_seq_len"], ours.config.mu)
        buckets["positions"] += int(real.sum())
        buckets["differ_raw_seconds"] += int(((b_raw != b_f32) & real).sum())
        batch = {**batch, "time_seq": rounded}
        mask = placeholder_positions(batch["item_seq_len"], batch["item_seq"].shape[1], ours.config.beta_pcl, gen)

        for prm in ours.parameters():
            prm.grad = None
        ours.placeholder_mask = lambda lengths, L, _m=mask: _m
        try:
            out = ours._forward(batch["item_seq"], batch["item_seq_len"], batch["time_seq"])
            s_o = ours._scores(out["hidden"], out["tables"])
            parts_o = {
                "ce": F.cross_entropy(s_o, batch["target"]),
                "idcl": ours.idcl_loss(out["hidden"][:, 0], batch["target"]),
                "cp": ours.cp_loss(batch["item_seq"], out["tables"]),
                "pcl": ours.pcl_loss(out, batch["item_seq_len"], batch["target"]),
            }
        finally:
            del ours.placeholder_mask
        total_o = sum(parts_o.values())
        total_o.backward()

        for prm in theirs.parameters():
            prm.grad = None
        module.random = _GivenPositions(mask)
        try:
            emb_seq, seq_vec, s_t = theirs.forward(inter["item_id_list"], inter["item_length"], inter["timestamp_list"])
            parts_t = {
                "ce": theirs.loss_fct(s_t, inter["item_id"]),
                "idcl": theirs.IDCL(seq_vec[0], inter),
                "cp": theirs.CP(inter["item_id_list"]),
                "pcl": theirs.PCL(inter, emb_seq, seq_vec),
            }
        finally:
            module.random = random
        total_t = sum(parts_t.values())
        total_t.backward()

        for key, (x, y) in {"scores": (s_o, s_t), "total": (total_o, total_t),
                            **{k: (parts_o[k], parts_t[k]) for k in parts_o}}.items():
            d, r = _rel(x.detach(), y.detach())
            w = worst.setdefault(key, [0.0, 0.0, None])
            w[0], w[1] = max(w[0], d), max(w[1], r)
            if y.dim() == 0:
                w[2] = [float(x.detach()), float(y.detach())]
        # Relative to the parameter's own largest gradient, floored at 1e-6 of the largest
        # gradient anywhere: some gradients are zero in exact arithmetic (the attention key bias
        # shifts a whole softmax row), and their float noise is not a difference.
        grads = []
        for name, _, b, grad_of_ours in pairs:
            if name.startswith("tmoe.expert"):
                continue  # the authors' code computes a gradient here but never applies it (G-HM-1)
            ga, gb = grad_of_ours(), b.grad
            if ga is None and gb is None:
                continue
            if ga is None or gb is None:
                raise SystemExit(f"{name}: a gradient only in {'the authors code' if ga is None else 'moedist'}")
            grads.append((name, ga, gb))
        scale = max(g.abs().max().item() for _, _, g in grads)
        compared = len(grads)
        for name, ga, gb in grads:
            d = (ga.double() - gb.double()).abs().max().item()
            r = d / max(gb.abs().max().item(), 1e-6 * scale)
            if r > grad_worst[1]:
                grad_worst = [d, r, name]
    return {
        "batches": len(batches), "batch_size": int(len(batches[0])),
        "interval_buckets": buckets,
        "max_abs_diff": {k: v[0] for k, v in worst.items()},
        "max_rel_diff": {k: v[1] for k, v in worst.items()},
        "last_batch_moedist_vs_authors": {k: v[2] for k, v in worst.items() if v[2] is not None},
        "gradients": {"parameters_compared": compared, "parameters_mapped": len(pairs),
                      "max_rel_diff": grad_worst[1], "max_abs_diff": grad_worst[0], "worst_parameter": grad_worst[2]},
    }


# ------------------------------------------------------------------------ part 2: training


def load_models(ours, theirs, state: dict) -> None:
    """Both models' weights from a saved ``<out>.state.pt``."""
    ours.load_state_dict(state["ours"])
    theirs.load_state_dict(state["theirs"])
    with torch.no_grad():  # the authors' temporal experts are not registered parameters
        for vec, saved in zip(theirs.time_moe.expert, state["theirs_time_experts"]):
            vec.copy_(saved)


def train_side_by_side(ours, theirs, task, args, result: dict, out: Path, cfg) -> None:
    from moedist.train.distributed import make_adam
    from moedist.train.loop import DistContext

    state_path = out.with_suffix(".state.pt")
    # each code's own trainer's optimizer: moedist's (fused Adam unless train.fused_adam=false), RecBole's plain Adam
    opt_o = make_adam([{"params": list(ours.parameters())}], cfg)
    opt_t = torch.optim.Adam(theirs.parameters(), lr=args.lr)
    adapter = AuthorsAdapter(theirs)
    codes = trained_codes(args)
    both = len(codes) == 2
    ctx = DistContext()
    epochs = result.setdefault("epochs", [])
    if state_path.is_file() and epochs:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["epoch"] != len(epochs):
            raise SystemExit(f"{state_path} is at epoch {state['epoch']} but {out} records {len(epochs)}; delete both to restart")
        load_models(ours, theirs, state)
        opt_o.load_state_dict(state["opt_ours"])
        opt_t.load_state_dict(state["opt_theirs"])
        ranks_by_epoch = state.get("ranks_by_epoch", {})
        print(f"resuming after epoch {len(epochs) - 1} from {state_path}", flush=True)
    else:
        ranks_by_epoch = {}
    ranks = None
    for epoch in range(len(epochs), args.epochs):
        if args.patience and _patience_spent(epochs, args.patience, codes):
            break
        ours.train()
        theirs.train()
        # Batches depend on the seed only; dropout and PCL draws also on --draw-seed.
        torch.manual_seed(args.seed + epoch + DRAW_SEED_STRIDE * args.draw_seed)
        random.seed(args.seed + epoch + DRAW_SEED_STRIDE * args.draw_seed)
        rng = np.random.default_rng(args.seed + epoch)
        secs = {who: 0.0 for who in codes}
        losses = {who: 0.0 for who in codes}
        n = 0
        batches = list(task.global_batches(rng, args.batch_size))
        if args.max_steps:
            batches = batches[: args.max_steps]
        for step, idx in enumerate(batches):
            batch = task.make_batch(idx)
            step_loss = {}
            if "moedist" in codes:
                t0 = time.perf_counter()
                loss_o, _ = ours.calculate_loss(batch)
                opt_o.zero_grad(set_to_none=True)
                loss_o.backward()
                opt_o.step()
                secs["moedist"] += time.perf_counter() - t0
                step_loss["moedist"] = float(loss_o.detach())
            if "authors" in codes:
                t1 = time.perf_counter()
                loss_t = adapter.calculate_loss(batch)
                opt_t.zero_grad(set_to_none=True)
                loss_t.backward()
                opt_t.step()
                secs["authors"] += time.perf_counter() - t1
                step_loss["authors"] = float(loss_t.detach())
            n += 1
            for who, value in step_loss.items():
                losses[who] += value
                if not math.isfinite(value):
                    raise SystemExit(f"epoch {epoch} step {step}: {who} loss {value}")
            if step % 10 == 0 or step == len(batches) - 1:
                print(f"epoch {epoch} step {step + 1}/{len(batches)}  "
                      + "  ".join(f"{who}: loss {step_loss[who]:.4f} s/step {secs[who] / n:.2f}" for who in codes),
                      flush=True)
        row = {"epoch": epoch, "steps": n,
               "train_loss": {k: v / n for k, v in losses.items()},
               "seconds_per_step": {k: v / n for k, v in secs.items()}}
        # ranks: for the paired comparison below
        metrics, ranks = evaluate_both(ours, adapter, task, ctx, args.eval_batch_size, codes)
        row.update(metrics)
        if both:
            row["paired"] = paired_from_ranks(ranks, args.seed)
        epochs.append(row)
        ranks_by_epoch[str(epoch)] = ranks
        buf = io.BytesIO()
        torch.save({"epoch": epoch + 1, "ours": ours.state_dict(), "theirs": theirs.state_dict(),
                    "theirs_time_experts": [v.detach().clone() for v in theirs.time_moe.expert],
                    "opt_ours": opt_o.state_dict(), "opt_theirs": opt_t.state_dict(),
                    "ranks_by_epoch": ranks_by_epoch}, buf)
        atomic_write_bytes(state_path, buf.getvalue())
        atomic_write_json(out, result, indent=2)
        print(f"epoch {epoch}: " + " | ".join(
            f"{who}: valid ndcg@20 {row['valid'][who]['ndcg@20']:.4f} test ndcg@10 {row['test'][who]['ndcg@10']:.4f}"
            f" s/step {row['seconds_per_step'][who]:.2f}" for who in codes), flush=True)
    if not both:
        if args.patience and epochs:
            result["at_best"] = best_epoch_comparison(epochs, {}, args.patience, args.seed, codes)
            atomic_write_json(out, result, indent=2)
        return
    if epochs and result.get("final_paired", {}).get("after_epochs") != len(epochs):
        if ranks is None:  # resumed with no epoch left to train: rank the restored models
            paired = paired_from_ranks(evaluate_both(ours, adapter, task, ctx, args.eval_batch_size)[1], args.seed)
        else:  # the last epoch trained here already compared them
            paired = epochs[-1]["paired"]
        result["final_paired"] = {"after_epochs": len(epochs), **paired}
        atomic_write_json(out, result, indent=2)
        print(json.dumps(result["final_paired"], indent=2), flush=True)
    if args.patience and epochs:
        result["at_best"] = best_epoch_comparison(epochs, ranks_by_epoch, args.patience, args.seed)
        atomic_write_json(out, result, indent=2)
        print(json.dumps(result["at_best"], indent=2), flush=True)


SELECT = "ndcg@20"  # the validation metric both codes select on (the authors' valid_metric)
DRAW_SEED_STRIDE = 1_000_003  # --draw-seed K shifts the dropout/PCL stream by K strides; batches stay


def _best_epochs(epochs: list[dict], codes: tuple[str, ...] = ("moedist", "authors")) -> dict[str, int]:
    """Each code's best epoch on validation ``SELECT`` (the first one on a tie, as early stopping keeps)."""
    best = {}
    for who in codes:
        vals = [row["valid"][who][SELECT] for row in epochs]
        best[who] = epochs[max(range(len(vals)), key=lambda i: (vals[i], -i))]["epoch"]
    return best


def _patience_spent(epochs: list[dict], patience: int, codes: tuple[str, ...] = ("moedist", "authors")) -> bool:
    """True when every code trained has gone ``patience`` epochs without a new best on validation."""
    last = epochs[-1]["epoch"] if epochs else -1
    return bool(epochs) and all(last - b >= patience for b in _best_epochs(epochs, codes).values())


def best_epoch_comparison(epochs: list[dict], ranks_by_epoch: dict, patience: int, seed: int,
                          codes: tuple[str, ...] = ("moedist", "authors")) -> dict:
    """Early stopping as each code's trainer does it: each model at its own best validation
    epoch, compared on the same users. Uses the stored ranks of those epochs, or, when both
    codes peak at the same epoch, that epoch's recorded paired comparison."""
    best = _best_epochs(epochs, codes)
    out = {"select": f"valid {SELECT}", "patience": patience, "epochs_trained": len(epochs),
           "stopped_early": _patience_spent(epochs, patience, codes), "best_epoch": best}
    if len(codes) == 1:
        (who,) = codes
        out["test_at_best"] = epochs[best[who]]["test"][who]
        return out
    ro, rt = ranks_by_epoch.get(str(best["moedist"])), ranks_by_epoch.get(str(best["authors"]))
    if ro is not None and rt is not None:
        out["paired"] = paired_from_ranks({"moedist": ro["moedist"], "authors": rt["authors"]}, seed)
    elif best["moedist"] == best["authors"] and "paired" in epochs[best["moedist"]]:
        out["paired"] = epochs[best["moedist"]]["paired"]
    else:
        out["paired"] = None  # ranks of an epoch trained before they were stored
    return out


def evaluate_both(ours, adapter, task, ctx, batch_size: int,
                  codes: tuple[str, ...] = ("moedist", "authors")) -> tuple[dict, dict]:
    """The models named in ``codes`` (both by default) on valid and test with moedist's
    evaluator: ``{split: {who: metrics}}`` and the gathered ranks ``{who: {split: ranks}}``."""
    from moedist.train.loop import evaluate_split

    models = {who: m for who, m in (("moedist", ours), ("authors", adapter)) if who in codes}
    metrics: dict = {}
    ranks: dict = {who: {} for who in models}
    for split in ("valid", "test"):
        metrics[split] = {who: evaluate_split(model, task, split, ctx, batch_size, ranks_out=ranks[who])
                          for who, model in models.items()}
    return metrics, ranks


def trained_codes(args) -> tuple[str, ...]:
    """The codes a run trains: both, or one of them alone (``--moedist-only`` / ``--authors-only``)."""
    if args.moedist_only:
        return ("moedist",)
    if args.authors_only:
        return ("authors",)
    return ("moedist", "authors")


def paired_from_ranks(ranks: dict, seed: int) -> dict:
    """Both models after the last epoch, on the same users: per-user NDCG@10 / @20 and the
    paired difference (moedist − authors) with a bootstrap interval and a sign-flip p.
    ``ranks[who][split]`` are the gathered ranks from moedist's evaluator."""
    from moedist.report.compare import bootstrap_ci, sign_flip_p_value
    from moedist.train.evaluate import loo_metric_values

    out = {}
    rng = np.random.default_rng(seed)
    for split in ("valid", "test"):
        vo, vt = loo_metric_values(ranks["moedist"][split]), loo_metric_values(ranks["authors"][split])
        for metric in ("ndcg@10", "ndcg@20"):
            d = (vo[metric] - vt[metric]).numpy()
            lo, hi = bootstrap_ci(d, resamples=10_000, confidence=0.95, rng=rng)
            pval, exact = sign_flip_p_value(d, resamples=100_000, rng=rng)
            out[f"{split} {metric}"] = {
                "moedist": float(vo[metric].mean()), "authors": float(vt[metric].mean()), "users": int(d.size),
                "mean_diff": float(d.mean()), "ci95": [lo, hi], "p_value": pval, "users_differ": int((d != 0).sum()),
            }
    return out


# ------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", type=Path, required=True, help="checkout of github.com/SStarCCat/HM4SR")
    p.add_argument("--extra-path", action="append", default=[], help="where colorlog/colorama/texttable/thop are")
    p.add_argument("--data", required=True, help="prepared dataset (moedist data prepare)")
    p.add_argument("--features", required=True, help="features folder (moedist extract)")
    p.add_argument("--out", type=Path, required=True, help="JSON results (also <out>.state.pt for resume)")
    p.add_argument("--epochs", type=int, default=3, help="most epochs to train")
    p.add_argument("--patience", type=int, default=0,
                   help="stop once both codes have gone this many epochs without a better valid ndcg@20, "
                        "and compare each at its best epoch (0 = train all --epochs)")
    p.add_argument("--max-steps", type=int, default=0, help="cap training steps per epoch (0 = full epochs)")
    p.add_argument("--check-batches", type=int, default=3)
    p.add_argument("--check-batch-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--eval-batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--override", action="append", default=[], help="extra hm4sr.* settings for both, key=value")
    p.add_argument("--time-input-check", action="store_true",
                   help="evaluate the last saved weights with exact and with float32-rounded times")
    p.add_argument("--dropout-check", type=int, default=0, metavar="N",
                   help="expected training loss over N dropout draws per batch, same weights in both (0 = skip)")
    p.add_argument("--dropout-check-batches", type=int, default=4)
    p.add_argument("--moedist-only", action="store_true",
                   help="train and evaluate moedist alone (same initial weights and batches as the side-by-side run)")
    p.add_argument("--authors-only", action="store_true",
                   help="train and evaluate the authors' model alone (same initial weights and batches as the side-by-side run)")
    p.add_argument("--draw-seed", type=int, default=0,
                   help="another stream of dropout and PCL draws, same weights and batches (default 0)")
    p.add_argument("--reference", type=Path,
                   help="a finished side-by-side JSON: compare this run's curve with both of its curves")
    args = p.parse_args()
    if args.moedist_only and args.authors_only:
        p.error("--moedist-only and --authors-only exclude each other (neither trains both codes side by side)")
    if (args.moedist_only or args.authors_only) and (args.time_input_check or args.dropout_check):
        p.error("--time-input-check and --dropout-check need both models trained: drop "
                + ("--moedist-only" if args.moedist_only else "--authors-only"))
    reference = None
    if args.reference is not None:
        try:
            reference = json.loads(args.reference.read_text())
            reference["epochs"][0]["test"]["authors"]["ndcg@10"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            p.error(f"--reference {args.reference}: not a finished side-by-side result ({type(e).__name__}: {e})")
        if reference.get("settings", {}).get("seed") != args.seed:
            p.error(f"--reference {args.reference} was run with seed {reference.get('settings', {}).get('seed')}, "
                    f"this run with {args.seed}: the initial weights and batches would differ")
    sys.path[:0] = args.extra_path
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    from moedist.data.dataset import PreparedDataset
    from moedist.features.store import ItemFeatures, load_item_features
    from moedist.models.hm4sr import HM4SR
    from moedist.train.cli import load_experiment_config
    from moedist.train.identity import dataset_differences, dataset_identity, features_identity
    from moedist.train.loop import build_task

    cfg = load_experiment_config("hm4sr", None, [f"data={args.data}", f"features={args.features}",
                                                 "hm4sr.temporal_experts_trainable=false", f"train.lr={args.lr}",
                                                 *args.override])
    data = PreparedDataset(cfg.data)
    feats = load_item_features(args.features, n_items=data.n_items, items=data.items, data_dir=data.path)
    if "text" not in feats.features:
        raise SystemExit(f"{args.features} has no text features; the authors' model needs text and image")
    tables = dict(feats.features)
    image_is_text = "image" not in tables
    if image_is_text:
        tables["image"] = tables["text"]
    features = ItemFeatures(tables, {m: feats.mask.get(m, feats.mask["text"]) for m in tables})
    cfg.hm4sr.modalities = ("id", "text", "image")
    cats = data.category_multihot()
    if cats is None or cats.shape[1] == 0:
        raise SystemExit(f"{args.data} has no item categories; the authors' model always has CP")
    task = build_task(cfg, data)

    torch.manual_seed(args.seed)
    ours = HM4SR(cfg.hm4sr, n_items=data.n_item_rows, n_users=data.n_users + 1, item_features=features,
                 item_categories=cats, max_interval_seconds=data.max_interval_seconds).to(device)
    module = load_authors_module(args.authors.resolve(), device)
    theirs = build_authors_model(
        module, cfg.hm4sr, n_items=data.n_item_rows, max_interval_seconds=data.max_interval_seconds, device=device,
        tables={"txt": tables["text"].clone(), "img": tables["image"].clone(), "cat": cats.clone().float()},
    )
    if theirs.time_moe.time_embedding.num_embeddings != ours.temporal_moe.time_embedding.num_embeddings:
        raise SystemExit("interval tables differ in size: "
                         f"{theirs.time_moe.time_embedding.num_embeddings} vs {ours.temporal_moe.time_embedding.num_embeddings}")
    copy_weights(parameter_map(ours, theirs))

    out = args.out
    result = json.loads(out.read_text()) if out.is_file() else {}
    # what the dataset and the features are, by content (the same files under another path are the same)
    inputs = {"dataset": dataset_identity(data.manifest, data.items), "features": features_identity(args.features)}
    # the equivalence check holds for these; a result made with others has its check redone
    checked_with = {"seed": args.seed, "overrides": args.override, "check_batches": args.check_batches,
                    "check_batch_size": args.check_batch_size, "inputs": inputs}
    if result.get("epochs"):  # resuming: the epochs to come must continue the same experiment
        was = result.get("settings", {})
        now = {"moedist_only": args.moedist_only, "authors_only": args.authors_only, "draw_seed": args.draw_seed,
               "overrides": args.override, "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
               "max_steps": args.max_steps}
        defaults = {"moedist_only": False, "authors_only": False, "draw_seed": 0, "max_steps": 0}
        changed = [k for k, v in now.items() if was.get(k, defaults.get(k)) != v]
        stored = result.get("inputs")  # results before this record held none
        if isinstance(stored, dict):
            if dataset_differences(stored.get("dataset"), inputs["dataset"]):
                changed.append("--data")
            if stored.get("features") != inputs["features"]:
                changed.append("--features")
        if changed:
            def said(k):
                return f"{k}: {was.get(k, defaults.get(k))!r} -> {now[k]!r}" if k in now else f"{k}: other content"
            raise SystemExit(f"{out} holds epochs run with other settings ({', '.join(map(said, changed))}); "
                             "use another --out, or delete it and its .state.pt to restart")
    elif result.get("equivalence", {}).get("checked_with") != checked_with:
        result.pop("equivalence", None)  # no epoch yet: a check made with other settings or data is redone
    result.update({
        "authors_code": {"repo": "github.com/SStarCCat/HM4SR", "checked_at": AUTHORS_COMMIT, "path": str(args.authors)},
        "data": str(args.data), "features": str(args.features), "image_features": "text (none extracted)" if image_is_text else "image",
        "n_items": data.n_items, "n_users": data.n_users, "train_samples": task.n_train(),
        "settings": {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "threads": args.threads,
                     "dropout": cfg.hm4sr.hidden_dropout_prob, "overrides": args.override, "max_steps": args.max_steps,
                     "moedist_only": args.moedist_only, "authors_only": args.authors_only, "draw_seed": args.draw_seed},
        "inputs": inputs,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
    })
    if "equivalence" not in result:
        rng = np.random.default_rng(args.seed)
        perm = rng.permutation(task.n_train())
        batches = [perm[i * args.check_batch_size : (i + 1) * args.check_batch_size] for i in range(args.check_batches)]
        result["equivalence"] = {**check_equivalence(ours, theirs, module, task, batches, args.seed),
                                 "checked_with": checked_with}
        copy_weights(parameter_map(ours, theirs))  # unchanged, but make the starting point explicit
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result, indent=2)
        print(json.dumps(result["equivalence"], indent=2), flush=True)
    if args.epochs > 0:
        train_side_by_side(ours, theirs, task, args, result, out, cfg)
    if reference is not None and result.get("epochs"):
        codes = trained_codes(args)  # a side-by-side run compares its moedist curve
        this = codes[0] if len(codes) == 1 else "moedist"
        result["against_reference"] = against_reference(result["epochs"], reference, str(args.reference), this)
        atomic_write_json(out, result, indent=2)
        print(json.dumps(result["against_reference"]["summary"], indent=2), flush=True)
    if args.time_input_check:
        result["time_input_check"] = time_input_check(ours, theirs, task, cfg, out, args.eval_batch_size)
        print(json.dumps(result["time_input_check"], indent=2), flush=True)
    if args.dropout_check:
        result["dropout_check"] = dropout_check(ours, theirs, task, out, args, trained_epochs=len(result.get("epochs", [])))
        print(json.dumps(result["dropout_check"], indent=2), flush=True)
    atomic_write_json(out, result, indent=2)


def against_reference(epochs: list[dict], reference: dict, path: str, this: str = "moedist") -> dict:
    """This run's curve of code ``this`` beside a finished side-by-side run's two curves, epoch by epoch.

    With the same seed all three start from the same weights and see the same batches; this
    curve and the reference's curve of the same code differ only in their dropout and PCL
    draws (``--draw-seed``) or in what ``--override`` changed. How far apart two curves of one
    code drift is the yardstick for the gap between the moedist and the authors' curve of the
    reference run."""
    ref = {row["epoch"]: row for row in reference["epochs"]}
    rows = []
    for row in epochs:
        r = ref.get(row["epoch"])
        if r is None:
            continue
        rows.append({"epoch": row["epoch"], **{
            f"{split} {metric}": {"this": row[split][this][metric], "reference moedist": r[split]["moedist"][metric],
                                  "reference authors": r[split]["authors"][metric]}
            for split, metric in (("valid", SELECT), ("test", "ndcg@10"), ("test", "ndcg@20"))}})

    def diffs(key: str, a: str, b: str, lo: int, hi: int) -> dict:
        d = np.array([row[key][a] - row[key][b] for row in rows if lo <= row["epoch"] <= hi])
        if d.size == 0:
            return {"epochs": 0}
        return {"epochs": int(d.size), "mean": float(d.mean()), "ahead": int((d > 0).sum()), "behind": int((d < 0).sum()),
                "largest_abs": float(np.abs(d).max())}

    pairs = {"this − reference moedist": ("this", "reference moedist"),
             "this − reference authors": ("this", "reference authors"),
             "reference moedist − reference authors": ("reference moedist", "reference authors")}
    last = rows[-1]["epoch"] if rows else -1
    windows = {"all": (0, last), "0-25": (0, 25), "26-": (26, last)}
    summary: dict = {"epochs_compared": len(rows)}
    for key in ("test ndcg@10", "test ndcg@20", f"valid {SELECT}"):
        summary[key] = {name: {w: diffs(key, a, b, lo, hi) for w, (lo, hi) in windows.items()}
                        for name, (a, b) in pairs.items()}
    # Early stopping on each curve over the epochs this run covers (first best on ties).
    sel = {}
    for who in ("this", "reference moedist", "reference authors"):
        vals = [row[f"valid {SELECT}"][who] for row in rows]
        if vals:
            i = max(range(len(vals)), key=lambda j: (vals[j], -j))
            sel[who] = {"epoch": rows[i]["epoch"], "valid": vals[i], "test ndcg@10": rows[i]["test ndcg@10"][who]}
    summary["at_best_over_these_epochs"] = sel
    return {"reference": path, "this": this, "per_epoch": rows, "summary": summary}


def time_input_check(ours, theirs, task, cfg, out: Path, batch_size: int) -> dict:
    """NDCG@10 of the last saved weights: moedist's with exact and with float32-rounded times
    (the authors' model always rounds), and how many interval buckets the rounding moves."""
    from moedist.models.hm4sr import interval_bucket
    from moedist.train.loop import DistContext, evaluate_split

    state_path = out.with_suffix(".state.pt")
    if not state_path.is_file():
        raise SystemExit(f"--time-input-check needs the trained state {state_path}")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    load_models(ours, theirs, state)
    ours.eval()
    theirs.eval()
    ctx = DistContext()
    splits = ("valid", "test")
    check: dict = {"after_epoch": state["epoch"] - 1, "ndcg@10": {}, "buckets_moved": {}}
    for rounded in (False, True):
        ours.temporal_moe.float32_times = rounded
        name = "moedist, float32 times" if rounded else "moedist, exact times"
        check["ndcg@10"][name] = {s: evaluate_split(ours, task, s, ctx, batch_size)["ndcg@10"] for s in splits}
    ours.temporal_moe.float32_times = cfg.hm4sr.time_float32
    adapter = AuthorsAdapter(theirs)
    check["ndcg@10"]["authors (float32 times)"] = {s: evaluate_split(adapter, task, s, ctx, batch_size)["ndcg@10"] for s in splits}
    for s in splits:
        batch = task.splits[s].batch(np.arange(len(task.splits[s])))
        exact = interval_bucket(batch["time_seq"], batch["item_seq_len"], cfg.hm4sr.mu)
        rounded = interval_bucket(batch["time_seq"], batch["item_seq_len"], cfg.hm4sr.mu, float32_times=True)
        lengths = batch["item_seq_len"]
        real = torch.arange(exact.shape[1])[None, :] < lengths[:, None]
        last = (torch.arange(len(lengths)), (lengths - 1).clamp_min(0))
        check["buckets_moved"][s] = {
            "real_positions": float(((exact != rounded) & real).sum() / real.sum()),
            "last_position": float((exact[last] != rounded[last]).float().mean()),
        }
        check.setdefault("by_bucket_move", {})[s] = gap_by_bucket_move(
            state.get("ranks_by_epoch", {}), s, (exact[last] != rounded[last]).numpy())
    return check


def gap_by_bucket_move(ranks_by_epoch: dict, split: str, moved: np.ndarray) -> dict:
    """Per-user NDCG@10 difference (moedist − authors) averaged over the first and the second
    half of the stored epochs, for the users whose last interval bucket the float32 rounding
    moves and for the others, with bootstrap intervals and a permutation p-value for the
    difference between the groups."""
    from moedist.report.compare import bootstrap_ci
    from moedist.train.evaluate import loo_metric_values

    epochs = sorted(int(e) for e in ranks_by_epoch)
    if len(epochs) < 2:
        return {}
    rng = np.random.default_rng(0)
    half = len(epochs) // 2
    out = {}
    for window in (epochs[:half], epochs[half:]):
        d = np.mean([(loo_metric_values(ranks_by_epoch[str(e)]["moedist"][split])["ndcg@10"]
                      - loo_metric_values(ranks_by_epoch[str(e)]["authors"][split])["ndcg@10"]).numpy()
                     for e in window], axis=0)
        row = {"all": {"users": int(d.size), "mean_diff": float(d.mean())}}
        for name, g in (("bucket moved", moved), ("bucket kept", ~moved)):
            lo, hi = bootstrap_ci(d[g], resamples=10_000, confidence=0.95, rng=rng)
            row[name] = {"users": int(g.sum()), "mean_diff": float(d[g].mean()), "ci95": [lo, hi]}
        between = d[moved].mean() - d[~moved].mean()
        perm = np.array([d[p].mean() - d[~p].mean() for p in (rng.permutation(moved) for _ in range(10_000))])
        row["moved_minus_kept"] = {"diff": float(between), "p_value": float((np.abs(perm) >= abs(between)).mean())}
        out[f"epochs {window[0]}-{window[-1]}"] = row
    return out


def dropout_check(ours, theirs, task, out: Path, args, *, trained_epochs: int) -> dict:
    """Mean training loss over ``args.dropout_check`` fresh dropout/PCL draws on each of
    ``args.dropout_check_batches`` training batches, moedist's last saved weights in both
    models: moedist with exact and with float32 times, and the authors' model."""
    state_path = out.with_suffix(".state.pt")
    trained = state_path.is_file() and trained_epochs > 0
    if trained:
        load_models(ours, theirs, torch.load(state_path, map_location="cpu", weights_only=True))
    copy_weights(parameter_map(ours, theirs))
    adapter = AuthorsAdapter(theirs)
    ours.train()
    theirs.train()
    perm = np.random.default_rng(args.seed).permutation(task.n_train())
    draws, n_batches = args.dropout_check, args.dropout_check_batches
    losses = {"moedist, exact times": [], "moedist, float32 times": [], "authors (float32 times)": []}
    saved = ours.temporal_moe.float32_times
    try:
        with torch.no_grad():
            for b in range(n_batches):
                batch = task.make_batch(perm[b * args.batch_size:(b + 1) * args.batch_size])
                for d in range(draws):
                    for name in losses:
                        torch.manual_seed(args.seed + 1000 * b + d)
                        random.seed(args.seed + 1000 * b + d)
                        if name.startswith("authors"):
                            loss = adapter.calculate_loss(batch)
                        else:
                            ours.temporal_moe.float32_times = "float32" in name
                            loss = ours.calculate_loss(batch)[0]
                        losses[name].append(float(loss))
                print(f"dropout check: batch {b + 1}/{n_batches}", flush=True)
    finally:
        ours.temporal_moe.float32_times = saved
    arr = {k: np.array(v).reshape(n_batches, draws) for k, v in losses.items()}
    ref = arr["authors (float32 times)"]
    check = {"weights": f"moedist's after epoch {trained_epochs - 1}" if trained else "moedist's initial",
             "batches": n_batches, "batch_size": args.batch_size,
             "draws": draws, "mean_loss": {k: float(v.mean()) for k, v in arr.items()},
             "loss_std_per_draw": float(ref.std(axis=1, ddof=1).mean())}
    for name in ("moedist, exact times", "moedist, float32 times"):
        a = arr[name]
        diff = a.mean(axis=1) - ref.mean(axis=1)  # per batch: the batch's own loss level cancels
        se = float(np.sqrt(((a.var(axis=1, ddof=1) + ref.var(axis=1, ddof=1)) / draws).sum()) / n_batches)
        check[f"{name} − authors"] = {"mean_diff": float(diff.mean()), "standard_error": se}
    return check


if __name__ == "__main__":
    main()
