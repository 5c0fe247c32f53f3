"""RecBole atomic files (``<name>.inter`` + ``<name>.item``), e.g. MovieLens-100K.

Tab-separated text with a header of ``name:type`` fields, type one of ``token``, ``float``,
``token_seq`` (space-separated tokens), ``float_seq``. The interaction file needs
``user_id``, ``item_id`` and ``timestamp`` (``rating`` is optional); float timestamps, as
RecBole writes them, are floored to whole seconds (the fraction still orders interactions
within a second). The item file needs ``item_id``; its
title comes from ``movie_title`` or ``title``, its category path from ``class`` (MovieLens
genres) or ``categories`` split on spaces, its brand from ``brand``. ``release_year`` and
other columns are not used.
"""
from __future__ import annotations

import re
from pathlib import Path

from moedist.data.schema import RawSource
from moedist.data.sources.amazon import (
    BadLine,
    ImageIndex,
    LinePolicy,
    Progress,
    ProgressFn,
    interactions_frame,
    items_frame,
    iter_lines,
    list_files,
    make_image_index,
    new_item_columns,
    parse_rating,
    parse_time,
    with_image_only_items,
)
from moedist.data.text import item_text
from moedist.errors import DataError

ATOMIC_TYPES = ("token", "float", "token_seq", "float_seq")
TITLE_COLUMNS = ("movie_title", "title")
CATEGORY_COLUMNS = ("class", "categories")
BRAND_COLUMNS = ("brand",)
# RecBole's pre-split benchmark files (<name>.train.inter ...) are not raw interactions.
_SPLIT_INTER_RE = re.compile(r"\.(train|valid|test)\.inter$")


def _parse_header(raw: bytes, path: Path) -> list[tuple[str, str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("bad header: not valid UTF-8", path=path, line=1) from None
    text = text.lstrip("\ufeff").rstrip("\r\n")
    if not text.strip():
        raise DataError("bad header: empty first line (expected tab-separated name:type fields)", path=path, line=1)
    fields: list[tuple[str, str]] = []
    seen: set[str] = set()
    for f in text.split("\t"):
        name, sep, typ = f.strip().rpartition(":")
        if not sep or not name or typ not in ATOMIC_TYPES:
            raise DataError(
                f"bad header field {f!r}: expected name:type with type one of {', '.join(ATOMIC_TYPES)}",
                path=path,
                line=1,
            )
        if name in seen:
            raise DataError(f"bad header: column {name!r} appears twice", path=path, line=1)
        seen.add(name)
        fields.append((name, typ))
    return fields


def _rows(path: Path, policy: LinePolicy, progress: Progress | None, required: tuple[str, ...], prefix: str):
    """Yield ``(header_index, line_number, values)`` for the data rows of an atomic file;
    the first item yielded is the column-name -> index map."""
    it = iter_lines(path, progress)
    first = next(it, None)
    if first is None:
        raise DataError("empty file: no header line", path=path)
    header = _parse_header(first[1], path)
    index = {name: i for i, (name, _) in enumerate(header)}
    missing = [c for c in required if c not in index]
    if missing:
        have = ", ".join(index)
        raise DataError(
            f"missing required column(s) {', '.join(repr(m) for m in missing)} in header (columns: {have})",
            path=path,
            line=1,
        )
    yield index
    n = len(header)
    for lineno, raw in it:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            policy.bad(BadLine("bad_encoding", "line is not valid UTF-8"), path, lineno, prefix=prefix)
            continue
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        values = text.split("\t")
        if len(values) != n:
            err = BadLine("bad_columns", f"expected {n} tab-separated columns, found {len(values)}")
            policy.bad(err, path, lineno, prefix=prefix)
            continue
        yield lineno, values


def _read_inter(path: Path, policy: LinePolicy, progress: Progress | None):
    rows = _rows(path, policy, progress, ("user_id", "item_id", "timestamp"), "inter")
    index = next(rows)
    ui, ii, ti = index["user_id"], index["item_id"], index["timestamp"]
    ri = index.get("rating")
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    fracs: list[float] = []
    ratings: list[float] = []
    for lineno, values in rows:
        try:
            user = values[ui].strip()
            if not user:
                raise BadLine("missing_user", "empty user_id")
            item = values[ii].strip()
            if not item:
                raise BadLine("missing_item", "empty item_id")
            t, frac = parse_time(values[ti], "timestamp")
            r = parse_rating(values[ri], "rating") if ri is not None else float("nan")
        except BadLine as e:
            policy.bad(e, path, lineno, prefix="inter")
            continue
        users.append(user)
        items.append(item)
        times.append(t)
        fracs.append(frac)
        ratings.append(r)
    if not users:
        raise DataError("no interactions (header only, or every row was bad and skipped)", path=path)
    return interactions_frame(users, items, times, ratings, fracs)


def _first_col(index: dict[str, int], names: tuple[str, ...]) -> int | None:
    for n in names:
        if n in index:
            return index[n]
    return None


def _read_items(path: Path, wanted: set[str], policy: LinePolicy, progress: Progress | None, images: ImageIndex | None):
    rows = _rows(path, policy, progress, ("item_id",), "item")
    index = next(rows)
    ii = index["item_id"]
    tcol = _first_col(index, TITLE_COLUMNS)
    ccol = _first_col(index, CATEGORY_COLUMNS)
    bcol = _first_col(index, BRAND_COLUMNS)
    cols = new_item_columns()
    seen: set[str] = set()
    for lineno, values in rows:
        item = values[ii].strip()
        if not item:
            policy.bad(BadLine("missing_item", "empty item_id"), path, lineno, prefix="item")
            continue
        if item in seen or item not in wanted:
            continue
        seen.add(item)
        title = values[tcol] if tcol is not None and values[tcol].strip() else None
        brand = values[bcol] if bcol is not None and values[bcol].strip() else None
        cats = values[ccol].split() if ccol is not None else []
        local = images.lookup(item) if images is not None else None
        cols["item_id"].append(item)
        cols["title"].append(title)
        cols["brand"].append(brand)
        cols["categories"].append(cats)
        cols["image"].append(local)
        cols["text"].append(item_text(title, cats, brand))
    return items_frame(cols)


def load_atomic(
    inter_path: str | Path,
    item_path: str | Path | None = None,
    *,
    on_bad_line: str = "error",
    image_root: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> RawSource:
    """Load a RecBole ``.inter`` file (and its ``.item`` file: the one beside it with the same
    stem when ``item_path`` is None, if present) into a :class:`RawSource`. ``image_root``
    gives local images (``image_root/<item_id>/``) to every interacted item, also to those
    without an ``.item`` row."""
    policy = LinePolicy(on_bad_line)
    ipath = Path(inter_path)
    if item_path is None:
        cand = ipath.with_suffix(".item")
        item = cand if cand.is_file() else None
    else:
        item = Path(item_path)
    images = make_image_index(image_root)
    prog = Progress(progress)
    inter = _read_inter(ipath, policy, prog)
    files = [str(ipath)]
    wanted = set(inter["item_id"].unique().tolist())
    if item is not None:
        items = _read_items(item, wanted, policy, prog, images)
        files.append(str(item))
    else:
        items = items_frame(new_item_columns())
    items = with_image_only_items(items, wanted, images)
    return RawSource(name=ipath.stem, interactions=inter, items=items, files=files, skipped=dict(policy.skipped))


def find_atomic_files(directory: str | Path) -> tuple[Path, Path | None]:
    """(``<name>.inter``, ``<name>.item`` or None) in a folder of RecBole atomic files."""
    d = Path(directory)
    names = list_files(d)
    inters = [n for n in names if n.endswith(".inter") and not _SPLIT_INTER_RE.search(n)]
    if len(inters) > 1:
        inters = [n for n in inters if n == f"{d.name}.inter"] or inters
    if not inters:
        raise DataError("no RecBole <name>.inter file in this directory", path=d)
    if len(inters) > 1:
        raise DataError(f"several .inter files in this directory ({', '.join(inters)}); name one", path=d)
    inter = d / inters[0]
    item = inter.with_suffix(".item")
    return inter, (item if item.is_file() else None)


def load_atomic_dir(path: str | Path, *, item_path: str | Path | None = None, **opts) -> RawSource:
    """:func:`load_atomic` on the ``<name>.inter`` / ``<name>.item`` files of a folder."""
    inter, item = find_atomic_files(path)
    return load_atomic(inter, item_path if item_path is not None else item, **opts)
