"""The preparation pipeline on hand-built raw sources: k-core, splits, id maps, atomicity."""
import json

import numpy as np
import pandas as pd
import pytest

from moedist.data.dataset import ColdStartData, PreparedDataset, SequentialSamples
from moedist.data.prepare import PrepareOptions, cold_item_split, kcore_filter, prepare_dataset
from moedist.data.schema import RawSource
from moedist.errors import DataError


def raw(rows, items=None, name="t"):
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["rating"] = np.nan
    inter = inter.astype({"user_id": "string", "item_id": "string", "timestamp": "int64"})
    if items is None:
        ids = sorted(inter["item_id"].unique())
        items = pd.DataFrame({"item_id": ids, "title": ids, "brand": pd.NA, "categories": [["Root", i[:1]] for i in ids], "image": pd.NA, "text": [f"{i}." for i in ids]})
    return RawSource(name=name, interactions=inter, items=items)


def dense_source(n_users=12, n_items=10, per_user=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        for j, i in enumerate(items):
            rows.append((f"u{u:02d}", f"i{i:02d}", 1_000_000 + 86400 * (j // 2)))  # same-day pairs
    return raw(rows)


def test_kcore_reaches_a_fixed_point():
    # u3 has 2 interactions -> removed; that drops item C to 2 -> removed; which drops u2 to 2 ...
    rows = [("u1", i, t) for t, i in enumerate("ABD")] + [("u2", i, t) for t, i in enumerate("ABC")] + [
        ("u3", "C", 0), ("u3", "D", 1)] + [("u4", i, t) for t, i in enumerate("ABD")]
    df = raw(rows).interactions
    out, passes = kcore_filter(df, 3)
    # after fixing: u1, u4 have A,B,D; u2 has A,B (C gone) -> u2 < 3 -> gone; A,B,D have 2 users -> all gone
    assert out.empty and passes >= 2
    out2, _ = kcore_filter(df, 2)
    counts_u = out2.groupby("user_id").size()
    counts_i = out2.groupby("item_id").size()
    assert (counts_u >= 2).all() and (counts_i >= 2).all()
    again, passes_again = kcore_filter(out2, 2)
    assert len(again) == len(out2) and passes_again == 1


def test_leave_one_out_targets_are_each_users_last_two_items(tmp_path):
    src = dense_source()
    m = prepare_dataset(src, tmp_path / "p", options=PrepareOptions(kcore=1))
    d = PreparedDataset(tmp_path / "p")
    inter = d.interactions.sort_values(["user_idx", "seq_pos"])
    for u, g in inter.groupby("user_idx"):
        assert list(g["loo_split"])[-2:] == ["valid", "test"]
        assert set(list(g["loo_split"])[:-2]) <= {"train"}
        assert list(g["timestamp"]) == sorted(g["timestamp"])
    test = SequentialSamples.build(d, "test", max_len=50)
    valid = SequentialSamples.build(d, "valid", max_len=50)
    train = SequentialSamples.build(d, "train", max_len=50)
    assert len(test) == len(valid) == d.n_users
    assert len(train) == m["stats"]["loo"]["train_samples"] == d.n_users * (6 - 3)
    b = test.batch(np.arange(len(test)))
    last = inter.groupby("user_idx").tail(1).set_index("user_idx")["item_idx"]
    assert b["target"].tolist() == last.loc[b["user"].numpy()].tolist()
    # test history includes the validation target (spec 1.2); valid history excludes it
    vb = valid.batch(np.arange(len(valid)))
    assert (b["item_seq_len"] == vb["item_seq_len"] + 1).all()
    assert (b["item_seq"][np.arange(len(test)), vb["item_seq_len"]] == vb["target"]).all()


def test_sequence_batches_are_left_aligned_and_truncated_to_max_len(tmp_path):
    rows = [("u1", f"i{j}", 100 + j) for j in range(8)] + [("u2", f"i{j}", 100 + j) for j in range(3)]
    prepare_dataset(raw(rows), tmp_path / "p", options=PrepareOptions(kcore=1))
    d = PreparedDataset(tmp_path / "p")
    test = SequentialSamples.build(d, "test", max_len=4)
    b = test.batch(np.arange(len(test)))
    u1 = int(np.flatnonzero(b["user"].numpy() == 1)[0])
    # u1's items i0..i7 -> ids 1..8; test target i7, history = the 4 most recent before it
    assert b["target"][u1] == d.items.set_index("item_id").loc["i7", "item_idx"]
    hist_ids = d.items.set_index("item_idx").loc[b["item_seq"][u1].tolist(), "item_id"].tolist()
    assert hist_ids == ["i3", "i4", "i5", "i6"] and int(b["item_seq_len"][u1]) == 4
    assert b["time_seq"][u1].tolist() == [103, 104, 105, 106]
    u2 = 1 - u1
    assert b["item_seq"][u2].tolist()[2:] == [0, 0] and b["time_seq"][u2].tolist()[2:] == [0, 0]


def test_same_timestamp_ties_keep_file_order(tmp_path):
    rows = [("u1", "Z", 5), ("u1", "A", 5), ("u1", "M", 5), ("u1", "B", 1)]
    prepare_dataset(raw(rows), tmp_path / "p", options=PrepareOptions(kcore=1))
    d = PreparedDataset(tmp_path / "p")
    by_idx = d.items.set_index("item_idx")["item_id"]
    assert [by_idx[i] for i in d.seq_items] == ["B", "Z", "A", "M"]


def test_cold_split_has_no_cold_item_in_training(tmp_path):
    src = dense_source(n_users=40, n_items=30, per_user=8)
    m = prepare_dataset(src, tmp_path / "p", options=PrepareOptions(kcore=1))
    d = PreparedDataset(tmp_path / "p")
    labels = d.item_split()
    assert (labels[1:] == "valid").sum() == 3 and (labels[1:] == "test").sum() == 3
    cold = ColdStartData(d)
    assert set(labels[cold.train_items]) == {"train"}
    assert set(labels[cold.candidates]) == {"valid", "test"}
    users, held = cold.heldout("test")
    for its in held:
        assert set(labels[its]) == {"test"}
    assert m["stats"]["cold"]["train_interactions"] == len(cold)
    # negatives are never the user's training positives
    rng = np.random.default_rng(0)
    u, p, n = cold.epoch_triples(rng)
    pos = set(zip(cold.train_users.tolist(), cold.train_items.tolist()))
    assert not any((a, b) in pos for a, b in zip(u.tolist(), n.tolist()))


def test_cold_item_split_is_8_1_1_and_seeded():
    a = cold_item_split(100, valid_frac=0.1, test_frac=0.1, seed=1)
    b = cold_item_split(100, valid_frac=0.1, test_frac=0.1, seed=1)
    c = cold_item_split(100, valid_frac=0.1, test_frac=0.1, seed=2)
    assert (a == b).all() and not (a == c).all()
    assert [(a == s).sum() for s in ("train", "valid", "test")] == [80, 10, 10]


def test_dedup_keeps_first_chronological_interaction(tmp_path):
    rows = [("u1", "A", 10), ("u1", "B", 5), ("u1", "A", 1), ("u1", "C", 20)]
    m = prepare_dataset(raw(rows), tmp_path / "p", options=PrepareOptions(kcore=1, dedup=True))
    d = PreparedDataset(tmp_path / "p")
    assert m["stats"]["duplicates_removed"] == 1
    assert d.seq_times.tolist() == [1, 5, 20]


def test_empty_after_kcore_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no interactions left after 5-core"):
        prepare_dataset(raw([("u1", "A", 1), ("u2", "B", 2)]), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_rerun_is_a_noop_and_failed_run_keeps_previous_output(tmp_path):
    src = dense_source()
    f = tmp_path / "raw.csv"
    f.write_text("fingerprinted input")
    calls = []

    def load():
        calls.append(1)
        return src

    out = tmp_path / "p"
    m1 = prepare_dataset(load, out, options=PrepareOptions(kcore=1), raw_files=[str(f)])
    mtime = (out / "interactions.parquet").stat().st_mtime_ns
    m2 = prepare_dataset(load, out, options=PrepareOptions(kcore=1), raw_files=[str(f)])
    assert len(calls) == 1 and m2["reused"] and (out / "interactions.parquet").stat().st_mtime_ns == mtime
    assert m2["files"] == m1["files"]

    def broken():
        raise DataError("boom", path="raw.csv", line=3)

    f.write_text("changed input")
    with pytest.raises(DataError, match="raw.csv:3: boom"):
        prepare_dataset(broken, out, options=PrepareOptions(kcore=1), raw_files=[str(f)])
    assert json.loads((out / "dataset.json").read_text())["fingerprint"] == m1["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_manifest_hashes_match_files(tmp_path):
    from moedist.data.prepare import sha256_file

    m = prepare_dataset(dense_source(), tmp_path / "p", options=PrepareOptions(kcore=1))
    for name, digest in m["files"].items():
        assert sha256_file(tmp_path / "p" / name) == digest
    assert m["stats"]["users"] == 12 and m["max_interval_seconds"] == 86400  # pairs per day: gaps 0 or 1 day


def test_category_multihot_first_appearance_order(tmp_path):
    prepare_dataset(dense_source(), tmp_path / "p", options=PrepareOptions(kcore=1))
    d = PreparedDataset(tmp_path / "p")
    vocab = d.category_vocab()
    assert vocab[0] == "Root"
    mh = d.category_multihot()
    assert mh.shape == (d.n_items + 1, len(vocab))
    assert mh[0].sum() == 0 and (mh[1:, 0] == 1).all() and (mh[1:].sum(1) == 2).all()


def test_packaged_data_yaml_loads():
    from moedist.config import load_config, packaged_config
    from moedist.data.api import DataConfig

    assert load_config(DataConfig, packaged_config("data")) == DataConfig()


def test_movielens_100k_prepared_statistics(shared_data, tmp_path):
    """The spec's numbers for ML-100K after 5-core (MODELS_SPEC addendum)."""
    from moedist.data.api import DataConfig, prepare

    m = prepare(DataConfig(source="atomic", input=str(shared_data / "movielens-100k"), out=str(tmp_path / "ml")))
    s = m["stats"]
    assert (s["users"], s["items"]) == (943, 1349)
    assert s["loo"]["train_samples"] == 96458
    assert s["loo"]["valid_users"] == s["loo"]["test_users"] == 943
    d = PreparedDataset(tmp_path / "ml")
    assert len(SequentialSamples.build(d, "train", 50)) == 96458
    again = prepare(DataConfig(source="atomic", input=str(shared_data / "movielens-100k"), out=str(tmp_path / "ml")))
    assert again["reused"]
