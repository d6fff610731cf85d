"""`export`: a run's source, e2e baseline, AR reference or one block, back in its family's reference format.

DiT: a reference-format checkpoint (`.pt`, a plain `torch.save` state dict, or `.safetensors` that also
records the parameterisation in its metadata); Llama: a Hugging Face `save_pretrained` folder. Each
family's `convert.py` holds the export key map (the reverse of its import map).

The export is written into a staging folder beside OUT and renamed into place at the end, so a failed
or killed export leaves an existing OUT as it was; an existing OUT is only replaced with `force` (a
file in one atomic rename; a folder is first moved into the staging folder, then the new one in).
Never replaced, even with `force`: the run folder, a folder inside it or holding it, a non-empty folder
that is not an earlier folder export of the same family (folder exports hold `dbconvert_export.json`),
a non-empty folder by a file or a file by a folder. The staging folder holds an owner file (pid, host):
the next export to the same OUT removes the ones whose process is gone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dbconvert.building import load_network
from dbconvert.checkpoint import load_weights
from dbconvert.source_ref import source_state
from dbconvert.errors import DbconvertError, RunError
from dbconvert.locks import make_staging, stale_staging
from dbconvert.rundir import Run

WEIGHTS = ("ema", "model")


@dataclass
class ExportResult:
    path: Path
    name: str
    """What was exported: source, e2e, ar or block-XX."""
    weights: Path
    """The run file the weights came from."""
    notes: list[str] = field(default_factory=list)


def export_target(run: Run, model: str, block: int | None, weights: str) -> tuple[str, str, int, Path]:
    """(kind, name, depth, weights file) of what to export; one-line errors for what the run lacks."""
    if weights not in WEIGHTS:
        raise DbconvertError(f"--weights must be ema or model, not {weights!r}")
    if block is not None:
        if model not in ("blocks", "source"):
            raise DbconvertError(f"give --block I alone (it exports block I), not with --model {model}")
        info = run.block(block)
        model, name, depth = "blocks", Run.block_name(block), info.layers[1] - info.layers[0]
    elif model == "blocks":
        raise DbconvertError("blocks are exported one at a time: pass --block I")
    else:
        ((name, depth),) = run.model_targets(model)
    if model == "source":
        return model, name, depth, run.source_weights
    if not run.status(name).trained:
        objective = "" if model == "e2e" else " --objective " + model
        command = f"train-block {block}" if block is not None else f"train-e2e{objective}"
        raise RunError(
            f"{name} of {run.root} is not trained, so there is nothing new to export; run "
            f"`dbconvert {command}` "
            "first (or export --model source)"
        )
    return model, name, depth, run.weights_file(name, weights)


EXPORT_MARKER = "dbconvert_export.json"
"""Written into every folder export: what makes a folder "an earlier export", which --force may replace."""


def check_out(run: Run, out: Path, force: bool) -> None:
    """Refuse an OUT whose replacement would lose data: the run itself, a folder holding it or a folder inside it,
    and (even with --force) a non-empty folder that is not an earlier folder export of this family."""
    if not out.name:
        raise RunError(f"{out} is not a path export can write to; give a new file or folder name")
    root, target = run.root.resolve(), out.resolve()
    if target == root or root in target.parents or target in root.parents:
        where = "is" if target == root else "is inside" if root in target.parents else "contains"
        raise RunError(f"{out} {where} the run folder {run.root}; export to a path outside the run")
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise RunError(
            f"{out} is the working folder or holds it; export to a new path (e.g. {out.name or 'export'}-hf)"
        )
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise RunError(f"{out} already exists; pass --force to replace it, or choose another path")
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not is_export_of(out, run.family_name):
        raise RunError(
            f"{out} is a folder that is not an earlier {run.family_name} export, so --force will not "
            "replace it; choose another path (or empty it yourself)"
        )


def is_export_of(folder: Path, family: str) -> bool:
    """True when `folder` is a folder export of `family` (it holds the marker export writes)."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("family") == family


def remove_stale_staging(out: Path) -> int:
    """Remove the staging folders of exports to `out` that were killed; an old OUT a killed export had already
    moved aside (and not yet replaced) is put back first. Folders of running exports are left alone."""
    removed = 0
    for staging in stale_staging(out.parent, f".{out.name}.export-"):
        replaced = staging / ".replaced"
        if (replaced.exists() or replaced.is_symlink()) and not (out.exists() or out.is_symlink()):
            os.replace(replaced, out)
        shutil.rmtree(staging, ignore_errors=True)
        removed += 1
    return removed


def export_model(
    run: Run, out: Path, model: str = "source", block: int | None = None, weights: str = "ema", force: bool = False
) -> ExportResult:
    """Export one network of `run` to `out` (see the module docstring)."""
    out = Path(os.path.abspath(out))  # `.` and `..` by name: a folder is never renamed as "."
    check_out(run, out, force)
    family = run.family()
    if block is None:
        run.model_targets(model)  # one line naming the models this run has
    family.check_export("blocks" if block is not None else model, out)
    kind, name, depth, source = export_target(run, model, block, weights)
    if kind == "source":  # the run's copy, or its checkpoint by reference (source_ref.py)
        state = source_state(run)
        if not source.is_file():
            source = Path((run.manifest.get("source") or {}).get("checkpoint_path") or source)
    else:
        state = load_weights(source)
    network = load_network(lambda: family.block_network(run.recipe, depth), state, str(source), torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_staging(out)
    staging = make_staging(out.parent, f".{out.name}.export-")
    replaced = staging / ".replaced"
    try:
        written = staging / out.name
        notes = family.export(run, kind, name, network, written)
        if not written.exists():
            raise DbconvertError(f"the {run.family_name} family wrote nothing for {name}")
        if written.is_dir():
            if out.exists() and not out.is_dir() or out.is_symlink():
                raise RunError(f"{out} is a file and a {run.family_name} export is a folder; choose another path")
            (written / EXPORT_MARKER).write_text(json.dumps({"family": run.family_name, "exported": name}) + "\n")
        elif out.is_dir() and not out.is_symlink() and any(out.iterdir()):
            raise RunError(
                f"{out} is a non-empty folder and a {run.family_name} {name} export is a file; choose another path"
            )
        if out.is_dir() and not out.is_symlink() or written.is_dir() and out.exists():
            os.replace(out, replaced)  # a folder cannot be renamed over: move the old one aside first
        try:
            os.replace(written, out)  # one atomic rename for files
        except BaseException:
            if replaced.exists() or replaced.is_symlink():
                os.replace(replaced, out)  # the old OUT back: a failed export changes nothing
            raise
    finally:
        if not (replaced.exists() or replaced.is_symlink()) or out.exists() or out.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)  # else the old OUT is in it: the next export puts it back
    if removed:
        notes.append(f"removed {removed} staging folder(s) of killed exports to {out.name}")
    return ExportResult(out, name, source, notes)
