"""A run's unsplit source, by reference: the checkpoint it was split from, recorded (path, size, sha256, key map)
and read again lazily when `sample --model source`, `export --model source` or `train-e2e` need it.

A second copy of a multi-GB checkpoint inside every run doubles its disk for something the checkpoint already
is. `split` therefore writes `RUN/source/model.safetensors` only for a fresh network (there is no file to point
at) or with `--copy-source` (a self-contained folder, e.g. to move the run to another machine). A moved or
changed checkpoint is a one-line error naming the path and the sha256 the run recorded: the source is never read
from a file other than the one it was split from. The record also keeps which checkpoint tensor every source key
came from (the family's key map as data); reading refuses a dbconvert whose conversion maps the keys otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dbconvert.checkpoint import file_sha256, load_weights, write_json
from dbconvert.errors import RunError

if TYPE_CHECKING:
    from dbconvert.families.contract import Source
    from dbconvert.rundir import Run

KEY_MAP_FILE = "source_keys.json"
"""RUN/shared/: {source network key: the checkpoint tensor it is read from, or "new" for a made one}."""


def checkpoint_digest(files: list[Path]) -> str:
    """One file's sha256, or (shards) the sha256 of the shards' sha256s in the order given."""
    import hashlib

    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def reference_record(source: "Source", sha256: str) -> dict[str, Any]:
    """What the manifest keeps of a source read by reference."""
    return {"by_reference": True, "files": [file_record(Path(f)) for f in source.files], "sha256": sha256}


def write_key_map(shared: Path, state: Mapping[str, torch.Tensor]) -> None:
    write_json(shared / KEY_MAP_FILE, origins(state))


def origins(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Source key -> the checkpoint key it is read from ("new" for a made tensor), as far as `state` says."""
    known = getattr(state, "origins", None) or {}
    return {key: known.get(key, "new") for key in state}


def check_files(run: "Run", record: dict[str, Any]) -> None:
    """A one-line RunError when a recorded checkpoint file is gone or is not the file the run was split from.

    A file of the recorded size and modification time is taken as unchanged; otherwise its sha256 decides.
    """
    files = [Path(f["path"]) for f in record["files"]]
    sha = str(record.get("sha256") or "")
    remedy = "put it back, or split again (split --copy-source keeps a copy of the source inside the run)"
    for path in files:
        if not path.is_file():
            raise RunError(
                f"the source checkpoint of {run.root} is gone: {path} (recorded sha256 {sha}) does not exist; {remedy}"
            )
    same = all(
        (p.stat().st_size, p.stat().st_mtime_ns) == (f["bytes"], f["mtime_ns"]) for p, f in zip(files, record["files"])
    )
    if not same and checkpoint_digest(files) != sha:
        raise RunError(
            f"the source checkpoint of {run.root} has changed: {files[0]} no longer has the recorded "
            f"sha256 {sha}; {remedy}"
        )


def source_state(run: "Run") -> Mapping[str, torch.Tensor]:
    """The run's unsplit source network's state dict: the copy in the run, or the checkpoint read again (lazily)."""
    if run.source_weights.is_file():
        return load_weights(run.source_weights, "split again")
    record = run.manifest.get("source") or {}
    if not record.get("by_reference"):
        raise RunError(f"run file {run.source_weights} is missing; split again")
    check_files(run, record)
    from dbconvert.families import get_family

    recipe = run.recipe.model_copy(deep=True)
    checkpoint = record.get("checkpoint_path") or recipe.model.checkpoint
    recipe.model.checkpoint = str(checkpoint)
    source = get_family(run.family_name).source(recipe)
    recorded = recorded_key_map(run)
    if recorded is not None and not same_key_map(recorded, origins(source.state)):
        raise RunError(
            f"this dbconvert converts {checkpoint} with another key map than the one {run.root} was split "
            "with (shared/source_keys.json); split again, or use the dbconvert version that split it"
        )
    return source.state


def same_key_map(recorded: dict[str, str], current: dict[str, str]) -> bool:
    """Whether the conversion that split a run maps the checkpoint as this one does. A record that names no
    checkpoint tensor (every key "new": written by a conversion that built its source in memory, as ViT splits did
    before they streamed) says only which keys there are, so only the keys are compared."""
    if set(recorded.values()) <= {"new"}:
        return recorded.keys() == current.keys()
    return recorded == current


def recorded_key_map(run: "Run") -> dict[str, str] | None:
    import json

    path = run.shared_dir / KEY_MAP_FILE
    if not path.is_file():
        return None
    try:
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError):
        raise RunError(f"{path} is damaged; split again") from None


def describe(run: "Run") -> str:
    """One line on where the run's source is: a copy inside the run, or the checkpoint it points at."""
    record = run.manifest.get("source") or {}
    dtype = record.get("storage_dtype", "float32")
    if record.get("by_reference"):
        files = record["files"]
        where = files[0]["path"] if len(files) == 1 else f"{len(files)} files in {Path(files[0]['path']).parent}"
        return f"source: by reference to {where} (sha256 {str(record.get('sha256'))[:12]}...); blocks stored as {dtype}"
    return f"source: a copy inside the run (source/model.safetensors); blocks stored as {dtype}"
