"""The one exception type users see: its message is printed as a single line by the CLI."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class DbconvertError(Exception):
    """A user-facing error: says what is wrong and how to fix it, in one line."""


class RecipeError(DbconvertError):
    """A recipe that is missing, malformed, or fails schema validation."""


class RunError(DbconvertError):
    """A run directory that is missing, incomplete, or does not match the request."""


class CheckpointError(DbconvertError):
    """A checkpoint that is missing, corrupt, or does not match the model's keys and shapes."""


class DataError(DbconvertError):
    """A data set that cannot be found, read, or reached offline."""
