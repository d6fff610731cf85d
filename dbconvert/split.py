"""`split`: cut a source network into B stand-alone blocks and write the run directory."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path

from dbconvert import __version__
from dbconvert.checkpoint import current_umask, save_weights
from dbconvert.config import Recipe
from dbconvert.errors import RecipeError, RunError
from dbconvert.families import Family, get_family
from dbconvert.families.contract import Source
from dbconvert import locks
from dbconvert.locks import LockedError, disown, make_staging, stale_staging
from dbconvert.noise_process import owned_ranges
from dbconvert.rundir import FORMAT_VERSION, MANIFEST, ORIENTATION, BlockInfo, Run, set_current, write_manifest
from dbconvert.source_ref import checkpoint_digest, reference_record, write_key_map
from dbconvert.tensorio import release


def layer_ranges(num_layers: int, num_blocks: int, uneven: bool = False) -> list[tuple[int, int]]:
    """Consecutive [start, end) layer slices, block 0 first.

    B must divide L unless `uneven` is allowed, in which case the first L mod B blocks get
    one layer more (the high-noise end, where the paper finds most work is done).
    """
    if num_blocks < 1 or num_blocks > num_layers:
        raise RecipeError(f"--blocks must be between 1 and the network's {num_layers} layers, got {num_blocks}")
    base, extra = divmod(num_layers, num_blocks)
    if extra and not uneven:
        divisors = [b for b in range(1, num_layers + 1) if num_layers % b == 0]
        raise RecipeError(
            f"{num_blocks} blocks do not divide the {num_layers} layers evenly; use one of {divisors} "
            "or set blocks.uneven=true"
        )
    ranges, start = [], 0
    for i in range(num_blocks):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def plan_blocks(recipe: Recipe, num_layers: int) -> tuple[list[float], list[dict]]:
    """Boundaries and, per block, its layers and owned / training noise-level ranges and mass.

    The run's noise process (`recipe.noise.process`) draws the boundaries, widens them by the overlap and
    weighs them; the orientation is the same for every process (block 0 = first layers = highest noise).
    """
    n = recipe.noise
    process = n.settings()
    if n.partition not in process.partitions:
        raise RecipeError(
            f"noise.partition={n.partition} is not a partition of the {process.name} noise process; "
            f"choose one of {', '.join(process.partitions)}"
        )
    process.validate()
    bounds = process.boundaries(recipe.blocks.num, n.partition)
    plans = []
    for i, (layers, owned) in enumerate(
        zip(layer_ranges(num_layers, recipe.blocks.num, recipe.blocks.uneven), owned_ranges(bounds))
    ):
        train = process.expand(*owned, n.gamma)
        mass = process.mass(*owned)
        if not (owned[1] > owned[0] and mass > MIN_MASS):
            raise RecipeError(
                f"{process.settings_text()}: block {i} would own the noise levels ({owned[0]:.4g}, "
                f"{owned[1]:.4g}] of mass {mass:.3g}, i.e. none; {process.widen_hint()}, "
                "or use fewer blocks"
            )
        plans.append({"index": i, "layers": layers, "owned_range": owned, "train_range": train, "mass": mass})
    return bounds, plans


MIN_MASS = 1e-9
"""Below this share of the training noise distribution a block owns nothing a float64 quantile can sample
from: such settings are refused at split."""


def check_noise_process(family: Family, recipe: Recipe) -> None:
    """A one-line error when the recipe's noise process is not one the family's objectives take."""
    if recipe.noise.process not in family.noise_processes:
        raise RecipeError(
            f"noise.process={recipe.noise.process} does not apply to the {family.name} family "
            f"(it takes {', '.join(family.noise_processes)}); remove the override"
        )


def keep_initial(weights: Path) -> None:
    """init.safetensors beside a block's first weights: what --restart starts from after training replaced them.

    A hard link costs no disk (training replaces model.safetensors by renaming a new file over it,
    so the link keeps the split weights); where links are not possible, a copy.
    """
    init = weights.with_name("init.safetensors")
    try:
        os.link(weights, init)
    except OSError:
        shutil.copyfile(weights, init)


def source_depth(recipe: Recipe) -> int:
    """The source network's layer count, from its family (a fresh one is built with its parameters on the meta
    device: no memory, and no random numbers drawn).

    The recipe is left as it is: `source` settles `auto` choices (e.g. model.storage_dtype) on a copy.
    """
    import torch

    from dbconvert.building import empty_parameters

    family = get_family(recipe.model.family)
    recipe = recipe.model_copy(deep=True)
    if recipe.model.checkpoint is None:
        try:
            with torch.device("meta"):  # nothing real at all
                return family.source(recipe).num_layers
        except (RuntimeError, NotImplementedError):  # a source that computes a value from its settings (DiT's
            with empty_parameters():  # DDPM schedule): the computation on the CPU, the parameters on meta
                return family.source(recipe).num_layers
    return family.source(recipe).num_layers


def trainable_params(family: Family, recipe: Recipe, depth: int) -> int:
    """Trainable parameters of a block of `depth` layers (frozen tables such as DiT's pos_embed not counted).

    Counted on the family's own network, built on the meta device (no memory), so no key name is assumed here.
    """
    import torch

    with torch.device("meta"):
        network = family.block_network(recipe, depth)
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def remove_stale_split_folders(out: Path) -> None:
    """Remove what killed splits to `out` left: staging folders (a partial run), and folders holding a replaced
    run once the new run is in place. Those of splits still running are left alone."""
    for staging in stale_staging(out.parent, f".{out.name}.split-"):
        shutil.rmtree(staging, ignore_errors=True)
    if (out / MANIFEST).exists():
        for trash in stale_staging(out.parent, f".{out.name}.old-"):
            shutil.rmtree(trash, ignore_errors=True)


def replace_run(staging: Path, out: Path) -> None:
    """Put the finished run `staging` in place of the run `out`: the old one is moved aside into a hidden folder,
    the new one renamed in, the old one removed. When the rename in fails (no permission, a full disk), the old
    run is moved back, so a failed `split --force` leaves the existing run as it was."""
    trash = make_staging(out.parent, f".{out.name}.old-")
    old = trash / "run"
    try:
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)
            raise
    finally:
        if not old.exists() or (out / MANIFEST).exists():  # kept only when the old run could not be put back
            shutil.rmtree(trash, ignore_errors=True)


def split_lock(out: Path) -> Path:
    """The lock a split holds while it writes `out` (beside it: `.NAME.split.lock`), so two splits to one folder
    never both report a run written."""
    return out.parent / f".{out.name}.split.lock"


def check_out(out: Path, force: bool) -> None:
    """One-line refusals of `out` as a split's target: a run without --force, a folder that is not a run, a run of
    which a block (or e2e, ...) is being trained now."""
    if (out / MANIFEST).exists() and not force:
        raise RunError(f"{out} already holds a run; pass --force to replace it or --out DIR for another folder")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise RunError(f"{out} exists and is not an empty folder or a dbconvert run; choose another --out")
    training = locks.training_owner(out)
    if training is not None:
        lock, owner = training
        raise RunError(
            f"{out} cannot be replaced: {lock.parent.name} is being trained by {locks.describe(owner)} "
            f"(lock {lock}); wait for that training to end (or stop it), then split again, or choose "
            "another --out"
        )


def take_training_locks(out: Path) -> list[tuple[Path, dict]]:
    """Every training lock of the run at `out` taken by this split, so no training starts on the run it is about to
    replace; a training running now is a one-line refusal (the locks taken so far are released)."""
    taken: list[tuple[Path, dict]] = []
    try:
        for path in locks.model_locks(out):
            taken.append((path, locks.acquire(path, f"{path.parent.name} of {out}")))
    except LockedError:
        release_all(taken)
        check_out(out, force=True)  # the refusal that names the training
        raise
    return taken


def release_all(taken: list[tuple[Path, dict]]) -> None:
    for path, owner in taken:
        locks.release(path, owner)


def split(
    recipe: Recipe,
    out: Path | None = None,
    force: bool = False,
    make_current: bool = True,
    progress: bool = False,
    copy_source: bool = False,
) -> Run:
    """Open the source network, cut it into blocks and write a new run directory.

    A checkpoint streams: each block's tensors are read from it when the block is made, the block is written and
    freed, so the whole network never exists in memory (peak about one block). The run records the checkpoint
    by reference (`source_ref.py`) unless `copy_source` asks for a copy inside the run; a fresh network is
    always copied (there is no file to point at). The run is assembled in a temporary sibling folder and renamed
    into place at the end, so a failed or killed split never leaves a half-written run, and an existing run is
    only replaced when `force` is set, and never while one of its blocks is being trained (`locks.py`). The split
    holds a lock beside `out` while it writes, so a second split to the same folder refuses instead of both
    reporting a run written. `progress` shows the tensors being written (MiB/s).
    """
    family = get_family(recipe.model.family)
    check_noise_process(family, recipe)
    family.check_training(recipe)  # a training option the family would ignore: refused before anything is written
    family.check_data(recipe)
    out = Path(out) if out is not None else recipe.output_dir()
    check_out(out, force)

    source = family.source(recipe)
    bounds, plans = plan_blocks(recipe, source.num_layers)

    out.parent.mkdir(parents=True, exist_ok=True)
    with locks.hold(split_lock(out), f"run folder {out}", doing="written"):
        check_out(out, force)  # again, now that no other split can write it: one may have finished meanwhile
        write_run(family, recipe, source, bounds, plans, out, force, progress, copy_source)
    if make_current:
        set_current(out)
    return Run.open(out)


def write_run(
    family: Family,
    recipe: Recipe,
    source: Source,
    bounds: list[float],
    plans: list[dict],
    out: Path,
    force: bool,
    progress: bool,
    copy_source: bool,
) -> None:
    """Assemble the run in a staging folder beside `out` and rename it into place (under the split's lock): onto
    nothing or an empty folder, or, with `force`, in place of a run; whatever else appeared at `out` meanwhile (made
    by a process that does not take the lock) is left alone and the split refuses."""
    from dbconvert.progress import progress as show

    remove_stale_split_folders(out)
    staging = make_staging(out.parent, f".{out.name}.split-")
    try:
        family.prepare_run(recipe, staging, source)  # first: its refusals (e.g. no tokenizer) come before any output
        by_reference = bool(source.files) and not copy_source
        files = len(plans) + (0 if by_reference else 1)
        with show(f"split into {len(plans)} blocks", files, unit="files", enabled=progress) as update:
            t0, written, done = time.perf_counter(), 0, 0

            def wrote(nbytes: int) -> None:
                nonlocal written
                written += nbytes
                mib = written / 2**20
                update(done, f"{mib:,.1f} MiB, {mib / max(time.perf_counter() - t0, 1e-9):,.1f} MiB/s")

            sha256 = source.checkpoint_sha256 or (checkpoint_digest(source.files) if source.files else None)
            if by_reference:
                write_key_map(staging / "shared", source.state)
            else:
                save_weights(staging / "source" / "model.safetensors", source.state, on_tensor=wrote)
                release(source.state)
                done += 1
            blocks = []
            for plan in plans:
                state = family.block_state(source, *plan["layers"])
                params = trainable_params(family, recipe, plan["layers"][1] - plan["layers"][0])
                weights = staging / "blocks" / Run.block_name(plan["index"]) / "model.safetensors"
                save_weights(weights, state, on_tensor=wrote)
                del state
                release(source.state)  # a memory-mapped .pt: the pages this block touched leave the resident set
                keep_initial(weights)
                blocks.append(BlockInfo(params=params, **plan).to_dict())
                done += 1
                wrote(0)
        record = {
            "checkpoint": recipe.model.checkpoint,
            "sha256": sha256,
            "storage_dtype": getattr(recipe.model, "storage_dtype", "float32"),
        }
        if by_reference:
            record.update(reference_record(source, sha256))
            record["checkpoint_path"] = str(Path(str(recipe.model.checkpoint)).expanduser().resolve())
        write_manifest(
            staging,
            {
                "format_version": FORMAT_VERSION,
                "dbconvert_version": __version__,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "family": recipe.model.family,
                "orientation": ORIENTATION,
                "num_layers": source.num_layers,
                "num_blocks": recipe.blocks.num,
                "partition": recipe.noise.partition,
                "gamma": recipe.noise.gamma,
                "noise": recipe.noise.model_dump(exclude={"partition", "gamma"}),
                "boundaries": bounds,
                "source": record,
                "parameterization": family.parameterization(recipe),
                "notes": list(source.notes),
                "blocks": blocks,
                "recipe": recipe.to_dict(),
            },
        )
        disown(staging)  # it becomes the run: no owner file inside
        os.chmod(staging, 0o777 & ~current_umask())  # a new folder's permissions, not mkdtemp's private 0700
        replacing = out.exists() and any(out.iterdir())
        if replacing and not (force and (out / MANIFEST).exists()):
            raise RunError(
                f"{out} was created by another process while this split ran; the new run was not written "
                "(choose another --out, or pass --force to replace a run)"
            )
        if replacing:
            taken = take_training_locks(out)  # they move away with the old run
            try:
                replace_run(staging, out)
            except BaseException:
                release_all(taken)  # the old run is back in place (replace_run): its locks are free again
                raise
        else:
            try:
                staging.rename(out)  # onto nothing, or an empty folder; never onto a run
            except OSError:  # filled in the instant since the check
                raise RunError(
                    f"{out} was created by another process while this split ran; the new run was not "
                    "written (choose another --out, or pass --force to replace a run)"
                ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
