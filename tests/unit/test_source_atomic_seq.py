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


# --------------------------------------------------------------------------- UniSRec's 50-item window


def write_unisrec(d: Path, seqs: dict[str, list[str]], *, window: int = 50, chronological: bool = False,
                  name: str = "Toy") -> Path:
    """Benchmark files written as UniSRec's ``convert_to_atomic_files`` writes them: train rows
    ``item_seq[:-t][-window:]`` for t = 1.. (newest target first), valid and test rows with
    the last ``window`` items of their history. ``chronological`` writes the train rows oldest
    first instead (another writer's order)."""
    d.mkdir(parents=True, exist_ok=True)
    header = HEADER + "\n"
    train, valid, test = [], [], []
    for uid, s in seqs.items():
        tr = s[:-2]
        rows = [f"{uid}\t{' '.join(tr[:-t][-window:])}\t{tr[-t]}" for t in range(1, len(tr))]
        train += reversed(rows) if chronological else rows
        valid.append(f"{uid}\t{' '.join(tr[-window:])}\t{s[-2]}")
        test.append(f"{uid}\t{' '.join(s[:-1][-window:])}\t{s[-1]}")
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        (d / f"{name}.{split}.inter").write_text(header + "".join(r + "\n" for r in rows))
    items = sorted({i for s in seqs.values() for i in s}, key=int)
    (d / f"{name}.item2index").write_text("".join(f"ASIN{i}\t{i}\n" for i in items))
    (d / f"{name}.user2index").write_text("".join(f"U{u}\t{u}\n" for u in seqs))
    return d


def long_sequences() -> dict[str, list[str]]:
    import random

    rng = random.Random(0)
    seqs = {str(u): [str(rng.randrange(40)) for _ in range(n)] for u, n in enumerate([60, 53, 52, 51, 120, 8, 3])}
    seqs["7"] = ["5"] * 70 + ["6"]  # one item over and over: every full window is the same
    seqs["8"] = (["1", "2"] * 40)[:75]
    return seqs


@pytest.mark.parametrize("chronological", [False, True])
def test_unisrec_truncated_histories_are_rebuilt(tmp_path, chronological):
    seqs = long_sequences()
    src = load_source("atomic-seq", write_unisrec(tmp_path / "toy", seqs, chronological=chronological))
    inter = src.interactions
    for u, s in seqs.items():
        got = inter[inter.user_id == f"U{u}"]
        assert got.item_id.tolist() == [f"ASIN{i}" for i in s], u
        assert got.timestamp.tolist() == list(range(len(s)))


def test_unisrec_truncated_files_prepare_with_every_interaction(tmp_path):
    from moedist.data.api import DataConfig, prepare

    seqs = long_sequences()
    m = prepare(DataConfig(source="atomic-seq", input=str(write_unisrec(tmp_path / "toy", seqs)),
                           out=str(tmp_path / "p"), kcore=1))
    assert m["stats"]["interactions"] == sum(len(s) for s in seqs.values())
    assert m["stats"]["max_seq_len"] == 120
    assert m["stats"]["loo"]["train_samples"] == sum(len(s) - 3 for s in seqs.values())


def test_a_truncated_row_that_does_not_fit_is_named(tmp_path):
    seqs = long_sequences()
    d = write_unisrec(tmp_path / "bad", seqs)
    lines = (d / "Toy.train.inter").read_text().splitlines()
    # user 0 (60 items, 57 train rows on lines 2..58, newest first): line 5's history is a
    # 50-item window; change its oldest item
    u, hist, target = lines[4].split("\t")
    assert u == "0" and len(hist.split()) == 50
    hist = hist.split()
    hist[0] = "38" if hist[0] == "39" else "39"
    lines[4] = "\t".join([u, " ".join(hist), target])
    (d / "Toy.train.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Toy\.train\.inter:5: user 0's history here .* is not the last 50 items"):
        load_source("atomic-seq", d)

    d = write_unisrec(tmp_path / "bad2", seqs)
    lines = (d / "Toy.test.inter").read_text().splitlines()
    u, hist, target = lines[1].split("\t")
    lines[1] = "\t".join([u, " ".join(hist.split()[1:] + [hist.split()[0]]), target])  # the window rotated
    (d / "Toy.test.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Toy\.test\.inter:2: user 0's history .* rebuilt from the rows up to Toy\.valid\.inter:2"):
        load_source("atomic-seq", d)


def test_the_text_file_is_the_item_text_as_written(tmp_path):
    # the .text lines are already UniSRec's joined, cleaned "Title. Cats. Brand. " text:
    # cleaning it again appended ". " (every item's text ended in "Acme. . ")
    src = load_source("atomic-seq", write_set(tmp_path / "txt"))
    row = src.items.set_index("item_id").loc["ASIN3"]
    assert row["text"] == "Product 3. Tools Drills. Acme. "
    assert row["title"] == "Product 3. Tools Drills. Acme. "


def test_prepared_text_matches_the_text_file_and_older_outputs_are_prepared_again(tmp_path):
    import json

    import pandas as pd

    from moedist.data.api import DataConfig, prepare
    from moedist.data.prepare import PrepareOptions, _fingerprint

    d = write_set(tmp_path / "prep")
    out = tmp_path / "out"
    cfg = DataConfig(source="atomic-seq", input=str(d), out=str(out), kcore=1)
    meta = prepare(cfg)
    assert meta["identity"]["reader_version"] >= 2
    items = pd.read_parquet(out / "items.parquet").set_index("item_id")
    assert items.loc["ASIN1", "text"] == "Product 1. Tools Drills. Acme. "
    # an output of the older reader (no reader_version in its identity) is not reused
    man = json.loads((out / "dataset.json").read_text())
    assert prepare(cfg)["reused"] is True
    old_identity = {k: v for k, v in man["identity"].items() if k != "reader_version"}
    man["fingerprint"] = _fingerprint(list(man["inputs"]), PrepareOptions(**man["options"]), old_identity)
    (out / "dataset.json").write_text(json.dumps(man))
    assert prepare(cfg)["reused"] is False


@pytest.mark.parametrize("index_file", ["user2index", "item2index"])
def test_an_original_id_given_two_indices_is_named(tmp_path, index_file):
    # two indices of one original id would merge two users' (or items') sequences silently
    d = write_set(tmp_path / index_file)
    if index_file == "user2index":
        (d / "Toy.user2index").write_text("U_a\t0\nU_a\t1\n")
    else:
        (d / "Toy.item2index").write_text("ASIN0\t0\nASIN1\t1\nASIN2\t2\nASIN3\t3\nASIN0\t4\n")
    line, orig = (2, "U_a") if index_file == "user2index" else (5, "ASIN0")
    with pytest.raises(DataError, match=rf"Toy\.{index_file}:{line}.*'{orig}' is given two indices"):
        load_source("atomic-seq", d)
