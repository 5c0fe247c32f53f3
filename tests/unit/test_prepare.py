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


# --------------------------------------------------------------------------- review fixes

ATOMIC_HEADER = "user_id:token\titem_id:token\ttimestamp:float"


def atomic_input(path, rows=None):
    """A small RecBole .inter file (5 users x 4 items, one per day)."""
    rows = rows if rows is not None else [f"u{u}\ti{(u + j) % 6}\t{1000 + 86400 * j}" for u in range(5) for j in range(4)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([ATOMIC_HEADER, *rows]) + "\n")
    return path


def tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def atomic_cfg(inp, out, **kw):
    from moedist.data.api import DataConfig

    return DataConfig(source="atomic", input=str(inp), out=str(out), kcore=kw.pop("kcore", 1), **kw)


def test_out_dir_that_is_not_a_dataset_is_never_replaced(tmp_path, monkeypatch):
    from moedist.data.api import prepare

    work = tmp_path / "work"
    inp = atomic_input(work / "ml.inter")
    (work / "notes.txt").write_text("my notes")
    before = tree(work)
    # the folder holding the input
    with pytest.raises(DataError, match=r"work: refusing .* holds the input"):
        prepare(atomic_cfg(inp, work))
    # the input itself
    with pytest.raises(DataError, match="refusing .* is the input"):
        prepare(atomic_cfg(inp, inp))
    # the current directory, given as ".", as its absolute path, or a folder above it
    monkeypatch.chdir(work)
    for out in (".", str(work), "..", str(tmp_path)):
        with pytest.raises(DataError, match="current directory or one above it"):
            prepare(atomic_cfg("ml.inter", out))
    monkeypatch.chdir(tmp_path)
    # any other non-empty folder without a moedist dataset.json
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    (other / "dataset.json").write_text('{"name": "not ours"}')  # no "format"
    with pytest.raises(DataError, match=r"other: refusing to replace this folder: it is not empty"):
        prepare(atomic_cfg(inp, other))
    assert tree(work) == before
    assert sorted(p.name for p in other.iterdir()) == ["dataset.json", "keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an empty folder and an earlier prepared dataset are replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not prepare(atomic_cfg(inp, empty))["reused"]
    assert prepare(atomic_cfg(inp, empty, kcore=2))["options"]["kcore"] == 2
    assert PreparedDataset(empty).n_users == 5


def test_cli_refuses_an_out_dir_holding_the_input(tmp_path, monkeypatch, capsys):
    from moedist.cli import main

    work = tmp_path / "work"
    atomic_input(work / "ml.inter")
    (work / "notes.txt").write_text("my notes")
    before = tree(work)
    monkeypatch.chdir(tmp_path)
    for out in ("work", str(work)):
        assert main(["data", "prepare", "--source", "atomic", "--input", "work/ml.inter", "--out", out, "--kcore", "1"]) == 2
    monkeypatch.chdir(work)
    assert main(["data", "prepare", "--source", "atomic", "--input", "ml.inter", "--out", ".", "--kcore", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err and "refusing" in err
    assert tree(work) == before


def test_amazon_meta_is_fingerprinted_under_any_extension(tmp_path):
    """``reviews_X_5.json.gz`` + ``meta_X.json``: the reader uses the meta file, so editing it
    must make a re-run prepare again."""
    import gzip

    from moedist.data.api import DataConfig, prepare

    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    reviews = [{"reviewerID": f"U{u}", "asin": f"I{(u + j) % 4}", "overall": 4.0, "unixReviewTime": 1_400_000_000 + 86400 * j}
               for u in range(4) for j in range(3)]
    with gzip.open(raw_dir / "reviews_X_5.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    meta = raw_dir / "meta_X.json"
    meta.write_text("".join(json.dumps({"asin": f"I{i}", "title": f"Title {i}", "categories": [["C"]]}) + "\n" for i in range(4)))
    cfg = DataConfig(source="amazon", input=str(raw_dir / "reviews_X_5.json.gz"), out=str(tmp_path / "p"), kcore=1)
    m1 = prepare(cfg)
    assert str(meta) in m1["inputs"] and not m1["reused"]
    assert prepare(cfg)["reused"]
    meta.write_text(meta.read_text().replace("Title 1", "Renamed"))
    m2 = prepare(cfg)
    assert not m2["reused"]
    assert "Renamed" in PreparedDataset(tmp_path / "p").items.set_index("item_id").loc["I1", "title"]


def test_source_name_image_root_and_bad_line_policy_are_part_of_the_identity(tmp_path):
    from moedist.data.api import prepare

    inp = atomic_input(tmp_path / "raw" / "ml.inter")
    out = tmp_path / "p"
    assert not prepare(atomic_cfg(inp, out))["reused"]
    assert prepare(atomic_cfg(inp, out))["reused"]
    m = prepare(atomic_cfg(inp, out, name="other"))
    assert not m["reused"] and PreparedDataset(out).name == "other"
    img = tmp_path / "img"
    (img / "i1").mkdir(parents=True)
    (img / "i1" / "a.jpg").write_bytes(b"x")
    m = prepare(atomic_cfg(inp, out, name="other", image_root=str(img)))
    assert not m["reused"] and m["stats"]["items_with_image"] == 1
    assert prepare(atomic_cfg(inp, out, name="other", image_root=str(img)))["reused"]
    (img / "i2").mkdir()
    (img / "i2" / "a.jpg").write_bytes(b"x")  # a new image
    m = prepare(atomic_cfg(inp, out, name="other", image_root=str(img)))
    assert not m["reused"] and m["stats"]["items_with_image"] == 2
    (img / "i2" / "a.jpg").write_bytes(b"a replaced image")  # same name, other size
    assert not prepare(atomic_cfg(inp, out, name="other", image_root=str(img)))["reused"]
    m = prepare(atomic_cfg(inp, out, name="other", image_root=str(img), on_bad_line="skip"))
    assert not m["reused"] and m["identity"]["on_bad_line"] == "skip"


def test_forced_amazon_version_is_part_of_the_identity(tmp_path):
    from moedist.data.api import DataConfig, prepare

    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    rows = [{"reviewerID": f"U{u}", "asin": f"I{(u + j) % 4}", "overall": 4.0, "unixReviewTime": 1_400_000_000 + j}
            for u in range(4) for j in range(3)]
    (raw_dir / "Toys_5.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source, reused in (("amazon", False), ("amazon", True), ("amazon2014", False), ("amazon2018", False)):
        m = prepare(DataConfig(source=source, input=str(raw_dir / "Toys_5.json"), out=str(tmp_path / "p"), kcore=1))
        assert m["reused"] is reused and m["source"] == source


def test_rerun_rechecks_the_files_the_reader_read(tmp_path):
    """A file the reader read but the caller did not name is recorded in ``inputs`` and
    checked on re-runs."""
    named, extra = tmp_path / "named.txt", tmp_path / "extra.txt"
    named.write_text("n")
    extra.write_text("e1")
    src = dense_source()
    src.files = [str(named), str(extra)]
    calls = []

    def load():
        calls.append(1)
        return src

    out = tmp_path / "p"
    m = prepare_dataset(load, out, options=PrepareOptions(kcore=1), raw_files=[str(named)])
    assert set(m["inputs"]) == {str(named), str(extra)}
    assert prepare_dataset(load, out, options=PrepareOptions(kcore=1), raw_files=[str(named)])["reused"]
    extra.write_text("e2")
    assert not prepare_dataset(load, out, options=PrepareOptions(kcore=1), raw_files=[str(named)])["reused"]
    assert prepare_dataset(load, out, options=PrepareOptions(kcore=1), raw_files=[str(named)])["reused"]
    assert len(calls) == 4  # the first re-run read the files to learn of extra.txt; then no reads


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_table_is_not_reused(tmp_path, damage):
    from moedist.data.api import prepare
    from moedist.data.prepare import is_complete

    inp = atomic_input(tmp_path / "raw" / "ml.inter")
    out = tmp_path / "p"
    prepare(atomic_cfg(inp, out))
    table = out / "interactions.parquet"
    data = table.read_bytes()
    if damage == "truncate":
        table.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        table.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        table.unlink()
    assert not is_complete(out)
    m = prepare(atomic_cfg(inp, out))
    assert not m["reused"] and is_complete(out)
    assert table.read_bytes() == data  # the same table again
    assert PreparedDataset(out).n_users == 5


def test_tables_manifest_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import os

    import moedist.data.prepare as prep

    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(a, b):
        renamed.append((str(a), str(b), list(synced)))
        real_replace(a, b)

    monkeypatch.setattr(prep.os, "fsync", fsync)
    monkeypatch.setattr(prep.os, "replace", replace)
    out = tmp_path / "p"
    prepare_dataset(dense_source(), out, options=PrepareOptions(kcore=1))
    (tmp, dest, before), = [r for r in renamed if r[1] == str(out)]
    for name in ("interactions.parquet", "items.parquet", "users.parquet", "dataset.json"):
        assert f"{tmp}/{name}" in before, name
    assert tmp in before  # the folder itself (its entries)
    assert str(tmp_path) in synced  # and the parent after the rename


def test_sub_second_times_decide_the_leave_one_out_targets(tmp_path):
    """``u a 100.0``, ``u c 300.7``, ``u b 300.2``: b comes before c although both are stored as
    second 300 (and a same-second repeat keeps its earlier rating under dedup)."""
    from moedist.data.api import prepare

    inp = atomic_input(tmp_path / "x.inter", ["u\ta\t100.0", "u\tc\t300.7", "u\tb\t300.2"])
    prepare(atomic_cfg(inp, tmp_path / "p"))
    d = PreparedDataset(tmp_path / "p")
    by_idx = d.items.set_index("item_idx")["item_id"]
    inter = d.interactions.sort_values("seq_pos")
    assert [by_idx[i] for i in inter["item_idx"]] == ["a", "b", "c"]
    assert inter["loo_split"].tolist() == ["train", "valid", "test"]
    assert inter["timestamp"].tolist() == [100, 300, 300]  # stored floored, as before

    rows = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu\ta\t5\t300.7\nu\ta\t1\t300.2\nu\tb\t3\t400\n"
    (tmp_path / "d.inter").write_text(rows)
    prepare(atomic_cfg(tmp_path / "d.inter", tmp_path / "q", dedup=True))
    d = PreparedDataset(tmp_path / "q")
    assert d.interactions.sort_values("seq_pos")["rating"].tolist() == [1.0, 3.0]


def test_amazon2023_milliseconds_order_within_a_second(tmp_path):
    from moedist.data.api import DataConfig, prepare

    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    recs = [("A", 1_600_000_000_000), ("C", 1_600_000_050_900), ("B", 1_600_000_050_100)]
    (raw_dir / "Toys.jsonl").write_text("".join(
        json.dumps({"user_id": "U", "parent_asin": i, "rating": 5.0, "timestamp": t}) + "\n" for i, t in recs))
    prepare(DataConfig(source="amazon2023", input=str(raw_dir / "Toys.jsonl"), out=str(tmp_path / "p"), kcore=1))
    d = PreparedDataset(tmp_path / "p")
    by_idx = d.items.set_index("item_idx")["item_id"]
    inter = d.interactions.sort_values("seq_pos")
    assert [by_idx[i] for i in inter["item_idx"]] == ["A", "B", "C"]
    assert inter["timestamp"].tolist() == [1_600_000_000, 1_600_000_050, 1_600_000_050]


@pytest.mark.parametrize("content", ["[]", '"x"', "{}", '{"format": 2}', '{"format": 2, "files": {}, "stats": []}',
                                     '{"format": 2, "files": {"../x": "0"}, "stats": {}}'])
def test_malformed_manifest_is_a_data_error(tmp_path, capsys, content):
    from moedist.cli import main
    from moedist.data.api import prepare
    from moedist.data.prepare import is_complete, load_manifest

    d = tmp_path / "p"
    d.mkdir()
    (d / "dataset.json").write_text(content)
    with pytest.raises(DataError, match=r"p/dataset\.json: (not a moedist dataset manifest|damaged manifest)"):
        load_manifest(d)
    with pytest.raises(DataError, match=r"dataset\.json"):
        PreparedDataset(d)
    assert not is_complete(d)
    assert main(["data", "summary", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    inp = atomic_input(tmp_path / "raw" / "ml.inter")
    if content.startswith('{"format"'):  # a damaged moedist manifest: prepared again over it
        assert not prepare(atomic_cfg(inp, d))["reused"]
        assert PreparedDataset(d).n_users == 5
    else:  # not a moedist manifest at all: the folder is not ours to replace
        with pytest.raises(DataError, match="refusing to replace this folder"):
            prepare(atomic_cfg(inp, d))
        assert (d / "dataset.json").read_text() == content


def test_cli_flags_are_taken_verbatim(tmp_path, monkeypatch):
    """``--out "exp #2"``, ``--name 0123`` / ``1.10`` / ``12:30``, ``--input null``: strings as
    typed, never YAML-parsed (no comment stripping, octal, float or sexagesimal numbers)."""
    from moedist.cli import main

    atomic_input(tmp_path / "raw" / "ml.inter")
    monkeypatch.chdir(tmp_path)
    for name in ("0123", "1.10", "12:30", "yes"):
        out = f"exp #{name}"
        assert main(["data", "prepare", "--source", "atomic", "--input", "raw/ml.inter", "--out", out,
                     "--name", name, "--kcore", "1"]) == 0
        assert json.loads((tmp_path / out / "dataset.json").read_text())["name"] == name
        assert (tmp_path / out / "data_config.yaml").is_file()
    assert not (tmp_path / "exp").exists()
    (tmp_path / "null").mkdir()  # even a folder called null is not "no input"
    atomic_input(tmp_path / "null" / "null.inter")
    assert main(["data", "prepare", "--source", "atomic", "--input", "null", "--out", "n", "--kcore", "1"]) == 0
    assert json.loads((tmp_path / "n" / "dataset.json").read_text())["name"] == "null"


def test_preparing_again_keeps_the_extracted_features_and_training_still_checks_them(tmp_path):
    """Re-preparing a dataset folder keeps its features/ (shards and the image download cache
    may have taken hours); features made for other items are then refused when loaded, while
    features of unchanged items load as before."""
    from moedist.features.store import load_item_features, write_feature_arrays

    out = tmp_path / "p"
    prepare_dataset(lambda: dense_source(), out, options=PrepareOptions(kcore=1))
    data = PreparedDataset(out)
    ids = data.items["item_id"].tolist()
    write_feature_arrays(out / "features" / "t", item_ids=ids,
                         arrays={"text": np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4) + 1})
    cache = out / "features" / ".image-cache" / "ab" / "img.jpg"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"downloaded")

    import dataclasses

    renamed = dataclasses.replace(dense_source(), name="renamed")  # the same items under another name
    prepare_dataset(lambda: renamed, out, options=PrepareOptions(kcore=1), identity={"name": "renamed"})
    assert json.loads((out / "dataset.json").read_text())["name"] == "renamed"
    assert cache.read_bytes() == b"downloaded"
    feats = load_item_features(out / "features" / "t", items=PreparedDataset(out).items, data_dir=out)
    assert feats.features["text"].shape == (len(ids) + 1, 4)

    prepare_dataset(lambda: dense_source(seed=5, n_items=12), out, options=PrepareOptions(kcore=1))  # other items
    assert cache.read_bytes() == b"downloaded"
    with pytest.raises(DataError, match="features"):
        load_item_features(out / "features" / "t", items=PreparedDataset(out).items, data_dir=out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old folders left
