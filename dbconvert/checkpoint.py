"""Weights on disk: atomic safetensors writes, safe reads, strict key/shape checks, key maps.

Nothing is pickled: run files are safetensors, and reference `.pt` checkpoints are read
with `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dbconvert.errors import CheckpointError, first_line, naming
from dbconvert.tensorio import LazyState, SafetensorsFile, Spec, spec_of, specs_of, write_safetensors

StateDict = dict[str, torch.Tensor]


# --- atomic writes -------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename over `path`.

    A process killed at any moment leaves either the old file or the new one, never half of one. The file gets
    the permissions of any new file (0666 less the umask, as `open` gives), not the temp file's private 0600.
    A write that fails without naming its file (a full disk) is raised naming `path`, for the one-line error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming(path):
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # `write` may have made the file anew
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pt(state: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save through an open file: given a path, torch records the (temporary, random) file name inside the
    zip, so the same weights would give different bytes; through a file object the record name is fixed."""
    with open(path, "wb") as fh:
        torch.save(state, fh)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_weights(
    path: Path,
    state: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Save a state dict as safetensors, atomically, one tensor at a time (`tensorio.write_safetensors`).

    A `LazyState` is written without ever holding more than one of its tensors; a plain state dict is written
    without the whole-file serialisation buffer `safetensors.torch.save_file` would make.
    """
    specs = specs_of(state)
    atomic_write(path, lambda tmp: write_safetensors(tmp, specs, state.__getitem__, metadata, on_tensor))


RUN_FILE_REMEDY = "dbconvert wrote it, so re-create it: split again, or retrain the model it belongs to with --restart"


def load_weights(path: Path, remedy: str = RUN_FILE_REMEDY) -> StateDict:
    """Read a safetensors file of a run (dbconvert wrote it); a missing or damaged one is a CheckpointError.

    The message says it is a run file and how to re-create it (`remedy`). Files a user supplies
    (model.checkpoint) go through `read_checkpoint`, whose errors name the recipe key instead:
    "split again" would not mend a bad source file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"run file {path} is missing; {remedy}")
    try:
        reader = SafetensorsFile(path)
        return {name: reader.read(name) for name in reader.specs}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"run file {path} is damaged: corrupt or truncated ({first_line(exc)}); {remedy}"
        ) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- reference checkpoints ------------------------------------------------------------------


def read_checkpoint(
    path: str | Path, wrappers: tuple[str, ...] = ("ema", "model"), key: str = "model.checkpoint"
) -> StateDict:
    """A user-supplied checkpoint (`.pt`/`.pth`/`.bin` or `.safetensors`) as a flat state dict.

    Accepts a bare state dict or one wrapped under the first of `wrappers` present (the DiT
    training script saves {"model", "ema", "opt", "args"}; the EMA weights are what its
    sampler uses, so `ema` wins). Every error names the recipe `key` the file came from and
    what is wrong with the file itself.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_error(path, key))
    if not path.is_file():
        raise CheckpointError(f"{key} {path} not found; check {key} in the recipe")
    if path.suffix.lower() == ".safetensors":
        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{key} {path} is not a readable .safetensors file: corrupt or truncated "
                f"({first_line(exc, 160)}); restore it from where it came from"
            ) from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated/corrupt/pickled files
            raise unreadable_pt(key, path, exc) from None
    return unwrap(state, path, wrappers, key)


def unreadable_pt(key: str, path: Path, exc: BaseException) -> CheckpointError:
    """Why a file torch cannot load is not a checkpoint of this family: a GGUF (by its magic, whatever the case of
    its suffix) is named as one; anything else is truncated, corrupt or pickled."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        magic = b""
    if magic == b"GGUF":
        return CheckpointError(
            f"{key} {path} is a GGUF file (llama.cpp's format), which only the Llama recipes "
            "read (e.g. llama-tiny-shakespeare); give this family a .pt/.safetensors file"
        )
    return CheckpointError(
        f"{key} {path} is not a readable .pt/.safetensors file ({first_line(exc, 160)}): it is truncated, "
        "corrupt, or holds pickled objects (only weights are read); restore it from where it came from"
    )


def folder_error(path: Path, key: str) -> str:
    """Why a folder is not a checkpoint file: a Hugging Face model folder names its model and the family to use."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        return f"{key} {path} is a folder, not a .pt/.safetensors checkpoint file; give the file itself"
    model_type = str(config.get("model_type") or "unknown")
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model = re.sub(r"(For[A-Z]\w*|LMHeadModel|Model)$", "", archs[0]) if archs else model_type
    from dbconvert.families import family_names

    hint = (
        f"use a {model_type} recipe (model.family={model_type})"
        if model_type in family_names()
        else "no dbconvert family converts it"
    )
    return (
        f"{key} {path} is a Hugging Face {model} folder (config.json model_type {model_type!r}), not a "
        f"checkpoint file of this recipe's family; {hint}"
    )


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` file (dbconvert's exports record what the weights mean there);
    empty for other formats, which have no place for it."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or truncated ({first_line(exc)})") from None


def open_checkpoint(
    files: Iterable[str | Path], wrappers: tuple[str, ...] = ("ema", "model"), key: str = "model.checkpoint"
) -> LazyState:
    """The tensors of a user's checkpoint (one file, or the shards of a folder), read one at a time on access.

    `.safetensors` files are read tensor by tensor (`tensorio.SafetensorsFile`); `.pt` / `.bin` files are
    memory-mapped (`torch.load(mmap=True, weights_only=True)`), each tensor copied out when asked for, and the
    mapping is dropped by `LazyState.release` (split releases after every block, so the mapped pages a block
    touched do not stay resident). A `.pt` of the legacy (pre-zip) format cannot be mapped and is read whole.
    The same wrapper rule as `read_checkpoint` applies; errors name the recipe `key`.
    """
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    specs: dict[str, Spec] = {}
    mapped: list[MappedFile] = []
    for file in files:
        path = Path(file)
        if path.is_dir():
            raise CheckpointError(folder_error(path, key))
        if not path.is_file():
            raise CheckpointError(f"{key} {path} not found; check {key} in the recipe")
        if path.suffix.lower() == ".safetensors":
            try:
                reader = SafetensorsFile(path)
            except (OSError, ValueError) as exc:
                raise CheckpointError(
                    f"{key} {path} is not a readable .safetensors file: corrupt or truncated "
                    f"({first_line(exc, 160)}); restore it from where it came from"
                ) from None
            names = reader.specs
            read = (lambda r: lambda name: checked_read(r, name, key))(reader)
            specs.update(reader.specs)
        else:
            source = MappedFile(path, wrappers, key)
            mapped.append(source)
            names = source.specs
            read = source.read
            specs.update(source.specs)
        for name in names:
            if name in loaders:
                raise CheckpointError(
                    f"{key}: tensor {name!r} is in more than one file ({path.name} and another); restore the checkpoint"
                )
            loaders[name] = (lambda read, name: lambda: read(name))(read, name)
    return LazyState(
        loaders, specs, release=lambda: [m.release() for m in mapped] and None, origins={name: name for name in loaders}
    )


def checked_read(reader: SafetensorsFile, name: str, key: str) -> torch.Tensor:
    try:
        return reader.read(name)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{key} {reader.path} is corrupt or truncated ({first_line(exc, 160)}); restore it from where it came from"
        ) from None


class MappedFile:
    """A `.pt` / `.bin` state dict, memory-mapped; each tensor is copied out when read, and `release` unmaps."""

    def __init__(self, path: Path, wrappers: tuple[str, ...], key: str) -> None:
        self.path, self.wrappers, self.key = path, wrappers, key
        self.whole = False
        self.state: dict[str, torch.Tensor] | None = None
        self.specs = {k: spec_of(v) for k, v in self.load().items()}

    def load(self) -> dict[str, torch.Tensor]:
        if self.state is None:
            try:
                state: Any = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise self.unreadable(exc) from None
                self.whole = True  # the legacy format: no memory map, read whole once
                state = self.read_whole()
            except Exception as exc:  # torch raises many types for truncated/corrupt/pickled files
                raise self.unreadable(exc) from None
            self.state = unwrap(state, self.path, self.wrappers, self.key)
        return self.state

    def read_whole(self) -> Any:
        try:
            return torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise self.unreadable(exc) from None

    def unreadable(self, exc: BaseException) -> CheckpointError:
        return unreadable_pt(self.key, self.path, exc)

    def read(self, name: str) -> torch.Tensor:
        return self.load()[name].clone()

    def release(self) -> None:
        if not self.whole:
            self.state = None


def unwrap(state: Any, path: Path, wrappers: tuple[str, ...], key: str) -> dict[str, torch.Tensor]:
    """A bare state dict, or the one wrapped under the first of `wrappers` present; else a one-line error."""
    if isinstance(state, dict):
        for wrapper in wrappers:
            if wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{key} {path} is not a state dict of tensors (nor one wrapped under {' / '.join(wrappers)})"
        )
    return dict(state)


STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`model.storage_dtype`: the dtype of a run's split weights (`auto`: the checkpoint's; float32 for a fresh network)."""


def resolve_storage_dtype(
    cfg: Any,
    state: Mapping[str, torch.Tensor],
    checkpoint: Mapping[str, torch.Tensor] | None = None,
    fresh: bool = False,
) -> Mapping[str, torch.Tensor]:
    """`state` in the run's storage dtype; settles `cfg.storage_dtype=auto` in place (the manifest records it).

    auto: the floating dtype holding most of `checkpoint`'s bytes (a bf16 checkpoint gives bf16 blocks), float32
    for a fresh network. Integer tensors keep their dtype.
    """
    from dbconvert.tensorio import cast_state, floating_dtype

    if cfg.storage_dtype == "auto":
        dtype = torch.float32 if fresh or checkpoint is None else floating_dtype(specs_of(checkpoint))
        if dtype not in STORAGE_DTYPES.values():
            dtype = torch.float32
        cfg.storage_dtype = next(name for name, d in STORAGE_DTYPES.items() if d == dtype)
    return cast_state(state, STORAGE_DTYPES[cfg.storage_dtype])


def storage_dtype(cfg: Any) -> torch.dtype:
    """The storage dtype a run's recipe records (float32 for runs split before it was recorded, or `auto`)."""
    return STORAGE_DTYPES.get(getattr(cfg, "storage_dtype", "auto"), torch.float32)


# --- strict checks and key maps ------------------------------------------------------------


def check_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    """Fail loudly on missing keys, unexpected keys, or shape mismatches."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        raise CheckpointError(f"{what}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{what}: unknown key {unexpected[0]!r} ({len(unexpected)} unknown in all)")
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{what}: shape mismatch for {key!r}: checkpoint has {tuple(got[key].shape)}, "
                f"model expects {tuple(ref.shape)}"
            )


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) after our own check, so errors are one readable line."""
    check_state(module.state_dict(), state, what)
    module.load_state_dict(dict(state), strict=True)


KeyMap = dict[str, str]
"""Destination key -> source key. Conversions are written as these explicit maps."""


def layer_slice_key_map(shared: Iterable[str], prefix: str, layer_keys: Iterable[str], start: int, end: int) -> KeyMap:
    """Block key -> source key for the block holding source layers [start, end) (every family's block map).

    Shared keys (embedders, head) keep their names; layer keys `{prefix}.{src}.{name}` are renumbered
    from 0 (`{prefix}.{src - start}.{name}`).
    """
    names = tuple(layer_keys)
    key_map = {key: key for key in shared}
    for local, src in enumerate(range(start, end)):
        key_map.update({f"{prefix}.{local}.{name}": f"{prefix}.{src}.{name}" for name in names})
    return key_map


def check_key_map(source_keys: Iterable[str], key_map: KeyMap, ignored: Callable[[str], bool], what: str) -> None:
    """Every destination key finds its source key; every source key is mapped or explicitly `ignored`."""
    keys = set(source_keys)
    missing = [src for src in key_map.values() if src not in keys]
    if missing:
        raise CheckpointError(f"{what}: source is missing key {missing[0]!r} ({len(missing)} missing in all)")
    used = set(key_map.values())
    unknown = [k for k in source_keys if k not in used and not ignored(k)]
    if unknown:
        raise CheckpointError(f"{what}: source has unknown key {unknown[0]!r} ({len(unknown)} unknown in all)")


def apply_key_map(
    source: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    ignored: Callable[[str], bool] = lambda key: False,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    what: str = "conversion",
) -> StateDict:
    """Build a destination state dict from `source` through an explicit key map.

    Every destination key must find its source key; every source key must be either mapped
    or explicitly `ignored` (e.g. the layers that belong to other blocks). `transforms`
    (by destination key) reshape a tensor on the way, e.g. dropping DiT's variance channels.
    Only the mapped tensors are read from a lazy `source` (a `tensorio.LazyState`).
    """
    check_key_map(list(source), key_map, ignored, what)
    transforms = transforms or {}
    out: StateDict = {}
    for dst, src in key_map.items():
        tensor = source[src]
        if dst in transforms:
            tensor = transforms[dst](tensor)
        out[dst] = tensor if isinstance(source, LazyState) else tensor.clone()  # a lazy read is already a copy
    return out


def map_lazily(
    source: LazyState,
    key_map: KeyMap,
    expected: Mapping[str, Spec],
    ignored: Callable[[str], bool] = lambda key: False,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    what: str = "conversion",
) -> LazyState:
    """`apply_key_map` without reading anything: a LazyState whose tensors are read (and transformed) on access.

    `expected` holds the destination network's shapes (e.g. its state dict built on the meta device); every
    key, and every untransformed tensor's shape, is checked here, before any tensor is read.
    """
    check_key_map(list(source), key_map, ignored, what)
    transforms = transforms or {}
    specs: dict[str, Spec] = {}
    for dst, src in key_map.items():
        got, want = source.specs[src], expected[dst]
        if dst not in transforms and got.shape != want.shape:
            raise CheckpointError(
                f"{what}: shape mismatch for {dst!r}: checkpoint has {got.shape}, model expects {want.shape}"
            )
        specs[dst] = Spec(got.dtype, want.shape)

    def loader(dst: str, src: str) -> Callable[[], torch.Tensor]:
        transform = transforms.get(dst)

        def load() -> torch.Tensor:
            tensor = source[src]
            if transform is not None:
                tensor = transform(tensor)
            if tuple(tensor.shape) != specs[dst].shape:
                raise CheckpointError(
                    f"{what}: {src!r} converts to shape {tuple(tensor.shape)}, the model expects {specs[dst].shape}"
                )
            return tensor

        return load

    return LazyState(
        {dst: loader(dst, src) for dst, src in key_map.items()},
        specs,
        source.release,
        {dst: source.origins.get(src, src) for dst, src in key_map.items()},
    )


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
