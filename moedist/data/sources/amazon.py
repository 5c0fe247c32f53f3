"""Amazon Reviews loaders: the 2014 (McAuley), 2018 (Ni et al.) and 2023 (Hou et al.) dumps.

=======  ===========================  ============================  =====================================
version  reviews                      metadata                      notes
=======  ===========================  ============================  =====================================
2014     ``reviews_<Cat>_5.json.gz``  ``meta_<Cat>.json.gz``        meta lines are *Python literals*;
         reviewerID, asin, overall,   asin, title, brand,           ``categories`` is a list of paths,
         unixReviewTime (s)           categories, imUrl             the first one is used
2018     ``<Cat>_5.json.gz`` (same    ``meta_<Cat>.json.gz``        ``category`` is one flat path;
         fields as 2014)              asin, title, brand, category, images: imageURLHighRes, then
                                      imageURL(HighRes)             imageURL; JSON or Python literals
2023     ``<Cat>.jsonl.gz``           ``meta_<Cat>.jsonl.gz``       item = parent_asin (else asin);
         user_id, parent_asin, asin,  parent_asin, title, store,    timestamps in ms -> s (floored);
         rating, timestamp (ms)       categories, main_category,    empty categories -> [main_category]
                                      images (list of dicts)
=======  ===========================  ============================  =====================================

Every line is parsed with ``json.loads`` first and, failing that, ``ast.literal_eval`` (never
``eval``). Files may be gzip-compressed or plain (told apart by their magic bytes). Bad lines
raise :class:`~moedist.errors.DataError` naming the file and the 1-based line, or are skipped
and counted (``on_bad_line="skip"``). The helpers here (line reading, bad-line policy,
timestamp parsing, frame building) are shared with the other sources.
"""
from __future__ import annotations

import ast
import gzip
import json
import math
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from moedist.data.schema import RAW_INTERACTION_COLUMNS, RAW_ITEM_COLUMNS, RawSource
from moedist.data.text import item_text
from moedist.errors import ConfigError, DataError

PROGRESS_EVERY = 100_000
GZIP_MAGIC = b"\x1f\x8b"
# Longest line (newline included) read into memory: real records are at most a few MB, while a
# gzip file of 1 MB can hold a 1 GB line (a decompression bomb) that would otherwise be buffered whole.
MAX_LINE_BYTES = 64 * 1024 * 1024
VERSIONS = ("2014", "2018", "2023")
MAX_TIMESTAMP = 2**63 - 1
_DATA_FILE_RE = re.compile(r"\.(json|jsonl)(\.gz)?$", re.IGNORECASE)
# ``{'asin': 'X', ...`` / ``{"asin": "X", ...``: an item id as the first key of a record.
_LEADING_ID_RE = re.compile(rb"""\s*\{\s*(['"])(asin|parent_asin)\1\s*:\s*(['"])([^'"\\]+)\3\s*[,}]""")

ProgressFn = Callable[[int], None]


# --------------------------------------------------------------------------- shared helpers


class BadLine(Exception):
    """One input line is unusable; ``reason`` is the key it is counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class LinePolicy:
    """What to do with a bad line: raise a DataError (``"error"``) or count it (``"skip"``)."""

    def __init__(self, on_bad_line: str = "error"):
        if on_bad_line not in ("error", "skip"):
            raise ConfigError(f"on_bad_line must be 'error' or 'skip', not {on_bad_line!r}")
        self.skip = on_bad_line == "skip"
        self.skipped: dict[str, int] = {}

    def bad(self, err: BadLine, path: str | Path, line: int | None, *, prefix: str) -> None:
        if not self.skip:
            raise DataError(err.message, path=path, line=line) from None
        key = f"{prefix}:{err.reason}"
        self.skipped[key] = self.skipped.get(key, 0) + 1


class Progress:
    """Calls ``callback(total_lines_read_so_far)`` (cumulative over all files of one load)
    every :data:`PROGRESS_EVERY` lines and at the end of each file."""

    def __init__(self, callback: ProgressFn | None):
        self.callback = callback
        self.lines = 0

    def advance(self, n: int) -> None:
        if self.callback is not None and n > 0:
            self.lines += n
            self.callback(self.lines)


def iter_lines(path: str | Path, progress: Progress | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` (1-based) from a plain or gzip-compressed file.

    Compression is detected from the magic bytes, not the extension. Unreadable, corrupt or
    truncated files, and a line longer than :data:`MAX_LINE_BYTES`, raise a DataError naming
    the file (and the line where reading failed).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError("expected a file, found a directory", path=path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as e:
        raise DataError(f"cannot open file: {e.strerror or e}", path=path) from None
    lineno = 0
    compressed = False
    with fh:
        try:
            compressed = fh.read(2) == GZIP_MAGIC
            fh.seek(0)
            stream = gzip.GzipFile(fileobj=fh, mode="rb") if compressed else fh
            limit = MAX_LINE_BYTES
            while raw := stream.readline(limit + 1):
                lineno += 1
                if len(raw) > limit:
                    raise DataError(f"line longer than {limit:,} bytes: not a JSON-lines / atomic data file, "
                                    "or a decompression bomb", path=path, line=lineno)
                yield lineno, raw
                if progress is not None and lineno % PROGRESS_EVERY == 0:
                    progress.advance(PROGRESS_EVERY)
        except (OSError, EOFError, zlib.error) as e:
            what = "corrupt or truncated gzip file" if compressed else "cannot read file"
            raise DataError(f"{what}: {e}", path=path, line=lineno + 1) from None
    if progress is not None:
        progress.advance(lineno % PROGRESS_EVERY)


_FAIL = object()


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _FAIL


def _literal(raw: bytes) -> Any:
    """A Python literal (``{'a': True, 'b': [['x']]}``) via ``ast.literal_eval``; never eval."""
    raw = raw.strip()
    if not raw.startswith(b"{"):
        return _FAIL
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _FAIL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning on "\d" escapes
            return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _FAIL


class RecordParser:
    """Parses one line into a dict: JSON first; Python literal as fallback. Once a file has
    needed the fallback, literals are tried first for the following lines (2014 meta)."""

    def __init__(self) -> None:
        self.prefer_literal = False

    def parse(self, raw: bytes) -> dict | None:
        if not raw or raw.isspace():
            return None
        if self.prefer_literal:
            rec = _literal(raw)
            if rec is _FAIL:
                rec = _json(raw)
        else:
            rec = _json(raw)
            if rec is _FAIL:
                rec = _literal(raw)
                if rec is not _FAIL:
                    self.prefer_literal = True
        if rec is _FAIL:
            raise BadLine("malformed_line", f"malformed line (neither JSON nor a Python literal): {_snippet(raw)}")
        if not isinstance(rec, dict):
            raise BadLine("malformed_line", f"expected a JSON object, found {type(rec).__name__}: {_snippet(raw)}")
        return rec


def _snippet(raw: bytes, n: int = 60) -> str:
    text = raw.strip().decode("utf-8", errors="replace")
    return repr(text if len(text) <= n else text[:n] + "...")


def check_text(value: str | None, field: str, *, url: bool = False) -> None:
    """BadLine unless ``value`` can be stored as text: a lone surrogate (from a ``\\ud800``-style
    escape; UTF-8 cannot encode it) is ``bad_encoding``; a NUL in a URL/path is ``bad_field``."""
    if value is None:
        return
    if url and "\x00" in value:
        raise BadLine("bad_field", f"field {field!r} contains a NUL character: {value[:60]!r}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadLine(
                "bad_encoding", f"field {field!r} is not valid Unicode (a lone surrogate): {value[:60]!r}"
            ) from None


def parse_id(value: Any) -> str | None:
    """A non-empty string id (ints are accepted and converted); None if missing/invalid."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_time(value: Any, field: str, *, divisor: int = 1) -> tuple[int, float]:
    """Unix time (int, float or numeric string, in units of ``1/divisor`` s) ->
    ``(whole seconds >= 0, fraction of the second in [0, 1))``.

    The whole seconds are floored (what the prepared tables store); the fraction keeps the
    order of interactions within one second (``300.2`` before ``300.7``; 2023's milliseconds)
    so that flooring never creates ties that file order would then break."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadLine("missing_timestamp", f"missing timestamp field {field!r}")
    t: Any
    if isinstance(value, bool):
        t = None
    elif isinstance(value, int):
        t = value
    elif isinstance(value, float):
        t = value
    elif isinstance(value, str):
        try:
            t = int(value)
        except ValueError:
            try:
                t = float(value)
            except ValueError:
                t = None
    else:
        t = None
    if t is None or (isinstance(t, float) and not math.isfinite(t)):
        raise BadLine("bad_timestamp", f"non-numeric timestamp {value!r} in field {field!r}")
    if t < 0:
        raise BadLine("bad_timestamp", f"negative timestamp {value!r} in field {field!r}")
    frac = 0.0
    if isinstance(t, float):
        whole = math.floor(t)
        frac = t - whole  # exact: t and floor(t) are within a factor of 2 (or floor(t) = 0)
        t = whole
    if t > MAX_TIMESTAMP:
        raise BadLine("bad_timestamp", f"timestamp {value!r} in field {field!r} is out of range")
    if divisor == 1:
        return t, frac
    seconds, rest = divmod(t, divisor)
    return seconds, (rest + frac) / divisor


def parse_timestamp(value: Any, field: str, *, divisor: int = 1) -> int:
    """Unix time (int, float or numeric string) -> whole seconds >= 0 (floored, ``// divisor``)."""
    return parse_time(value, field, divisor=divisor)[0]


def parse_rating(value: Any, field: str) -> float:
    """A rating as float; NaN when missing."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise BadLine("bad_rating", f"non-numeric rating {value!r} in field {field!r}")


def interactions_frame(users: list, items: list, times: list, ratings: list, fracs: list | None = None) -> pd.DataFrame:
    """The raw interaction table with the dtypes of ``RAW_INTERACTION_COLUMNS``; ``fracs`` is
    each timestamp's sub-second fraction (``time_frac``, 0 when None)."""
    df = pd.DataFrame(
        {
            "user_id": pd.array(users, dtype="string"),
            "item_id": pd.array(items, dtype="string"),
            "timestamp": np.asarray(times, dtype=np.int64),
            "rating": np.asarray(ratings, dtype=np.float64),
            "time_frac": np.asarray(fracs, dtype=np.float64) if fracs is not None else np.zeros(len(users), np.float64),
        }
    )
    return df[list(RAW_INTERACTION_COLUMNS)]


def items_frame(cols: dict[str, list]) -> pd.DataFrame:
    """The raw item table (``RAW_ITEM_COLUMNS``) from column lists; categories stay lists."""
    n = len(cols["item_id"])
    arr = np.empty(n, dtype=object)
    for i, c in enumerate(cols["categories"]):
        arr[i] = list(c)
    cats = pd.Series(arr, dtype=object)
    data = {
        name: (cats if name == "categories" else pd.array(cols[name], dtype=dtype))
        for name, dtype in RAW_ITEM_COLUMNS.items()
    }
    return pd.DataFrame(data)[list(RAW_ITEM_COLUMNS)]


def new_item_columns() -> dict[str, list]:
    return {name: [] for name in RAW_ITEM_COLUMNS}


class ImageIndex:
    """Local images laid out as ``<image_root>/<item_id>/<files>`` (HM4SR's layout): an item's
    image is the first file of its folder in sorted order (hidden files ignored)."""

    def __init__(self, image_root: str | Path):
        root = Path(image_root)
        if not root.is_dir():
            raise DataError("image_root is not a directory", path=root)
        self.root = root.absolute()
        try:
            self.names = {e.name for e in os.scandir(self.root) if e.is_dir()}
        except OSError as e:
            raise DataError(f"cannot list image folder: {e.strerror or e}", path=root) from None

    def lookup(self, item_id: str) -> str | None:
        if item_id not in self.names:  # only real sub-folder names: no path tricks
            return None
        folder = self.root / item_id
        try:
            files = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
        except OSError:
            return None
        return str(folder / files[0]) if files else None


def make_image_index(image_root: str | Path | None) -> ImageIndex | None:
    return ImageIndex(image_root) if image_root is not None else None


def with_image_only_items(items: pd.DataFrame, wanted: set[str], images: ImageIndex | None) -> pd.DataFrame:
    """``items`` plus a row for every interacted item that has no metadata row but a local
    image (``image_root/<item_id>/``): title, brand and text missing, so the item still
    counts as one without metadata; only the image is known."""
    if images is None:
        return items
    have = set(items["item_id"].dropna().tolist())
    cols = new_item_columns()
    for item in sorted((images.names & wanted) - have):
        local = images.lookup(item)
        if local is None:
            continue
        cols["item_id"].append(item)
        cols["title"].append(None)
        cols["brand"].append(None)
        cols["categories"].append([])
        cols["image"].append(local)
        cols["text"].append(None)
    if not cols["item_id"]:
        return items
    extra = items_frame(cols)
    if items.empty:
        return extra
    return pd.concat([items, extra], ignore_index=True)[list(RAW_ITEM_COLUMNS)]


# --------------------------------------------------------------------------- Amazon fields


def _opt_str(value: Any, field: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadLine("bad_field", f"field {field!r} must be a string, found {type(value).__name__}")


def _flat_path(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadLine(
            "bad_categories", f"field {field!r} must be a list of strings (a category path), found {type(value).__name__}"
        )
    path = []
    for x in value:
        if not isinstance(x, str):
            raise BadLine(
                "bad_categories", f"field {field!r} must be a list of strings, found an element of type {type(x).__name__}"
            )
        if x.strip():
            path.append(x)
    return path


def _first_path(value: Any, field: str) -> list[str]:
    """2014 ``categories``: a list of category paths; the first path is kept."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadLine(
            "bad_categories", f"field {field!r} must be a list of category paths, found {type(value).__name__}"
        )
    for p in value:
        if not isinstance(p, list):
            raise BadLine(
                "bad_categories",
                f"field {field!r} must be a list of category paths (lists), found an element of type {type(p).__name__}",
            )
    return _flat_path(value[0], field) if value else []


def _any_path(value: Any, field: str) -> list[str]:
    """A flat path or a list of paths (first kept)."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return _first_path(value, field)
    return _flat_path(value, field)


def _first_url(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):
        for x in value:
            if isinstance(x, str) and x.strip():
                return x
            if x is not None and not isinstance(x, str):
                raise BadLine("bad_field", f"field {field!r} must be a list of URLs, found an element of type {type(x).__name__}")
        return None
    raise BadLine("bad_field", f"field {field!r} must be a list of URLs, found {type(value).__name__}")


_IMAGE_SIZES_2023 = ("hi_res", "large", "thumb")


def _image_2023(value: Any) -> str | None:
    """2023 ``images``: a list of ``{hi_res, large, thumb, variant}`` dicts (or the Hugging Face
    dict-of-lists form); the first image, in the highest resolution it has."""
    if value is None:
        return None
    if isinstance(value, dict):  # {"hi_res": [...], "large": [...], ...}
        for size in _IMAGE_SIZES_2023:
            urls = value.get(size)
            if isinstance(urls, list) and urls and isinstance(urls[0], str) and urls[0].strip():
                return urls[0]
        return None
    if not isinstance(value, list):
        raise BadLine("bad_field", f"field 'images' must be a list of image records, found {type(value).__name__}")
    if not value:
        return None
    first = value[0]
    if isinstance(first, str):
        return first if first.strip() else None
    if not isinstance(first, dict):
        raise BadLine("bad_field", f"field 'images' must hold image records (dicts), found {type(first).__name__}")
    for size in _IMAGE_SIZES_2023:
        url = first.get(size)
        if isinstance(url, str) and url.strip():
            return url
    return None


def _meta_fields(rec: dict, version: str) -> tuple[str | None, str | None, list[str], str | None]:
    """(title, brand, first category path, first image URL) of one metadata record."""
    title = _opt_str(rec.get("title"), "title")
    if version == "2014":
        brand = _opt_str(rec.get("brand"), "brand")
        cats = _first_path(rec.get("categories"), "categories")
        url = _first_url(rec.get("imUrl"), "imUrl")
    elif version == "2018":
        brand = _opt_str(rec.get("brand"), "brand")
        if "category" in rec:
            cats = _flat_path(rec.get("category"), "category")
        else:
            cats = _any_path(rec.get("categories"), "categories")
        url = _first_url(rec.get("imageURLHighRes"), "imageURLHighRes") or _first_url(rec.get("imageURL"), "imageURL")
        if url is None and "imUrl" in rec:
            url = _first_url(rec.get("imUrl"), "imUrl")
    else:
        brand = _opt_str(rec.get("store"), "store")
        cats = _flat_path(rec.get("categories"), "categories")
        if not cats:
            main = _opt_str(rec.get("main_category"), "main_category")
            cats = [main] if main else []
        url = _image_2023(rec.get("images"))
    return title, brand, cats, url


# --------------------------------------------------------------------------- files and versions


def normalize_version(version: Any) -> str | None:
    if version is None:
        return None
    v = str(version).strip().lower().removeprefix("amazon")
    if v not in VERSIONS:
        raise ConfigError(f"unknown Amazon reviews version {version!r} (expected one of {', '.join(VERSIONS)})")
    return v


def _strip_data_ext(name: str) -> str:
    for suffix in (".gz", ".jsonl", ".json"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def category_name(reviews_path: str | Path) -> str:
    """``reviews_Video_Games_5.json.gz`` / ``Video_Games_5.json.gz`` / ``Video_Games.jsonl.gz``
    -> ``Video_Games``."""
    stem = _strip_data_ext(Path(reviews_path).name)
    stem = stem.removeprefix("reviews_").removesuffix("_5")
    return stem or "amazon"


def find_meta_beside(reviews_path: str | Path) -> Path | None:
    """The metadata file next to a reviews file: ``meta_<Cat>.{json,jsonl}[.gz]``."""
    p = Path(reviews_path)
    cat = category_name(p)
    for ext in (".json.gz", ".jsonl.gz", ".json", ".jsonl"):
        cand = p.parent / f"meta_{cat}{ext}"
        if cand.is_file():
            return cand
    return None


def list_files(d: Path) -> list[str]:
    """Sorted names of the visible regular files in folder ``d`` (a clear error if unreadable)."""
    try:
        return sorted(e.name for e in os.scandir(d) if e.is_file() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list directory: {e.strerror or e}", path=d) from None


def find_amazon_files(directory: str | Path) -> tuple[Path, Path | None]:
    """(reviews file, metadata file or None) in a folder of raw Amazon files."""
    d = Path(directory)
    names = list_files(d)
    data = [n for n in names if _DATA_FILE_RE.search(n)]
    metas = [n for n in data if n.startswith("meta_")]
    reviews = [n for n in data if not n.startswith("meta_")]
    if not reviews:
        raise DataError("no Amazon reviews file (*.json[.gz] or *.jsonl[.gz], not meta_*) in this directory", path=d)
    if len(reviews) > 1:
        paired = [n for n in reviews if find_meta_beside(d / n) is not None]
        five = [n for n in (paired or reviews) if n.startswith("reviews_") or _strip_data_ext(n).endswith("_5")]
        reviews = five or paired or reviews
    if len(reviews) > 1:
        raise DataError(f"several Amazon reviews files in this directory ({', '.join(reviews)}); name one", path=d)
    rev = d / reviews[0]
    meta = find_meta_beside(rev)
    if meta is None and len(metas) == 1:
        meta = d / metas[0]
    return rev, meta


def _peek(path: str | Path | None, n: int = 20) -> list[dict]:
    """Up to ``n`` parseable records from the start of a file (errors ignored: the real pass
    reports them)."""
    if path is None:
        return []
    out: list[dict] = []
    parser = RecordParser()
    try:
        for _, raw in iter_lines(path):
            try:
                rec = parser.parse(raw)
            except BadLine:
                continue
            if rec is not None:
                out.append(rec)
                if len(out) >= n:
                    break
    except DataError:
        pass
    return out


def detect_amazon_version(reviews_path: str | Path, meta_path: str | Path | None = None) -> str:
    """"2014", "2018" or "2023", from the records' fields, else the file names."""
    rkeys = set().union(*(r.keys() for r in _peek(reviews_path)))
    old = bool(rkeys & {"reviewerID", "overall", "unixReviewTime"})
    if not old and (rkeys & {"user_id", "parent_asin"} or ("rating" in rkeys and "timestamp" in rkeys)):
        return "2023"
    metas = _peek(meta_path)
    mkeys = set().union(*(m.keys() for m in metas))
    if not old and mkeys & {"parent_asin", "main_category", "store", "images"}:
        return "2023"
    nested = any(isinstance(m.get("categories"), list) and m["categories"] and isinstance(m["categories"][0], list) for m in metas)
    if "imUrl" in mkeys or nested:
        return "2014"
    if mkeys & {"category", "imageURL", "imageURLHighRes"}:
        return "2018"
    name = Path(reviews_path).name
    if name.startswith("reviews_"):
        return "2014"
    if not old and re.search(r"\.jsonl(\.gz)?$", name, re.IGNORECASE):
        return "2023"
    return "2018"


# --------------------------------------------------------------------------- readers


def _read_reviews(path: Path, version: str, policy: LinePolicy, progress: Progress | None):
    if version == "2023":
        ukey, ikeys, tkey, rkey, divisor = "user_id", ("parent_asin", "asin"), "timestamp", "rating", 1000
    else:
        ukey, ikeys, tkey, rkey, divisor = "reviewerID", ("asin",), "unixReviewTime", "overall", 1
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    fracs: list[float] = []
    ratings: list[float] = []
    parser = RecordParser()
    records = 0
    for lineno, raw in iter_lines(path, progress):
        try:
            rec = parser.parse(raw)
            if rec is None:
                continue
            records += 1
            user = parse_id(rec.get(ukey))
            if user is None:
                raise BadLine("missing_user", f"missing or empty user id field {ukey!r}")
            item = None
            for k in ikeys:
                item = parse_id(rec.get(k))
                if item is not None:
                    break
            if item is None:
                raise BadLine("missing_item", f"missing or empty item id field {ikeys[0]!r}")
            check_text(user, ukey)
            check_text(item, k)
            t, frac = parse_time(rec.get(tkey), tkey, divisor=divisor)
            r = parse_rating(rec.get(rkey), rkey)
        except BadLine as e:
            policy.bad(e, path, lineno, prefix="reviews")
            continue
        users.append(user)
        items.append(item)
        times.append(t)
        fracs.append(frac)
        ratings.append(r)
    if records == 0:
        raise DataError("empty file: no review records", path=path)
    if not users:
        raise DataError("no interactions: every review line was bad and skipped", path=path)
    return interactions_frame(users, items, times, ratings, fracs)


def _read_meta(
    path: Path,
    version: str,
    wanted: set[str],
    policy: LinePolicy,
    progress: Progress | None,
    images: ImageIndex | None,
) -> pd.DataFrame:
    id_keys = ("parent_asin", "asin") if version == "2023" else ("asin",)
    lead = _LEADING_ID_RE.match
    cols = new_item_columns()
    seen: set[str] = set()
    parser = RecordParser()
    records = 0
    for lineno, raw in iter_lines(path, progress):
        # Fast path: a line that *starts* with the item id of an item that is not reviewed
        # (or already seen) is dropped without being parsed (2014 meta files are large
        # Python literals with "asin" first).
        m = lead(raw)
        if m is not None and m.group(2) != id_keys[0].encode():
            m = None
        if m is not None:
            records += 1
            try:
                skip_id = m.group(4).decode("utf-8")
            except UnicodeDecodeError:
                skip_id = None
            if skip_id is not None and (skip_id not in wanted or skip_id in seen):
                continue
        try:
            rec = parser.parse(raw)
            if rec is None:
                continue
            if m is None:
                records += 1
            item = None
            for k in id_keys:
                item = parse_id(rec.get(k))
                if item is not None:
                    break
            if item is None:
                raise BadLine("missing_item", f"missing or empty item id field {id_keys[0]!r}")
            if item in seen or item not in wanted:  # duplicates: first wins; unreviewed: dropped
                continue
            title, brand, cats, url = _meta_fields(rec, version)
            check_text(title, "title")
            check_text(brand, "brand")
            for c in cats:
                check_text(c, "categories")
            check_text(url, "image", url=True)
        except BadLine as e:
            policy.bad(e, path, lineno, prefix="meta")
            continue
        seen.add(item)
        local = images.lookup(item) if images is not None else None
        cols["item_id"].append(item)
        cols["title"].append(title)
        cols["brand"].append(brand)
        cols["categories"].append(cats)
        cols["image"].append(local or url)
        cols["text"].append(item_text(title, cats, brand))
    if records == 0:
        raise DataError("empty file: no metadata records", path=path)
    return items_frame(cols)


def load_amazon(
    reviews_path: str | Path,
    meta_path: str | Path | None = None,
    *,
    version: str | int | None = None,
    on_bad_line: str = "error",
    image_root: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> RawSource:
    """Load an Amazon reviews file (and its metadata) into a :class:`RawSource`.

    ``reviews_path`` may be a folder holding one reviews file (and ``meta_*``). Without
    ``meta_path`` the metadata file beside the reviews file (``meta_<Cat>.json[l][.gz]``) is
    used if there is one; otherwise items are empty. ``version`` ("2014" / "2018" / "2023")
    is detected from the fields and file names when None. ``image_root/<item_id>/`` folders
    give local images (first file in sorted order), else the first image URL is kept; an
    item with a local image but no metadata row gets an image-only row.
    ``progress(n)`` receives the cumulative number of lines read, every ~100k lines.
    """
    policy = LinePolicy(on_bad_line)
    v = normalize_version(version)
    rpath = Path(reviews_path)
    if rpath.is_dir():
        rpath, found = find_amazon_files(rpath)
        mpath = Path(meta_path) if meta_path is not None else found
    else:
        if rpath.name.startswith("meta_") and rpath.is_file():
            raise DataError("this is a metadata file; pass the reviews file (meta_* is found beside it)", path=rpath)
        mpath = Path(meta_path) if meta_path is not None else find_meta_beside(rpath)
    images = make_image_index(image_root)
    if v is None:
        v = detect_amazon_version(rpath, mpath)
    prog = Progress(progress)
    inter = _read_reviews(rpath, v, policy, prog)
    files = [str(rpath)]
    wanted = set(inter["item_id"].unique().tolist())
    if mpath is not None:
        items = _read_meta(mpath, v, wanted, policy, prog, images)
        files.append(str(mpath))
    else:
        items = items_frame(new_item_columns())
    items = with_image_only_items(items, wanted, images)
    return RawSource(
        name=category_name(rpath),
        interactions=inter,
        items=items,
        files=files,
        skipped=dict(policy.skipped),
    )
