"""Feature extraction end to end: items table with real JPEGs (some missing / corrupt) ->
Ray Data (2 actors) and the local loop -> WebDataset shards + manifest -> ItemFeatures.

Encoders are tiny and deterministic: a BERT saved with ``save_pretrained`` (text) and an
open_clip model loaded from a checkpoint file (image), both written by the fixtures.
One Ray session for the module."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from moedist.errors import DataError
from moedist.features import store
from moedist.features.pipeline import extract_features, extract_features_local
from moedist.features.store import load_item_features

pytestmark = pytest.mark.integration

N_ITEMS = 23
SHARD = 8  # -> shards of 8, 8, 7 items
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
WORDS = "red blue green bike car tea lens toy game camera mug lamp".split()
# item_idx -> what is wrong with its image / text
NO_IMAGE = {4, 17}  # null
NOT_FOUND = {6}  # path that does not exist
GARBAGE = {9}  # not an image
TRUNCATED = {12}  # JPEG cut in half
NO_TEXT = {3, 20}
BAD_IMAGES = NO_IMAGE | NOT_FOUND | GARBAGE | TRUNCATED


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, N_ITEMS + 1):
        p = imgs / f"{i}.jpg"
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(buf, format="JPEG")
        if i in NO_IMAGE:
            image = None
        elif i in NOT_FOUND:
            image = str(imgs / "gone.jpg")
        else:
            data = buf.getvalue()
            p.write_bytes(b"<html>oops</html>" if i in GARBAGE else data[: len(data) // 2] if i in TRUNCATED else data)
            image = str(p) if i % 2 else f"images/{i}.jpg"  # absolute and relative to the data folder
        text = None if i == 3 else "  " if i == 20 else " ".join(rng.choice(WORDS, size=3 + i % 5))
        rows.append({"item_idx": i, "item_id": f"B{i:05d}", "text": text, "image": image})
    # shuffled on disk: the pipeline must order by item_idx
    pd.DataFrame(rows).sample(frac=1, random_state=1).to_parquet(root / "items.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    import open_clip
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from moedist.features.encoders import register_open_clip_config

    d = tmp_path_factory.mktemp("models")
    bert = d / "tiny-bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    register_open_clip_config("tiny-clip-it", TINY_CLIP)
    torch.manual_seed(1)
    clip, _, _ = open_clip.create_model_and_transforms("tiny-clip-it", pretrained=None)
    ckpt = d / "tiny-clip-it.pt"
    torch.save(clip.state_dict(), ckpt)
    text = {"backend": "transformers", "model": str(bert), "modality": "text"}
    image = {"backend": "open_clip", "model": "tiny-clip-it", "model_config": TINY_CLIP, "pretrained": str(ckpt), "modality": "image"}
    return text, image


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _run_local(dataset, encoders, out, **kw):
    text, image = encoders
    return extract_features_local(dataset, out, text_encoder=text, image_encoder=image, shard_size=SHARD, batch_size=5, progress=False, **kw)


def _run_ray(dataset, encoders, out, **kw):
    text, image = encoders
    return extract_features(dataset, out, text_encoder=text, image_encoder=image, shard_size=SHARD, batch_size=5, num_actors=2, progress=False, **kw)


@pytest.fixture(scope="module")
def local_out(dataset, encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("feat") / "local"
    return out, _run_local(dataset, encoders, out)


@pytest.fixture(scope="module")
def ray_out(dataset, encoders, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("feat") / "ray"
    return out, _run_ray(dataset, encoders, out)


def _assert_same_features(a, b):
    """Same features up to float noise: a different batch composition changes the last bits."""
    fa, fb = load_item_features(a, n_items=N_ITEMS), load_item_features(b, n_items=N_ITEMS)
    for m in fa.features:
        torch.testing.assert_close(fa.features[m], fb.features[m], atol=1e-5, rtol=1e-5)
        assert torch.equal(fa.mask[m], fb.mask[m])


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.tar"))}


def test_shards_and_manifest(ray_out):
    out, m = ray_out
    assert m["complete"] and m["n_items"] == N_ITEMS and m["run"]["mode"] == "ray" and m["run"]["num_actors"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((out / "manifest.json").read_text()) == m
    assert [(s["first_item"], s["last_item"], s["count"]) for s in m["shards"]] == [(1, 8, 8), (9, 16, 8), (17, 23, 7)]
    for s in m["shards"]:
        assert store.sha256_file(out / s["file"]) == s["sha256"] and (out / s["file"]).stat().st_size == s["bytes"]
    assert m["dims"] == {"text": 24, "image": 16}
    assert m["encoders"]["text"]["backend"] == "transformers" and m["encoders"]["image"]["weights"]["source"] == "checkpoint"
    assert m["item_ids"] == [f"B{i:05d}" for i in range(1, N_ITEMS + 1)]
    img = m["missing"]["image"]
    assert img["total"] == len(BAD_IMAGES)
    assert img["reasons"] == {"no_image": 2, "file_not_found": 1, "not_an_image": 1, "truncated": 1}
    assert sorted(img["examples"]["no_image"]) == sorted(NO_IMAGE)
    assert m["missing"]["text"]["reasons"] == {"no_text": 2}
    # WebDataset layout: <key>.text.npy, <key>.image.npy, <key>.meta.json per item
    with tarfile.open(out / "shard-000001.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000012.meta.json").read())
        x = np.load(io.BytesIO(tar.extractfile("000000010.image.npy").read()), allow_pickle=False)
    assert names[:3] == ["000000009.text.npy", "000000009.image.npy", "000000009.meta.json"] and len(names) == 24
    assert meta == {"item_idx": 12, "item_id": "B00012", "mask": {"text": True, "image": False}, "missing": {"image": "truncated"}}
    assert x.shape == (16,) and x.dtype == np.float32


def test_webdataset_reads_the_shards(ray_out):
    wds = pytest.importorskip("webdataset")
    out, _ = ray_out
    ds = wds.WebDataset([str(out / "shard-000000.tar")], shardshuffle=False).decode()
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(1, 9)]
    assert samples[0]["text.npy"].shape == (24,) and samples[3]["meta.json"]["mask"]["image"] is False


def test_ray_equals_local_and_masks(ray_out, local_out):
    f_ray = load_item_features(ray_out[0], n_items=N_ITEMS)
    f_loc = load_item_features(local_out[0], n_items=N_ITEMS)
    assert f_ray.dims == {"text": 24, "image": 16} and f_ray.n_items == N_ITEMS
    for m in ("text", "image"):
        assert f_ray.features[m].shape == (N_ITEMS + 1, f_ray.dims[m]) and f_ray.features[m].dtype == torch.float32
        torch.testing.assert_close(f_ray.features[m], f_loc.features[m], atol=1e-5, rtol=1e-5)
        assert torch.equal(f_ray.mask[m], f_loc.mask[m]) and f_ray.mask[m].dtype == torch.bool
        assert not f_ray.mask[m][0] and f_ray.features[m][0].abs().sum() == 0  # padding row
    img_mask = f_ray.mask["image"]
    assert [i for i in range(1, N_ITEMS + 1) if not img_mask[i]] == sorted(BAD_IMAGES)
    assert f_ray.features["image"][sorted(BAD_IMAGES)].abs().sum() == 0
    assert f_ray.features["image"][1].abs().sum() > 0 and f_ray.features["image"][2].abs().sum() > 0  # absolute and relative paths
    assert [i for i in range(1, N_ITEMS + 1) if not f_ray.mask["text"][i]] == sorted(NO_TEXT)
    assert f_ray.item_ids[1] == "B00001" and f_ray.encoders["image"]["dim"] == 16
    # the features are the encoders' own outputs
    from moedist.features.encoders import build_encoder

    enc = build_encoder(json.loads(json.dumps(ray_out[1]["encoder_specs"]["text"])))
    items = pd.read_parquet(ray_out[1]["data_dir"] + "/items.parquet").set_index("item_idx")
    np.testing.assert_allclose(f_ray.features["text"][7].numpy(), enc.encode([items.loc[7, "text"]])[0], atol=1e-5)


def test_resume_skips_complete_shards_and_rebuilds_a_deleted_one(dataset, encoders, ray_out, local_out):
    out, first = ray_out
    first_local_dir = local_out[0]
    before = _mtimes(out)
    m = _run_ray(dataset, encoders, out)  # nothing to do: no actors started
    assert m["run"]["shards_skipped"] == 3 and m["run"]["shards_built"] == 0 and _mtimes(out) == before
    (out / "shard-000001.tar").unlink()
    m = _run_ray(dataset, encoders, out)
    after = _mtimes(out)
    assert m["run"]["shards_built"] == 1 and m["run"]["items_encoded"] == 8
    assert after["shard-000000.tar"] == before["shard-000000.tar"] and after["shard-000002.tar"] == before["shard-000002.tar"]
    assert after["shard-000001.tar"] != before["shard-000001.tar"]
    assert m["shards"][0]["sha256"] == first["shards"][0]["sha256"] and m["missing"] == first["missing"]
    _assert_same_features(out, first_local_dir)


def test_crash_midway_then_resume(dataset, encoders, tmp_path, monkeypatch, local_out):
    from moedist.features import pipeline

    out = tmp_path / "crash"
    real = pipeline.encode_rows
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # 10 items encoded: shard 0 written, shard 1 half done
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "encode_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        _run_local(dataset, encoders, out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False and [s["file"] for s in m["shards"]] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar"]  # no partial shard visible
    with pytest.raises(DataError, match="did not finish"):
        load_item_features(out)
    (out / "shard-000001.tar.123.tmp").write_bytes(b"partial")  # a crashed writer's leftover
    monkeypatch.setattr(pipeline, "encode_rows", real)
    t0 = _mtimes(out)["shard-000000.tar"]
    m = _run_local(dataset, encoders, out)
    assert m["complete"] and m["run"]["shards_skipped"] == 1 and m["run"]["items_encoded"] == N_ITEMS - SHARD
    assert _mtimes(out)["shard-000000.tar"] == t0 and not list(out.glob("*.tmp"))
    _assert_same_features(out, local_out[0])


def test_changed_encoder_rebuilds_everything(dataset, encoders, tmp_path):
    text, image = encoders
    out = tmp_path / "text-only"
    m = extract_features_local(dataset, out, text_encoder=text, image_encoder=None, shard_size=SHARD, batch_size=8, progress=False)
    assert m["modalities"] == ["text"] and "image" not in m["dims"]
    m = extract_features_local(dataset, out, text_encoder=text, image_encoder=None, shard_size=12, batch_size=8, progress=False)
    assert m["run"]["shards_built"] == 2 and sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    f = load_item_features(out)
    assert set(f.features) == {"text"}


def test_an_interrupted_rerun_with_another_layout_leaves_no_manifest_of_deleted_shards(dataset, encoders, tmp_path, monkeypatch):
    from moedist.features import pipeline

    text, _ = encoders
    out = tmp_path / "relayout"
    run = dict(text_encoder=text, image_encoder=None, batch_size=8, progress=False)
    extract_features_local(dataset, out, shard_size=4, **run)  # 6 shards
    load_item_features(out)

    real = pipeline.encode_rows

    def dying(*a, **kw):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(pipeline, "encode_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features_local(dataset, out, shard_size=12, **run)  # 2 shards: 2..5 are deleted before encoding
    on_disk = {p.name for p in out.glob("shard-*.tar")}
    m = json.loads((out / "manifest.json").read_text())
    # the old manifest stayed, complete=true, listing shards the re-run had deleted
    assert {s["file"] for s in m["shards"]} <= on_disk and m["complete"] is False
    with pytest.raises(DataError, match="did not finish"):
        load_item_features(out)
    monkeypatch.setattr(pipeline, "encode_rows", real)
    m = extract_features_local(dataset, out, shard_size=12, **run)
    assert m["complete"] and m["run"]["shards_built"] == 2
    assert load_item_features(out, n_items=N_ITEMS).n_items == N_ITEMS


def test_damaged_shards_raise_data_error_naming_them(local_out, tmp_path):
    import shutil

    src, _ = local_out
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    with pytest.raises(DataError, match="for 23 items but the dataset has 24"):
        load_item_features(out, n_items=24)
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # flip a byte inside an .npy payload
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-000001.tar.*corrupt"):
        load_item_features(out)
    shard.write_bytes(bytes(data[:3000]))  # truncated; also without the checksum
    with pytest.raises(DataError, match="shard-000001.tar"):
        load_item_features(out, verify=False)
    shard.unlink()
    with pytest.raises(DataError, match="shard-000001.tar is missing"):
        load_item_features(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        load_item_features(out)


def test_cli_extract_local(dataset, encoders, tmp_path, capsys):
    import argparse

    from moedist.features.cli import add_commands

    parser = argparse.ArgumentParser(prog="moedist")
    add_commands(parser.add_subparsers(dest="command"))
    text, image = encoders
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["extract", str(dataset), "--out", str(out), "--local", "--text-encoder", json.dumps(text), "--image-encoder", json.dumps(image), "--shard-size", "10", "--batch-size", "8", "--no-progress"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "items/s" in printed and "missing image" in printed and "not_an_image" in printed
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 3


def test_write_feature_arrays_round_trip(tmp_path):
    from moedist.features.store import write_feature_arrays

    rng = np.random.default_rng(0)
    text = rng.normal(size=(11, 6)).astype(np.float32)
    image = rng.normal(size=(11, 3)).astype(np.float32)
    image[4] = 0  # all-zero row -> masked by default
    m = write_feature_arrays(tmp_path / "arr", item_ids=[f"i{i}" for i in range(1, 12)], arrays={"text": text, "image": image}, shard_size=4)
    assert [s["file"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    f = load_item_features(tmp_path / "arr", n_items=11)
    np.testing.assert_array_equal(f.features["text"][1:].numpy(), text)
    np.testing.assert_array_equal(f.features["image"][1:].numpy(), image)
    assert f.mask["image"].tolist() == [False] + [i != 4 for i in range(11)] and f.mask["text"][1:].all()
    assert f.item_ids[1] == "i1" and m["missing"]["image"]["total"] == 1


# ----------------------------------------------------------------------------- resume: never mix encoders


def _text_only(dataset, out, text, **kw):
    return extract_features_local(dataset, out, text_encoder=text, image_encoder=None, shard_size=SHARD, batch_size=8, progress=False, **kw)


def _retrain_bert(folder, seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig.from_pretrained(folder)).save_pretrained(folder)


def test_new_weights_at_the_same_path_rebuild_every_shard(dataset, encoders, tmp_path):
    import shutil

    text, _ = encoders
    bert = tmp_path / "bert"
    shutil.copytree(text["model"], bert)
    spec = dict(text, model=str(bert))
    out = tmp_path / "feat"
    first = _text_only(dataset, out, spec)
    (out / "shard-000001.tar").unlink()  # an interrupted run ...
    _retrain_bert(bert, seed=7)  # ... and a new checkpoint written over the old one
    logs = []
    m = _text_only(dataset, out, spec, log=logs.append)
    assert m["run"]["shards_built"] == 3 and m["run"]["shards_skipped"] == 0
    assert any("weights changed" in line and "rebuilding every shard" in line for line in logs)
    assert m["encoders"]["text"]["weights"]["sha256"] != first["encoders"]["text"]["weights"]["sha256"]
    fresh = tmp_path / "fresh"
    _text_only(dataset, fresh, spec)
    _assert_same_features(out, fresh)  # every row made with the new weights


def test_a_new_encoder_version_rebuilds_every_shard(dataset, encoders, tmp_path, monkeypatch):
    from moedist.features.encoders import HFTextCLSEncoder

    text, _ = encoders
    out = tmp_path / "feat"
    _text_only(dataset, out, text)
    monkeypatch.setattr(HFTextCLSEncoder, "version", HFTextCLSEncoder.version + ".1")  # preprocessing changed
    m = _text_only(dataset, out, text)
    assert m["run"]["shards_built"] == 3 and m["run"]["shards_skipped"] == 0
    assert m["encoders"]["text"]["version"] == HFTextCLSEncoder.version


def _pretend_older_library(out):
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    m["encoders"]["text"]["transformers"] = "0.0.1"  # what describe() said when the kept shards were made
    path.write_text(json.dumps(m))


def test_kept_shards_from_a_differently_described_encoder_are_not_mixed_local(dataset, encoders, tmp_path):
    text, _ = encoders
    out = tmp_path / "feat"
    _text_only(dataset, out, text)
    _pretend_older_library(out)
    (out / "shard-000001.tar").unlink()
    logs = []
    m = _text_only(dataset, out, text, log=logs.append)
    assert m["run"]["shards_built"] == 3 and m["run"]["shards_skipped"] == 0
    assert any("differs from the one that made the 2 kept shard(s)" in line and "0.0.1" in line for line in logs)
    assert m["encoders"]["text"]["transformers"] != "0.0.1"


def test_kept_shards_from_a_differently_described_encoder_are_not_mixed_ray(dataset, encoders, ray_out, tmp_path):
    import shutil

    out = tmp_path / "ray-copy"
    shutil.copytree(ray_out[0], out)
    _pretend_older_library(out)
    (out / "shard-000002.tar").unlink()
    logs = []
    m = _run_ray(dataset, encoders, out, log=logs.append)
    assert m["run"]["shards_built"] == 3 and m["run"]["shards_skipped"] == 0 and m["complete"]
    assert any("differs from the one that made the 2 kept shard(s)" in line for line in logs)
    _assert_same_features(out, ray_out[0])


# ----------------------------------------------------------------------------- resume: retry what failed for a while


def _image_dataset(root, sources):
    root.mkdir()
    pd.DataFrame({"item_idx": range(1, len(sources) + 1), "item_id": [f"I{i}" for i in range(1, len(sources) + 1)],
                  "text": None, "image": sources}).to_parquet(root / "items.parquet", index=False)
    return root


def _jpeg_bytes(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _images_only(data, out, image, **kw):
    return extract_features_local(data, out, text_encoder=None, image_encoder=image, shard_size=3, batch_size=3, progress=False,
                                  fetch_retries=0, fetch_timeout=2, **kw)


def test_images_missing_while_a_mount_was_down_are_retried_and_warned_about(encoders, tmp_path):
    _, image = encoders
    mount = tmp_path / "mnt"  # not there during the first run
    data = _image_dataset(tmp_path / "data", [str(mount / f"{i}.jpg") for i in range(1, 7)] + [str(tmp_path / "really-gone.jpg")])
    out = tmp_path / "feat"
    logs = []
    with pytest.warns(RuntimeWarning, match="image features are missing for 7 of 7 items"):
        m = _images_only(data, out, image, log=logs.append)
    assert m["missing"]["image"]["reasons"] == {"file_not_found": 7}
    assert m["warnings"] and any(line.startswith("WARNING: image features are missing for 7 of 7") for line in logs)
    mount.mkdir()
    for i in range(1, 7):
        (mount / f"{i}.jpg").write_bytes(_jpeg_bytes(i))
    m = _images_only(data, out, image)
    assert m["run"]["shards_built"] == 2 and m["run"]["shards_skipped"] == 1  # shard 2 holds only item 7, still gone
    assert m["missing"]["image"]["reasons"] == {"file_not_found": 1} and m["warnings"] == []
    assert load_item_features(out).mask["image"].tolist() == [False] + [True] * 6 + [False]
    # a file that is really gone does not make every later run rebuild its shard
    m = _images_only(data, out, image)
    assert m["run"]["shards_built"] == 0 and m["run"]["shards_skipped"] == 3


def test_images_that_timed_out_or_were_refused_are_retried_on_a_rerun(encoders, tmp_path):
    import socket

    _, image = encoders
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = tmp_path / "ok.jpg"
    local.write_bytes(_jpeg_bytes(0))
    data = _image_dataset(tmp_path / "data", [str(local)] * 3 + [f"http://127.0.0.1:{port}/x.jpg"] + [str(local)] * 2)
    out = tmp_path / "feat"
    m = _images_only(data, out, image, image_cache_dir=tmp_path / "cache")
    assert m["missing"]["image"]["reasons"] == {"connection_error": 1}
    logs = []
    m = _images_only(data, out, image, image_cache_dir=tmp_path / "cache", log=logs.append)
    assert m["run"]["shards_built"] == 1 and m["run"]["shards_skipped"] == 1  # only the shard with the failure
    assert any("shard-000001.tar: 1 image(s) failed for temporary reasons (connection_error: 1)" in line for line in logs)
    m = _images_only(data, out, image, image_cache_dir=tmp_path / "cache", retry_missing=False)
    assert m["run"]["shards_built"] == 0


def test_images_a_server_refuses_are_not_fetched_again_by_every_rerun(encoders, tmp_path):
    """A 403 (or 401, 400, ...) is the server's answer about that URL, the same on every run:
    unlike a 5xx, it does not make each re-run rebuild the shard (dead Amazon image URLs answer
    403, and nearly every shard of a large catalogue has one)."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        _, image = encoders
        local = tmp_path / "ok.jpg"
        local.write_bytes(_jpeg_bytes(0))
        url = f"http://127.0.0.1:{httpd.server_address[1]}/x.jpg"
        data = _image_dataset(tmp_path / "data", [str(local)] * 3 + [url] + [str(local)] * 2)
        out = tmp_path / "feat"
        m = _images_only(data, out, image, image_cache_dir=tmp_path / "cache")
        assert m["missing"]["image"]["reasons"] == {"http_error": 1}
        m = _images_only(data, out, image, image_cache_dir=tmp_path / "cache")
        assert m["run"]["shards_built"] == 0 and m["run"]["shards_skipped"] == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


# ----------------------------------------------------------------------------- bad settings, unusable manifests


def test_local_batch_size_must_be_positive(dataset, encoders, tmp_path):
    from moedist.errors import ConfigError

    text, _ = encoders
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        extract_features_local(dataset, tmp_path / "x", text_encoder=text, image_encoder=None, batch_size=0, progress=False)


@pytest.mark.parametrize("damage", ["list", "no-dims", "bad-shard-entry"])
def test_an_unusable_manifest_makes_extract_start_over(dataset, encoders, local_out, tmp_path, damage):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(local_out[0], out)
    m = json.loads((out / "manifest.json").read_text())
    if damage == "list":
        m = m["shards"]
    elif damage == "no-dims":
        del m["dims"]
    else:
        m["shards"][1] = {"file": "shard-000001.tar"}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="manifest.json: manifest is not usable"):
        load_item_features(out)
    logs = []
    m = _run_local(dataset, encoders, out, log=logs.append)
    assert m["complete"] and m["run"]["shards_built"] == 3
    assert any("ignoring unusable manifest" in line and "rebuilding every shard" in line for line in logs)
    _assert_same_features(out, local_out[0])
