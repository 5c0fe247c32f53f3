"""Raw data sources: Amazon 2014/2018/2023 and RecBole atomic files (moedist.data.sources)."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from moedist.data.schema import RAW_INTERACTION_COLUMNS, RAW_ITEM_COLUMNS, RawSource
from moedist.data.sources import detect_source, load_source
from moedist.data.sources import amazon as amazon_mod
from moedist.data.sources.amazon import load_amazon
from moedist.data.sources.atomic import load_atomic, load_atomic_dir
from moedist.data.text import clean_text, item_text
from moedist.errors import ConfigError, DataError

ML100K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "movielens-100k"


# --------------------------------------------------------------------------- helpers


def write(path: Path, lines: list[str], *, gz: bool | None = None) -> Path:
    """Write text lines; gzip-compressed when the name ends with .gz (or ``gz=True``)."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz is None:
        gz = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def check_schema(src: RawSource) -> None:
    assert list(src.interactions.columns) == list(RAW_INTERACTION_COLUMNS)
    for col, dtype in RAW_INTERACTION_COLUMNS.items():
        assert str(src.interactions[col].dtype) == dtype, col
    assert list(src.items.columns) == list(RAW_ITEM_COLUMNS)
    for col, dtype in RAW_ITEM_COLUMNS.items():
        assert str(src.items[col].dtype) == dtype, col
    assert all(isinstance(c, list) for c in src.items["categories"])


def rows(df: pd.DataFrame) -> list[dict]:
    out = []
    for rec in df.to_dict("records"):
        out.append({k: (None if v is pd.NA else v) for k, v in rec.items()})
    return out


def items_by_id(src: RawSource) -> dict[str, dict]:
    return {r["item_id"]: r for r in rows(src.items)}


# --------------------------------------------------------------------------- fixtures

REVIEWS_2014 = [
    json.dumps({"reviewerID": "U1", "asin": "A1", "reviewerName": "Ann", "helpful": [0, 0],
                "reviewText": "fun", "overall": 5.0, "summary": "ok", "unixReviewTime": 1370304000,
                "reviewTime": "06 4, 2013"}),
    json.dumps({"reviewerID": "U2", "asin": "A2", "overall": 3.0, "unixReviewTime": 1262304000}),
    "",  # blank lines are ignored
    json.dumps({"reviewerID": "U1", "asin": "A2", "overall": 4.0, "unixReviewTime": 1370304000}),
]

# Python literals as in the real 2014 dump: single quotes, True, nested lists, a dict.
META_2014 = [
    """{'asin': 'A1', 'title': 'Super &amp; "Fun"\\tGame...', 'price': 9.99, 'isPrime': True, """
    """'imUrl': 'http://ecx.images-amazon.com/images/I/a1.jpg', 'related': {'also_bought': ['A2']}, """
    """'salesRank': {'Toys & Games': 5}, 'categories': [['Toys & Games', 'Puzzles'], ['Other', 'X']], 'brand': 'Acme.'}""",
    """{'asin': 'A9', 'title': 'never reviewed', 'categories': 'not even a list'}""",
    """{'asin': 'A2', 'categories': [['Toys & Games']], 'imUrl': 'http://x/a2.jpg', 'description': "It's"}""",
    """{'asin': 'A2', 'title': 'duplicate: ignored', 'categories': [['Y']]}""",
]


@pytest.fixture()
def amazon2014(tmp_path: Path) -> Path:
    d = tmp_path / "raw2014"
    d.mkdir()
    write(d / "reviews_Toys_5.json.gz", REVIEWS_2014)
    write(d / "meta_Toys.json.gz", META_2014)
    return d


REVIEWS_2018 = [
    json.dumps({"overall": 5.0, "verified": True, "reviewTime": "09 1, 2016", "reviewerID": "R1",
                "asin": "B1", "style": {"Color:": " Red"}, "reviewText": "x", "unixReviewTime": 1472688000}),
    json.dumps({"overall": 1.0, "reviewerID": "R2", "asin": "B2", "unixReviewTime": 1472774400}),
    json.dumps({"reviewerID": "R2", "asin": "B1", "unixReviewTime": 1472774400}),  # no rating -> NaN
]

META_2018 = [
    json.dumps({"asin": "B1", "title": "Robot\nKit", "brand": "RoboCo", "category": ["Toys & Games", "Robots"],
                "imageURL": ["https://small/b1.jpg"], "imageURLHighRes": ["https://big/b1.jpg", "https://big/b1b.jpg"],
                "also_buy": [], "rank": "1 in Toys"}),
    # some 2018 meta files are Python literals too
    """{'asin': 'B2', 'title': 'Kite', 'category': [], 'imageURL': ['https://small/b2.jpg'], 'details': {'a': None}}""",
]


@pytest.fixture()
def amazon2018(tmp_path: Path) -> Path:
    d = tmp_path / "raw2018"
    d.mkdir()
    write(d / "Toys_5.json.gz", REVIEWS_2018)
    write(d / "meta_Toys.json.gz", META_2018)
    return d


REVIEWS_2023 = [
    json.dumps({"rating": 5.0, "title": "Great", "text": "x", "images": [], "asin": "C1X", "parent_asin": "C1",
                "user_id": "AG1", "timestamp": 1588687728923, "helpful_vote": 2, "verified_purchase": True}),
    json.dumps({"rating": 2.0, "asin": "C2", "user_id": "AG2", "timestamp": 1588687728999}),  # no parent_asin
]

META_2023 = [
    json.dumps({"main_category": "Toys & Games", "title": "Puzzle Cube", "average_rating": 4.5, "features": [],
                "images": [{"thumb": "https://t/c1.jpg", "large": "https://l/c1.jpg", "variant": "MAIN", "hi_res": None}],
                "store": "CubeCo", "categories": [], "details": {}, "parent_asin": "C1"}),
    json.dumps({"main_category": "All Beauty", "title": "Soap", "store": None, "categories": ["Beauty", "Soap"],
                "images": [{"thumb": "https://t/c2.jpg", "large": "https://l/c2.jpg", "hi_res": "https://h/c2.jpg"}],
                "parent_asin": "C2"}),
]


@pytest.fixture()
def amazon2023(tmp_path: Path) -> Path:
    d = tmp_path / "raw2023"
    d.mkdir()
    write(d / "Toys.jsonl.gz", REVIEWS_2023)
    write(d / "meta_Toys.jsonl.gz", META_2023)
    return d


# --------------------------------------------------------------------------- text


def test_clean_text_rules():
    assert clean_text("Title") == "Title."
    assert clean_text("Title...") == "Title."
    assert clean_text('A &amp; "B"\n\r\tC') == "A & B C."
    assert clean_text([["Video Games", "PC", "Games"], ["Other"]]) == "Video Games PC Games."
    assert clean_text(["Beauty", "Soap"]) == "Beauty Soap."
    assert clean_text("x" * 1998) == "x" * 1998 + "."
    assert clean_text("x" * 1999) == ""  # 2000 chars with the dot
    assert clean_text(None) == "" and clean_text(float("nan")) == "" and clean_text(pd.NA) == ""
    assert clean_text("") == "" and clean_text([]) == "" and clean_text("...") == ""


def test_item_text_matches_spec_example():
    assert item_text("Title", [["Video Games", "PC", "Games"]], "Brand") == "Title. Video Games PC Games. Brand. "
    assert item_text("Title", ["Video Games", "PC"], None) == "Title. Video Games PC. "
    assert item_text(None, [], "Brand.") == "Brand. "
    assert item_text(None, [], None) == ""


# --------------------------------------------------------------------------- Amazon formats


def test_amazon2014_python_literal_meta(amazon2014: Path):
    src = load_amazon(amazon2014 / "reviews_Toys_5.json.gz")  # meta found beside it, version detected
    check_schema(src)
    assert src.name == "Toys"
    assert rows(src.interactions) == [
        {"user_id": "U1", "item_id": "A1", "timestamp": 1370304000, "rating": 5.0, "time_frac": 0.0},
        {"user_id": "U2", "item_id": "A2", "timestamp": 1262304000, "rating": 3.0, "time_frac": 0.0},
        {"user_id": "U1", "item_id": "A2", "timestamp": 1370304000, "rating": 4.0, "time_frac": 0.0},
    ]
    items = items_by_id(src)
    assert list(items) == ["A1", "A2"]  # A9 (not reviewed) dropped, A2 duplicate: first kept
    a1 = items["A1"]
    assert a1["title"] == 'Super &amp; "Fun"\tGame...'
    assert a1["brand"] == "Acme."
    assert a1["categories"] == ["Toys & Games", "Puzzles"]  # first path only
    assert a1["image"] == "http://ecx.images-amazon.com/images/I/a1.jpg"
    assert a1["text"] == "Super & Fun Game. Toys & Games Puzzles. Acme. "
    a2 = items["A2"]
    assert a2["title"] is None and a2["brand"] is None
    assert a2["categories"] == ["Toys & Games"]
    assert a2["text"] == "Toys & Games. "
    assert src.files == [str(amazon2014 / "reviews_Toys_5.json.gz"), str(amazon2014 / "meta_Toys.json.gz")]
    assert src.skipped == {}


def test_amazon2014_local_images(amazon2014: Path, tmp_path: Path):
    root = tmp_path / "image"
    (root / "A1").mkdir(parents=True)
    for name in ("b.jpg", "a.png", ".DS_Store"):
        (root / "A1" / name).write_bytes(b"x")
    (root / "A2").mkdir()  # empty folder: falls back to the URL
    src = load_source("amazon2014", amazon2014, image_root=root)
    items = items_by_id(src)
    assert items["A1"]["image"] == str((root / "A1" / "a.png").absolute())
    assert items["A2"]["image"] == "http://x/a2.jpg"


def test_amazon2018(amazon2018: Path):
    src = load_source("amazon2018", amazon2018)
    check_schema(src)
    inter = rows(src.interactions)
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in inter] == [
        ("R1", "B1", 1472688000), ("R2", "B2", 1472774400), ("R2", "B1", 1472774400)
    ]
    assert inter[0]["rating"] == 5.0 and math.isnan(inter[2]["rating"])
    items = items_by_id(src)
    assert items["B1"]["categories"] == ["Toys & Games", "Robots"]
    assert items["B1"]["image"] == "https://big/b1.jpg"  # high-res first
    assert items["B1"]["text"] == "RobotKit. Toys & Games Robots. RoboCo. "
    assert items["B2"]["categories"] == [] and items["B2"]["brand"] is None
    assert items["B2"]["image"] == "https://small/b2.jpg"
    assert items["B2"]["text"] == "Kite. "


def test_amazon2023_milliseconds_and_parent_asin(amazon2023: Path):
    src = load_source("amazon2023", amazon2023 / "Toys.jsonl.gz")
    check_schema(src)
    assert rows(src.interactions) == [
        {"user_id": "AG1", "item_id": "C1", "timestamp": 1588687728, "rating": 5.0, "time_frac": 0.923},
        {"user_id": "AG2", "item_id": "C2", "timestamp": 1588687728, "rating": 2.0, "time_frac": 0.999},
    ]
    items = items_by_id(src)
    assert items["C1"] == {
        "item_id": "C1", "title": "Puzzle Cube", "brand": "CubeCo", "categories": ["Toys & Games"],
        "image": "https://l/c1.jpg", "text": "Puzzle Cube. Toys & Games. CubeCo. ",
    }
    assert items["C2"]["categories"] == ["Beauty", "Soap"]
    assert items["C2"]["image"] == "https://h/c2.jpg"
    assert items["C2"]["brand"] is None
    assert items["C2"]["text"] == "Soap. Beauty Soap. "


def test_version_detection(amazon2014: Path, amazon2018: Path, amazon2023: Path, tmp_path: Path):
    assert detect_source(amazon2014) == "amazon2014"
    assert detect_source(amazon2018) == "amazon2018"
    assert detect_source(amazon2023) == "amazon2023"
    assert detect_source(amazon2023 / "Toys.jsonl.gz") == "amazon2023"
    # detected from the fields, not only the names
    d = tmp_path / "renamed"
    d.mkdir()
    write(d / "Toys_5.json.gz", REVIEWS_2014)
    write(d / "meta_Toys.json.gz", META_2014)
    assert detect_source(d) == "amazon2014"
    src = load_source("amazon", d)
    assert items_by_id(src)["A1"]["categories"] == ["Toys & Games", "Puzzles"]
    src = load_source("auto", amazon2023)
    assert src.interactions["timestamp"].tolist() == [1588687728, 1588687728]


def test_compression_detected_by_magic_bytes(tmp_path: Path):
    write(tmp_path / "Toys_5.json", REVIEWS_2018, gz=True)  # gzip without .gz
    write(tmp_path / "meta_Toys.json.gz", META_2018, gz=False)  # plain text named .gz
    src = load_amazon(tmp_path / "Toys_5.json", version="2018")
    assert len(src.interactions) == 3 and len(src.items) == 2


def test_reviews_without_meta(tmp_path: Path):
    write(tmp_path / "Toys_5.json.gz", REVIEWS_2018)
    src = load_amazon(tmp_path / "Toys_5.json.gz")
    check_schema(src)
    assert len(src.interactions) == 3 and len(src.items) == 0


def test_progress_callback(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(amazon_mod, "PROGRESS_EVERY", 2)
    d = tmp_path / "p"
    d.mkdir()
    write(d / "Toys_5.json.gz", REVIEWS_2018)
    write(d / "meta_Toys.json.gz", META_2018)
    seen: list[int] = []
    load_amazon(d, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 5  # cumulative lines over both files


# --------------------------------------------------------------------------- bad input


def expect_error(fn, path: Path, line: int | None, *fragments: str) -> str:
    with pytest.raises(DataError) as exc:
        fn()
    msg = str(exc.value)
    where = f"{path}:{line}:" if line is not None else f"{path}:"
    assert msg.startswith(where), msg
    assert exc.value.path == str(path) and exc.value.line == line
    for f in fragments:
        assert f in msg, msg
    assert "Traceback" not in msg
    return msg


GOOD = json.dumps({"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 100})


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ('{"reviewerID": "U2", "asin": ', "malformed line"),
        ("not json at all", "malformed line"),
        ("[1, 2, 3]", "expected a JSON object"),
        (json.dumps({"asin": "A1", "overall": 5.0, "unixReviewTime": 1}), "user id field 'reviewerID'"),
        (json.dumps({"reviewerID": "", "asin": "A1", "unixReviewTime": 1}), "user id field 'reviewerID'"),
        (json.dumps({"reviewerID": "U2", "overall": 5.0, "unixReviewTime": 1}), "item id field 'asin'"),
        (json.dumps({"reviewerID": "U2", "asin": "A1", "overall": 5.0}), "missing timestamp field 'unixReviewTime'"),
        (json.dumps({"reviewerID": "U2", "asin": "A1", "unixReviewTime": "yesterday"}), "non-numeric timestamp"),
        (json.dumps({"reviewerID": "U2", "asin": "A1", "unixReviewTime": [1]}), "non-numeric timestamp"),
        (json.dumps({"reviewerID": "U2", "asin": "A1", "unixReviewTime": -5}), "negative timestamp"),
        (json.dumps({"reviewerID": "U2", "asin": "A1", "unixReviewTime": 5, "overall": "great"}), "non-numeric rating"),
    ],
)
def test_bad_review_line(tmp_path: Path, bad: str, fragment: str):
    path = write(tmp_path / "Toys_5.json.gz", [GOOD, bad, GOOD])
    expect_error(lambda: load_amazon(path), path, 2, fragment)


@pytest.mark.parametrize(
    "version,bad,fragment",
    [
        ("2014", "{'asin': 'A1', 'categories': 'Toys'}", "list of category paths, found str"),
        ("2014", "{'asin': 'A1', 'categories': {'Toys': 1}}", "list of category paths, found dict"),
        ("2014", "{'asin': 'A1', 'categories': ['Toys', 'Games']}", "found an element of type str"),
        ("2014", "{'asin': 'A1', 'categories': [['Toys', 3]]}", "found an element of type int"),
        ("2018", json.dumps({"asin": "A1", "category": "Toys"}), "'category' must be a list of strings"),
        ("2018", json.dumps({"asin": "A1", "category": {"a": 1}}), "found dict"),
        ("2018", json.dumps({"asin": "A1", "imageURL": {"a": 1}}), "'imageURL' must be a list of URLs"),
        ("2018", json.dumps({"asin": "A1", "title": ["x"]}), "'title' must be a string"),
        ("2014", json.dumps({"title": "no asin"}), "item id field 'asin'"),
        ("2014", "{'asin': 'A1', 'title': 'unterminated}", "malformed line"),
    ],
)
def test_bad_meta_line(tmp_path: Path, version: str, bad: str, fragment: str):
    reviews = write(tmp_path / "Toys_5.json.gz", [GOOD])
    meta = write(tmp_path / "meta_Toys.json.gz", ["{'asin': 'OTHER', 'title': 'x'}", bad])
    expect_error(lambda: load_amazon(reviews, meta, version=version), meta, 2, fragment)


def test_bad_2023_fields(tmp_path: Path):
    reviews = write(tmp_path / "Toys.jsonl.gz", [json.dumps({"user_id": "U", "parent_asin": "P", "rating": 1.0, "timestamp": 5000}),
                                                json.dumps({"user_id": "U", "parent_asin": "P", "rating": 1.0, "timestamp": "soon"})])
    expect_error(lambda: load_amazon(reviews, version=2023), reviews, 2, "non-numeric timestamp", "'timestamp'")
    reviews = write(tmp_path / "Toys.jsonl.gz", [json.dumps({"user_id": "U", "parent_asin": "P", "timestamp": 5000})])
    meta = write(tmp_path / "meta_Toys.jsonl.gz", [json.dumps({"parent_asin": "P", "categories": "Toys"})])
    expect_error(lambda: load_amazon(reviews), meta, 1, "'categories' must be a list of strings")
    meta = write(tmp_path / "meta_Toys.jsonl.gz", [json.dumps({"parent_asin": "P", "images": "x.jpg"})])
    expect_error(lambda: load_amazon(reviews), meta, 1, "'images' must be a list")


def test_literal_eval_is_safe(tmp_path: Path):
    marker = tmp_path / "PWNED"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"{{'asin': __import__('os').system('touch {marker}')}}",
        f"{{'asin': 'A1', 'title': open('{marker}', 'w')}}",
    ]
    reviews = write(tmp_path / "Toys_5.json.gz", [GOOD])
    for p in payloads:
        meta = write(tmp_path / "meta_Toys.json.gz", ["{'asin': 'A0', 'title': 'ok'}", p])
        expect_error(lambda: load_amazon(reviews, meta, version="2014"), meta, 2, "malformed line")
        bad_reviews = write(tmp_path / "bad_5.json.gz", [GOOD, p])
        expect_error(lambda: load_amazon(bad_reviews), bad_reviews, 2, "malformed line")
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path: Path):
    garbage = tmp_path / "garbage_5.json.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"this is not deflate data" * 10)
    expect_error(lambda: load_amazon(garbage), garbage, 1, "corrupt or truncated gzip")
    missing = tmp_path / "missing_5.json.gz"
    expect_error(lambda: load_amazon(missing), missing, None, "file not found")
    reviews = write(tmp_path / "Toys_5.json.gz", [GOOD])
    expect_error(lambda: load_amazon(reviews, tmp_path / "nope.json"), tmp_path / "nope.json", None, "file not found")


def test_truncated_gzip_names_file(tmp_path: Path):
    good = gzip.compress(("\n".join([GOOD] * 2000) + "\n").encode())
    truncated = tmp_path / "trunc_5.json.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as exc:
        load_amazon(truncated)
    assert str(truncated) in str(exc.value) and exc.value.line is not None and exc.value.line > 1
    assert str(exc.value).startswith(f"{truncated}:{exc.value.line}: corrupt or truncated gzip file")


def test_empty_files(tmp_path: Path):
    empty = tmp_path / "empty_5.json.gz"
    empty.write_bytes(b"")
    expect_error(lambda: load_amazon(empty), empty, None, "empty file")
    blank = write(tmp_path / "blank_5.json.gz", ["", "  "])
    expect_error(lambda: load_amazon(blank), blank, None, "empty file")
    reviews = write(tmp_path / "Toys_5.json.gz", [GOOD])
    meta = write(tmp_path / "meta_Toys.json.gz", [])
    expect_error(lambda: load_amazon(reviews, meta), meta, None, "empty file")
    allbad = write(tmp_path / "bad_5.json.gz", ["nope", "{}"])
    expect_error(lambda: load_amazon(allbad, on_bad_line="skip"), allbad, None, "no interactions")


def test_skip_mode_counts(tmp_path: Path):
    reviews = write(tmp_path / "Toys_5.json.gz", [
        GOOD,
        "not json",
        json.dumps({"asin": "A1", "unixReviewTime": 1}),
        json.dumps({"reviewerID": "U2", "asin": "A1", "unixReviewTime": -1}),
        json.dumps({"reviewerID": "U3", "asin": "A1", "unixReviewTime": "x"}),
        json.dumps({"reviewerID": "U4", "asin": "A2", "unixReviewTime": 7}),
    ])
    meta = write(tmp_path / "meta_Toys.json.gz", [
        "{'asin': 'A1', 'categories': 'bad'}",
        "{'asin': 'A1', 'title': 'second line for A1 is used', 'categories': [['C']]}",
        "__import__('os')",
        "{'asin': 'A2', 'title': 'T2'}",
    ])
    src = load_amazon(reviews, meta, version="2014", on_bad_line="skip")
    assert src.interactions["user_id"].tolist() == ["U1", "U4"]
    assert src.interactions["item_id"].tolist() == ["A1", "A2"]
    assert src.interactions["timestamp"].tolist() == [100, 7]
    assert src.interactions["rating"].iloc[0] == 5.0 and math.isnan(src.interactions["rating"].iloc[1])
    assert src.skipped == {
        "reviews:malformed_line": 1,
        "reviews:missing_user": 1,
        "reviews:bad_timestamp": 2,
        "meta:bad_categories": 1,
        "meta:malformed_line": 1,
    }
    items = items_by_id(src)
    assert items["A1"]["title"] == "second line for A1 is used" and items["A1"]["categories"] == ["C"]


def test_bad_options(tmp_path: Path, amazon2018: Path):
    with pytest.raises(ConfigError):
        load_amazon(amazon2018, on_bad_line="ignore")
    with pytest.raises(ConfigError):
        load_amazon(amazon2018, version="2016")
    with pytest.raises(ConfigError):
        load_source("parquet", amazon2018)
    with pytest.raises(DataError):
        detect_source(tmp_path / "does-not-exist")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot tell"):
        detect_source(empty)
    with pytest.raises(DataError, match="no Amazon reviews file"):
        load_source("amazon", empty)


# --------------------------------------------------------------------------- atomic files

INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "1\t10\t4\t881250949",
    "2\t11\t3.5\t881250950.7",  # float timestamps are floored
    "1\t11\t5\t881250951",
]
ITEM = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "10\tToy Story\t1995\tAnimation Children's Comedy",
    "11\tGoldenEye\t1995\tAction Adventure Thriller",
    "12\tNot Rated\t1996\tDrama",
]


def test_atomic_files(tmp_path: Path):
    write(tmp_path / "toy.inter", INTER)
    write(tmp_path / "toy.item", ITEM)
    src = load_atomic(tmp_path / "toy.inter")
    check_schema(src)
    assert src.name == "toy"
    assert rows(src.interactions) == [
        {"user_id": "1", "item_id": "10", "timestamp": 881250949, "rating": 4.0, "time_frac": 0.0},
        {"user_id": "2", "item_id": "11", "timestamp": 881250950, "rating": 3.5,
         "time_frac": pytest.approx(0.7, abs=1e-6)},  # the fraction orders same-second rows,
        {"user_id": "1", "item_id": "11", "timestamp": 881250951, "rating": 5.0, "time_frac": 0.0},
    ]
    items = items_by_id(src)
    assert list(items) == ["10", "11"]
    assert items["10"]["categories"] == ["Animation", "Children's", "Comedy"]
    assert items["10"]["title"] == "Toy Story"
    assert items["10"]["text"] == "Toy Story. Animation Children's Comedy. "
    assert items["10"]["image"] is None
    assert detect_source(tmp_path) == "atomic"
    src2 = load_source("atomic", tmp_path)
    assert src2.interactions.equals(src.interactions)
    src3 = load_atomic_dir(tmp_path)
    assert src3.files == [str(tmp_path / "toy.inter"), str(tmp_path / "toy.item")]


def test_atomic_without_rating_or_items(tmp_path: Path):
    write(tmp_path / "x.inter", ["item_id:token\tuser_id:token\ttimestamp:token", "i\tu\t3", "j\tu\t4"])
    src = load_atomic(tmp_path / "x.inter")
    check_schema(src)
    assert src.interactions["user_id"].tolist() == ["u", "u"]
    assert src.interactions["rating"].isna().all() and len(src.items) == 0


@pytest.mark.parametrize(
    "lines,line,fragment",
    [
        (["user_id\titem_id\ttimestamp", "1\t2\t3"], 1, "bad header field 'user_id'"),
        (["user_id:token\titem_id:str\ttimestamp:float", "1\t2\t3"], 1, "bad header field 'item_id:str'"),
        (["", "1\t2\t3"], 1, "bad header"),
        (["user_id:token\tuser_id:token\ttimestamp:float"], 1, "appears twice"),
        (["user_id:token\titem_id:token\trating:float", "1\t2\t3"], 1, "missing required column(s) 'timestamp'"),
        (["user_id:token\titem_id:token\ttimestamp:float", "1\t2\t3", "1\t2", "1\t2\t3"], 3, "expected 3 tab-separated columns, found 2"),
        (["user_id:token\titem_id:token\ttimestamp:float", "1\t2\t3", "1\t2\t3\t4"], 3, "found 4"),
        (["user_id:token\titem_id:token\ttimestamp:float", "1\t2\tnoon"], 2, "non-numeric timestamp"),
        (["user_id:token\titem_id:token\ttimestamp:float", "1\t2\tnan"], 2, "non-numeric timestamp"),
        (["user_id:token\titem_id:token\ttimestamp:float", "1\t2\t-3"], 2, "negative timestamp"),
        (["user_id:token\titem_id:token\ttimestamp:float", "1\t2\t"], 2, "missing timestamp"),
        (["user_id:token\titem_id:token\ttimestamp:float", "\t2\t3"], 2, "empty user_id"),
        (["user_id:token\titem_id:token\trating:float\ttimestamp:float", "1\t2\tfive\t3"], 2, "non-numeric rating"),
    ],
)
def test_bad_atomic_inter(tmp_path: Path, lines: list[str], line: int, fragment: str):
    path = write(tmp_path / "bad.inter", lines)
    expect_error(lambda: load_atomic(path), path, line, fragment)


def test_bad_atomic_item_and_empty(tmp_path: Path):
    inter = write(tmp_path / "a.inter", INTER)
    item = write(tmp_path / "a.item", ["movie_title:token_seq\tclass:token_seq", "x\ty"])
    expect_error(lambda: load_atomic(inter), item, 1, "missing required column(s) 'item_id'")
    item = write(tmp_path / "a.item", [ITEM[0], ITEM[1], "11\tGoldenEye"])
    expect_error(lambda: load_atomic(inter), item, 3, "expected 4 tab-separated columns")
    empty = tmp_path / "e.inter"
    empty.write_bytes(b"")
    expect_error(lambda: load_atomic(empty), empty, None, "empty file")
    header_only = write(tmp_path / "h.inter", [INTER[0]])
    expect_error(lambda: load_atomic(header_only), header_only, None, "no interactions")
    gz = tmp_path / "g.inter"
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    expect_error(lambda: load_atomic(gz), gz, 1, "corrupt or truncated gzip")
    d = tmp_path / "noatomic"
    d.mkdir()
    write(d / "x.train.inter", ["user_id:token\titem_id_list:token_seq\titem_id:token", "0\t1 2\t3"])
    with pytest.raises(DataError, match="no RecBole"):
        load_atomic_dir(d)


def test_atomic_skip_mode(tmp_path: Path):
    inter = write(tmp_path / "s.inter", INTER[:2] + ["1\t2", "3\t4\tx\t5", "3\t4\t1\t-5", INTER[3]])
    write(tmp_path / "s.item", ITEM[:2] + ["11\tshort"] + ITEM[2:])
    src = load_atomic(inter, on_bad_line="skip")
    assert src.interactions["item_id"].tolist() == ["10", "11"]
    assert src.skipped == {"inter:bad_columns": 1, "inter:bad_rating": 1, "inter:bad_timestamp": 1, "item:bad_columns": 1}
    assert list(items_by_id(src)) == ["10", "11"]


@pytest.mark.data
def test_movielens_100k():
    if not ML100K.is_dir():
        pytest.skip(f"{ML100K} not present")
    assert detect_source(ML100K) == "atomic"
    src = load_source("atomic", ML100K)
    check_schema(src)
    inter = src.interactions
    assert len(inter) == 100_000
    assert inter["user_id"].nunique() == 943
    assert inter["item_id"].nunique() == 1682
    assert inter.iloc[0].to_dict() == {"user_id": "196", "item_id": "242", "timestamp": 881250949, "rating": 3.0, "time_frac": 0.0}
    assert set(inter["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(src.items) == 1682 and src.skipped == {}
    items = items_by_id(src)
    assert items["1"]["title"] == "Toy Story"
    assert items["1"]["categories"] == ["Animation", "Children's", "Comedy"]
    assert items["1"]["text"] == "Toy Story. Animation Children's Comedy. "
    assert all(isinstance(c, list) for c in src.items["categories"])
    genres = {g for c in src.items["categories"] for g in c}
    assert {"Action", "Sci-Fi", "Film-Noir", "Drama"} <= genres


# --------------------------------------------------------------------------- review fixes


def test_image_root_covers_items_without_metadata(tmp_path: Path):
    """An interacted item with a local image but no metadata row gets an image-only row
    (atomic with a partial .item file, atomic without one, Amazon without a meta file)."""
    root = tmp_path / "img"
    for item in ("10", "11", "B2"):
        (root / item).mkdir(parents=True)
        (root / item / "a.jpg").write_bytes(b"x")
    (root / "99").mkdir()  # an image of an item nobody interacted with: ignored
    (root / "99" / "a.jpg").write_bytes(b"x")
    write(tmp_path / "toy.inter", ["user_id:token\titem_id:token\ttimestamp:float", "1\t10\t1", "1\t11\t2", "1\t12\t3"])
    write(tmp_path / "toy.item", ["item_id:token\tmovie_title:token_seq", "10\tToy Story"])  # no row for 11, 12
    src = load_atomic(tmp_path / "toy.inter", image_root=root)
    check_schema(src)
    items = items_by_id(src)
    assert sorted(items) == ["10", "11"]
    assert items["10"]["image"] == str((root / "10" / "a.jpg").absolute()) and items["10"]["title"] == "Toy Story"
    assert items["11"]["image"] == str((root / "11" / "a.jpg").absolute())
    assert items["11"]["title"] is None and items["11"]["text"] is None and items["11"]["categories"] == []
    (tmp_path / "toy.item").unlink()
    items = items_by_id(load_atomic(tmp_path / "toy.inter", image_root=root))
    assert sorted(items) == ["10", "11"] and items["10"]["text"] is None

    (tmp_path / "am").mkdir()
    reviews = write(tmp_path / "am" / "Toys_5.json", REVIEWS_2018)
    src = load_amazon(reviews, version="2018", image_root=root)  # no meta file beside it
    check_schema(src)
    assert rows(src.items)[0]["item_id"] == "B2" and len(src.items) == 1
    assert src.items["image"].tolist() == [str((root / "B2" / "a.jpg").absolute())]


def test_image_only_items_count_as_items_without_metadata(tmp_path: Path):
    from moedist.data.api import DataConfig, prepare
    from moedist.data.dataset import PreparedDataset

    root = tmp_path / "img"
    (root / "11").mkdir(parents=True)
    (root / "11" / "a.jpg").write_bytes(b"x")
    write(tmp_path / "toy.inter", ["user_id:token\titem_id:token\ttimestamp:float", "1\t10\t1", "1\t11\t2", "2\t11\t3"])
    write(tmp_path / "toy.item", ["item_id:token\tmovie_title:token_seq", "10\tToy Story"])
    m = prepare(DataConfig(source="atomic", input=str(tmp_path / "toy.inter"), image_root=str(root),
                           out=str(tmp_path / "p"), kcore=1))
    assert m["stats"]["items_with_image"] == 1 and m["stats"]["items_without_metadata"] == 1
    items = PreparedDataset(tmp_path / "p").items.set_index("item_id")
    assert items.loc["11", "image"] == str((root / "11" / "a.jpg").absolute()) and items.loc["11", "text"] == ""


def test_sub_second_time_is_kept_for_ordering(tmp_path: Path):
    """Times are stored in whole seconds; the fraction (RecBole float seconds, 2023
    milliseconds) is kept in ``time_frac`` so flooring creates no ties."""
    from moedist.data.sources.amazon import parse_time

    assert parse_time("300.7", "t")[0] == 300 and parse_time("300.7", "t")[1] == pytest.approx(0.7)
    assert parse_time(1588687728923, "t", divisor=1000) == (1588687728, 0.923)
    assert parse_time(2**62 + 1, "t") == (2**62 + 1, 0.0)  # large integers stay exact
    write(tmp_path / "x.inter", ["user_id:token\titem_id:token\ttimestamp:float", "u\ta\t100.0", "u\tc\t300.7", "u\tb\t300.2"])
    src = load_atomic(tmp_path / "x.inter")
    assert src.interactions["timestamp"].tolist() == [100, 300, 300]
    assert src.interactions["time_frac"].tolist() == pytest.approx([0.0, 0.7, 0.2])
