"""`dbconvert bench`: measure the two claims the tool exists for (DESIGN 8).

Memory: the peak memory of one full training step (forward, backward, optimizer step with
the recipe's optimizer, EMA update) of each block alone and of the whole network end to
end, at the same batch and data shape. Speed: seconds per sampling step and per training
step, blocks vs the whole network.

Against what a user would turn on instead (issue 19): the deepest block and the e2e network are also
measured with `train.activation_checkpointing` (every layer recomputed in backward), and for a family
with a plain reference (`Family.reference_kind`: a causal LM for text) the same layers trained as it, without and
with it; beside each measured peak, the paper's App. G estimate from the P and A measured on that network.

Networks are built fresh from the recipe through the family registry, with random weights
(memory and time do not depend on the values), and fed synthetic random data of the
model's shape, so no run directory, checkpoint or data set is needed.

How CPU memory is measured (the honest part): each measurement runs in a fresh Python
process (`python -m dbconvert.bench`, reading a JSON spec on stdin) so one target's
allocations never inflate another's peak. That process imports everything, warms the
kernels up on a throwaway one-layer network, and records its resident memory (VmRSS) as
the baseline; it then builds the target network, its optimizer and EMA copy, runs one
small-batch step so the optimizer state exists (a steady-state step, not the lazy first
one), resets the kernel's high-water mark (`/proc/self/clear_refs`) and runs the measured
step. Peak = VmHWM - baseline, so the interpreter and libraries are not counted but the
parameters, gradients, optimizer state, EMA weights and activations are. glibc's malloc
would otherwise keep freed tensors in its heap and move its mmap threshold around, which
makes RSS depend on allocation history; the worker is started with a fixed
`MALLOC_MMAP_THRESHOLD_`, so every tensor-sized allocation is its own mapping and goes
back to the kernel when freed. On CUDA the allocator's own peak is used in-process.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dbconvert.config import Recipe, apply_overrides, validate_recipe
from dbconvert.devices import resolve_device
from dbconvert.errors import DbconvertError
from dbconvert.families import get_family
from dbconvert.optimizers import moment_bytes, optimizer_state_bytes, weight_bytes
from dbconvert.trainstep import build_state

WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
"""Environment of the CPU memory worker: every allocation >= 64 KiB is an mmap, unmapped on free."""

WARMUP_BATCH = 2
"""Batch of the unmeasured steps that initialise kernels and optimizer state."""


@dataclass(frozen=True)
class BenchTarget:
    """One thing to measure: block i (its depth and training range) or the whole network."""

    name: str
    depth: int
    layers: tuple[int, int]
    level_range: tuple[float, float]
    e2e: bool
    checkpointing: bool = False
    """train.activation_checkpointing for this target: every layer recomputed in backward."""
    objective: str = "denoiser"
    """`denoiser`, or the family's `reference_kind` (`ar`: the same network trained as a plain causal LM)."""
    title: str = ""
    """How a reference target is called in reports (`Family.reference_title`)."""
    twin: str | None = None
    """The target measuring the same network without checkpointing (its P and A feed the App. G formula)."""


# --- targets and inputs --------------------------------------------------------------------


def with_blocks(recipe: Recipe, blocks: int) -> Recipe:
    """The recipe with B blocks (validated here so the error names --blocks)."""
    if blocks < 1:
        raise DbconvertError(f"--blocks must be at least 1, got {blocks}")
    return validate_recipe(apply_overrides(recipe.to_dict(), [f"blocks.num={blocks}"]), "recipe")


CKPT = "+ckpt"
"""Suffix of a target trained with activation checkpointing (`e2e+ckpt`, `block-0+ckpt`)."""


def bench_targets(
    recipe: Recipe, blocks: int, checkpointing: bool = False, every_block: bool = True
) -> list[BenchTarget]:
    """Every block of a B-way split (same layers and ranges as `split`), then the e2e network.

    With `checkpointing`, also the deepest block (the first of them) and the e2e network with activation
    checkpointing, and, for families with a plain reference (`Family.reference_kind`), that same
    network trained as the reference without and with checkpointing: what a user would train instead.
    `every_block=False` keeps only the deepest block of the split (blocks of equal depth cost the same).
    """
    from dbconvert.split import plan_blocks, source_depth

    recipe = with_blocks(recipe, blocks)
    total = source_depth(recipe)
    _, plans = plan_blocks(recipe, total)
    out = [
        BenchTarget(
            f"block-{p['index']}", p["layers"][1] - p["layers"][0], tuple(p["layers"]), tuple(p["train_range"]), False
        )
        for p in plans
    ]
    deepest = max(out, key=lambda t: t.depth)
    if not every_block:
        out = [deepest]
    full = recipe.noise.settings().full_range()
    out.append(BenchTarget("e2e", total, (0, total), full, True))
    if not checkpointing:
        return out
    out.append(
        BenchTarget(
            deepest.name + CKPT, deepest.depth, deepest.layers, deepest.level_range, False, True, twin=deepest.name
        )
    )
    out.append(BenchTarget("e2e" + CKPT, total, (0, total), full, True, True, twin="e2e"))
    family = get_family(recipe.model.family)
    ref = family.reference_kind
    if ref is not None and ref in family.model_kinds:
        title = family.reference_title
        out.append(BenchTarget(ref, total, (0, total), full, True, objective=ref, title=title))
        out.append(BenchTarget(ref + CKPT, total, (0, total), full, True, True, ref, twin=ref, title=title))
    return out


def target_recipe(recipe: Recipe, target: BenchTarget) -> Recipe:
    """The recipe a target trains with: train.activation_checkpointing as the target says."""
    if recipe.train.activation_checkpointing == target.checkpointing:
        return recipe
    value = "true" if target.checkpointing else "false"
    return validate_recipe(apply_overrides(recipe.to_dict(), [f"train.activation_checkpointing={value}"]), "recipe")


def bench_recipe(recipe: Recipe) -> Recipe:
    """A copy of the recipe with the family's `resolve` applied: with model.checkpoint, the architecture `split`
    would build from that checkpoint (its config only, no weights), or a one-line error when it cannot."""
    copy = validate_recipe(recipe.to_dict(), "recipe").mark_given(recipe.given)
    family = get_family(copy.model.family)
    family.check_training(copy)  # bench steps as train does: an option train would refuse is refused here too
    family.resolve(copy)
    # Settled, the recipe describes the checkpoint's architecture: the networks are built (and the source's depth
    # counted on the meta device) from it alone, as for a fresh model; weights never change memory or time.
    copy.model.checkpoint = None
    return copy


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise DbconvertError(f"--batch must be at least 1, got {batch}")


# --- one training process, as train.py runs it ---------------------------------------------


class Trainer:
    """The training state of one target, stepping exactly like `train.train` (through `trainstep`)."""

    def __init__(self, recipe: Recipe, target: BenchTarget, device: torch.device) -> None:
        recipe = target_recipe(recipe, target)
        self.recipe, self.target, self.device = recipe, target, device
        self.family = get_family(recipe.model.family).for_bench(recipe)
        torch.manual_seed(recipe.train.seed)
        self.state = build_state(self.family, recipe, target.depth, recipe.noise.settings(), device, target.objective)
        self.network = self.state.network
        self.layers = self.family.layers(self.network)

    def step(self, batch: list[torch.Tensor], seed: int = 0) -> None:
        """One training step: forward, backward, optimizer step, EMA update (the order of train.py)."""
        self.state.step(batch, self.target.level_range, torch.Generator().manual_seed(seed))

    def sampling_step(self, batch: list[torch.Tensor]) -> Callable[[], Any]:
        """One sampling step's network evaluation at the middle of the target's range (on the process's axis)."""
        self.state.model.eval()
        process = self.recipe.noise.settings()
        middle = process.level_at(sum(float(process.coordinate(v)) for v in self.target.level_range) / 2)
        with torch.no_grad():
            fn = self.family.sampling_step(self.recipe, self.state.model, batch, middle)

        def run() -> Any:
            with torch.no_grad():
                return fn()

        return run

    def breakdown(self) -> dict[str, int]:
        """Exact bytes of parameters (and buffers), gradients, optimizer state and EMA weights.

        Gradients are freed after each optimizer step, but all of them are alive between the
        backward pass and the step, so they count at the size of the trainable parameters that get
        one (once the optimizer has stepped: those it keeps state for; a parameter the objective never
        uses, e.g. the noise modulation of a causal LM, gets no gradient).
        """
        s = self.state
        params = sum(_nbytes(t) for t in s.network.parameters()) + sum(_nbytes(t) for t in s.network.buffers())
        stepped = [p for p in s.trainable if p in s.optimizer.state] if s.optimizer.state else s.trainable
        grads = sum(_nbytes(p) for p in stepped)
        if s.recipe.train.optimizer_in_backward:  # one gradient at a time: the largest is what a step holds
            grads = max((_nbytes(p) for p in stepped), default=0)
        optim = sum(_nbytes(v) for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
        # the EMA copy of a frozen parameter is that parameter (trainstep.share_frozen): not counted twice; an EMA
        # on the CPU (train.ema=cpu) is off the training device and not counted, none with train.ema=off
        ema = 0
        if s.ema is not None and s.recipe.train.ema == "device":
            ema = sum(_nbytes(e) for e, p in zip(s.ema.parameters(), s.network.parameters()) if p.requires_grad)
            ema += sum(_nbytes(t) for t in s.ema.buffers())
        # P of the App. G formulas: the trainable bytes of one residual layer (mean over the network's layers)
        layer = sum(_nbytes(p) for m in self.layers for p in m.parameters() if p.requires_grad) // max(
            1, len(self.layers)
        )
        return {
            "parameters": params,
            "gradients": grads,
            "optimizer_state": optim,
            "ema": ema,
            "layer_parameter_bytes": layer,
        }


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor; of a tensor subclass (torchao's 8-bit moments), the bytes of its inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        return sum(_nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded.

    They are all alive together at the end of the forward pass, so this is the exact
    saved-activation share of a peak; the rest of `activations` is temporaries (activation
    gradients, attention workspaces) and allocator overhead.
    """

    def __init__(self, network: nn.Module, layers: list[nn.Module] | None = None) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in network.parameters()}
        self.exclude |= {b.untyped_storage().data_ptr() for b in network.buffers()}
        self.storages: dict[int, int] = {}
        self.in_layer: set[int] = set()  # storages first saved while one of `layers` ran its forward
        self.layers = layers or []
        self.running = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
            if self.running:
                self.in_layer.add(ptr)
        return t

    def _enter_layer(self, *_: object) -> None:
        self.running += 1

    def _leave_layer(self, *_: object) -> None:
        self.running -= 1

    def __enter__(self) -> "SavedActivations":
        self._handles = [
            h
            for m in self.layers
            for h in (m.register_forward_pre_hook(self._enter_layer), m.register_forward_hook(self._leave_layer))
        ]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    @property
    def per_layer(self) -> int:
        """A of the App. G formulas: bytes saved for backward inside the layers, per layer."""
        return sum(self.storages[p] for p in self.in_layer) // max(1, len(self.layers))


# --- memory --------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_cpu_step(recipe: Recipe, target: BenchTarget, batch: int) -> dict[str, Any]:
    """Peak RSS growth of one steady-state training step, in THIS process (meant for a fresh worker)."""
    device = torch.device("cpu")
    family = get_family(recipe.model.family)
    gen = torch.Generator().manual_seed(recipe.train.seed)
    data = family.synthetic_batch(recipe, batch, gen)
    small = [t[:WARMUP_BATCH] for t in data]
    # Initialise kernels, thread pools and lazy imports on a throwaway network before the baseline.
    scratch = Trainer(recipe, BenchTarget("warmup", 1, (0, 1), target.level_range, False), device)
    scratch.step(small)
    del scratch
    gc.collect()
    rss_kb = _status_kb("VmRSS")
    use_proc = rss_kb is not None
    baseline = rss_kb * 1024 if use_proc else _maxrss_bytes()
    trainer = Trainer(recipe, target, device)
    trainer.step(small)  # creates the optimizer state: the measured step is a steady-state one
    gc.collect()
    use_proc = use_proc and _reset_peak_rss()
    before = _status_kb("VmRSS") * 1024 if use_proc else _maxrss_bytes()  # type: ignore[operator]
    with SavedActivations(trainer.network, trainer.layers) as saved:
        trainer.step(data, seed=1)
    peak = _status_kb("VmHWM") * 1024 if use_proc else _maxrss_bytes()  # type: ignore[operator]
    method = (
        "peak RSS (VmHWM after /proc/self/clear_refs) minus VmRSS before building the network"
        if use_proc
        else "ru_maxrss after the step minus ru_maxrss before building the network"
    )
    return {
        "peak_bytes": peak - baseline,
        "baseline_bytes": baseline,
        "method": method,
        **trainer.breakdown(),
        "resident_before_step": before - baseline,
        "step_peak": peak - before,
        "saved_activations": saved.nbytes,
        "layer_saved_activations": saved.per_layer,
    }


def measure_cuda_step(recipe: Recipe, target: BenchTarget, batch: int, device: torch.device) -> dict[str, Any]:
    """The CUDA allocator's peak during one steady-state step, minus what was allocated before."""
    family = get_family(recipe.model.family)
    gen = torch.Generator().manual_seed(recipe.train.seed)
    data = [t.to(device) for t in family.synthetic_batch(recipe, batch, gen)]
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    trainer = Trainer(recipe, target, device)
    trainer.step([t[:WARMUP_BATCH] for t in data])
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with SavedActivations(trainer.network, trainer.layers) as saved:
        trainer.step(data, seed=1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    out = {
        "peak_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "method": "CUDA allocator peak (max_memory_allocated) minus memory allocated before building the network",
        **trainer.breakdown(),
        "resident_before_step": int(before - baseline),
        "step_peak": int(peak + baseline - before),
        "saved_activations": saved.nbytes,
        "layer_saved_activations": saved.per_layer,
    }
    del trainer, data
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _run_worker(recipe: Recipe, target: BenchTarget, batch: int) -> dict[str, Any]:
    """Measure one target in a fresh interpreter, so no earlier allocation shapes its peak."""
    spec = json.dumps(
        {"recipe": recipe.to_dict(), "target": asdict(target), "batch": batch, "threads": torch.get_num_threads()}
    )
    env = {**os.environ, **WORKER_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "dbconvert.bench"], input=spec, capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        if proc.returncode in (-9, 137):
            raise DbconvertError(f"the {target.name} measurement was killed (out of memory?); lower --batch")
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DbconvertError(f"the {target.name} measurement failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def optimizer_moments(recipe: Recipe) -> float:
    """Optimizer state per trainable parameter in units of a weight's bytes: two moments for Adam/AdamW, one
    momentum for SGD; 8-bit AdamW's two moments are about half a float32 weight (`optimizers.moment_bytes`)."""
    return round(moment_bytes(recipe.train) / weight_bytes(recipe.train), 3)


def app_g_formula(target: BenchTarget, depth: int, p: int, a: int, moments: int) -> dict[str, Any]:
    """The paper's App. G estimate of a target's training memory, from P (parameter bytes per layer) and A
    (activation bytes per layer) measured on that network: standard (4P + A)·L, checkpointing 4P·L + A,
    a block (4P + A)·L/B, a block with checkpointing 4P·L/B + A. 4P = parameters, gradients and AdamW's two
    moments (3P with SGD's one); `depth` is L for the whole network and L/B for a block."""
    k = f"{2 + moments:g}"
    kk = 2 + moments
    n = "L" if target.e2e else "L/B"
    if target.checkpointing:
        return {"formula": f"{k}P·{n} + A", "bytes": int(kk * p * depth + a), "P": p, "A": a, "depth": depth}
    return {"formula": f"({k}P + A)·{n}", "bytes": int((kk * p + a) * depth), "P": p, "A": a, "depth": depth}


MEMORY_KEYS = (
    "peak_bytes",
    "parameters",
    "gradients",
    "optimizer_state",
    "ema",
    "resident_before_step",
    "step_peak",
    "saved_activations",
)


def left_to_measure(targets: list[BenchTarget], skip: tuple[str, ...]) -> list[BenchTarget]:
    """The targets `--skip` leaves; one line for a name that is not a target here, and for a selection that leaves
    nothing to measure (there would be no result, only an empty report)."""
    names = [t.name for t in targets]
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise DbconvertError(f"--skip {unknown[0]}: no such network here; choose from {', '.join(names)}")
    left = [t for t in targets if t.name not in skip]
    if not left:
        raise DbconvertError(
            f"--skip leaves nothing to measure: every network here is skipped ({', '.join(names)}); skip fewer"
        )
    return left


def bench_memory(
    recipe: Recipe,
    blocks: int,
    batch: int | None = None,
    device: str | None = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
    checkpointing: bool = True,
    every_block: bool = True,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Peak training-step memory of each block and of the e2e network; ratio = e2e / largest block.

    `skip`: target names not to measure (one that would not fit in this machine's memory); the
    ratios that need one of them are left out (None).

    With `checkpointing` (the default) also the deepest block and the e2e network with activation
    checkpointing, and for families with an autoregressive reference the same network as a plain
    causal LM without and with it (`bench_targets`); ratio lines e2e / block+ckpt and e2e+ckpt /
    block+ckpt, and each target's App. G formula (`app_g_formula`) evaluated with the P and A measured
    on its network (the checkpointed target: on its twin without checkpointing).

    `batch` defaults to the recipe's train.batch_size; `device` to its train.device. Each entry of
    `breakdown` has the measured peak, the exact tensor bytes of parameters, gradients (alive
    between backward and the optimizer step), optimizer state and EMA, and two MEASURED parts of the
    peak: `resident_before_step` (what is held between steps: parameters, optimizer state, EMA, data,
    allocator slack) and `step_peak` (the growth during the step: activations, gradients and
    temporaries alive at the step's worst moment), plus the exact bytes autograd saved for backward
    (`saved_activations`, alive together at the end of the forward, so a lower bound of `step_peak`).
    """
    recipe = bench_recipe(recipe)
    batch = recipe.train.batch_size if batch is None else batch
    _check_batch(batch)
    targets = bench_targets(recipe, blocks, checkpointing, every_block)
    measured = left_to_measure(targets, skip)
    dev = resolve_device(device or recipe.train.device)
    if dev.type not in ("cpu", "cuda"):
        raise DbconvertError(f"bench memory measures cpu or cuda, not {dev.type}; pass --device cpu")
    results: dict[str, dict[str, Any]] = {}
    for target in measured:
        if dev.type == "cuda":
            res = measure_cuda_step(recipe, target, batch, dev)
        else:
            res = _run_worker(recipe, target, batch)
        results[target.name] = res
        if on_result:
            on_result(target.name, res)
    block_peaks = [results[t.name]["peak_bytes"] for t in measured if not t.e2e and not t.checkpointing]
    e2e = results.get("e2e", {})
    moments = optimizer_moments(recipe)
    breakdown: dict[str, Any] = {}
    for t in measured:
        # P and A of this network without checkpointing; its twin skipped: those of another measured network of
        # the same objective (every layer is the same layer at the same batch, so P and A per layer are too)
        # (none measured: no A to evaluate the formula with, so `app_g` is None)
        same = [u.name for u in measured if not u.checkpointing and u.objective == t.objective]
        twin = results.get(t.name if not t.checkpointing else t.twin if t.twin in results else (same or [""])[0])
        row = {
            "layers": list(t.layers),
            "checkpointing": t.checkpointing,
            "objective": t.objective,
            **{k: results[t.name][k] for k in MEMORY_KEYS},
        }
        row["app_g"] = twin and app_g_formula(
            t, t.depth, twin["layer_parameter_bytes"], twin["layer_saved_activations"], moments
        )
        breakdown[t.name] = row
    out: dict[str, Any] = {
        "recipe": recipe.name,
        "device": str(dev),
        "method": next(iter(results.values()))["method"]
        + (" (fresh subprocess per measurement)" if dev.type == "cpu" else ""),
        "skipped": list(skip),
        "blocks": blocks,
        "layers": max(t.depth for t in targets),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "e2e_peak_bytes": e2e.get("peak_bytes"),
        "block_peak_bytes": block_peaks,
        "ratio": e2e["peak_bytes"] / max(block_peaks) if e2e and block_peaks else None,
        "breakdown": breakdown,
    }
    if checkpointing:
        out.update(checkpointing_ratios(targets, {name: row["peak_bytes"] for name, row in breakdown.items()}, "bytes"))
    return out


def checkpointing_ratios(targets: list[BenchTarget], value: dict[str, float], unit: str) -> dict[str, Any]:
    """The `checkpointing` entry of a result: the four (six with a plain reference) networks' values in `unit`
    (`bytes` or `seconds`) and the ratio lines against a block with checkpointing; a reference's keys are named
    by its kind (`ar`, `ar_ckpt`, `ar_over_block_ckpt`), and `reference` / `reference_title` say which it is."""
    block_ck = next(t.name for t in targets if t.checkpointing and not t.e2e)
    named = {"e2e": "e2e", "e2e_ckpt": "e2e" + CKPT, "block": block_ck.removesuffix(CKPT), "block_ckpt": block_ck}
    ref = next((t for t in targets if t.objective != "denoiser" and not t.checkpointing), None)
    extra: dict[str, Any] = {}
    if ref is not None:
        named.update({ref.name: ref.name, f"{ref.name}_ckpt": ref.name + CKPT})
        extra = {"reference": ref.name, "reference_title": ref.title}
    out: dict[str, Any] = {
        "unit": unit,
        "block_ckpt_target": block_ck,
        **extra,
        **{key: value.get(name) for key, name in named.items()},
    }
    for key in named:
        if key not in ("block", "block_ckpt"):
            ok = out[key] is not None and out["block_ckpt"] is not None
            out[f"{key}_over_block_ckpt"] = out[key] / out["block_ckpt"] if ok else None
    return {"checkpointing": out}


def bench_static(
    recipe: Recipe, blocks: int, checkpointing: bool = True, every_block: bool = True, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Exact bytes of parameters, gradients, optimizer state and EMA of each block and of e2e, built on the
    meta device: no memory is allocated, so any size works (activations are not included).

    `skip`: target names not to build (as `bench_memory`'s); the ratios that need one of them are None.

    Optimizer state is what the recipe's optimizer keeps per trainable parameter once it has stepped:
    two moments for Adam/AdamW, one momentum buffer for SGD. The checkpointed targets hold the same
    tensors as their twins (checkpointing changes activations only); a causal LM's count includes
    parameters its objective leaves without gradients (nothing steps on the meta device to tell).
    """
    recipe = bench_recipe(recipe)
    per_param = optimizer_moments(recipe)
    out: dict[str, Any] = {"recipe": recipe.name, "blocks": blocks, "device": "meta (static)", "breakdown": {}}
    targets = bench_targets(recipe, blocks, checkpointing, every_block)
    unknown = sorted(set(skip) - {t.name for t in targets})
    if unknown:
        raise DbconvertError(
            f"--skip {unknown[0]}: no such network here; choose from {', '.join(t.name for t in targets)}"
        )
    out["skipped"] = list(skip)
    for target in left_to_measure(targets, skip):  # nothing left is one line, as for the measured figures
        with torch.device("meta"):
            trainer = Trainer(recipe, target, torch.device("meta"))
        parts = trainer.breakdown()
        layer = parts.pop("layer_parameter_bytes")
        sizes = [p.numel() for p in trainer.state.trainable]
        parts["optimizer_state"] = int(optimizer_state_bytes(recipe.train, sizes))  # once it has stepped
        parts["total_bytes"] = sum(parts.values())
        out["breakdown"][target.name] = {
            "layers": list(target.layers),
            "checkpointing": target.checkpointing,
            "objective": target.objective,
            **parts,
            "app_g_static": {
                "formula": f"{2 + per_param:g}P·{'L' if target.e2e else 'L/B'}",
                "bytes": int((2 + per_param) * layer * target.depth),
                "P": layer,
            },
        }
    rows = out["breakdown"]
    out["e2e_static_bytes"] = rows["e2e"]["total_bytes"] if "e2e" in rows else None
    out["block_static_bytes"] = [
        rows[t.name]["total_bytes"] for t in targets if not t.e2e and not t.checkpointing and t.name in rows
    ]
    both = out["e2e_static_bytes"] is not None and out["block_static_bytes"]
    out["ratio"] = out["e2e_static_bytes"] / max(out["block_static_bytes"]) if both else None
    if checkpointing:
        out.update(checkpointing_ratios(targets, {n: r["total_bytes"] for n, r in rows.items()}, "bytes"))
    return out


# --- speed ---------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn` takes on `device` (CUDA synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_speed(
    recipe: Recipe,
    blocks: int,
    batch: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    sampling_only: bool = False,
    checkpointing: bool = True,
    every_block: bool = True,
    skip: tuple[str, ...] = (),
    decoding: bool = True,
    decode_tokens: int | None = None,
) -> dict[str, Any]:
    """Median seconds per sampling step and per training step, each block vs the e2e network.

    With `decoding`, for families that decode token by token (`Family.decoding_rates`): whole decodes of
    `decode_tokens` new tokens per row, blocks at the few-step protocol against the same network's AR decoding.

    `skip`: target names not to build or time (one that would not fit in memory); their times and the
    ratios that need them are NaN, as for `sampling_only`.

    `sampling_only` skips the training steps (their timings and ratio are NaN): for shapes whose
    training step is too slow to time on this device. With `checkpointing` (default) the training
    steps of the checkpointed targets of `bench_targets` (and a family's causal LM) are timed too
    (their sampling step is their twin's: checkpointing changes training only), with ratio lines
    against a block with checkpointing and `block_ckpt_over_block_train` (the recompute's cost).

    `batch` (default: the recipe's sample.num) is the batch of both steps; a sampling step
    doubles it internally when the recipe uses classifier-free guidance, as `sample` does.
    Repetitions go round-robin over the targets, so a change in machine load hits all of
    them alike. Ratios are e2e / slowest block.
    """
    recipe = bench_recipe(recipe)
    batch = recipe.sample.num if batch is None else batch
    _check_batch(batch)
    if repeats < 1 or warmup < 0:
        raise DbconvertError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    targets = bench_targets(recipe, blocks, checkpointing and not sampling_only, every_block)
    dev = resolve_device(device or recipe.train.device)
    family = get_family(recipe.model.family).for_bench(recipe)
    gen = torch.Generator().manual_seed(recipe.train.seed)
    data = [t.to(dev) for t in family.synthetic_batch(recipe, batch, gen)]
    left = left_to_measure(targets, skip)
    # whole decodes first: a bad --decode-tokens is reported before any step is timed
    if decode_tokens is not None and not decoding:
        raise DbconvertError("--decode-tokens sets the decoding rows, which --no-decoding leaves out; drop one of them")
    decode = (
        family.decoding_rates(recipe, blocks, batch, dev, repeats, warmup, decode_tokens, on_progress)
        if decoding
        else None
    )
    if decode is None and decode_tokens is not None:  # the family has no unit-by-unit decoding for this recipe
        raise DbconvertError(
            f"--decode-tokens does not apply to {recipe.name} (its runs do not decode token by "
            "token, so there are no decoding rows to time); drop it"
        )
    trainers = [Trainer(recipe, t, dev) for t in left]
    plain = [tr for tr in trainers if not tr.target.checkpointing and tr.target.objective == "denoiser"]
    samplers = {tr.target.name: tr.sampling_step(data) for tr in plain}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    timings: dict[str, dict[str, list[float]]] = {t.name: {"sample": [], "train": []} for t in targets}
    for kind in ("sample",) if sampling_only else ("sample", "train"):
        for rep in range(warmup + repeats):
            for trainer in plain if kind == "sample" else trainers:
                if on_progress:
                    on_progress(
                        f"{kind} step, {'warm-up' if rep < warmup else 'repetition'} {rep + 1}, {trainer.target.name}"
                    )
                fn = (
                    samplers[trainer.target.name]
                    if kind == "sample"
                    else (lambda tr=trainer, r=rep: tr.step(data, seed=r))
                )
                seconds = timed(fn, dev)
                if rep >= warmup:
                    timings[trainer.target.name][kind].append(seconds)
    nan = float("nan")  # --sampling-only: no training step was timed
    med = {name: {k: statistics.median(v) if v else nan for k, v in kinds.items()} for name, kinds in timings.items()}
    block_names = [t.name for t in targets if not t.e2e and not t.checkpointing]
    extra: dict[str, Any] = {}
    if checkpointing and not sampling_only:
        extra = checkpointing_ratios(targets, {n: m["train"] for n, m in med.items()}, "seconds")
        ck = extra["checkpointing"]
        ck["block_ckpt_over_block"] = ck["block_ckpt"] / ck["block"]
    return {
        "recipe": recipe.name,
        "device": str(dev),
        "blocks": blocks,
        "layers": max(t.depth for t in targets),
        "batch": batch,
        "guidance": recipe.sample.guidance,
        "repeats": repeats,
        "warmup": warmup,
        "skipped": list(skip),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "e2e_sample_step_s": med["e2e"]["sample"],
        "block_sample_step_s": [med[n]["sample"] for n in block_names],
        "e2e_train_step_s": med["e2e"]["train"],
        "block_train_step_s": [med[n]["train"] for n in block_names],
        "sample_step_ratio": med["e2e"]["sample"] / max(med[n]["sample"] for n in block_names),
        "train_step_ratio": nan if sampling_only else med["e2e"]["train"] / max(med[n]["train"] for n in block_names),
        **generation_rates(
            with_blocks(recipe, blocks), targets, med, batch, family.generated_unit, family.protocol_units
        ),
        **extra,
        "decoding": decode,
        "raw_seconds": timings,
    }


def generation_rates(
    recipe: Recipe,
    targets: list[BenchTarget],
    med: dict[str, dict[str, float]],
    batch: int,
    unit: str,
    protocol_units: int,
) -> dict[str, Any]:
    """Generated units (images, or tokens for text) per second with `sample.steps` steps each, and the hours
    the paper's evaluation protocol (`protocol_units` of them) takes at those rates.

    Blocks: each step runs the block owning its sigma (the EDM schedule decides how many steps each block
    gets); e2e: every step runs all layers. Model loading and, for text, extending the prompt cache by
    one token per unit are not included: this is the cost of the denoising steps. When only the deepest
    block was timed (`every_block=False`), its time stands for every block's step.
    """
    from dbconvert.noise_process import owner_of
    from dbconvert.split import plan_blocks

    steps = recipe.sample.steps
    e2e = next(t for t in targets if t.name == "e2e")
    _, plans = plan_blocks(recipe, e2e.depth)
    owned = [tuple(p["owned_range"]) for p in plans]
    timed = [t.name for t in targets if not t.e2e and not t.checkpointing]
    names = timed if len(timed) == len(plans) else timed[:1] * len(plans)
    ts = recipe.noise.settings().schedule(steps, recipe.sample.rho)
    per_unit = sum(med[names[owner_of(t, owned)]]["sample"] for t in ts[:-1])
    rates = {"block_units_per_s": batch / per_unit, "e2e_units_per_s": batch / (steps * med["e2e"]["sample"])}
    return {
        "unit": unit,
        "sample_steps": steps,
        **rates,
        "protocol_units": protocol_units,
        "block_protocol_hours": protocol_units / rates["block_units_per_s"] / 3600,
        "e2e_protocol_hours": protocol_units / rates["e2e_units_per_s"] / 3600,
    }


# --- tables (the CLI prints these) ---------------------------------------------------------


def _mib(n: float) -> str:
    mib = n / 2**20
    return f"{mib:,.1f}" if abs(mib) < 100 else f"{mib:,.0f}"


def _ratio_lines(r: dict[str, Any], name: str) -> list[str]:
    """The `e2e / block+ckpt` lines of a result's `checkpointing` entry (none without one)."""
    if "checkpointing" not in r:
        return []
    c = r["checkpointing"]
    ck = c["block_ckpt_target"]
    x = lambda key: "not measured" if c[key] is None or c[key] != c[key] else f"{c[key]:.2f}x"  # noqa: E731
    out = [f"{name} e2e / {ck}: {x('e2e_over_block_ckpt')}, e2e+ckpt / {ck}: {x('e2e_ckpt_over_block_ckpt')}"]
    ref = c.get("reference")
    if ref:
        out.append(
            f"{name} the same network as a {c['reference_title']} ({ref}) / {ck}: {x(f'{ref}_over_block_ckpt')}, "
            f"{ref}+ckpt / {ck}: {x(f'{ref}_ckpt_over_block_ckpt')}"
        )
    return out


def memory_report(r: dict[str, Any]) -> list[Any]:
    """The `bench memory` table and its lines (rich renderables) of a `bench_memory` result."""
    from rich.table import Table

    table = Table(
        title=f"peak training-step memory, MiB ({r['recipe']}, {r['layers']} layers, "
        f"B={r['blocks']}, batch {r['batch']}, {r['device']})"
    )
    heads = ("peak", "params", "grads", "optim", "EMA", "held", "step", "saved")
    table.add_column("network")
    table.add_column("layers", justify="right")
    for head in heads:
        table.add_column(head, justify="right")
    table.add_column("App. G", justify="right")
    for name, row in r["breakdown"].items():
        table.add_row(
            name,
            f"{row['layers'][0]}-{row['layers'][1]}",
            *(_mib(row[c]) for c in MEMORY_KEYS),
            _mib(row["app_g"]["bytes"]) if row["app_g"] else "-",
        )
    ratio = "not measured" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    lines: list[Any] = [table, f"ratio e2e / largest block: {ratio}", *_ratio_lines(r, "ratio")]
    if r["skipped"]:
        lines.append(f"not measured (--skip): {', '.join(r['skipped'])}")
    lines.append(
        f"method: {r['method']}. layers: source layers [start, end). params, grads, optim (optimizer "
        "state) and EMA are exact tensor bytes; held = measured memory held between steps; step = measured "
        "growth during the step (activations, gradients, temporaries at its worst moment), peak = held + "
        "step; saved = bytes autograd kept for backward, exact (a lower bound of step)."
    )
    formulas = ", ".join(
        f"{name} {row['app_g']['formula']} (P {_mib(row['app_g']['P'])}, A {_mib(row['app_g']['A'])})"
        for name, row in r["breakdown"].items()
        if row["app_g"] and (name == "e2e" or row["objective"] != "denoiser" or CKPT in name)
    )
    lines.append(
        f"App. G: the paper's estimate from P = trainable bytes of one layer and A = bytes one layer saves "
        f"for backward (MiB), both measured on that network (a +ckpt row: on its twin without): {formulas}. "
        "It leaves out the EMA and everything outside the layers (embedding, head, loss, allocator), which "
        "is where a measured peak parts from it."
    )
    if "checkpointing" in r:
        reference = r["checkpointing"].get("reference")
        lines.append(
            "+ckpt: train.activation_checkpointing=true (every layer recomputed in backward)"
            + (
                f"; {reference}: the same layers trained as a {r['checkpointing'].get('reference_title')} "
                "(its own loss, the recipe's optimizer)"
                if reference
                else ""
            )
        )
    return lines


def table_unit(largest: float) -> tuple[str, float]:
    """(unit, bytes per unit) in which a table's largest figure reads with two decimals: GiB from 1 GiB, else MiB,
    else KiB, so a CPU recipe's rows are not all 0.00 GiB."""
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20)):
        if largest >= scale:
            return unit, scale
    return "KiB", 2.0**10


def static_report(r: dict[str, Any]) -> list[Any]:
    """The `bench memory --static` table and its lines."""
    from rich.table import Table

    unit, scale = table_unit(max((row["total_bytes"] for row in r["breakdown"].values()), default=0))
    table = Table(title=f"static training memory, {unit} ({r['recipe']}, B={r['blocks']}, meta device)")
    for col in ("network", "layers", "params", "grads", "optim", "EMA", "total", "App. G (no A)"):
        table.add_column(col, justify="left" if col == "network" else "right")
    gib = lambda b: f"{b / scale:.2f}"  # noqa: E731
    for name, row in r["breakdown"].items():
        g = row["app_g_static"]
        table.add_row(
            name,
            f"{row['layers'][0]}-{row['layers'][1]}",
            gib(row["parameters"]),
            gib(row["gradients"]),
            gib(row["optimizer_state"]),
            gib(row["ema"]),
            gib(row["total_bytes"]),
            f"{gib(g['bytes'])} = {g['formula']}",
        )
    ratio = "not measured" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    lines: list[Any] = [
        table,
        f"ratio e2e / largest block (static part only): {ratio}",
        *_ratio_lines(r, "static ratio"),
    ]
    if "checkpointing" in r:
        lines.append(
            "a +ckpt network holds the same tensors as its twin: checkpointing changes activations only, which "
            "the static part leaves out; a reference row counts every trainable parameter, also those the "
            "reference never uses (measured, they get no gradient or optimizer state)"
        )
    return lines


def speed_report(r: dict[str, Any]) -> list[Any]:
    """The `bench speed` table and its lines."""
    from rich.table import Table

    table = Table(
        title=f"median seconds per step ({r['recipe']}, {r['layers']} layers, B={r['blocks']}, "
        f"batch {r['batch']}, {r['device']}, {r['threads']} threads)"
    )
    for col in ("network", "sampling step", "training step"):
        table.add_column(col, justify="left" if col == "network" else "right")
    fmt = lambda x: "" if x != x else f"{x:.4f}"  # noqa: E731  (NaN: not timed)
    for name, kinds in r["raw_seconds"].items():
        table.add_row(name, *(fmt(statistics.median(kinds[k])) if kinds[k] else "-" for k in ("sample", "train")))
    lines: list[Any] = [
        table,
        f"e2e / slowest block: sampling step {r['sample_step_ratio']:.2f}x, training step "
        f"{r['train_step_ratio']:.2f}x  (median of {r['repeats']} after {r['warmup']} warm-up; batch "
        f"{r['batch']}, guidance {r['guidance']:g})",
        *_ratio_lines(r, "training step"),
    ]
    if "checkpointing" in r:
        c = r["checkpointing"]
        lines.append(
            f"recompute cost: {c['block_ckpt_target']} / {c['block_ckpt_target'].removesuffix(CKPT)} training step "
            f"{c['block_ckpt_over_block']:.2f}x (a +ckpt network samples as its twin: not timed)"
        )
    unit = r["unit"]
    lines.append(
        f"generation with {r['sample_steps']} steps per {unit}: blocks {r['block_units_per_s']:.1f} {unit}s/s, "
        f"e2e {r['e2e_units_per_s']:.1f} {unit}s/s (denoising steps only)"
    )
    lines.append(
        f"the paper's evaluation protocol ({r['protocol_units']:,} {unit}s) at these rates and this batch: "
        f"blocks {r['block_protocol_hours']:.1f} h, e2e {r['e2e_protocol_hours']:.1f} h on {r['device']}"
    )
    if r.get("decoding"):
        lines += decoding_report(r["decoding"], r["device"])
    return lines


def decoding_report(d: dict[str, Any], device: str) -> list[Any]:
    """The decoding table of `bench speed` (families with `decoding_rates`)."""
    from rich.table import Table

    table = Table(
        title=f"decoding, tokens/s (batch {d['batch']}, {d['prompt_tokens']}-token prompts, "
        f"{d['new_tokens']} new tokens each, KV cache, {device})"
    )
    for col in ("decoder", "tokens/s", "x AR"):
        table.add_column(col, justify="left" if col == "decoder" else "right")
    ar = d["tokens_per_s"][d["reference"]]
    for name, rate in d["tokens_per_s"].items():
        table.add_row(name, f"{rate:,.1f}", f"{rate / ar:.2f}")
    return [
        table,
        f"blocks: the {d['protocol']} protocol ({d['steps']} steps per token, one per block, greedy last step); "
        f"ar: greedy decoding of the same {d['layers']} layers. Fused, a block enters the new clean token in the "
        "same forward as its next noisy query (one forward per block and token, as AR runs each layer once); "
        "separate extend: one more forward per block and token. Left over AR: a head over the vocabulary in "
        f"every block (B per token instead of 1). blocks / AR: {d['blocks_over_ar']:.2f}x (goal >= 0.9x), "
        f"separate extend / AR: {d['unfused_over_ar']:.2f}x; median of the repetitions, prefill included.",
    ]


# --- worker entry point --------------------------------------------------------------------


def _worker() -> None:
    """`python -m dbconvert.bench`: read {recipe, target, batch} as JSON on stdin, print one JSON line."""
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])  # the same setting as the process that asked
    recipe = validate_recipe(spec["recipe"], "bench worker")
    t = spec["target"]
    target = BenchTarget(**{**t, "layers": tuple(t["layers"]), "level_range": tuple(t["level_range"])})
    print(json.dumps(measure_cpu_step(recipe, target, int(spec["batch"]))), flush=True)


if __name__ == "__main__":
    _worker()
