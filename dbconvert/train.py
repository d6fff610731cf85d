"""`train-block` and `train-e2e`: one training loop, fed either one block or the whole network.

A block process loads only its own weights (plus the data), so it needs about 1/B of the
memory of end-to-end backprop. Randomness is derived from (seed, step), and the data
order from (seed, epoch), so an interrupted run that resumes ends with exactly the weights
of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dbconvert import distributed, locks, tblog
from dbconvert.checkpoint import atomic_write_text, load_strict, load_weights, save_weights, write_json
from dbconvert.config import Recipe, override_recipe
from dbconvert.devices import resolve_device
from dbconvert.errors import DbconvertError, RunError, first_line
from dbconvert.locks import LOCK_NAME
from dbconvert.optimizers import flatten_state, set_lr, unflatten_state
from dbconvert.rundir import Run
from dbconvert.schema import MAX_TRAIN_STEPS, fold_seed
from dbconvert.source_ref import source_state
from dbconvert.trainstep import Objective, TrainingState, build_state, learning_rate

TRAIN_OVERRIDABLE = ("train", "sample")
"""data.* is fixed at split like model and noise: a training-time data change (the held-out rows, another source)
would be used silently, unrecorded, and unseen by the evaluations' overlap checks."""


@dataclass(frozen=True)
class Target:
    """What one training process trains: a block, the e2e baseline, or the family's plain reference."""

    name: str
    depth: int
    train_range: tuple[float, float]
    init_weights: Path | None
    """What training starts from: a block's split weights, or None for the run's source (`source_ref.py`)."""
    objective: Objective = "denoiser"
    salt: int = 0
    """Mixed into the per-step RNG so different targets of one run draw different noise."""


@dataclass
class TrainResult:
    name: str
    step: int
    total_steps: int
    last_loss: float | None
    directory: Path


StepCallback = Callable[[dict[str, Any]], None]


def block_target(run: Run, index: int) -> Target:
    info = run.block(index)
    name = Run.block_name(index)
    init = (
        run.model_dir(name) / INIT_FILE
    )  # what split wrote; runs split before it existed start from model.safetensors
    if not init.is_file():
        init = run.model_dir(name) / "model.safetensors"
    return Target(name, info.layers[1] - info.layers[0], info.train_range, init, salt=1 + index)


def e2e_target(run: Run, objective: Objective = "denoiser") -> Target:
    """The whole network from the converted source: the e2e baseline (same denoiser, full sigma range) or the
    family's plain reference (`Family.reference_kind`: `ar` for text, `classifier` for ViT)."""
    full = run.noise().full_range()
    reference = run.family().reference_kind
    if objective == "denoiser":
        return Target("e2e", run.num_layers, full, None)
    if reference is None:
        raise DbconvertError(
            f"--objective {objective}: a {run.family_name} run has no plain reference to train; "
            "use --objective denoiser (the default)"
        )
    if objective != reference:
        raise DbconvertError(f"--objective must be denoiser or {reference}, not {objective!r}")
    return Target(objective, run.num_layers, full, None, objective, salt=999_983)


def total_steps(recipe: Recipe, num_examples: int) -> int:
    """train.steps, or train.epochs worth of full batches (at most MAX_TRAIN_STEPS, like train.steps)."""
    if recipe.train.steps is not None:
        return recipe.train.steps
    per_epoch = max(1, num_examples // recipe.train.batch_size)
    steps = max(1, math.ceil(recipe.train.epochs * per_epoch))  # type: ignore[operator]
    if steps > MAX_TRAIN_STEPS:
        raise DbconvertError(
            f"train.epochs={recipe.train.epochs:.10g} is {steps:,} steps ({per_epoch:,} an epoch), more "
            f"than the {MAX_TRAIN_STEPS:,} allowed; train fewer epochs"
        )
    return steps


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """The RNG for one training step: a pure function of (seed, step, target), so resume is exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 10_007 + step) % (2**63))


def batch_indices(seed: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Example indices of `step`: a fresh seeded permutation per epoch, full batches only."""
    if n < batch:
        raise DbconvertError(
            f"the data set has {n} examples, fewer than train.batch_size={batch}; lower the batch size"
        )
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(fold_seed(seed * 7919 + epoch)))
    return perm[pos * batch : (pos + 1) * batch]


def training_recipe(
    run: Run, overrides: list[str] | None = None, steps: int | None = None, epochs: float | None = None
) -> Recipe:
    """The run's recipe with training overrides and --steps / --epochs applied (an option the run's family would
    ignore is a one-line error: `Family.check_training`)."""
    recipe = override_recipe(run.recipe, overrides, TRAIN_OVERRIDABLE)
    if steps is not None or epochs is not None:
        recipe = override_recipe(
            recipe,
            [
                f"train.steps={steps}" if steps else "train.steps=null",
                f"train.epochs={epochs}" if epochs else "train.epochs=null",
            ],
            ("train",),
        )
    run.family().check_training(recipe)
    return recipe


def train(
    run: Run,
    target: Target,
    steps: int | None = None,
    epochs: float | None = None,
    restart: bool = False,
    overrides: list[str] | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
    note: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train one block (or the e2e network) of `run`, resuming from its last checkpoint.

    Under torchrun (RANK/WORLD_SIZE/... in the environment) this process is one rank of a
    data-parallel group: the recipe's batch is the global batch, split across ranks; only
    rank 0 logs, shows progress, holds the lock and writes checkpoints.
    """
    import torch.distributed as td

    recipe = training_recipe(run, overrides, steps, epochs)
    owned_group = not (td.is_available() and td.is_initialized())
    dist, device_name = distributed.setup(recipe.train.device)
    note = note or (lambda msg: print(msg, file=sys.stderr))
    lock_path = run.model_dir(target.name) / LOCK_NAME
    owner = None
    try:
        failure = None
        if dist.is_main:
            try:
                owner = locks.acquire(lock_path, f"{target.name} of {run.root}", note)
                if run.replaced():  # a split put a new run here after this one was opened: not the run asked for
                    failure = (
                        f"{run.root} was replaced by a new split after this training opened it; nothing was "
                        "trained: start the training again"
                    )
            except DbconvertError as exc:
                failure = str(exc)
        distributed.broadcast_error(dist, failure)
        return _train(run, target, recipe, dist, device_name, restart, on_step, progress and dist.is_main, note)
    finally:
        if owner is not None:
            locks.release(lock_path, owner)
        if owned_group:
            distributed.teardown(dist)


def _train(
    run: Run,
    target: Target,
    recipe: Recipe,
    dist: distributed.Dist,
    device_name: str,
    restart: bool,
    on_step: StepCallback | None,
    progress: bool,
    note: Callable[[str], None],
) -> TrainResult:
    family = run.family()
    schedule = family.training_schedule(run, target.name, recipe, note)  # read (and checked) before any work
    device = resolve_device(device_name)
    global_batch = recipe.train.batch_size
    local = dist.slice(global_batch)  # the global batch must divide by the world size
    data = family.load_data(recipe)
    n_total = total_steps(recipe, len(data))
    out_dir = run.model_dir(target.name)
    main = dist.is_main
    if recipe.train.compile:
        _check_compiler(device)
    if recipe.train.tensorboard:
        tblog.require_tensorboard()  # every rank fails alike, before any work

    start = 0
    state_path = out_dir / STATE_FILE
    if main:
        _remove_stale_temp_files(run, target.name)
        if restart:
            clear_training_state(
                out_dir, keep=target.init_weights
            )  # a kill before the next checkpoint must not resume the old run
    distributed.barrier(dist)
    initial = None
    if not state_path.exists():  # a new training: built straight from the weights it starts from
        initial = source_state(run) if target.init_weights is None else load_weights(target.init_weights)
    state = build_state(
        family,
        recipe,
        target.depth,
        run.noise(),
        device,
        target.objective,
        initial,
        f"initial weights of {target.name}",
    )
    del initial
    if state_path.exists():
        start, saved = _restore(state_path, state, target.name)
        if saved.get("batch_size") not in (None, global_batch) and main and start < n_total:
            note(
                f"{target.name}: resuming at step {start} with train.batch_size={global_batch} (the checkpoint was "
                f"trained with {saved['batch_size']}); steps continue from {start}, later batches are drawn with "
                f"the new "
                "size, and the optimizer state is kept. Use --restart to start over with the new batch size."
            )
    if main:
        _truncate_metrics(run.metrics_path(target.name), start)
    if start >= n_total:
        if main and not exports_match(out_dir, start):  # killed between the state file and the exports
            _export(out_dir, state, start, n_total, target.name, global_batch)
        return TrainResult(target.name, start, n_total, None, out_dir)

    heldout = heldout_batch(family, recipe, device, note) if main and recipe.train.val_every else None
    model = distributed.wrap(dist, state.model, device, find_unused=target.objective != "denoiser")
    forward = torch.compile(model) if recipe.train.compile else model
    metrics = run.metrics_path(target.name)
    if main:
        metrics.parent.mkdir(parents=True, exist_ok=True)
    state.model.train()
    window: list[float] = []
    last_loss: float | None = None
    t_log = time.perf_counter()
    examples = 0
    with (
        _progress(progress, target.name, n_total, start) as advance,
        open(metrics, "a") if main else nullcontext() as log,
        (
            tblog.TensorBoardLog(run.root, target.name, start) if main and recipe.train.tensorboard else nullcontext()
        ) as tb,
    ):
        for step in range(start, n_total):
            gen = step_generator(recipe.train.seed, step, target.salt)
            indices = batch_indices(recipe.train.seed, step, global_batch, len(data))[local]
            batch = [t.to(device) for t in data.batch(indices)]
            lr = learning_rate(recipe, step, n_total)
            set_lr(state.optimizer, lr)
            if schedule is not None:
                schedule(state.network, step)

            def check(loss: torch.Tensor, step: int = step) -> torch.Tensor:
                value = distributed.mean_across(dist, loss)  # the same value on every rank
                if not torch.isfinite(value):
                    raise DbconvertError(
                        f"{target.name}: loss became {value.item()} at step {step}; the last checkpoint is intact "
                        "(lower train.lr or use train.precision=fp32, then rerun to resume)"
                    )
                return value

            try:
                loss_value, stats = state.train_step(forward, batch, target.train_range, gen, step, dist.shard, check)
            except Exception as exc:
                if recipe.train.compile and type(exc).__module__.startswith("torch._"):
                    raise DbconvertError(
                        f"train.compile=true failed on {device} ({first_line(exc)}); rerun with train.compile=false"
                    ) from None
                raise
            window.append(loss_value.item())
            examples += global_batch
            done = step + 1
            log_now = done % recipe.train.log_every == 0 or done == n_total
            if log_now and dist.enabled:
                stats = distributed.reduce_stats(dist, stats)  # every rank takes part; rank 0 writes
            if main and log_now:
                now = time.perf_counter()
                last_loss = sum(window) / len(window)
                record = {
                    "step": done,
                    "total_steps": n_total,
                    "loss": last_loss,
                    "lr": lr,
                    **stats,
                    "effective_batch": global_batch,
                    "micro_batch": global_batch // recipe.train.grad_accumulation,
                    "examples_per_s": examples / max(now - t_log, 1e-9),
                    "peak_memory_bytes": peak_memory(device),
                    "world_size": dist.world_size,
                    "threads": torch.get_num_threads(),  # the last bits of a CPU run's numbers depend on it
                    "time": time.time(),
                }
                if heldout is not None and (done % recipe.train.val_every == 0 or done == n_total):
                    record.update(state.heldout(heldout, target.train_range, recipe.train.seed))
                log.write(json.dumps(record) + "\n")
                log.flush()
                if tb is not None:
                    tb.write(record)
                if on_step:
                    on_step(record)
                window, examples, t_log = [], 0, now
            if main and (done % recipe.train.checkpoint_every == 0 or done == n_total):
                _checkpoint(out_dir, state, done, n_total, target.name, global_batch)
            advance(done, last_loss)
    distributed.barrier(dist)  # every rank ends after rank 0's last checkpoint
    return TrainResult(target.name, n_total, n_total, last_loss, out_dir)


HELDOUT_ROWS = 32
"""Rows of the fixed held-out batch that `train.val_every` evaluates."""


def heldout_batch(
    family: Any, recipe: Recipe, device: torch.device, note: Callable[[str], None]
) -> list[torch.Tensor] | None:
    """The first HELDOUT_ROWS examples of the held-out split, or None (with a note) when there is none."""
    try:
        data = family.load_data(recipe, "val")
    except DbconvertError as exc:
        note(f"train.val_every is set but there is no held-out data ({first_line(exc)}); no val_* metrics")
        return None
    return [t.to(device) for t in data.batch(torch.arange(min(HELDOUT_ROWS, len(data))))]


def train_block(run: Run, index: int, **kwargs: Any) -> TrainResult:
    """Train block `index` alone: only its own weights are ever read."""
    return train(run, block_target(run, index), **kwargs)


def train_e2e(run: Run, objective: Objective = "denoiser", **kwargs: Any) -> TrainResult:
    """The baseline: the whole source network, end to end over the full sigma range (the same denoiser).

    By default it runs the recipe's steps, the same as each block: B blocks x S steps x L/B
    layers equals S steps x L layers, the paper's matched layer updates. `objective=Family.reference_kind`
    trains the family's plain reference instead (families that have one: `ar`, `classifier`), into RUN/KIND/.
    """
    return train(run, e2e_target(run, objective), **kwargs)


# --- pieces --------------------------------------------------------------------------------


def _check_compiler(device: torch.device) -> None:
    """torch.compile (inductor) on the CPU builds C++ kernels: without a compiler, say so in one line."""
    import os
    import shutil

    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise DbconvertError(
            "train.compile=true on the CPU needs a C++ compiler (g++ or clang++) for torch.compile; "
            "install one or rerun with train.compile=false"
        )


def peak_memory(device: torch.device) -> int:
    """Peak memory in bytes: the CUDA allocator's peak, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


STATE_FILE = "state.safetensors"
INIT_FILE = "init.safetensors"
"""A block's weights as split wrote them (a hard link to the first model.safetensors: no extra disk)."""
EXPORTS = ("model.safetensors", "ema.safetensors", "state.json")


def _checkpoint(out_dir: Path, state: TrainingState, step: int, total: int, name: str, batch_size: int) -> None:
    """Everything needed to resume in ONE atomically written file, then the exported weights.

    A kill between the two leaves a state file ahead of the exports; `_train` sees that on the
    next run (`exports_match`) and re-exports from the state file before returning.
    """
    optim_tensors, optim_meta = flatten_state(state.optimizer)
    tensors = {f"model.{k}": v for k, v in state.network.state_dict().items()}
    shared = {v.untyped_storage().data_ptr() for v in state.network.state_dict().values()}
    if state.ema is not None:
        tensors.update(
            {
                f"ema.{k}": v.clone() if v.untyped_storage().data_ptr() in shared else v  # frozen: same tensor
                for k, v in state.ema.state_dict().items()
            }
        )
    tensors.update(optim_tensors)
    meta = {
        "step": str(step),
        "total_steps": str(total),
        "target": name,
        "optimizer": optim_meta,
        "grad_scaler": json.dumps(state.scaler.state_dict()),
        "batch_size": str(batch_size),
        "memory_options": json.dumps(resume_options(state.recipe)),
    }
    save_weights(out_dir / STATE_FILE, tensors, metadata=meta)
    _export(out_dir, state, step, total, name, batch_size)


def _export(out_dir: Path, state: TrainingState, step: int, total: int, name: str, batch_size: int) -> None:
    save_weights(out_dir / "model.safetensors", state.network.state_dict(), metadata={"step": str(step)})
    if state.ema is not None:
        save_weights(out_dir / "ema.safetensors", state.ema.state_dict(), metadata={"step": str(step)})
    else:  # train.ema=off: no EMA file, and none of an earlier run left to be read as this one's
        (out_dir / "ema.safetensors").unlink(missing_ok=True)
    dtypes = sorted(
        {str(t.dtype).removeprefix("torch.") for t in state.network.state_dict().values() if t.is_floating_point()}
    )
    t = state.recipe.train
    write_json(
        out_dir / "state.json",
        {
            "step": step,
            "total_steps": total,
            "target": name,
            "batch_size": batch_size,
            "weights_dtype": ",".join(dtypes),  # what training kept (split's: the manifest)
            "memory_options": {
                "precision": t.precision,
                "optimizer": t.optimizer,
                "ema": t.ema,
                "optimizer_in_backward": t.optimizer_in_backward,
                "grad_accumulation": t.grad_accumulation,
                "effective_batch": batch_size,
            },
        },
    )


def exports_match(out_dir: Path, step: int) -> bool:
    """Do model/EMA weights and state.json all say `step` (the step of the state file)?"""
    from safetensors import safe_open

    try:
        state = json.loads((out_dir / "state.json").read_text())
        files = ["model.safetensors"] + (
            [] if state.get("memory_options", {}).get("ema") == "off" else ["ema.safetensors"]
        )
        for file in files:
            with safe_open(str(out_dir / file), "pt") as fh:
                if (fh.metadata() or {}).get("step") != str(step):
                    return False
        return int(state.get("step", -1)) == step
    except Exception:  # missing or damaged exports (any read error): re-export
        return False


def clear_training_state(out_dir: Path, keep: Path | None) -> None:
    """Remove a target's training state and exports (for --restart), state file first; never `keep` (its init)."""
    for file in (STATE_FILE, *EXPORTS):
        if keep is None or (out_dir / file).resolve() != keep.resolve():
            (out_dir / file).unlink(missing_ok=True)


def _restore(path: Path, state: TrainingState, name: str) -> tuple[int, dict[str, str]]:
    from safetensors import safe_open

    tensors = load_weights(path)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("target") != name or "step" not in meta:
        raise RunError(f"{path} is not a training state of {name}; rerun with --restart")
    saved_options = json.loads(meta.get("memory_options", "null") or "null") or {}
    changed = [
        f"train.{k}={saved_options[k]}"
        for k, v in resume_options(state.recipe).items()
        if k in saved_options and saved_options[k] != v
    ]
    if changed:
        raise RunError(
            f"{name} was trained with {', '.join(changed)}: resume with the same (add it to the command) "
            "or rerun with --restart"
        )
    load_strict(state.network, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, f"{path} (model)")
    saved_ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if (state.ema is None) != (not saved_ema):
        had, has = ("off" if not saved_ema else "on"), state.recipe.train.ema
        raise RunError(
            f"{path} was trained with the EMA {had}, this run asks train.ema={has}; keep the option the "
            "training started with, or rerun with --restart"
        )
    if state.ema is not None:
        load_strict(state.ema, saved_ema, f"{path} (ema)")
    try:
        state.optimizer.load_state_dict(
            unflatten_state({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
        )
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise RunError(
            f"{path}: the saved optimizer state does not fit train.optimizer={state.recipe.train.optimizer}"
            f" ({first_line(exc)}); keep the options the training started with, or rerun with --restart"
        ) from None
    if meta.get("grad_scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(json.loads(meta["grad_scaler"]))
    saved = {"batch_size": int(meta["batch_size"])} if meta.get("batch_size") else {}
    return int(meta["step"]), saved


def resume_options(recipe: Recipe) -> dict[str, Any]:
    """The memory options a training state is bound to: resuming with others would change what the saved tensors
    mean (their dtype, the optimizer state's layout, whether an EMA exists)."""
    t = recipe.train
    return {
        "precision": t.precision,
        "optimizer": t.optimizer,
        "ema": t.ema,
        "optimizer_in_backward": t.optimizer_in_backward,
    }


def _remove_stale_temp_files(run: Run, name: str) -> None:
    """Temp files of atomic writes cut short by a kill (we hold the lock: nobody else writes here)."""
    out_dir = run.model_dir(name)
    for final in (STATE_FILE, *EXPORTS):
        for tmp in out_dir.glob(f".{final}.*.tmp"):
            tmp.unlink(missing_ok=True)
    metrics = run.metrics_path(name)
    for tmp in metrics.parent.glob(f".{metrics.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged lines past the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed process
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _progress(enabled: bool, name: str, total: int, start: int):  # noqa: ANN202
    """Progress of the steps (`dbconvert.progress`: a bar, or plain lines when not a terminal) yielding
    `advance(step, loss)`."""
    from contextlib import contextmanager

    from dbconvert.progress import progress

    @contextmanager
    def bar():  # noqa: ANN202
        with progress(name, total, unit="steps", enabled=enabled, start=start) as update:
            yield lambda step, loss: update(step, f"loss {loss:.4f}" if loss is not None else "")

    return bar()
