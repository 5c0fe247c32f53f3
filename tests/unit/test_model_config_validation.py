"""Model settings and data that a model cannot use are refused with a ConfigError naming the
key, before anything is built or trained: not a ZeroDivisionError or a torch shape error deep
in a forward pass, not a NaN loss after the first step, and not a run that silently trains a
component on constants (an inverted objective, a modality no item has, categories or times the
dataset does not have)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from moedist.errors import ConfigError
from moedist.models.baselines import ContentMapping, ContentMappingConfig
from moedist.models.hm4sr import HM4SR, HM4SRConfig
from moedist.models.mamex import MAMEX, MAMEXConfig
from moedist.train.cli import load_experiment_config
from moedist.train.config import validate_experiment

torch.set_num_threads(1)

DAY = 86400

BAD = [
    # (model, override, key named in the error)
    ("hm4sr", "hm4sr.n_heads=0", "hm4sr.n_heads"),  # was ZeroDivisionError in __post_init__
    ("hm4sr", "hm4sr.hidden_size=0", "hm4sr.hidden_size"),  # was a reshape error in the MoE
    ("hm4sr", "hm4sr.inner_size=0", "hm4sr.inner_size"),  # trained with a zero-width FFN
    ("hm4sr", "hm4sr.n_layers=-1", "hm4sr.n_layers"),
    ("hm4sr", "hm4sr.max_seq_len=0", "hm4sr.max_seq_len"),  # was a reshape error
    ("hm4sr", "hm4sr.hidden_dropout_prob=1.0", "hm4sr.hidden_dropout_prob"),  # trained on all-zero activations
    ("hm4sr", "hm4sr.hidden_dropout_prob=1.5", "hm4sr.hidden_dropout_prob"),  # error did not name the key
    ("hm4sr", "hm4sr.attn_dropout_prob=-0.1", "hm4sr.attn_dropout_prob"),  # was an SDPA RuntimeError
    ("hm4sr", "hm4sr.mu=0", "hm4sr.mu"),  # every interval in bucket 0: Temporal MoE without intervals
    ("hm4sr", "hm4sr.mu=-1", "hm4sr.mu"),  # was "negative dimension" in nn.Embedding
    ("hm4sr", "hm4sr.freq=0", "hm4sr.freq"),  # NaN loss after the first step
    ("hm4sr", "hm4sr.tau_idcl=0", "hm4sr.tau_idcl"),  # NaN loss
    ("hm4sr", "hm4sr.tau_idcl=-0.2", "hm4sr.tau_idcl"),  # trained an inverted contrastive loss
    ("hm4sr", "hm4sr.tau_pcl=0", "hm4sr.tau_pcl"),
    ("hm4sr", "hm4sr.lambda_cp=-1", "hm4sr.lambda_cp"),  # trained to maximise the CP loss
    ("hm4sr", "hm4sr.lambda_idcl=.nan", "hm4sr.lambda_idcl"),
    ("hm4sr", "hm4sr.lambda_pcl=-0.5", "hm4sr.lambda_pcl"),
    ("hm4sr", "hm4sr.layer_norm_eps=-1", "hm4sr.layer_norm_eps"),  # NaN loss
    ("hm4sr", "hm4sr.initializer_range=-1", "hm4sr.initializer_range"),  # was "normal expects std >= 0"
    ("hm4sr", "hm4sr.temporal_expert_init_std=-0.1", "hm4sr.temporal_expert_init_std"),
    ("hm4sr", "hm4sr.alpha_init=[0,1,.inf]", "hm4sr.alpha_init"),
    ("sasrec", "sasrec.n_heads=0", "sasrec.n_heads"),  # was ZeroDivisionError
    ("sasrec", "sasrec.max_seq_len=0", "sasrec.max_seq_len"),  # was an index error in gather
    ("sasrec", "sasrec.hidden_size=0", "sasrec.hidden_size"),
    ("sasrec", "sasrec.attn_dropout_prob=1.0", "sasrec.attn_dropout_prob"),
    ("mamex", "mamex.num_experts=0", "mamex.num_experts"),  # the error blamed top_k
    ("mamex", "mamex.lambda_align=-1", "mamex.lambda_align"),
    ("mamex", "mamex.lambda_adapter=-1", "mamex.lambda_adapter"),
    ("mamex", "mamex.lambda_fusion=.inf", "mamex.lambda_fusion"),
    ("mamex", "mamex.reg_coeff=-1", "mamex.reg_coeff"),
    ("mamex", "mamex.user_init_std=-1", "mamex.user_init_std"),  # was "normal expects std >= 0"
    ("content", "content.dropout=1.5", "content.dropout"),  # named "content_mapping.dropout", no such key
    ("content", "content.embed_dim=0", "content.embed_dim"),  # trained a 0-d embedding
    ("content", "content.hidden_dim=0", "content.hidden_dim"),
    ("content", "content.reg_coeff=-1", "content.reg_coeff"),
]


@pytest.mark.parametrize("model,override,key", BAD, ids=[b[1] for b in BAD])
def test_out_of_range_settings_are_config_errors_naming_the_key(model, override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}\b"):
        load_experiment_config(model, None, [override])


GOOD = [
    ("hm4sr", ["hm4sr.n_layers=0", "hm4sr.hidden_dropout_prob=0", "hm4sr.attn_dropout_prob=0.99",
               "hm4sr.lambda_cp=0", "hm4sr.lambda_idcl=0", "hm4sr.lambda_pcl=0", "hm4sr.max_seq_len=1",
               "hm4sr.mu=0.5", "hm4sr.freq=1", "hm4sr.tau_idcl=1e-3", "hm4sr.layer_norm_eps=0",
               "hm4sr.temporal_expert_init_std=0", "hm4sr.alpha_init=[-1,0,2]"]),
    ("sasrec", ["sasrec.n_layers=0", "sasrec.hidden_dropout_prob=0", "sasrec.max_seq_len=1"]),
    ("mamex", ["mamex.num_experts=1", "mamex.top_k=1", "mamex.lambda_align=0", "mamex.reg_coeff=0",
               "mamex.user_init_std=0"]),
    ("content", ["content.reg_coeff=0", "content.dropout=0"]),
]


@pytest.mark.parametrize("model,overrides", GOOD, ids=[g[0] for g in GOOD])
def test_boundary_values_stay_accepted(model, overrides):
    cfg = load_experiment_config(model, None, overrides)
    validate_experiment(cfg)


def test_the_packaged_defaults_pass():
    for model in ("hm4sr", "mamex", "sasrec", "content", "popularity"):
        validate_experiment(load_experiment_config(model, None, []))


# ------------------------------------------------------------------ CLI keys


def test_a_typo_in_a_key_suggests_the_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'hm4sr\.hiden_size' \(did you mean 'hm4sr\.hidden_size'\?"):
        load_experiment_config("hm4sr", None, ["hm4sr.hiden_size=32"])
    with pytest.raises(ConfigError, match=r"unknown key 'hm4s' \(did you mean 'hm4sr'\?"):
        load_experiment_config("hm4sr", None, ["hm4s.k1=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'hm4sr\.zzz' \(known keys in hm4sr\.: "):
        load_experiment_config("hm4sr", None, ["hm4sr.zzz=1"])  # nothing close: just the list
    with pytest.raises(ConfigError, match=r"hm4sr\.k1: expected an integer, got 'abc'"):
        load_experiment_config("hm4sr", None, ["hm4sr.k1=abc"])


@pytest.mark.parametrize("model", ["hm4sr", "mamex"])
def test_the_model_sections_ep_size_cannot_bypass_dist_ep_size(model):
    """Set alone, ``<model>.ep_size=2`` sharded the experts behind the launcher's checks (a
    RuntimeError from torch.distributed in local mode); the size comes from --ep-size."""
    cfg = load_experiment_config(model, None, [f"{model}.ep_size=2"])
    with pytest.raises(ConfigError, match=rf"{model}\.ep_size=2 differs from dist\.ep_size=1.*--ep-size"):
        validate_experiment(cfg)
    # what the loop itself writes there (dist.ep_size carried into the section) stays valid
    validate_experiment(load_experiment_config(model, None, [f"{model}.ep_size=2", "dist.ep_size=2", "dist.workers=2"]))


# ------------------------------------------------------------------ data the model cannot use


N = 7  # 6 items + padding row 0


def feats(*, missing_image=False, modalities=("text", "image")):
    g = torch.Generator().manual_seed(0)
    f = {m: torch.randn(N, 4, generator=g) for m in modalities}
    mask = {m: torch.arange(N) > 0 for m in modalities}
    if missing_image and "image" in mask:
        f["image"].zero_()
        mask["image"][:] = False  # e.g. image features extracted for a dataset without images
    return SimpleNamespace(features=f, mask=mask)


def cats(n_cat=3, *, empty=False):
    c = torch.zeros(N, n_cat)
    if not empty:
        c[1:, 0] = 1.0
        c[2::2, 1] = 1.0
    return c


def hm4sr(features=None, categories=None, max_interval=400 * DAY, **kw):
    base = dict(hidden_size=8, n_heads=2, n_layers=1, inner_size=16, max_seq_len=5)
    base.update(kw)
    return HM4SR(HM4SRConfig(**base), n_items=N, n_users=3, item_features=features if features is not None else feats(),
                 item_categories=cats() if categories is None else categories, max_interval_seconds=max_interval)


def test_a_modality_no_item_has_is_refused_with_the_list_to_use():
    with pytest.raises(ConfigError, match=r"hm4sr\.modalities includes 'image' but no item has 'image' features "
                                          r"\(all 6 missing.*hm4sr\.modalities=\[id,text\]"):
        hm4sr(features=feats(missing_image=True))
    with pytest.raises(ConfigError, match=r"mamex\.modalities includes 'image' but no item has.*mamex\.modalities=\[text\]"):
        MAMEX(MAMEXConfig(embed_dim=8), n_items=N, n_users=3, item_features=feats(missing_image=True))
    with pytest.raises(ConfigError, match=r"content\.modalities includes 'image' but no item has.*content\.modalities=\[text\]"):
        ContentMapping(ContentMappingConfig(embed_dim=8, hidden_dim=8), n_items=N, n_users=3,
                       item_features=feats(missing_image=True))
    # without it, the same features train
    hm4sr(features=feats(missing_image=True), modalities=("id", "text"))
    MAMEX(MAMEXConfig(embed_dim=8, modalities=("text",)), n_items=N, n_users=3, item_features=feats(missing_image=True))


def test_a_modality_without_a_table_names_what_the_features_have():
    with pytest.raises(ConfigError, match=r"no 'image' table \(they have: text\); drop it from hm4sr\.modalities "
                                          r"\(e\.g\. hm4sr\.modalities=\[id,text\]\)"):
        hm4sr(features=feats(modalities=("text",)))
    with pytest.raises(ConfigError, match=r"no 'text' table \(they have: image\).*hm4sr\.modalities=\[id,image\]"):
        hm4sr(features=feats(modalities=("image",)))
    with pytest.raises(ConfigError, match=r"mamex\.modalities includes 'audio'.*\(they have: image, text\)"):
        MAMEX(MAMEXConfig(embed_dim=8, modalities=("image", "audio")), n_items=N, n_users=3, item_features=feats())


def test_cp_on_a_dataset_without_categories_is_refused():
    """``category_multihot`` of a dataset with no categories is an all-zero [N, 1] table: CP
    trained on it only taught the model that nothing has a category."""
    with pytest.raises(ConfigError, match=r"hm4sr\.use_cp=true but no item has a category.*hm4sr\.use_cp=false"):
        hm4sr(categories=cats(1, empty=True))
    model = hm4sr(categories=cats(1, empty=True), use_cp=False)
    assert not model.use_cp


@pytest.mark.parametrize("max_interval", [0, 1])
def test_temporal_moe_on_order_only_timestamps_is_refused(max_interval):
    """``--source atomic-seq`` stores positions as timestamps (every gap 1 s)."""
    with pytest.raises(ConfigError, match=rf"hm4sr\.use_tmoe=true but .* is {max_interval} s.*hm4sr\.use_tmoe=false"):
        hm4sr(max_interval=max_interval)
    model = hm4sr(max_interval=max_interval, use_tmoe=False)
    assert model.temporal_moe is None and not model.use_pcl


def test_training_on_an_order_only_dataset_without_categories_names_the_switches(tmp_path):
    """End to end through ``run_training``: the error comes before any epoch, naming the key."""
    from moedist.data.prepare import PrepareOptions, prepare_dataset
    from moedist.data.schema import RawSource
    from moedist.train.loop import run_training

    rows = []
    for u in range(12):
        for pos in range(6):
            rows.append((f"u{u:02d}", f"i{(u + pos) % 8}", pos))  # timestamps = positions
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"user_id": "string", "item_id": "string"})
    inter["rating"] = float("nan")
    ids = sorted(inter["item_id"].unique())
    items = pd.DataFrame({"item_id": ids, "title": ids, "brand": pd.NA, "categories": [[] for _ in ids],
                          "image": pd.NA, "text": ids})
    data = tmp_path / "seq"
    prepare_dataset(RawSource("seq", inter, items), data, options=PrepareOptions(kcore=1))

    def run(*overrides):
        cfg = load_experiment_config("hm4sr", None, [f"data={data}", f"run_dir={tmp_path / 'run'}", "hm4sr.modalities=[id]",
                                                     "hm4sr.hidden_size=8", "train.epochs=0", "train.progress=false", *overrides])
        return run_training(cfg, echo=lambda s: None)

    with pytest.raises(ConfigError, match=r"hm4sr\.use_tmoe=true"):
        run()
    with pytest.raises(ConfigError, match=r"hm4sr\.use_cp=true"):
        run("hm4sr.use_tmoe=false")
    assert "test" in run("hm4sr.use_tmoe=false", "hm4sr.use_cp=false")
