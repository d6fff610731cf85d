"""A file system that refuses a write (issue 32) is one `error:` line naming the path and the fix, exit 2, for every
command, and leaves nothing half-written: a read-only folder, no permission, a full disk, a rename refused after
an existing run or export was moved aside.

As root, chmod does not stop writes, so the refusals are made in-process: `refuse_writes` makes every write-like
OS call (mkdir, open for writing, rename, link, unlink, ...) under one folder raise the OSError the kernel would;
`full_disk` lets folders and files be created but fails every write into a file with ENOSPC, as a full disk does.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import typer

from dbconvert.cli.app import handle_errors
from dbconvert.errors import file_system_error
from dbconvert.rundir import set_current
from tests.cli.test_bad_inputs import DIT, snapshot
from tests.cli_helpers import assert_user_error, invoke

WRITE_MODES = set("wax+")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def under(path: Any, root: Path) -> bool:
    """Is `path` (a str or Path; not a file descriptor) inside `root`?"""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    full = os.path.abspath(os.fsdecode(path))
    return full == str(root) or full.startswith(str(root) + os.sep)


@contextmanager
def refuse_writes(monkeypatch: pytest.MonkeyPatch, root: Path, code: int = errno.EROFS) -> Iterator[None]:
    """Every write under `root` raises OSError(`code`) naming its path, as a read-only mount (EROFS) or a folder
    without write permission (EACCES) does; reads go through."""
    message = os.strerror(code)

    def guard(name: str, is_write: Callable[..., bool] = lambda *a, **k: True) -> None:
        real = getattr(os, name)

        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("dir_fd") is None and under(path, root) and is_write(path, *args, **kwargs):
                raise OSError(code, message, os.fsdecode(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, call)

    for name in ("rename", "replace", "link", "symlink", "unlink", "remove", "rmdir", "chmod", "utime"):
        guard(name)
    real_mkdir = os.mkdir

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> Any:
        if under(path, root) and kwargs.get("dir_fd") is None:
            if not os.path.isdir(os.path.dirname(os.path.abspath(os.fsdecode(path)))):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(path))  # as the kernel
            raise OSError(code, message, os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    guard("open", lambda path, flags, *a, **k: bool(flags & WRITE_FLAGS))
    real_open = io.open

    def opener(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if under(file, root) and WRITE_MODES & set(mode):
            raise OSError(code, message, os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)
    yield


class FullFile:
    """A file opened for writing on a full disk: made, but every write fails (with no file name, as write(2))."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> "FullFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()


@contextmanager
def full_disk(monkeypatch: pytest.MonkeyPatch, root: Path) -> Iterator[None]:
    """Files under `root` can be created but not written to (a full disk)."""
    real_open = io.open

    def opener(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        return FullFile(fh) if under(file, root) and WRITE_MODES & set(mode) else fh

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)
    yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DiT run `run`, a ViT run `vit`, a masked Llama run `md4` (its e2e trained), a folder of one image `imgs`,
    an earlier DiT export `old.pt`, and `empty.pt`, an empty folder a file export may replace."""
    from PIL import Image

    from tests.families.llama_tiny import write_corpus
    from tests.families.test_llama_masked import masked_overrides
    from tests.families.test_vit import TINY

    root = tmp_path_factory.mktemp("file-system")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        text = write_corpus(root)
        for args in (
            ("split", *DIT, "--out", "run"),
            ("split", "vit-tiny-digits", *TINY, "--out", "vit"),
            ("split", "md4-tiny-shakespeare", *masked_overrides(text), "--out", "md4"),
            ("train-e2e", "--run", "md4", "-q"),
            ("export", "old.pt", "--run", "run"),
        ):
            result = invoke(*args)
            assert result.exit_code == 0, result.output
        (root / "imgs").mkdir()
        Image.new("L", (8, 8)).save(root / "imgs" / "a.png")
        (root / "empty.pt").mkdir()
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def ws(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the workspace, as the working folder (`run` its current run)."""
    root = tmp_path / "ws"
    shutil.copytree(workspace, root, symlinks=True)
    monkeypatch.chdir(root)
    set_current(root / "run")
    return root


HERE = "."
"""Stands for the working folder's absolute path in an expected message (a staging folder made in it)."""

COMMANDS = [
    (("eval", "accuracy", "--run", "vit", "--model", "source", "-q"), "vit/eval"),
    (
        ("eval", "bpc", "--run", "md4", "--model", "e2e", "--draws", "1", "--repeats", "1", "--max-rows", "4", "-q"),
        "md4/eval",
    ),
    (("sample", "--run", "run", "--model", "source", "-q"), "run/samples"),
    (("sample", "--run", "vit", "--model", "source", "--images", "imgs", "-q"), "vit/samples"),
    (("train-block", "0", "--run", "run", "-q"), "run/blocks/block-00"),
    (("train-e2e", "--run", "run", "-q"), "run/e2e"),
    (("train-all", "--run", "run", "-q"), "run/logs"),
    (("plot", "--run", "run"), "run/plots"),
    (("export", "x.pt", "--run", "run"), HERE),
    (("split", *DIT, "--out", "new", "-q"), HERE),
    (("split", *DIT, "--out", "run", "--force", "-q"), HERE),
]


@pytest.mark.parametrize(
    "args, path", COMMANDS, ids=[" ".join(a[:2]) + (" --force" if "--force" in a else "") for a, _ in COMMANDS]
)
def test_a_read_only_folder_is_one_line_naming_it(
    args: tuple[str, ...], path: str, ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = str(Path.cwd()) if path == HERE else path
    before = snapshot(ws)
    with refuse_writes(monkeypatch, ws):
        result = invoke(*args)
    assert_user_error(result, f"{shown}: read-only file system; write to a folder on a writable disk")
    assert snapshot(ws) == before


def test_no_permission_is_one_line_saying_so(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(ws)
    with refuse_writes(monkeypatch, ws, errno.EACCES):
        result = invoke("plot", "--run", "run")
    assert_user_error(result, "run/plots: permission denied; fix its permissions")
    assert snapshot(ws) == before


def files(tree: dict[str, tuple]) -> dict[str, tuple]:
    """The files of a snapshot (a full disk may leave a new empty folder, never a file)."""
    return {path: entry for path, entry in tree.items() if entry != ("dir",)}


@pytest.mark.parametrize(
    "args, path, exact",
    [
        (("split", *DIT, "--out", "run", "--force", "-q"), HERE, True),
        (("export", "old.pt", "--run", "run", "--force"), HERE, True),
        (("train-block", "0", "--run", "run", "-q"), "run/blocks/block-00", False),
        (("eval", "accuracy", "--run", "vit", "--model", "source", "-q"), "vit/eval/accuracy-", False),
    ],
    ids=["split --force", "export --force", "train-block", "eval accuracy"],
)
def test_a_full_disk_leaves_nothing_half_written(
    args: tuple[str, ...], path: str, exact: bool, ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """split and export write into a staging folder: nothing at all changes (the old run and the old export kept);
    a file written in place (atomic_write) leaves no temp file, at most the new empty folder it was to go in."""
    shown = str(Path.cwd()) if path == HERE else path
    before = snapshot(ws)
    with full_disk(monkeypatch, ws):
        result = invoke(*args)
    assert_user_error(result, f"{shown}")
    assert "no space left on the device; free some space or choose a folder on another disk" in result.stderr
    after = snapshot(ws)
    assert (after if exact else files(after)) == (before if exact else files(before))


def test_a_refused_rename_puts_the_old_run_back(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """split --force moves the old run aside, then renames the new one in: when that rename fails the old run goes
    back, byte for byte, and no hidden folder is left."""
    before = snapshot(ws)
    real = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if ".run.split-" in os.fsdecode(src):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(src), None, os.fsdecode(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    assert_user_error(invoke("split", *DIT, "--out", "run", "--force", "-q"), "run: permission denied")
    assert snapshot(ws) == before


def test_a_refused_replace_puts_the_old_export_back(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """export --force over a folder moves it aside first; when the new file cannot be renamed in, the folder goes
    back."""
    before = snapshot(ws)
    real = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if ".empty.pt.export-" in os.fsdecode(src) and os.path.basename(src) == "empty.pt":  # the export, not its
            # own atomic write inside the staging folder, nor the old folder's move back
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(src), None, os.fsdecode(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert_user_error(invoke("export", "empty.pt", "--run", "run", "--force"), "empty.pt: no space left")
    assert snapshot(ws) == before
    assert (ws / "empty.pt").is_dir()


def test_the_largest_seed_works_where_seeds_are_multiplied(ws: Path) -> None:
    """2^63 - 1 is accepted, and the seeds derived from it by arithmetic (bpc's repeats, a text row's seed, the epoch
    permutation) are folded back into torch's range instead of overflowing."""
    seed = str(2**63 - 1)
    bpc = invoke(
        "eval",
        "bpc",
        "--run",
        "md4",
        "--model",
        "e2e",
        "--draws",
        "1",
        "--repeats",
        "1",
        "--max-rows",
        "4",
        "--seed",
        seed,
        "-q",
    )
    assert bpc.exit_code == 0, bpc.output
    sample = invoke(
        "sample", "--run", "md4", "--model", "e2e", "--num", "1", "--max-new-tokens", "4", "--seed", seed, "-q"
    )
    assert sample.exit_code == 0, sample.output
    train = invoke("train-block", "0", f"train.seed={seed}", "--steps", "1", "--run", "run", "-q")
    assert train.exit_code == 0, train.output


# --- the mapping itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, filename, filename2, line",
    [
        (
            errno.EROFS,
            "r/eval",
            None,
            "r/eval: read-only file system; write to a folder on a writable disk (or remount it read-write)",
        ),
        (
            errno.EACCES,
            "r/plots",
            None,
            "r/plots: permission denied; fix its permissions (ls -l, chmod, chown) or choose a path you can write to",
        ),
        (errno.EPERM, "r/x", None, "r/x: permission denied"),
        (
            errno.ENOSPC,
            "r/m.safetensors",
            None,
            "r/m.safetensors: no space left on the device; free some space or choose a folder on another disk",
        ),
        (errno.EDQUOT, "r/m.safetensors", None, "r/m.safetensors: disk quota exceeded"),
        (
            errno.EISDIR,
            "r/eval.json",
            None,
            "r/eval.json is a folder where a file is expected; move it away or choose another path",
        ),
        (errno.EROFS, "r/eval/.a.json.k3j2.tmp", None, "r/eval: read-only"),  # atomic_write's temp file: its folder
        (errno.EROFS, "r/blocks/block-00/.train.lock.12.ab.tmp", None, "r/blocks/block-00: read-only"),  # a lock's
        (errno.EACCES, "out/.run.split-x1y2/source/model.safetensors", None, "out: permission denied"),  # staging
        (errno.EACCES, "out/.run.split-x1y2", "out/run", "out/run: permission denied"),  # a rename: its target
        (errno.EACCES, "out/a.json", "out/b.json", "out/a.json: permission denied"),  # not a temp: the source
        (errno.ENOSPC, None, None, "no space left on the device; free some space"),
        (errno.ENOTDIR, None, None, "Not a directory; move it away or choose another path"),
    ],
    ids=[
        "erofs",
        "eacces",
        "eperm",
        "enospc",
        "edquot",
        "eisdir",
        "temp-file",
        "lock-temp",
        "staging",
        "rename",
        "rename-plain",
        "enospc-no-filename",
        "enotdir-no-filename",
    ],
)
def test_file_system_errors_become_one_line(code: int, filename: str | None, filename2: str | None, line: str) -> None:
    exc = (
        OSError(code, os.strerror(code), filename, None, filename2)
        if filename2
        else (OSError(code, os.strerror(code), filename) if filename else OSError(code, os.strerror(code)))
    )
    user = file_system_error(exc)
    assert user is not None and line in str(user) and "\n" not in str(user)


def test_a_file_in_the_way_is_named_itself(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dir").mkdir()
    deep = tmp_path / "afile" / "run" / "eval"
    assert str(file_system_error(NotADirectoryError(errno.ENOTDIR, "Not a directory", str(deep)))) == (
        f"{tmp_path / 'afile'} is a file where a folder is expected (to reach {deep}); move it away or choose "
        "another path"
    )
    assert str(file_system_error(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "afile")))) == (
        f"{tmp_path / 'afile'} is a file where a folder is expected; move it away or choose another path"
    )
    assert str(file_system_error(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "dir")))) == (
        f"{tmp_path / 'dir'} already exists; move it away or choose another path"
    )


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory", "x"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        OSError("no errno"),
    ],
    ids=["enoent", "network", "no-errno"],
)
def test_other_os_errors_are_not_the_users_file_system(exc: OSError) -> None:
    """A missing file the code did not check for, or a network error, is a bug to fix where it happens: it keeps its
    traceback (and its own one-line DataError where the code does check)."""
    assert file_system_error(exc) is None

    def command() -> None:
        raise exc

    with pytest.raises(type(exc)):
        handle_errors(command)()


def test_the_cli_turns_a_file_system_error_into_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def command() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "runs/r/eval")

    with pytest.raises(typer.Exit) as exit_:
        handle_errors(command)()
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err.strip() == (
        "error: runs/r/eval: permission denied; fix its permissions (ls -l, "
        "chmod, chown) or choose a path you can write to"
    )
