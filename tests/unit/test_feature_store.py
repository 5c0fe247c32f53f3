"""Feature folders on disk: manifest checks and "are these features for this dataset?".

Folders are written with ``write_feature_arrays`` (real shards, no encoder needed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from moedist.errors import DataError
from moedist.features.store import items_digest, load_item_features, read_manifest, write_feature_arrays

IDS = [f"i{i}" for i in range(1, 8)]


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "feat"
    write_feature_arrays(out, item_ids=IDS, arrays={"text": rng.normal(size=(7, 4)), "image": rng.normal(size=(7, 3))}, shard_size=3)
    return out


def _edit(folder, fn):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m = fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["shards"], "expected a JSON object, got a JSON list"),
        (lambda m: {k: v for k, v in m.items() if k != "dims"}, "'dims'"),
        (lambda m: {**m, "dims": {"text": "4"}}, "'dims'"),
        (lambda m: {**m, "n_items": "7"}, "'n_items'"),
        (lambda m: {**m, "shards": {"0": 1}}, "'shards' must be a list"),
        (lambda m: {**m, "shards": [{**m["shards"][0], "file": "../../etc/passwd"}, *m["shards"][1:]]}, r"shards\[0\].file"),
        (lambda m: {**m, "shards": [{k: v for k, v in s.items() if k != "sha256"} for s in m["shards"]]}, r"shards\[0\].sha256"),
        (lambda m: {**m, "item_ids": m["item_ids"][:3]}, "'item_ids'"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_a_data_error_naming_it(folder, edit, message):
    _edit(folder, edit)
    with pytest.raises(DataError, match=message) as e:
        load_item_features(folder)
    assert e.value.path == str(folder / "manifest.json")
    with pytest.raises(DataError, match=message):
        read_manifest(folder)


def test_features_of_another_item_order_are_refused_naming_both_folders(folder, tmp_path):
    f = load_item_features(folder, n_items=7, items=IDS, data_dir=tmp_path / "data-a")
    assert f.item_ids[1:] == IDS
    swapped = IDS[:2] + [IDS[3], IDS[2]] + IDS[4:]  # same count, same ids, another order
    with pytest.raises(DataError, match=r"item_idx 3 is 'i4' in the dataset but 'i3' in the features") as e:
        load_item_features(folder, n_items=7, items=swapped, data_dir=tmp_path / "data-b")
    assert str(folder) in str(e.value) and str(tmp_path / "data-b") in str(e.value)
    other = [f"x{i}" for i in range(1, 8)]
    with pytest.raises(DataError, match="re-run `moedist extract"):
        load_item_features(folder, items=pd.DataFrame({"item_idx": range(1, 8), "item_id": other}))


def test_items_digest_catches_changed_text_with_the_same_ids(folder):
    text = [f"text of {i}" for i in IDS]
    _edit(folder, lambda m: {**m, "items_digest": items_digest(IDS, text=text), "data_dir": "/data/a"})
    same = pd.DataFrame({"item_idx": range(7, 0, -1), "item_id": IDS[::-1], "text": text[::-1], "image": [None] * 7})
    load_item_features(folder, items=same)  # ordered by item_idx before comparing
    changed = same.copy()
    changed.loc[0, "text"] = "another text"
    with pytest.raises(DataError, match=r"extracted from /data/a: the same item ids, but the items' text"):
        load_item_features(folder, items=changed)
    # only the modalities loaded count
    load_item_features(folder, items=changed, modalities=["image"])


def test_an_older_manifest_without_items_digest_loads_when_its_ids_match(folder):
    _edit(folder, lambda m: {k: v for k, v in m.items() if k != "items_digest"})
    items = pd.DataFrame({"item_idx": range(1, 8), "item_id": IDS, "text": ["t"] * 7, "image": [None] * 7})
    assert load_item_features(folder, items=items).n_items == 7
    with pytest.raises(DataError, match="item_idx 1"):
        load_item_features(folder, items=items.assign(item_id=["z"] + IDS[1:]))


def test_training_refuses_features_made_for_another_dataset(toy_data, toy_features, tmp_path):
    """The train loop's call site passes the dataset's items: equal counts are not enough."""
    from moedist.data.dataset import PreparedDataset
    from moedist.train.cli import load_experiment_config
    from moedist.train.loop import load_features_for

    data = PreparedDataset(toy_data)
    ok = load_experiment_config("mamex", None, [f"data={toy_data}", f"features={toy_features}"])
    assert load_features_for(ok, data).n_items == data.n_items
    other = tmp_path / "other-features"
    shutil.copytree(toy_features, other)
    ids = data.items["item_id"].tolist()
    rng = np.random.default_rng(0)
    write_feature_arrays(other, item_ids=ids[::-1], arrays={"text": rng.normal(size=(len(ids), 16)), "image": rng.normal(size=(len(ids), 16))})
    bad = load_experiment_config("mamex", None, [f"data={toy_data}", f"features={other}"])
    with pytest.raises(DataError, match="not from the dataset") as e:
        load_features_for(bad, data)
    assert str(other) in str(e.value) and str(toy_data) in str(e.value)


@pytest.mark.parametrize("idx", [[1.0, np.nan], ["1", "x"]])
def test_an_item_idx_that_is_not_an_integer_is_a_data_error_naming_the_table(tmp_path, idx):
    from moedist.features.pipeline import read_items

    pd.DataFrame({"item_idx": idx, "item_id": ["a", "b"], "text": ["x", "y"]}).to_parquet(tmp_path / "items.parquet")
    # was pandas' IntCastingNaNError / ValueError, naming neither the file nor the column
    with pytest.raises(DataError, match=r"items\.parquet: column item_idx must hold integers"):
        read_items(tmp_path)
