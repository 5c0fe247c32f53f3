"""Small file helpers every part of moedist shares: atomic writes and content hashes.

Everything moedist writes goes through a temporary file in the target directory and an
``os.replace``, so a reader (or a crash) never sees half a file.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_strings(values, *, chunk: int = 65536) -> str:
    """sha256 of a sequence of strings (None allowed), fed in chunks: each value as its length
    and text, so no separator inside a value can make two sequences hash alike, and no single
    string of the whole column is ever built (a million item texts stay a few MB at a time)."""
    h = hashlib.sha256()
    it = iter(values)
    while part := list(itertools.islice(it, chunk)):
        h.update("".join("-1:" if v is None else f"{len(v)}:{v}" for v in part).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it in /proc (setting
    and restoring it would briefly change it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def temp_file(folder: str | Path, *, prefix: str = "", suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, with the permissions ``open()`` would give a new file
    (0o666 less the umask) instead of mkstemp's owner-only 0o600: the file is renamed into place,
    and others who may read the folder (teammates, a web server, other pods) must read it too."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def temp_dir(folder: str | Path, *, prefix: str = "") -> Path:
    """``tempfile.mkdtemp`` in ``folder``, with ``mkdir``'s permissions (0o777 less the umask)
    instead of 0o700, for a folder that is renamed into place when complete."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=prefix))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def fsync_path(path: str | Path) -> None:
    """Flush a written file, or a folder's entries, to disk: before the rename that publishes
    a file or folder, so that a crash after it cannot leave a complete-looking name over empty
    or partial contents; on the parent after the rename, so that the rename itself lasts."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename (permissions as ``open()``
    would give a new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj, *, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
