"""One lock file per trained block: two processes never train the same block at once (and `split` never
replaces a run while one of its blocks is being trained, nor writes a run folder another split is writing).

The lock is a small JSON file (`RUN/blocks/block-02/train.lock`) holding the owner's pid,
host, start time and a random token. It is created complete or not at all (written to a
temp file, then hard-linked into place, which fails if a lock exists), so a reader never
sees half a lock. A lock whose owner is dead on this host (its pid is gone, or the pid now
belongs to a process started later) is stale and is taken over, with a note. A lock held
from another host cannot be checked from here: it is refused, and the message says which
file to delete if that process is really gone.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dbconvert.errors import DbconvertError, naming

LOCK_NAME = "train.lock"


class LockedError(DbconvertError):
    """Another live process holds the lock."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": _start_time(pid),
        "token": secrets.token_hex(8),
        "time": time.time(),
    }


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_stale(owner: dict[str, Any]) -> bool:
    """True when the owner is known to be dead: same host, and its pid is gone or reused."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    pid = owner["pid"]
    if not _alive(pid):
        return True
    started = owner.get("started")
    return started is not None and _start_time(pid) not in (None, started)


def describe(owner: dict[str, Any]) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"


@contextmanager
def hold(
    path: Path, what: str, note: Callable[[str], None] | None = None, doing: str = "trained"
) -> Iterator[dict[str, Any]]:
    """Take the lock at `path` for the duration of the block (released on any exit but SIGKILL)."""
    owner = acquire(path, what, note, doing)
    try:
        yield owner
    finally:
        release(path, owner)


def acquire(path: Path, what: str, note: Callable[[str], None] | None = None, doing: str = "trained") -> dict[str, Any]:
    """Create the lock file or fail with a one-line LockedError naming the owner (`what` is already being `doing`
    by it: `trained` for a block's lock, `written` for a split's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _owner()
    tmp = path.with_name(f".{path.name}.{me['pid']}.{me['token']}.tmp")
    try:
        with naming(tmp):  # inside the try: a full disk leaves no temp file behind
            tmp.write_text(json.dumps(me))
        for _ in range(20):
            try:
                os.link(tmp, path)
                return me
            except FileExistsError:
                pass
            held = _read(path)
            if held is None:
                continue  # released meanwhile: try again
            if not held:
                # unreadable: an empty or foreign file; only a stale one would be, but be explicit
                raise LockedError(
                    f"{what} is locked by {path}, which cannot be read; delete it if no process is training"
                )
            if not is_stale(held):
                raise LockedError(
                    f"{what} is already being {doing} by {describe(held)} (lock {path}); wait for it, "
                    "or delete the lock file if that process is gone"
                )
            if _take_over(path, held):
                if note:
                    note(
                        f"note: took over the stale lock of {what} left by {describe(held)}, which is no longer running"
                    )
        raise LockedError(f"could not take the lock {path} (it keeps changing hands); try again")
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, held: dict[str, Any]) -> bool:
    """Remove a stale lock, unless someone else replaced it meanwhile (serialised by flock)."""
    import fcntl

    guard = path.with_name(f".{path.name}.guard")
    with open(guard, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            now = _read(path)
            if now is not None and now.get("token") == held.get("token"):
                path.unlink(missing_ok=True)
                return True
            return False
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def release(path: Path, owner: dict[str, Any]) -> None:
    """Remove the lock if it is still ours."""
    held = _read(Path(path))
    if held and held.get("token") == owner.get("token"):
        Path(path).unlink(missing_ok=True)


def current_owner(path: Path) -> dict[str, Any] | None:
    """The live owner of a lock, or None (no lock, or a stale one)."""
    held = _read(Path(path))
    if not held or is_stale(held):
        return None
    return held


def model_locks(run_root: Path) -> list[Path]:
    """The paths of every training lock a run folder can hold: one per folder under blocks/ and one per other
    top-level folder (e2e, the family's reference, ...), whether or not the lock exists now."""
    root = Path(run_root)
    if not root.is_dir():
        return []
    blocks = root / "blocks"
    folders = sorted(p for p in blocks.iterdir() if p.is_dir()) if blocks.is_dir() else []
    folders += sorted(p for p in root.iterdir() if p.is_dir() and p != blocks)
    return [folder / LOCK_NAME for folder in folders]


def training_owner(run_root: Path) -> tuple[Path, dict[str, Any]] | None:
    """(lock, live owner) of a training running in the run folder, or None (no lock, or only stale ones)."""
    for path in model_locks(run_root):
        owner = current_owner(path)
        if owner is not None:
            return path, owner
    return None


# --- staging folders ---------------------------------------------------------------------------

OWNER_FILE = ".owner.json"
UNOWNED_STALE_S = 3600.0
"""A staging folder without an owner file (made by an older version, or killed within microseconds of its
creation) is taken as abandoned once it has not changed for this long."""


def make_staging(parent: Path, prefix: str) -> Path:
    """A new hidden folder `PARENT/PREFIXxxxxxxxx` holding an owner file (pid, host, start time), so that a later
    run can tell a folder left by a killed process (see `remove_stale_staging`) from one still being written."""
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        with naming(staging / OWNER_FILE):
            (staging / OWNER_FILE).write_text(json.dumps(_owner()))
    except BaseException:  # e.g. a full disk: no ownerless folder is left behind
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def disown(staging: Path) -> None:
    """Drop the owner file, before `staging` is renamed into place as a finished folder."""
    (Path(staging) / OWNER_FILE).unlink(missing_ok=True)


def staging_is_stale(staging: Path) -> bool:
    """True when the process that made `staging` (with `make_staging`) is known to be gone."""
    owner = _read(Path(staging) / OWNER_FILE)
    if owner:
        return is_stale(owner)
    try:
        age = time.time() - Path(staging).stat().st_mtime
    except OSError:
        return False
    return age > UNOWNED_STALE_S


def stale_staging(parent: Path, prefix: str) -> list[Path]:
    """The folders `PARENT/PREFIX*` left behind by processes that are no longer running."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    import glob

    return sorted(
        p for p in parent.glob(f"{glob.escape(prefix)}*") if p.is_dir() and not p.is_symlink() and staging_is_stale(p)
    )
