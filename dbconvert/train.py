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
from torch import nn

from dbconvert import distributed, locks, tblog
from dbconvert.checkpoint import atomic_write_text, load_strict, load_weights, save_weights, write_json
from dbconvert.config import Recipe, override_recipe
from dbconvert.devices import resolve_device
from dbconvert.errors import DbconvertError, RunError, first_line
from dbconvert.locks import LOCK_NAME
from dbconvert.rundir import Run

TRAIN_OVERRIDABLE = ("train", "sample", "data")


@dataclass(frozen=True)
class Target:
    """What one training process trains: a block or the e2e network."""

    name: str
    depth: int
    train_range: tuple[float, float]
    init_weights: Path


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
    return Target(name, info.layers[1] - info.layers[0], info.train_range, run.model_dir(name) / "model.safetensors")


def e2e_target(run: Run) -> Target:
    noise = run.noise()
    return Target("e2e", run.num_layers, (noise.sigma_min, noise.sigma_max), run.source_weights)


def total_steps(recipe: Recipe, num_examples: int) -> int:
    """train.steps, or train.epochs worth of full batches."""
    if recipe.train.steps is not None:
        return recipe.train.steps
    per_epoch = max(1, num_examples // recipe.train.batch_size)
    return max(1, math.ceil(recipe.train.epochs * per_epoch))  # type: ignore[operator]


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """The RNG for one training step: a pure function of (seed, step, target), so resume is exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 10_007 + step) % (2**63))


def batch_indices(seed: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Example indices of `step`: a fresh seeded permutation per epoch, full batches only."""
    if n < batch:
        raise DbconvertError(f"the data set has {n} examples, fewer than train.batch_size={batch}; lower the batch size")
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[pos * batch : (pos + 1) * batch]


def training_recipe(run: Run, overrides: list[str] | None = None, steps: int | None = None,
                    epochs: float | None = None) -> Recipe:
    """The run's recipe with training overrides and --steps / --epochs applied."""
    recipe = override_recipe(run.recipe, overrides, TRAIN_OVERRIDABLE)
    if steps is not None or epochs is not None:
        recipe = override_recipe(recipe, [f"train.steps={steps}" if steps else "train.steps=null",
                                          f"train.epochs={epochs}" if epochs else "train.epochs=null"], ("train",))
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
            except DbconvertError as exc:
                failure = str(exc)
        distributed.broadcast_error(dist, failure)
        return _train(run, target, recipe, dist, device_name, restart, on_step, progress and dist.is_main)
    finally:
        if owner is not None:
            locks.release(lock_path, owner)
        if owned_group:
            distributed.teardown(dist)


def _train(run: Run, target: Target, recipe: Recipe, dist: distributed.Dist, device_name: str, restart: bool,
           on_step: StepCallback | None, progress: bool) -> TrainResult:
    family = run.family()
    device = resolve_device(device_name)
    global_batch = recipe.train.batch_size
    local = dist.slice(global_batch)  # the global batch must divide by the world size
    data = family.load_data(recipe)
    n_total = total_steps(recipe, len(data))
    out_dir = run.model_dir(target.name)
    main = dist.is_main
    autocast, scaler = _precision(recipe.train.precision, device)
    if recipe.train.compile:
        _check_compiler(device)
    if recipe.train.tensorboard:
        tblog.require_tensorboard()  # every rank fails alike, before any work

    network = family.block_network(recipe, target.depth)
    is_e2e = target.name == "e2e"
    wrap = family.e2e_model if is_e2e else family.denoiser
    denoiser = wrap(recipe, network, run.noise()).to(device)
    ema = family.block_network(recipe, target.depth).to(device).requires_grad_(False)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = _optimizer(recipe, trainable)

    start = 0
    state_path = out_dir / "state.safetensors"
    if main:
        _remove_stale_temp_files(run, target.name)
    if state_path.exists() and not restart:
        start = _restore(state_path, network, ema, optimizer, target.name)
    else:
        load_strict(network, load_weights(target.init_weights), f"initial weights of {target.name}")
        ema.load_state_dict(network.state_dict())
        if main:
            _truncate_metrics(run.metrics_path(target.name), 0)
    if start and main:
        _truncate_metrics(run.metrics_path(target.name), start)
    if start >= n_total:
        return TrainResult(target.name, start, n_total, None, out_dir)

    salt = 0 if is_e2e else 1 + int(target.name.split("-")[-1])
    model = distributed.wrap(dist, denoiser, device, find_unused=is_e2e)
    forward = torch.compile(model) if recipe.train.compile else model
    shard = {"shard": dist.shard} if dist.enabled else {}
    metrics = run.metrics_path(target.name)
    if main:
        metrics.parent.mkdir(parents=True, exist_ok=True)
    denoiser.train()
    window: list[float] = []
    last_loss: float | None = None
    t_log = time.perf_counter()
    examples = 0
    with _progress(progress, target.name, n_total, start) as advance, \
            (open(metrics, "a") if main else nullcontext()) as log, \
            (tblog.TensorBoardLog(run.root, target.name, start) if main and recipe.train.tensorboard else nullcontext()) as tb:
        for step in range(start, n_total):
            gen = step_generator(recipe.train.seed, step, salt)
            indices = batch_indices(recipe.train.seed, step, global_batch, len(data))[local]
            batch = [t.to(device) for t in data.batch(indices)]
            lr = _lr(recipe, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                try:
                    if is_e2e:
                        loss, stats = family.e2e_loss(forward, batch, recipe, run.noise(), gen, **shard)
                    else:
                        loss, stats = family.training_loss(forward, batch, target.train_range, recipe, gen, **shard)
                except Exception as exc:
                    if recipe.train.compile and type(exc).__module__.startswith("torch._"):
                        raise DbconvertError(f"train.compile=true failed on {device} ({first_line(exc)}); "
                                             "rerun with train.compile=false") from None
                    raise
            loss_value = distributed.mean_across(dist, loss)  # the same value on every rank
            if not torch.isfinite(loss_value):
                raise DbconvertError(
                    f"{target.name}: loss became {loss_value.item()} at step {step}; the last checkpoint is intact "
                    "(lower train.lr or use train.precision=fp32, then rerun to resume)"
                )
            optimizer_step(loss, optimizer, scaler, trainable, recipe.train.grad_clip)
            _ema_update(ema, network, ema_decay_at(recipe.train.ema_decay, step, recipe.train.ema_warmup))
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
                    "examples_per_s": examples / max(now - t_log, 1e-9),
                    "peak_memory_bytes": peak_memory(device),
                    "world_size": dist.world_size,
                    "time": time.time(),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                if tb is not None:
                    tb.write(record)
                if on_step:
                    on_step(record)
                window, examples, t_log = [], 0, now
            if main and (done % recipe.train.checkpoint_every == 0 or done == n_total):
                _checkpoint(out_dir, network, ema, optimizer, done, n_total, target.name)
            advance(done, last_loss)
    distributed.barrier(dist)  # every rank ends after rank 0's last checkpoint
    return TrainResult(target.name, n_total, n_total, last_loss, out_dir)


def train_block(run: Run, index: int, **kwargs: Any) -> TrainResult:
    """Train block `index` alone: only its own weights are ever read."""
    return train(run, block_target(run, index), **kwargs)


def train_e2e(run: Run, **kwargs: Any) -> TrainResult:
    """The baseline: the whole source network, end to end over the full sigma range.

    By default it runs the recipe's steps, the same as each block: B blocks x S steps x L/B
    layers equals S steps x L layers, the paper's matched layer updates.
    """
    return train(run, e2e_target(run), **kwargs)


# --- pieces --------------------------------------------------------------------------------


def _optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.betas[0], weight_decay=t.weight_decay)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    grad_clip: float | None,
) -> None:
    """Backward, optional clipping, optimizer step, then free the gradients.

    Freeing them right after the step (not before the next backward) keeps one gradient-sized
    buffer out of the next forward pass's peak memory.
    """
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _lr(recipe: Recipe, step: int) -> float:
    warm = recipe.train.warmup_steps
    return recipe.train.lr * min(1.0, (step + 1) / warm) if warm else recipe.train.lr


@torch.no_grad()
def ema_decay_at(decay: float, step: int, warmup: bool = True) -> float:
    """EMA decay of `step` (0-based): with warmup, min(decay, (1 + step) / (10 + step)).

    A plain 0.9999 EMA still holds 90% of the initial weights after 1000 steps; the warmup
    makes the EMA follow the model early and reach the full decay later (0.999 by ~9000 steps).
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p.detach(), 1.0 - decay)


def _precision(precision: str, device: torch.device):  # noqa: ANN202
    """(autocast context factory, grad scaler) for fp32 / bf16 / fp16."""
    if precision == "fp32":
        return nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise DbconvertError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 here")
    return (lambda: torch.autocast(device.type, dtype=dtype)), torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _check_compiler(device: torch.device) -> None:
    """torch.compile (inductor) on the CPU builds C++ kernels: without a compiler, say so in one line."""
    import os
    import shutil

    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise DbconvertError("train.compile=true on the CPU needs a C++ compiler (g++ or clang++) for torch.compile; "
                             "install one or rerun with train.compile=false")


def peak_memory(device: torch.device) -> int:
    """Peak memory in bytes: the CUDA allocator's peak, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: str) -> dict[str, Any]:
    info = json.loads(meta)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


def _checkpoint(out_dir: Path, network: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                step: int, total: int, name: str) -> None:
    """Everything needed to resume in ONE atomically written file, then the exported weights."""
    optim_tensors, optim_meta = _flatten_optimizer(optimizer)
    state = {f"model.{k}": v for k, v in network.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    state.update(optim_tensors)
    meta = {"step": str(step), "total_steps": str(total), "target": name, "optimizer": optim_meta}
    save_weights(out_dir / "state.safetensors", state, metadata=meta)
    save_weights(out_dir / "model.safetensors", network.state_dict(), metadata={"step": str(step)})
    save_weights(out_dir / "ema.safetensors", ema.state_dict(), metadata={"step": str(step)})
    write_json(out_dir / "state.json", {"step": step, "total_steps": total, "target": name})


def _restore(path: Path, network: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, name: str) -> int:
    from safetensors import safe_open

    state = load_weights(path)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("target") != name or "step" not in meta:
        raise RunError(f"{path} is not a training state of {name}; rerun with --restart")
    load_strict(network, {k[6:]: v for k, v in state.items() if k.startswith("model.")}, f"{path} (model)")
    load_strict(ema, {k[4:]: v for k, v in state.items() if k.startswith("ema.")}, f"{path} (ema)")
    optimizer.load_state_dict(_unflatten_optimizer({k: v for k, v in state.items() if k.startswith("optim.")}, meta["optimizer"]))
    return int(meta["step"])


def _remove_stale_temp_files(run: Run, name: str) -> None:
    """Temp files of atomic writes cut short by a kill (we hold the lock: nobody else writes here)."""
    out_dir = run.model_dir(name)
    for final in ("state.safetensors", "model.safetensors", "ema.safetensors", "state.json"):
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
    """A Rich progress bar (or nothing) yielding `advance(step, loss)`."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    @contextmanager
    def bar():  # noqa: ANN202
        if not enabled:
            yield lambda step, loss: None
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns) as prog:
            task = prog.add_task(name, total=total, completed=start, loss="-")

            def advance(step: int, loss: float | None) -> None:
                prog.update(task, completed=step, loss=f"{loss:.4f}" if loss is not None else "-")

            yield advance

    return bar()
