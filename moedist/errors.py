"""Errors that moedist reports to users.

Every error raised for bad input is a :class:`MoedistError` whose message names the file,
line/row or field at fault. The CLI prints these as one clean line (no traceback); anything
else escaping is a bug.
"""
from __future__ import annotations

from pathlib import Path


class MoedistError(Exception):
    """Base class of errors with a message meant for the user."""


class ConfigError(MoedistError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(MoedistError):
    """Input data is malformed. ``path`` and ``line`` say where, when known."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += ": "
        super().__init__(where + message)


class CheckpointError(MoedistError):
    """A checkpoint is missing, truncated or does not match the model."""
