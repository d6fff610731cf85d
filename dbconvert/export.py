"""`export`: a run's source, e2e baseline, AR reference or one block, back in its family's reference format.

DiT: a reference-format checkpoint (`.pt`, a plain `torch.save` state dict, or `.safetensors` that also
records the parameterisation in its metadata); Llama: a Hugging Face `save_pretrained` folder. Each
family's `convert.py` holds the export key map (the reverse of its import map).

The export is written into a staging folder beside OUT and renamed into place at the end, so a failed
or killed export leaves an existing OUT as it was; an existing OUT is only replaced with `force` (a
file in one atomic rename; a folder is first moved into the staging folder, then the new one in).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dbconvert.checkpoint import load_strict, load_weights
from dbconvert.errors import DbconvertError, RunError
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
        command = f"train-block {block}" if block is not None else f"train-e2e{'' if model == 'e2e' else ' --objective ' + model}"
        raise RunError(f"{name} of {run.root} is not trained, so there is nothing new to export; run `dbconvert {command}` "
                       "first (or export --model source)")
    return model, name, depth, run.model_dir(name) / f"{weights}.safetensors"


def export_model(run: Run, out: Path, model: str = "source", block: int | None = None, weights: str = "ema",
                 force: bool = False) -> ExportResult:
    """Export one network of `run` to `out` (see the module docstring)."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise RunError(f"{out} already exists; pass --force to replace it, or choose another path")
    family = run.family()
    if block is None:
        run.model_targets(model)  # one line naming the models this run has
    family.check_export("blocks" if block is not None else model, out)
    kind, name, depth, source = export_target(run, model, block, weights)
    network = family.block_network(run.recipe, depth)
    load_strict(network, load_weights(source), str(source))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        written = staging / out.name
        notes = family.export(run, kind, name, network, written)
        if not written.exists():
            raise DbconvertError(f"the {run.family_name} family wrote nothing for {name}")
        if out.is_dir() and not out.is_symlink() or written.is_dir() and out.exists():
            os.replace(out, staging / ".replaced")  # a folder cannot be renamed over: move the old one aside first
        os.replace(written, out)  # one atomic rename for files
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, name, source, notes)
