"""The one exception type users see: its message is printed as a single line by the CLI."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


class FileSystemError(DbconvertError):
    """A path the file system refused: no permission, a read-only file system, a full disk, or a file where a
    folder is expected (or a folder where a file is)."""


FILE_SYSTEM_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
)
"""The OSErrors that are the user's file system, not a bug: `file_system_error` words these. Any other OSError
(a missing file the code did not check for, a network error) stays a traceback, a bug to fix where it happens."""

TEMPORARY = re.compile(r"^\.[^/]+\.(?:[^/]*\.tmp|(?:split|export|old)-[^/.]+)$")
"""The hidden names dbconvert writes through and renames into place (`checkpoint.atomic_write`'s `.NAME.xxx.tmp`,
a lock's temp file, the staging folders `.NAME.split-xxx`, `.NAME.export-xxx`, `.NAME.old-xxx`): a message names
the folder they were made in, which is what the user chose, not them."""


def shown_path(exc: OSError) -> Path | None:
    """The path an OSError is about, as the user knows it: a rename's target rather than its hidden source, and
    a hidden temporary file or staging folder replaced by the folder it was made in."""
    name = (
        exc.filename2
        if exc.filename2 is not None
        and exc.filename is not None
        and any(TEMPORARY.match(part) for part in Path(str(exc.filename)).parts)
        else exc.filename
    )
    if name is None:
        return None
    path = Path(str(name) if not isinstance(name, bytes) else name.decode(errors="replace"))
    parts = path.parts
    for i, part in enumerate(parts):
        if TEMPORARY.match(part):
            return Path(*parts[:i]) if i else Path.cwd()  # "." would say little
    return path


def in_the_way(path: Path) -> Path | None:
    """The first of `path` and its parents that exists and is not a folder (what makes `path` unreachable)."""
    for candidate in [*reversed(path.parents), path]:
        if candidate.is_symlink() and not candidate.exists():
            continue
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Writes to `path`: an OSError that names no file (write(2) on a full disk names none) is raised again naming
    `path`, as the subclass of its errno, so its one line can say where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def file_system_error(exc: OSError) -> FileSystemError | None:
    """One line naming the path and the fix for an OSError the user's file system caused, else None.

    A file in the way (ENOTDIR, or EEXIST from a `mkdir` over a file) is named itself, whichever path was being
    made beneath it. Used by the CLI for every command (`cli.app.handle_errors`), so no writer needs a try/except
    of its own; writers only make sure a failure leaves nothing half-written (`checkpoint.atomic_write`, the
    staging folders of split and export).
    """
    if exc.errno not in FILE_SYSTEM_ERRNOS:
        return None
    path = shown_path(exc)
    where = f"{path}: " if path is not None else ""
    move = "move it away or choose another path"
    if exc.errno == errno.EROFS:
        return FileSystemError(
            f"{where}read-only file system; write to a folder on a writable disk (or remount it read-write)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FileSystemError(
            f"{where}permission denied; fix its permissions (ls -l, chmod, chown) or choose a path you can write to"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        full = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return FileSystemError(f"{where}{full}; free some space or choose a folder on another disk")
    if path is None:
        return FileSystemError(f"{exc.strerror or 'a file or folder is in the way'}; {move}")
    if exc.errno == errno.EISDIR:
        return FileSystemError(f"{path} is a folder where a file is expected; {move}")
    blocker = in_the_way(path)
    if blocker is not None:
        to = f" (to reach {path})" if blocker != path else ""
        return FileSystemError(f"{blocker} is a file where a folder is expected{to}; {move}")
    if exc.errno == errno.EEXIST:
        return FileSystemError(f"{path} already exists; {move}")
    return FileSystemError(f"{path}: a part of it is not a folder; {move}")
