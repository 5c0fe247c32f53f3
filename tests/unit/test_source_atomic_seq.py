"""RecBole pre-split sequential benchmark files (``--source atomic-seq``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from moedist.data.sources import detect_source, load_source
from moedist.errors import ConfigError, DataError

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"


def write_set(d: Path, *, train=None, valid=None, test=None, text=True, name="Toy") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    # user 0: items 0 1 2 3 ; user 1: items 2 4 1
    train = train if train is not None else ["0\t0\t1", "0\t0 1\t2", "1\t2\t4"]
    valid = valid if valid is not None else ["0\t0 1\t2", "1\t2\t4"]
    test = test if test is not None else ["0\t0 1 2\t3", "1\t2 4\t1"]
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        (d / f"{name}.{split}.inter").write_text("\n".join([HEADER, *rows]) + "\n")
    (d / f"{name}.item2index").write_text("".join(f"ASIN{i}\t{i}\n" for i in range(5)))
    (d / f"{name}.user2index").write_text("U_a\t0\nU_b\t1\n")
    if text:
        (d / f"{name}.text").write_text("item_id:token\ttext:token_seq\n"
                                        + "".join(f"ASIN{i}\tProduct {i}. Tools Drills. Acme. \n" for i in range(5)))
    return d


def test_sequences_are_rebuilt_in_order_with_original_ids(tmp_path):
    d = write_set(tmp_path / "toy")
    assert detect_source(d) == "atomic-seq"
    src = load_source("auto", d)
    inter = src.interactions
    a = inter[inter.user_id == "U_a"]
    assert a.item_id.tolist() == ["ASIN0", "ASIN1", "ASIN2", "ASIN3"]
    assert a.timestamp.tolist() == [0, 1, 2, 3]  # order only
    assert inter[inter.user_id == "U_b"].item_id.tolist() == ["ASIN2", "ASIN4", "ASIN1"]
    assert len(inter) == 7
    assert sorted(src.items.item_id) == [f"ASIN{i}" for i in range(5)]
    assert src.items.set_index("item_id").loc["ASIN3", "text"].startswith("Product 3. Tools Drills. Acme.")
    assert src.name == "Toy"


def test_a_row_that_contradicts_the_users_sequence_is_named(tmp_path):
    d = write_set(tmp_path / "bad", valid=["0\t0 4\t2", "1\t2\t4"])
    with pytest.raises(DataError, match=r"Toy\.valid\.inter:2.*not a prefix of the one at Toy\.test\.inter:2"):
        load_source("atomic-seq", d)


def test_unknown_indices_and_missing_files_are_clear_errors(tmp_path):
    d = write_set(tmp_path / "unk", test=["0\t0 1 2\t9", "1\t2 4\t1"])
    with pytest.raises(DataError, match="item index 9 .* not in Toy.item2index"):
        load_source("atomic-seq", d)
    d = write_set(tmp_path / "nouser")
    (d / "Toy.user2index").unlink()
    with pytest.raises(DataError, match="missing Toy.user2index"):
        load_source("atomic-seq", d)
    d = write_set(tmp_path / "hdr", train=["0\t0\t1"])
    (d / "Toy.train.inter").write_text("user_id:token\titem_id:token\n0\t1\n")
    with pytest.raises(DataError, match="item_id_list"):
        load_source("atomic-seq", d)
    with pytest.raises(ConfigError, match="meta_path does not apply"):
        load_source("atomic-seq", write_set(tmp_path / "ok"), meta_path="x.json")


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path):
    d = write_set(tmp_path / "skip", train=["0\t0\t1", "0\t0 1", "1\t2\t4"])
    with pytest.raises(DataError, match=r"Toy\.train\.inter:3"):
        load_source("atomic-seq", d)
    src = load_source("atomic-seq", d, on_bad_line="skip")
    assert src.skipped == {"train:bad_columns": 1}
    assert len(src.interactions) == 7


def test_without_text_file_items_have_no_metadata(tmp_path):
    src = load_source("atomic-seq", write_set(tmp_path / "notext", text=False))
    assert len(src.items) == 0 and len(src.interactions) == 7


def test_real_amazon_scientific(shared_data, tmp_path):
    from moedist.data.api import DataConfig, prepare

    d = shared_data / "amazon-scientific"
    if not d.is_dir():
        pytest.skip("amazon-scientific is not in ../shared/data")
    manifest = prepare(DataConfig(source="atomic-seq", input=str(d), out=str(tmp_path / "sci")))
    s = manifest["stats"]
    # the dataset's published statistics (../shared/data/README.md); train rows = LOO samples
    assert (s["users"], s["items"], s["interactions"]) == (2928, 1585, 19712)
    assert s["loo"]["train_samples"] == 10928
    assert s["items_without_metadata"] == 0
