"""Property-based tests: malformed raw inputs give a clear error or a counted skip, never a crash.

Hypothesis corrupts small valid raw files (Amazon 2014 / 2018 / 2023 reviews + metadata,
RecBole atomic ``.inter`` / ``.item``) and checks four properties:

1. ``load_source`` / ``prepare`` either succeed or raise a :class:`MoedistError` whose message
   names the corrupted file (and, for a line-level problem, ``path:line``); no other exception
   type leaks. With ``on_bad_line="skip"`` every corrupted line is skipped and counted in
   ``RawSource.skipped`` (the counts sum to the number of corrupted lines).
2. A failed ``prepare`` into a fresh out dir leaves neither the out dir nor ``.<name>.tmp-*``
   directories behind.
3. A failed ``prepare`` into an out dir holding a good dataset leaves its files byte-identical.
4. ``moedist data prepare`` (``moedist.cli.main``) returns 2 and prints exactly one ``error:``
   line for bad input (0 is allowed with ``--on-bad-line skip``) and for bad ``key=value``
   overrides, naming the file / key.

Deterministic (``derandomize=True``, no example database). Each test is parametrized over
the corruption families, so every family runs every time; hypothesis generates the rest
(positions, values, how many lines, gzip or not). Generated inputs per run = the sum of
``max_examples`` over the parametrized cases:

    test_amazon_line_corruptions        3 versions x 11 corruptions x 3 =  99  (error + skip mode each)
    test_atomic_line_corruptions                     9 corruptions x 4 =  36  (error + skip mode each)
    test_atomic_bad_headers                          6 corruptions x 2 =  12
    test_file_level_corruptions         4 sources x {truncate, flip} x 4 =  32
    test_failed_prepare_writes_nothing                  6 families x 5 =  30  (fresh + good out dir each)
    test_cli_corrupt_input                              4 families x 4 =  16
    test_cli_bad_overrides                                              16
    test_cli_error_line_is_not_markup                                     3
                                                                       ---
                                                                       244

Runtime: ~8 s on 2 cores.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import string
import tempfile
from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from moedist.cli import main as cli_main
from moedist.data.api import DataConfig, prepare
from moedist.data.sources import load_source
from moedist.errors import ConfigError, DataError, MoedistError


def cfg(n: int, **kw) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
        **kw,
    )


# --------------------------------------------------------------------------- valid raw data

VERSIONS = ("2014", "2018", "2023")
N_USERS, N_ITEMS = 4, 5  # every user reviews every item: 20 review lines, 5 meta lines
USER_KEY = {"2014": "reviewerID", "2018": "reviewerID", "2023": "user_id"}
ITEM_KEYS = {"2014": ("asin",), "2018": ("asin",), "2023": ("parent_asin", "asin")}
TIME_KEY = {"2014": "unixReviewTime", "2018": "unixReviewTime", "2023": "timestamp"}
CATEGORY_KEY = {"2014": "categories", "2018": "category", "2023": "categories"}
AMAZON_NAMES = {
    "2014": ("reviews_Toys_5.json", "meta_Toys.json"),
    "2018": ("Toys_5.json", "meta_Toys.json"),
    "2023": ("Toys.jsonl", "meta_Toys.jsonl"),
}


def review(version: str, u: int, i: int) -> dict:
    t = 1_300_000_000 + 86_400 * (u * N_ITEMS + i)
    if version == "2023":
        return {"rating": float(1 + (u + i) % 5), "title": "ok", "asin": f"P{i}-v", "parent_asin": f"P{i}",
                "user_id": f"U{u}", "timestamp": t * 1000 + 123, "verified_purchase": True}
    return {"reviewerID": f"U{u}", "asin": f"A{i}", "overall": float(1 + (u + i) % 5), "summary": "ok",
            "unixReviewTime": t}


def meta(version: str, i: int) -> dict:
    if version == "2014":
        return {"asin": f"A{i}", "title": f"Toy {i}", "price": 9.99, "imUrl": f"http://img/a{i}.jpg",
                "categories": [["Toys & Games", f"Sub{i}"], ["Other"]], "brand": "Acme"}
    if version == "2018":
        return {"asin": f"A{i}", "title": f"Toy {i}", "brand": "Acme", "category": ["Toys & Games", f"Sub{i}"],
                "imageURL": [f"http://img/s{i}.jpg"], "imageURLHighRes": [f"http://img/l{i}.jpg"]}
    return {"main_category": "Toys", "title": f"Toy {i}", "store": "Acme", "categories": ["Toys", f"Sub{i}"],
            "images": [{"thumb": f"http://img/t{i}.jpg", "large": f"http://img/l{i}.jpg", "hi_res": None}],
            "parent_asin": f"P{i}"}


def dump(version: str, which: str, rec: dict) -> bytes:
    """One raw line: JSON, except 2014 metadata, which is Python literals as in the real dump."""
    text = repr(rec) if (version == "2014" and which == "meta") else json.dumps(rec)
    return text.encode("utf-8")


def pack(lines: list[bytes], gz: bool) -> bytes:
    data = b"".join(line + b"\n" for line in lines)
    return gzip.compress(data, mtime=0) if gz else data


def amazon_names(version: str, gz: bool) -> tuple[str, str]:
    r, m = AMAZON_NAMES[version]
    return (r + ".gz", m + ".gz") if gz else (r, m)


def amazon_records(version: str) -> tuple[list[dict], list[dict]]:
    return ([review(version, u, i) for u in range(N_USERS) for i in range(N_ITEMS)],
            [meta(version, i) for i in range(N_ITEMS)])


INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
ITEM_HEADER = ["item_id:token", "movie_title:token_seq", "class:token_seq"]


def atomic_rows() -> tuple[list[list[str]], list[list[str]]]:
    inter = [[f"U{u}", f"I{i}", str(1 + (u + i) % 5), str(881_250_949 + 60 * (u * N_ITEMS + i))]
             for u in range(N_USERS) for i in range(N_ITEMS)]
    items = [[f"I{i}", f"Movie {i}", "Comedy Drama"] for i in range(N_ITEMS)]
    return inter, items


def tsv(values: list[str]) -> bytes:
    return "\t".join(values).encode("utf-8")


# --------------------------------------------------------------------------- generated cases


@dataclass
class Case:
    """Raw files with one kind of corruption in the file ``target``."""

    kind: str  # load_source kind ("amazon2018", "atomic", ...)
    files: dict[str, bytes]
    input: str  # the file passed as the input (reviews / .inter)
    target: str  # the corrupted file
    label: str  # what was done (shown when an example fails)
    bad_lines: list[int] = field(default_factory=list)  # 1-based lines corrupted (line-level cases)
    reasons: frozenset[str] = frozenset()  # skip keys these lines may be counted under
    always_fails: bool = False  # an error even with on_bad_line="skip"
    expect_line: int | None | str = "any"  # exact DataError.line in "error" mode, or "any"
    kcore: int = 2
    good_reviews: int | None = None  # interactions left in skip mode (line-level cases)
    good_items: int | None = None  # items with metadata left in skip mode
    cut: int | None = None  # where a file was truncated

    def write(self, d: Path) -> Path:
        for name, data in self.files.items():
            (d / name).write_bytes(data)
        return d / self.input

    def __repr__(self) -> str:
        return f"Case({self.kind}, {self.label}, target={self.target}, bad_lines={self.bad_lines})"

    def _repr_pretty_(self, p, cycle) -> None:  # how hypothesis prints a failing example
        p.text(repr(self) + "\n" + "\n".join(f"  {k}: {v[:3000]!r}" for k, v in self.files.items()))


SAFE_CHARS = st.characters(blacklist_categories=("Cs",))
JUNK_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs",),
                           blacklist_characters="{")
# A non-blank line that is not a record. No "{" (so never a dict), no control characters
# (so never a gzip magic number, a line break or an ASCII-blank line).
JUNK = st.text(JUNK_CHARS, min_size=1, max_size=20).filter(lambda s: s.strip(" ") != "")
# Junk lines without "[" / "]" (markup-looking text has its own test below).
JUNK_NO_MARKUP = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs",), blacklist_characters="{[]"),
    min_size=1, max_size=20,
).filter(lambda s: s.strip(" ") != "")

LETTERS = st.text(string.ascii_letters, min_size=1, max_size=8)
# Timestamps that must be rejected: negative, >= 2**63 (also after flooring), non-finite,
# non-numeric, missing, wrong type.
BAD_TIME = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63, max_value=2**80),
    st.floats(max_value=-0.001),
    st.floats(min_value=1e19),
    st.just(float("nan")),
    LETTERS,  # float() accepts only nan/inf/infinity spellings of letters: non-finite, rejected too
    st.sampled_from([None, "", "  ", "NaN", "-1", "-0.5", "1e30", "12abc", "9" * 25, True, False, [1], {"t": 1}]),
)
BAD_TIME_TEXT = st.one_of(
    st.integers(max_value=-1).map(str),
    st.floats(max_value=-0.001).map(repr),
    st.floats(min_value=1e19).map(repr),
    LETTERS,
    st.sampled_from(["", " ", "nan", "-inf", "1e400", "12abc", "9" * 25, "1,5"]),
)
NOT_LIST = st.one_of(
    st.text(SAFE_CHARS, max_size=8),
    st.dictionaries(LETTERS, st.integers(), max_size=2),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
NOT_STR = st.one_of(
    st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(SAFE_CHARS, max_size=3), max_size=2), st.dictionaries(LETTERS, st.integers(), max_size=1),
)
STRS = st.lists(st.text(SAFE_CHARS, max_size=6), max_size=2)
# A category path of the wrong shape. 2014: a list of paths (lists) whose first path is checked;
# 2018/2023: one flat list of strings.
BAD_PATHS_2014 = st.one_of(
    NOT_LIST,
    st.lists(st.text(SAFE_CHARS, max_size=6), min_size=1, max_size=3),  # flat, not nested
    st.builds(lambda pre, bad, post: [pre + [bad] + post, ["ok"]], STRS, NOT_STR, STRS),  # nested wrong
)
BAD_PATHS_FLAT = st.one_of(
    NOT_LIST,
    st.builds(lambda pre, bad, post: pre + [bad] + post, STRS, NOT_STR, STRS),
)
LONE_SURROGATE = st.builds(lambda a, s, b: a + s + b, st.text(string.ascii_letters, max_size=3),
                           st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                           st.text(string.ascii_letters, max_size=3))

REVIEW_CORRUPTIONS = ("junk", "drop_user", "drop_item", "drop_time", "bad_time", "surrogate_id")
META_CORRUPTIONS = ("junk", "drop_item", "bad_category", "surrogate_text", "nul_url")
AMAZON_CORRUPTIONS = [("reviews", h) for h in REVIEW_CORRUPTIONS] + [("meta", h) for h in META_CORRUPTIONS]
REASONS = {
    "junk": {"malformed_line"},
    "drop_user": {"missing_user"},
    "drop_item": {"missing_item"},
    "drop_time": {"missing_timestamp"},
    "bad_time": {"bad_timestamp", "missing_timestamp"},
    "surrogate_id": {"bad_encoding"},
    "bad_category": {"bad_categories"},
    "surrogate_text": {"bad_encoding"},
    "nul_url": {"bad_field"},
}


def corrupt_record(draw, version: str, which: str, how: str, rec: dict) -> dict:
    rec = dict(rec)
    if how == "drop_user":
        rec.pop(USER_KEY[version])
    elif how == "drop_item":
        for k in ITEM_KEYS[version]:
            rec.pop(k, None)
    elif how == "drop_time":
        rec.pop(TIME_KEY[version])
    elif how == "bad_time":
        rec[TIME_KEY[version]] = draw(BAD_TIME)
    elif how == "surrogate_id":
        key = draw(st.sampled_from([USER_KEY[version], ITEM_KEYS[version][0]]))
        rec[key] = draw(LONE_SURROGATE)
    elif how == "bad_category":
        rec[CATEGORY_KEY[version]] = draw(BAD_PATHS_2014 if version == "2014" else BAD_PATHS_FLAT)
    elif how == "surrogate_text":
        bad = draw(LONE_SURROGATE)
        if draw(st.booleans()):
            rec["title"] = bad
        elif version == "2014":
            rec["categories"] = [["Toys", bad]]
        else:
            rec[CATEGORY_KEY[version]] = ["Toys", bad]
    elif how == "nul_url":
        url = draw(st.text(string.ascii_letters, max_size=3)) + "\x00" + draw(st.text(string.ascii_letters, max_size=3))
        if version == "2014":
            rec["imUrl"] = url
        elif version == "2018":
            rec["imageURLHighRes"] = [url]
        else:
            rec["images"] = [{"large": url, "hi_res": None}]
    else:  # pragma: no cover
        raise AssertionError(how)
    return rec


def corrupt_lines(draw, lines: list[bytes], n: int, make_bad, junk=None) -> tuple[list[bytes], list[int]]:
    """Replace ``n`` distinct lines by ``make_bad(i)`` (or insert ``n`` ``junk`` lines at random
    positions); returns the new lines and the 1-based numbers of the bad ones."""
    if junk is not None:
        tagged = [(line, False) for line in lines]
        for _ in range(n):
            pos = draw(st.integers(0, len(tagged)))
            tagged.insert(pos, (draw(junk).encode("utf-8"), True))
        return [t[0] for t in tagged], [k + 1 for k, t in enumerate(tagged) if t[1]]
    idx = sorted(draw(st.lists(st.integers(0, len(lines) - 1), min_size=n, max_size=n, unique=True)))
    out = list(lines)
    for i in idx:
        out[i] = make_bad(i)
    return out, [i + 1 for i in idx]


@st.composite
def amazon_line_case(draw, junk=JUNK, versions=VERSIONS, corruptions=AMAZON_CORRUPTIONS):
    version = draw(st.sampled_from(versions))
    which, how = draw(st.sampled_from(corruptions))
    n = draw(st.integers(1, 3))
    gz = draw(st.booleans())
    reviews, metas = amazon_records(version)
    records = reviews if which == "reviews" else metas
    lines = [dump(version, which, r) for r in records]
    lines, bad = corrupt_lines(
        draw, lines, n,
        lambda i: dump(version, which, corrupt_record(draw, version, which, how, records[i])),
        junk=junk if how == "junk" else None,
    )
    rname, mname = amazon_names(version, gz)
    rlines = lines if which == "reviews" else [dump(version, "reviews", r) for r in reviews]
    mlines = lines if which == "meta" else [dump(version, "meta", r) for r in metas]
    replaced = 0 if how == "junk" else n
    return Case(
        kind=f"amazon{version}",
        files={rname: pack(rlines, gz), mname: pack(mlines, gz)},
        input=rname,
        target=rname if which == "reviews" else mname,
        label=f"{which}:{how} x{n}{' gz' if gz else ''}",
        bad_lines=bad,
        reasons=frozenset(f"{which}:{r}" for r in REASONS[how]),
        expect_line=bad[0],
        good_reviews=len(reviews) - (replaced if which == "reviews" else 0),
        good_items=N_ITEMS - (replaced if which == "meta" else 0),
    )


ATOMIC_INTER_CORRUPTIONS = ("columns", "empty_user", "empty_item", "bad_time", "bad_rating", "bad_utf8")
ATOMIC_ITEM_CORRUPTIONS = ("columns", "empty_item", "bad_utf8")
ATOMIC_CORRUPTIONS = [("inter", h) for h in ATOMIC_INTER_CORRUPTIONS] + [("item", h) for h in ATOMIC_ITEM_CORRUPTIONS]
ATOMIC_REASONS = {
    "columns": {"bad_columns"},
    "empty_user": {"missing_user"},
    "empty_item": {"missing_item"},
    "bad_time": {"bad_timestamp", "missing_timestamp"},
    "bad_rating": {"bad_rating"},
    "bad_utf8": {"bad_encoding"},
}


def atomic_files(inter_lines: list[bytes], item_lines: list[bytes], gz: bool) -> dict[str, bytes]:
    return {"toy.inter": pack(inter_lines, gz), "toy.item": pack(item_lines, gz)}


def atomic_bad_row(draw, how: str, values: list[str], inter: bool) -> bytes:
    v = list(values)
    if how == "columns":
        if draw(st.booleans()):
            v = v[: draw(st.integers(1, len(v) - 1))]
        else:
            v = v + draw(st.lists(st.text(string.ascii_letters, max_size=3), min_size=1, max_size=3))
    elif how == "empty_user":
        v[0] = ""
    elif how == "empty_item":
        v[1 if inter else 0] = draw(st.sampled_from(["", " ", "  "]))
    elif how == "bad_time":
        v[3] = draw(BAD_TIME_TEXT)
    elif how == "bad_rating":
        v[2] = "x" + draw(LETTERS)
    elif how == "bad_utf8":  # invalid UTF-8 bytes in one field
        k = draw(st.integers(0, len(v) - 1))
        raw = [x.encode("utf-8") for x in v]
        raw[k] = draw(st.sampled_from([b"\xff", b"\xfe\xfe", b"\xc3", b"\xed\xa0\x80"])) + raw[k]
        return b"\t".join(raw)
    return tsv(v)


@st.composite
def atomic_line_case(draw, corruptions=ATOMIC_CORRUPTIONS):
    which, how = draw(st.sampled_from(corruptions))
    n = draw(st.integers(1, 3))
    gz = draw(st.booleans())
    inter_rows, item_rows = atomic_rows()
    rows = inter_rows if which == "inter" else item_rows
    lines, bad = corrupt_lines(draw, [tsv(r) for r in rows], n,
                               lambda i: atomic_bad_row(draw, how, rows[i], which == "inter"))
    header = tsv(INTER_HEADER if which == "inter" else ITEM_HEADER)
    lines = [header] + lines
    bad = [b + 1 for b in bad]
    inter_lines = lines if which == "inter" else [tsv(INTER_HEADER)] + [tsv(r) for r in inter_rows]
    item_lines = lines if which == "item" else [tsv(ITEM_HEADER)] + [tsv(r) for r in item_rows]
    return Case(
        kind="atomic",
        files=atomic_files(inter_lines, item_lines, gz),
        input="toy.inter",
        target=f"toy.{which}",
        label=f"{which}:{how} x{n}{' gz' if gz else ''}",
        bad_lines=bad,
        reasons=frozenset(f"{which}:{r}" for r in ATOMIC_REASONS[how]),
        expect_line=bad[0],
        good_reviews=len(inter_rows) - (n if which == "inter" else 0),
        good_items=N_ITEMS - (n if which == "item" else 0),
    )


HEADER_CORRUPTIONS = ("untyped", "bad_type", "duplicate", "missing_required", "empty", "junk")


@st.composite
def atomic_header_case(draw, corruptions=HEADER_CORRUPTIONS):
    """A bad header: not skippable, an error at line 1 in both modes."""
    which = draw(st.sampled_from(["inter", "item"]))
    header = list(INTER_HEADER if which == "inter" else ITEM_HEADER)
    how = draw(st.sampled_from(corruptions))
    k = draw(st.integers(0, len(header) - 1))
    if how == "untyped":
        header[k] = header[k].rpartition(":")[0]
    elif how == "bad_type":
        bad_type = st.sampled_from(["str", "int", "Token"]) | LETTERS.map(lambda t: t + "_")
        header[k] = header[k].rpartition(":")[0] + ":" + draw(bad_type)
    elif how == "duplicate":
        header[k] = header[(k + draw(st.integers(1, len(header) - 1))) % len(header)]
    elif how == "missing_required":
        req = 0  # user_id (inter) / item_id (item): required in both
        header[req] = "x" + draw(LETTERS) + ":token"
    elif how == "empty":
        header = [""]
    else:  # a header of junk fields without ":type"
        header = draw(st.lists(st.text(string.ascii_letters + " _", min_size=1, max_size=6), min_size=1, max_size=4))
    inter_rows, item_rows = atomic_rows()
    ih = header if which == "inter" else INTER_HEADER
    th = header if which == "item" else ITEM_HEADER
    files = atomic_files([tsv(ih)] + [tsv(r) for r in inter_rows], [tsv(th)] + [tsv(r) for r in item_rows], False)
    return Case(kind="atomic", files=files, input="toy.inter", target=f"toy.{which}", label=f"header:{how}",
                always_fails=True, expect_line=1)


def valid_files(source: str, gz: bool) -> tuple[str, dict[str, bytes], str, str]:
    """(kind, files, reviews/.inter name, meta/.item name) of a valid dataset."""
    if source == "atomic":
        inter_rows, item_rows = atomic_rows()
        files = atomic_files([tsv(INTER_HEADER)] + [tsv(r) for r in inter_rows],
                             [tsv(ITEM_HEADER)] + [tsv(r) for r in item_rows], gz)
        return "atomic", files, "toy.inter", "toy.item"
    reviews, metas = amazon_records(source)
    rname, mname = amazon_names(source, gz)
    files = {rname: pack([dump(source, "reviews", r) for r in reviews], gz),
             mname: pack([dump(source, "meta", r) for r in metas], gz)}
    return f"amazon{source}", files, rname, mname


@st.composite
def file_case(draw, sources=VERSIONS + ("atomic",), modes=("truncate", "flip"), gz_only=False):
    """Byte-level damage to a whole file: gzip truncated at a random byte, or random bytes flipped."""
    source = draw(st.sampled_from(sources))
    gz = True if gz_only else draw(st.booleans())
    kind, files, first, second = valid_files(source, gz)
    target = draw(st.sampled_from([first, second]))
    data = files[target]
    mode = draw(st.sampled_from(modes))
    if mode == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        files[target] = data[:cut]
        label = f"truncated at byte {cut}/{len(data)}{' gz' if gz else ''}"
        fails = gz  # a gzip stream cut anywhere is always an error
    else:
        buf = bytearray(data)
        positions = draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=4, unique=True))
        for p in positions:
            buf[p] ^= draw(st.integers(1, 255))
        files[target] = bytes(buf)
        label = f"flipped bytes {positions}{' gz' if gz else ''}"
        fails = False
    return Case(kind=kind, files=files, input=first, target=target, label=label, always_fails=fails,
                cut=cut if mode == "truncate" else None)


@st.composite
def empty_case(draw, sources=VERSIONS + ("atomic",)):
    source = draw(st.sampled_from(sources))
    kind, files, first, second = valid_files(source, False)
    target = draw(st.sampled_from([first, second]))
    style = draw(st.sampled_from(["zero bytes", "empty gzip", "blank lines"]))
    files[target] = {"zero bytes": b"", "empty gzip": gzip.compress(b"", mtime=0), "blank lines": b"\n  \n\n"}[style]
    return Case(kind=kind, files=files, input=first, target=target, label=f"empty ({style})", always_fails=True)


@st.composite
def kcore_empty_case(draw, sources=VERSIONS + ("atomic",)):
    """5-30 interactions, no user with 5: nothing survives the 5-core."""
    source = draw(st.sampled_from(sources))
    per_user = draw(st.lists(st.integers(1, 4), min_size=5, max_size=7))  # 5..28 lines
    items = draw(st.lists(st.integers(0, N_ITEMS - 1), min_size=sum(per_user), max_size=sum(per_user)))
    pairs = [(u, items[k]) for k, u in enumerate(u for u, c in enumerate(per_user) for _ in range(c))]
    kind, files, first, _ = valid_files(source, False)
    if source == "atomic":
        rows = [[f"U{u}", f"I{i}", "3", str(881_250_949 + 60 * k)] for k, (u, i) in enumerate(pairs)]
        files[first] = pack([tsv(INTER_HEADER)] + [tsv(r) for r in rows], False)
    else:
        files[first] = pack([dump(source, "reviews", review(source, u, i)) for u, i in pairs], False)
    return Case(kind=kind, files=files, input=first, target=first, label=f"5-core empty {per_user}",
                always_fails=True, kcore=5)


# --------------------------------------------------------------------------- checks


def assert_names_file(err: BaseException, path: Path, line: int | None | str = "any") -> None:
    """``err`` is a MoedistError whose message names ``path`` (and ``path:line`` when given)."""
    assert isinstance(err, MoedistError), f"{type(err).__name__} leaked: {err}"
    msg = str(err)
    assert str(path) in msg, msg
    assert "Traceback" not in msg
    if isinstance(err, DataError):
        assert err.path == str(path), (err.path, msg)
        if line != "any":
            assert err.line == line, msg
            assert msg.startswith(f"{path}:{line}: " if line is not None else f"{path}: "), msg


def load(case: Case, d: Path, on_bad_line: str):
    event(f"{case.kind} {case.target.split('.')[0]}: {case.label.split(' x')[0].split(' at ')[0].split(' [')[0]}")
    return load_source(case.kind, case.write(d), on_bad_line=on_bad_line)


def run_load(case: Case, d: Path, on_bad_line: str):
    """(RawSource, None) or (None, MoedistError); any other exception fails the test."""
    try:
        return load(case, d, on_bad_line), None
    except MoedistError as e:
        return None, e


def check_skip_counts(case: Case, src) -> None:
    assert sum(src.skipped.values()) == len(case.bad_lines), (src.skipped, case.bad_lines)
    assert set(src.skipped) <= case.reasons, (src.skipped, case.reasons)
    if case.good_reviews is not None:
        assert len(src.interactions) == case.good_reviews
    if case.good_items is not None:
        assert len(src.items) == case.good_items


def sha_tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-")))


def prepare_case(case: Case, raw: Path, out: Path):
    event(f"{case.kind}: {case.label.split(' x')[0].split(' at ')[0].split(' [')[0]}")
    c = DataConfig(source=case.kind, input=str(raw), out=str(out), kcore=case.kcore)
    try:
        prepare(c)
    except MoedistError as e:
        return e
    return None


# --------------------------------------------------------------------------- property 1: load_source


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("corruption", AMAZON_CORRUPTIONS, ids=lambda c: ":".join(c))
@cfg(3)
@given(data=st.data())
def test_amazon_line_corruptions(version: str, corruption: tuple[str, str], data):
    """error mode: DataError at path:first-bad-line; skip mode: loads, every bad line counted."""
    case = data.draw(amazon_line_case(versions=(version,), corruptions=[corruption]), label="case")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, err = run_load(case, d, "error")
        assert src is None, f"{case}: corrupted input loaded without error"
        assert_names_file(err, d / case.target, case.expect_line)
        src, err = run_load(case, d, "skip")
        assert err is None, f"{case}: skip mode failed: {err}"
        check_skip_counts(case, src)


@pytest.mark.parametrize("corruption", ATOMIC_CORRUPTIONS, ids=lambda c: ":".join(c))
@cfg(4)
@given(data=st.data())
def test_atomic_line_corruptions(corruption: tuple[str, str], data):
    case = data.draw(atomic_line_case(corruptions=[corruption]), label="case")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, err = run_load(case, d, "error")
        assert src is None, f"{case}: corrupted input loaded without error"
        assert_names_file(err, d / case.target, case.expect_line)
        src, err = run_load(case, d, "skip")
        assert err is None, f"{case}: skip mode failed: {err}"
        check_skip_counts(case, src)


@pytest.mark.parametrize("corruption", HEADER_CORRUPTIONS)
@cfg(2)
@given(data=st.data(), on_bad_line=st.sampled_from(["error", "skip"]))
def test_atomic_bad_headers(corruption: str, data, on_bad_line: str):
    case = data.draw(atomic_header_case(corruptions=(corruption,)), label="case")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, err = run_load(case, d, on_bad_line)
        assert src is None, f"{case}: bad header accepted"
        assert_names_file(err, d / case.target, 1)
        assert "header" in str(err)


@pytest.mark.parametrize("source", VERSIONS + ("atomic",))
@pytest.mark.parametrize("mode", ["truncate", "flip"])
@cfg(4)
@given(data=st.data(), on_bad_line=st.sampled_from(["error", "skip"]))
def test_file_level_corruptions(source: str, mode: str, data, on_bad_line: str):
    """Truncated gzip is always a DataError naming the file; flipped bytes load or fail cleanly."""
    case = data.draw(file_case(sources=(source,), modes=(mode,)), label="case")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, err = run_load(case, d, on_bad_line)
        if err is None:
            assert not case.always_fails, f"{case}: loaded"
            assert len(src.interactions) > 0
            return
        assert_names_file(err, d / case.target)
        if case.always_fails and case.cut is not None and case.cut >= 2:  # past the magic number
            assert "corrupt or truncated gzip file" in str(err), str(err)


# --------------------------------------------------------------------------- properties 2 + 3: prepare

GOOD_NAME = "good"


@pytest.fixture(scope="module")
def good_output():
    """A good prepared dataset (built once); failed runs into it must leave it as it is."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = root / "raw"
        raw.mkdir()
        kind, files, first, _ = valid_files("2018", True)
        for name, data in files.items():
            (raw / name).write_bytes(data)
        out = root / "outputs" / GOOD_NAME
        manifest = prepare(DataConfig(source=kind, input=str(raw / first), out=str(out), kcore=2))
        assert manifest["stats"]["interactions"] == N_USERS * N_ITEMS
        yield out, sha_tree(out)


FAILING_CASES = {
    "amazon-line": amazon_line_case(),
    "atomic-line": atomic_line_case(),
    "atomic-header": atomic_header_case(),
    "gzip-truncated": file_case(modes=("truncate",), gz_only=True),
    "empty": empty_case(),
    "5-core-empty": kcore_empty_case(),
}


@pytest.mark.parametrize("family", sorted(FAILING_CASES))
@cfg(5)
@given(data=st.data())
def test_failed_prepare_writes_nothing(good_output, family: str, data):
    case = data.draw(FAILING_CASES[family], label="case")
    good_out, good_hashes = good_output
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        raw = d / "raw"
        raw.mkdir()
        path = case.write(raw)
        # property 2: a fresh out dir is not created, and no temp dirs are left
        parent = d / "outputs"
        parent.mkdir()
        err = prepare_case(case, path, parent / "fresh")
        assert err is not None, f"{case}: prepare succeeded"
        assert_names_file(err, raw / case.target, case.expect_line)
        assert not (parent / "fresh").exists()
        assert list(parent.iterdir()) == []
        # property 3: a previous good output is not touched
        err = prepare_case(case, path, good_out)
        assert err is not None, f"{case}: prepare into the good out dir succeeded"
        assert_names_file(err, raw / case.target, case.expect_line)
        assert sha_tree(good_out) == good_hashes
        assert leftovers(good_out.parent, GOOD_NAME) == []


# --------------------------------------------------------------------------- property 4: the CLI


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


CLI_CASES = {
    "amazon-line": amazon_line_case(junk=JUNK_NO_MARKUP),
    "gzip-truncated": file_case(sources=VERSIONS, modes=("truncate",), gz_only=True),
    "empty": empty_case(sources=VERSIONS),
    "5-core-empty": kcore_empty_case(sources=VERSIONS),
}


@pytest.mark.parametrize("family", sorted(CLI_CASES))
@cfg(4)
@given(data=st.data(), skip=st.booleans())
def test_cli_corrupt_input(capsys, family: str, data, skip: bool):
    case = data.draw(CLI_CASES[family], label="case")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        raw = d / "raw"
        raw.mkdir()
        path = case.write(raw)
        out = d / "out"
        argv = ["data", "prepare", "--source", "amazon", "--input", str(path), "--out", str(out), "--kcore", str(case.kcore)]
        if skip:
            argv += ["--on-bad-line", "skip"]
        capsys.readouterr()
        rc = cli_main(argv)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        line_level = bool(case.bad_lines)
        if skip and line_level:
            assert rc == 0, f"{case}: {captured.err}"
            assert error_lines(captured.err) == []
            manifest = json.loads((out / "dataset.json").read_text())
            assert sum(manifest["skipped_lines"].values()) == len(case.bad_lines)
            return
        assert rc == 2, f"{case}: rc={rc}\n{captured.err}"
        errs = error_lines(captured.err)
        assert len(errs) == 1, captured.err
        target = raw / case.target
        where = f"{target}:{case.expect_line}: " if line_level and not skip else f"{target}"
        assert where in errs[0], errs[0]
        assert not out.exists()
        assert leftovers(d, "out") == []


DC_FIELDS = {f.name for f in dc_fields(DataConfig)}
WRONG = ["[1, 2]", "{a: 1}"]
BAD_OVERRIDE_VALUES = {
    # source / input / out are also given as flags (the flags win), so they are not generated here
    "seed": WRONG + ["1.5", "true", "xyz"],
    "split_seed": WRONG + ["0.25", "false", "abc"],
    "kcore": WRONG + ["2.5", "true", "five", "0", "-3"],  # 0 / -3: right type, out of range
    "dedup": WRONG + ["2", "1.5", "maybe", "xyes"],
    "cold_valid_frac": WRONG + ["true", "tenth", "1.5", "-0.1"],
    "cold_test_frac": WRONG + ["false", "abc", "2"],
    "on_bad_line": WRONG + ["ignore", "1", "true", "Skip"],
    "meta": WRONG + ["true"],
    "image_root": WRONG + ["false"],
    "name": WRONG + ["true"],
    "size": WRONG + ["false"],
}
OUT_OF_RANGE = {("kcore", "0"), ("kcore", "-3"), ("cold_valid_frac", "1.5"), ("cold_valid_frac", "-0.1"),
                ("cold_test_frac", "2")}
UNKNOWN_KEY = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True).filter(lambda k: k not in DC_FIELDS)
NON_STR_KEYS = sorted(set(BAD_OVERRIDE_VALUES) - {"meta", "image_root", "name", "size"})  # any string is a str
BAD_OVERRIDE = st.one_of(
    st.tuples(UNKNOWN_KEY, st.sampled_from(["1", "x", "true", "[1]"])),
    st.sampled_from(sorted(BAD_OVERRIDE_VALUES)).flatmap(
        lambda k: st.tuples(st.just(k), st.sampled_from(BAD_OVERRIDE_VALUES[k]))),
    st.tuples(st.sampled_from(NON_STR_KEYS), LETTERS.map(lambda s: "x" + s)),
)


@pytest.fixture(scope="module")
def good_raw():
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _, files, first, _ = valid_files("2018", False)
        for name, data in files.items():
            (d / name).write_bytes(data)
        yield d / first


@cfg(16)
@given(kv=BAD_OVERRIDE)
def test_cli_bad_overrides(capsys, good_raw, kv: tuple[str, str]):
    key, value = kv
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        capsys.readouterr()
        rc = cli_main(["data", "prepare", "--source", "amazon", "--input", str(good_raw), "--out", str(out),
                       f"{key}={value}"])
        captured = capsys.readouterr()
        assert rc == 2, f"{key}={value}: rc={rc}\n{captured.err}"
        errs = error_lines(captured.err)
        assert len(errs) == 1, captured.err
        assert key in errs[0], errs[0]
        if key not in DC_FIELDS:
            assert f"unknown key '{key}'" in errs[0], errs[0]
        assert "Traceback" not in captured.err
        assert not out.exists()


def test_bad_override_errors_are_config_errors():
    """The library side of the CLI check: wrong types are ConfigErrors naming the key."""
    from moedist.config import load_config

    for key, values in BAD_OVERRIDE_VALUES.items():
        for value in values:
            if (key, value) in OUT_OF_RANGE:
                continue  # right type, wrong range: rejected by prepare (a DataError naming the key)
            with pytest.raises(ConfigError, match=key):
                load_config(DataConfig, None, [f"{key}={value}"])


MARKUP_JUNK = st.builds(lambda a, tag, b: f"{a} [/{tag}] [{tag}]{b}",
                        LETTERS, st.sampled_from(["b", "bold", "red", "x"]), LETTERS)


@cfg(3, phases=(Phase.generate,))
@given(junk=MARKUP_JUNK)
def test_cli_error_line_is_not_markup(capsys, junk: str):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        reviews = d / "Toys_5.json"
        reviews.write_bytes(pack([dump("2018", "reviews", review("2018", 0, 0)), junk.encode()], False))
        capsys.readouterr()
        rc = cli_main(["data", "prepare", "--source", "amazon", "--input", str(reviews), "--out", str(d / "out")])
        errs = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(errs) == 1
        assert f"{reviews}:2: " in errs[0] and junk in errs[0], errs[0]
