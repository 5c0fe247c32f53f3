"""The token a local Ray authenticates its callers with stays readable by this user only.

A local Ray's GCS and raylets listen on every interface, and Ray's default for a new local
cluster is token authentication: a caller must present the token in ``~/.ray/auth_token``
(or ``RAY_AUTH_TOKEN_PATH``). Ray writes that file with the process umask, usually mode
0644, so on a shared machine every other user could read the token and run code as this
one. :func:`private_auth_token` runs before moedist starts a local Ray: it writes a missing
token file itself with mode 0600 (in a 0700 folder when it creates the folder), and takes
group and other permissions off an existing one. Nothing is done when auth is turned off
(``RAY_AUTH_MODE`` other than ``token``) or the token comes from ``RAY_AUTH_TOKEN``.
Connecting to an existing cluster (``RAY_ADDRESS``) does not call it.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def token_path() -> Path:
    """Where Ray reads the token from: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(given).expanduser() if given else Path.home() / ".ray" / "auth_token"


def private_auth_token(echo=None) -> Path | None:
    """Make the local Ray's token file private (see the module docstring); returns its path,
    or None when no token file is used."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if path.exists():
        st = path.stat()
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
            if echo:
                echo(f"note: {path} (Ray's auth token) was readable by other users; it is now mode 0600")
        return path
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    # O_EXCL: a file created meanwhile (another Ray starting) is not overwritten
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return private_auth_token(echo)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # Ray's own format: 256 random bits as hex
        f.flush()
        os.fsync(f.fileno())
    return path
