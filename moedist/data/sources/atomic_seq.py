"""RecBole pre-split sequential benchmark files, as UniSRec and its successors publish them
(e.g. Amazon "Industrial and Scientific"):

- ``<name>.train.inter``, ``<name>.valid.inter``, ``<name>.test.inter``: tab-separated with
  a header ``user_id:token  item_id_list:token_seq  item_id:token``; each row is a prefix of
  one user's sequence (space-separated item indices) and the item that follows it;
- ``<name>.item2index`` and ``<name>.user2index``: ``original_id<TAB>index`` per line (no
  header), mapping the indices back to ASINs / reviewer ids;
- ``<name>.text`` (optional): header ``item_id:token  text:token_seq``, one product text per
  original item id (title, category path and brand, already joined).

Each user's full sequence is the longest prefix-plus-target among all rows of all three files;
every other row of the user must be a prefix of it (else a DataError names the file and line).
UniSRec keeps only the last 50 items of each history (``item_seq[:-t][-50:]``), so the rows of
a user with more than 52 interactions are windows, not prefixes: then the sequence is rebuilt
from the shortest training row's history, the training targets in order and the validation
and test targets, each row's history checked against the last W items rebuilt before it (W =
the longest history in the files).
The files carry **order only, no time**: an interaction's timestamp is its position in the
user's sequence (0, 1, 2, ... seconds), so every interval is one second. Models that use
absolute time or intervals (HM4SR's Temporal MoE) learn nothing from it; turn them off
(``hm4sr.use_tmoe=false``). The text (already title, category path and brand, joined and
cleaned) becomes the item title and, as written, the item text; there are no categories,
brands or images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moedist.data.schema import RawSource
from moedist.data.sources.amazon import (
    BadLine,
    LinePolicy,
    Progress,
    ProgressFn,
    interactions_frame,
    items_frame,
    iter_lines,
    list_files,
    new_item_columns,
)
from moedist.data.sources.atomic import _rows
from moedist.errors import DataError

SPLITS = ("train", "valid", "test")
# Changes when the same files give other tables (part of a preparation's identity, so that
# outputs of an older reader are prepared again): 2, the .text is the item text as written.
READER_VERSION = 2


def find_seq_files(directory: str | Path) -> dict[str, Path]:
    """The benchmark files of a folder: keys ``train valid test item2index user2index`` and
    ``text`` (when present). The name is the common stem of ``<name>.train.inter``."""
    d = Path(directory)
    names = list_files(d)
    stems = sorted(n[: -len(".train.inter")] for n in names if n.endswith(".train.inter"))
    if not stems:
        raise DataError("no <name>.train.inter file in this directory", path=d)
    if len(stems) > 1:
        raise DataError(f"several benchmark sets in this directory ({', '.join(stems)}); keep one per folder", path=d)
    stem = stems[0]
    files = {s: d / f"{stem}.{s}.inter" for s in SPLITS}
    files |= {k: d / f"{stem}.{k}" for k in ("item2index", "user2index", "text")}
    missing = [f.name for k, f in files.items() if k != "text" and not f.is_file()]
    if missing:
        raise DataError(f"incomplete benchmark set {stem!r}: missing {', '.join(missing)}", path=d)
    if not files["text"].is_file():
        del files["text"]
    return files


def is_seq_dir(directory: str | Path) -> bool:
    try:
        find_seq_files(directory)
        return True
    except DataError:
        return False


def _read_index(path: Path, policy: LinePolicy, progress: Progress, prefix: str) -> dict[str, str]:
    """``index -> original id`` from an ``original<TAB>index`` file."""
    out: dict[str, str] = {}
    index_of: dict[str, str] = {}  # original id -> its index: one each, or two users / items merge
    for lineno, raw in iter_lines(path, progress):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            policy.bad(BadLine("bad_encoding", "line is not valid UTF-8"), path, lineno, prefix=prefix)
            continue
        if not text.strip():
            continue
        parts = text.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            policy.bad(BadLine("bad_columns", "expected 'original_id<TAB>index'"), path, lineno, prefix=prefix)
            continue
        orig, idx = parts[0].strip(), parts[1].strip()
        if idx in out and out[idx] != orig:
            raise DataError(f"index {idx} is given to both {out[idx]!r} and {orig!r}", path=path, line=lineno)
        if index_of.setdefault(orig, idx) != idx:
            raise DataError(f"{orig!r} is given two indices, {index_of[orig]} and {idx}", path=path, line=lineno)
        out[idx] = orig
    if not out:
        raise DataError("empty index file", path=path)
    return out


@dataclass
class _Row:
    split: str
    hist: list[str]
    target: str
    path: Path
    lineno: int

    @property
    def seq(self) -> list[str]:
        return self.hist + [self.target]


def _show(items: list[str], n: int = 3) -> str:
    if len(items) <= 2 * n:
        return " ".join(items)
    return f"{' '.join(items[:n])} ... {' '.join(items[-n:])}, {len(items)} items"


def _distance(a: list[str], b: list[str]) -> int:
    """Positions that differ between two histories aligned at their ends, plus the length gap."""
    return sum(x != y for x, y in zip(reversed(a), reversed(b))) + abs(len(a) - len(b))


def _as_prefixes(user: str, rows: list[_Row]) -> tuple[list[str] | None, DataError | None]:
    """Untruncated files: every row's prefix + target is a prefix of the longest one."""
    longest = rows[0]
    for r in rows[1:]:
        if len(r.hist) > len(longest.hist):
            longest = r
    full = longest.seq
    for r in rows:
        seq = r.seq
        if full[: len(seq)] != seq:
            err = DataError(
                f"user {user}'s sequence here is not a prefix of the one at {longest.path.name}:{longest.lineno}",
                path=r.path,
                line=r.lineno,
            )
            return None, err
    return full, None


def _windowed(user: str, rows: list[_Row], window: int) -> list[str]:
    """Rebuild a sequence whose rows keep only the last ``window`` items of their history
    (UniSRec writes ``item_seq[:-t][-50:]``): the history of the shortest training row, then
    the training targets in order (each row's history must be the last ``window`` items
    rebuilt so far; rows with equal histories are taken last-written first, as UniSRec
    writes them newest first), then the validation and test targets, checked the same way."""
    train = [r for r in rows if r.split == "train"]
    later = [r for r in rows if r.split != "train"]
    if train:
        shortest = min(len(r.hist) for r in train)
        seq = list([r for r in train if len(r.hist) == shortest][-1].hist)
    else:
        seq = list(later[0].hist)
    prev: _Row | None = None

    def mismatch(r: _Row) -> DataError:
        where = f"the rows up to {prev.path.name}:{prev.lineno}" if prev is not None else "its first row"
        return DataError(
            f"user {user}'s history here ({_show(r.hist)}) is not the last {window} items of their sequence as "
            f"rebuilt from {where} ({_show(seq[-window:])})",
            path=r.path,
            line=r.lineno,
        )

    pending: dict[tuple[str, ...], list[_Row]] = {}
    for r in train:
        pending.setdefault(tuple(r.hist), []).append(r)
    for _ in range(len(train)):
        want = seq[-window:]
        cands = pending.get(tuple(want))
        if not cands:
            # no row continues the sequence: name the one whose history is nearest to it
            left = [r for rs in pending.values() for r in rs]
            nearest = min(left, key=lambda r: (_distance(r.hist, want), len(r.hist), r.lineno))
            raise mismatch(nearest)
        prev = cands.pop()
        if not cands:
            del pending[tuple(seq[-window:])]
        seq.append(prev.target)
    for r in later:
        if r.hist != seq[-window:]:
            raise mismatch(r)
        seq.append(r.target)
        prev = r
    return seq


def _read_sequences(files: dict[str, Path], policy: LinePolicy, progress: Progress) -> dict[str, list[str]]:
    """user index -> full item-index sequence, checked for consistency across rows.

    Each row is a prefix of its user's sequence and the item that follows it. When the files
    keep only the last W items of long histories (UniSRec keeps 50; W is the longest history
    in the files), a long user's rows are windows rather than prefixes and the sequence is
    rebuilt from them (:func:`_windowed`). A row that fits neither is a DataError naming it."""
    by_user: dict[str, list[_Row]] = {}
    window = 0
    for split in SPLITS:
        path = files[split]
        rows = _rows(path, policy, progress, ("user_id", "item_id_list", "item_id"), split)
        index = next(rows)
        ui, li, ii = index["user_id"], index["item_id_list"], index["item_id"]
        for lineno, values in rows:
            user, target = values[ui].strip(), values[ii].strip()
            if not user:
                policy.bad(BadLine("missing_user", "empty user_id"), path, lineno, prefix=split)
                continue
            if not target:
                policy.bad(BadLine("missing_item", "empty item_id"), path, lineno, prefix=split)
                continue
            hist = values[li].split()
            window = max(window, len(hist))
            by_user.setdefault(user, []).append(_Row(split, hist, target, path, lineno))
    if not by_user:
        raise DataError("no sequences (header only, or every row was bad and skipped)", path=files["train"])
    full: dict[str, list[str]] = {}
    for user, rows in by_user.items():
        seq, err = _as_prefixes(user, rows)
        if err is not None:
            # a full-window history that is not a prefix of the longest row marks truncation
            longest = max(len(r.hist) for r in rows)
            longest_seq = next(r.seq for r in rows if len(r.hist) == longest)
            truncated = window > 0 and any(
                len(r.hist) == window and longest_seq[: len(r.hist) + 1] != r.seq for r in rows
            )
            if not truncated:
                raise err
            seq = _windowed(user, rows, window)
        full[user] = seq
    return full


def _read_texts(path: Path, wanted: set[str], policy: LinePolicy, progress: Progress) -> dict[str, str]:
    rows = _rows(path, policy, progress, ("item_id", "text"), "text")
    index = next(rows)
    ii, ti = index["item_id"], index["text"]
    out: dict[str, str] = {}
    for _, values in rows:
        item = values[ii].strip()
        if item in wanted and item not in out and values[ti].strip():
            out[item] = values[ti]
    return out


def load_atomic_seq(path: str | Path, *, on_bad_line: str = "error", progress: ProgressFn | None = None,
                    image_root: str | Path | None = None) -> RawSource:
    """Load a folder of RecBole sequential benchmark files into a :class:`RawSource`."""
    if image_root is not None:
        raise DataError("sequential benchmark files carry no images; image_root is not supported", path=path)
    policy = LinePolicy(on_bad_line)
    prog = Progress(progress)
    files = find_seq_files(path)
    items_of = _read_index(files["item2index"], policy, prog, "item2index")
    users_of = _read_index(files["user2index"], policy, prog, "user2index")
    seqs = _read_sequences(files, policy, prog)
    users, items, times = [], [], []
    for u, seq in seqs.items():
        if u not in users_of:
            raise DataError(f"user index {u} is not in {files['user2index'].name}", path=files["train"])
        for pos, i in enumerate(seq):
            if i not in items_of:
                raise DataError(f"item index {i} (user {u}) is not in {files['item2index'].name}", path=files["train"])
            users.append(users_of[u])
            items.append(items_of[i])
            times.append(pos)
    inter = interactions_frame(users, items, times, [float("nan")] * len(users))
    cols = new_item_columns()
    read = [str(files[k]) for k in (*SPLITS, "item2index", "user2index")]
    if "text" in files:
        wanted = set(items)
        texts = _read_texts(files["text"], wanted, policy, prog)
        read.append(str(files["text"]))
        for item in sorted(texts):
            cols["item_id"].append(item)
            cols["title"].append(texts[item])
            cols["brand"].append(None)
            cols["categories"].append([])
            cols["image"].append(None)
            cols["text"].append(texts[item])  # already the joined, cleaned text: cleaning again appends ". "
    name = files["train"].name[: -len(".train.inter")]
    return RawSource(name=name, interactions=inter, items=items_frame(cols), files=read, skipped=dict(policy.skipped))
