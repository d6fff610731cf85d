"""`dbconvert bench`: measure the two claims the tool exists for (DESIGN 8).

Memory: the peak memory of one full training step (forward, backward, optimizer step with
the recipe's optimizer, EMA update) of each block alone and of the whole network end to
end, at the same batch and data shape. Speed: seconds per sampling step and per training
step, blocks vs the whole network.

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
    sigma_range: tuple[float, float]
    e2e: bool


# --- targets and inputs --------------------------------------------------------------------


def with_blocks(recipe: Recipe, blocks: int) -> Recipe:
    """The recipe with B blocks (validated here so the error names --blocks)."""
    if blocks < 1:
        raise DbconvertError(f"--blocks must be at least 1, got {blocks}")
    return validate_recipe(apply_overrides(recipe.to_dict(), [f"blocks.num={blocks}"]), "recipe")


def bench_targets(recipe: Recipe, blocks: int) -> list[BenchTarget]:
    """Every block of a B-way split (same layers and ranges as `split`), then the e2e network."""
    from dbconvert.split import plan_blocks, source_depth

    recipe = with_blocks(recipe, blocks)
    total = source_depth(recipe)
    _, plans = plan_blocks(recipe, total)
    out = [
        BenchTarget(f"block-{p['index']}", p["layers"][1] - p["layers"][0], tuple(p["layers"]), tuple(p["train_range"]), False)
        for p in plans
    ]
    out.append(BenchTarget("e2e", total, (0, total), recipe.noise.settings().full_range(), True))
    return out


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise DbconvertError(f"--batch must be at least 1, got {batch}")


# --- one training process, as train.py runs it ---------------------------------------------


class Trainer:
    """The training state of one target, stepping exactly like `train.train` (through `trainstep`)."""

    def __init__(self, recipe: Recipe, target: BenchTarget, device: torch.device) -> None:
        self.recipe, self.target, self.device = recipe, target, device
        self.family = get_family(recipe.model.family).for_bench(recipe)
        torch.manual_seed(recipe.train.seed)
        self.state = build_state(self.family, recipe, target.depth, recipe.noise.settings(), device)
        self.network = self.state.network

    def step(self, batch: list[torch.Tensor], seed: int = 0) -> None:
        """One training step: forward, backward, optimizer step, EMA update (the order of train.py)."""
        self.state.step(batch, self.target.sigma_range, torch.Generator().manual_seed(seed))

    def sampling_step(self, batch: list[torch.Tensor]) -> Callable[[], Any]:
        """One sampling step's network evaluation at the middle of the target's range (on the process's axis)."""
        self.state.model.eval()
        process = self.recipe.noise.settings()
        middle = process.level_at(sum(float(process.coordinate(v)) for v in self.target.sigma_range) / 2)
        with torch.no_grad():
            fn = self.family.sampling_step(self.recipe, self.state.model, batch, middle)

        def run() -> Any:
            with torch.no_grad():
                return fn()

        return run

    def breakdown(self) -> dict[str, int]:
        """Exact bytes of parameters (and buffers), gradients, optimizer state and EMA weights.

        Gradients are freed after each optimizer step, but all of them are alive between the
        backward pass and the step, so they count at the size of the trainable parameters.
        """
        s = self.state
        params = sum(_nbytes(t) for t in s.network.parameters()) + sum(_nbytes(t) for t in s.network.buffers())
        grads = sum(_nbytes(p) for p in s.trainable)
        optim = sum(_nbytes(v) for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
        # the EMA copy of a frozen parameter is that parameter (trainstep.share_frozen): not counted twice
        ema = sum(_nbytes(e) for e, p in zip(s.ema.parameters(), s.network.parameters()) if p.requires_grad)
        ema += sum(_nbytes(t) for t in s.ema.buffers())
        return {"parameters": params, "gradients": grads, "optimizer_state": optim, "ema": ema}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded.

    They are all alive together at the end of the forward pass, so this is the exact
    saved-activation share of a peak; the rest of `activations` is temporaries (activation
    gradients, attention workspaces) and allocator overhead.
    """

    def __init__(self, network: nn.Module) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in network.parameters()}
        self.exclude |= {b.untyped_storage().data_ptr() for b in network.buffers()}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


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
    scratch = Trainer(recipe, BenchTarget("warmup", 1, (0, 1), target.sigma_range, False), device)
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
    with SavedActivations(trainer.network) as saved:
        trainer.step(data, seed=1)
    peak = _status_kb("VmHWM") * 1024 if use_proc else _maxrss_bytes()  # type: ignore[operator]
    method = ("peak RSS (VmHWM after /proc/self/clear_refs) minus VmRSS before building the network"
              if use_proc else "ru_maxrss after the step minus ru_maxrss before building the network")
    return {"peak_bytes": peak - baseline, "baseline_bytes": baseline, "method": method, **trainer.breakdown(),
            "resident_before_step": before - baseline, "step_peak": peak - before, "saved_activations": saved.nbytes}


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
    with SavedActivations(trainer.network) as saved:
        trainer.step(data, seed=1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    out = {"peak_bytes": int(peak), "baseline_bytes": int(baseline),
           "method": "CUDA allocator peak (max_memory_allocated) minus memory allocated before building the network",
           **trainer.breakdown(), "resident_before_step": int(before - baseline),
           "step_peak": int(peak + baseline - before), "saved_activations": saved.nbytes}
    del trainer, data
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _run_worker(recipe: Recipe, target: BenchTarget, batch: int) -> dict[str, Any]:
    """Measure one target in a fresh interpreter, so no earlier allocation shapes its peak."""
    spec = json.dumps({"recipe": recipe.to_dict(), "target": asdict(target), "batch": batch,
                       "threads": torch.get_num_threads()})
    env = {**os.environ, **WORKER_ENV}
    proc = subprocess.run([sys.executable, "-m", "dbconvert.bench"], input=spec, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137):
            raise DbconvertError(f"the {target.name} measurement was killed (out of memory?); lower --batch")
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DbconvertError(f"the {target.name} measurement failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(
    recipe: Recipe,
    blocks: int,
    batch: int | None = None,
    device: str | None = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Peak training-step memory of each block and of the e2e network; ratio = e2e / largest block.

    `batch` defaults to the recipe's train.batch_size; `device` to its train.device. Each entry of
    `breakdown` has the measured peak, the exact tensor bytes of parameters, gradients (alive
    between backward and the optimizer step), optimizer state and EMA, and two MEASURED parts of the
    peak: `resident_before_step` (what is held between steps: parameters, optimizer state, EMA, data,
    allocator slack) and `step_peak` (the growth during the step: activations, gradients and
    temporaries alive at the step's worst moment), plus the exact bytes autograd saved for backward
    (`saved_activations`, alive together at the end of the forward, so a lower bound of `step_peak`).
    """
    batch = recipe.train.batch_size if batch is None else batch
    _check_batch(batch)
    targets = bench_targets(recipe, blocks)
    dev = resolve_device(device or recipe.train.device)
    if dev.type not in ("cpu", "cuda"):
        raise DbconvertError(f"bench memory measures cpu or cuda, not {dev.type}; pass --device cpu")
    results: dict[str, dict[str, Any]] = {}
    for target in targets:
        if dev.type == "cuda":
            res = measure_cuda_step(recipe, target, batch, dev)
        else:
            res = _run_worker(recipe, target, batch)
        results[target.name] = res
        if on_result:
            on_result(target.name, res)
    block_peaks = [results[t.name]["peak_bytes"] for t in targets if not t.e2e]
    e2e = results["e2e"]
    keys = ("peak_bytes", "parameters", "gradients", "optimizer_state", "ema", "resident_before_step", "step_peak",
            "saved_activations")
    return {
        "recipe": recipe.name,
        "device": str(dev),
        "method": e2e["method"] + (" (fresh subprocess per measurement)" if dev.type == "cpu" else ""),
        "blocks": blocks,
        "layers": targets[-1].depth,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "e2e_peak_bytes": e2e["peak_bytes"],
        "block_peak_bytes": block_peaks,
        "ratio": e2e["peak_bytes"] / max(block_peaks),
        "breakdown": {
            t.name: {"layers": list(t.layers), **{k: results[t.name][k] for k in keys}} for t in targets
        },
    }


def bench_static(recipe: Recipe, blocks: int) -> dict[str, Any]:
    """Exact bytes of parameters, gradients, optimizer state and EMA of each block and of e2e, built on the
    meta device: no memory is allocated, so any size works (activations are not included).

    Optimizer state is what the recipe's optimizer keeps per trainable parameter once it has stepped:
    two moments for Adam/AdamW, one momentum buffer for SGD.
    """
    per_param = {"adamw": 2, "adam": 2, "sgd": 1}[recipe.train.optimizer]
    out: dict[str, Any] = {"recipe": recipe.name, "blocks": blocks, "device": "meta (static)", "breakdown": {}}
    for target in bench_targets(recipe, blocks):
        with torch.device("meta"):
            trainer = Trainer(recipe, target, torch.device("meta"))
        parts = trainer.breakdown()
        parts["optimizer_state"] = per_param * parts["gradients"]
        parts["total_bytes"] = sum(parts.values())
        out["breakdown"][target.name] = {"layers": list(target.layers), **parts}
    rows = out["breakdown"]
    out["e2e_static_bytes"] = rows["e2e"]["total_bytes"]
    out["block_static_bytes"] = [r["total_bytes"] for name, r in rows.items() if name != "e2e"]
    out["ratio"] = out["e2e_static_bytes"] / max(out["block_static_bytes"])
    return out


# --- speed ---------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
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
) -> dict[str, Any]:
    """Median seconds per sampling step and per training step, each block vs the e2e network.

    `sampling_only` skips the training steps (their timings and ratio are NaN): for shapes whose
    training step is too slow to time on this device.

    `batch` (default: the recipe's sample.num) is the batch of both steps; a sampling step
    doubles it internally when the recipe uses classifier-free guidance, as `sample` does.
    Repetitions go round-robin over the targets, so a change in machine load hits all of
    them alike. Ratios are e2e / slowest block.
    """
    batch = recipe.sample.num if batch is None else batch
    _check_batch(batch)
    if repeats < 1 or warmup < 0:
        raise DbconvertError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    targets = bench_targets(recipe, blocks)
    dev = resolve_device(device or recipe.train.device)
    family = get_family(recipe.model.family).for_bench(recipe)
    gen = torch.Generator().manual_seed(recipe.train.seed)
    data = [t.to(dev) for t in family.synthetic_batch(recipe, batch, gen)]
    trainers = [Trainer(recipe, t, dev) for t in targets]
    samplers = {tr.target.name: tr.sampling_step(data) for tr in trainers}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    timings: dict[str, dict[str, list[float]]] = {t.name: {"sample": [], "train": []} for t in targets}
    for kind in ("sample",) if sampling_only else ("sample", "train"):
        for rep in range(warmup + repeats):
            for trainer in trainers:
                if on_progress:
                    on_progress(f"{kind} step, {'warm-up' if rep < warmup else 'repetition'} {rep + 1}, {trainer.target.name}")
                fn = samplers[trainer.target.name] if kind == "sample" else (
                    lambda tr=trainer, r=rep: tr.step(data, seed=r))
                seconds = _timed(fn, dev)
                if rep >= warmup:
                    timings[trainer.target.name][kind].append(seconds)
    nan = float("nan")  # --sampling-only: no training step was timed
    med = {name: {k: statistics.median(v) if v else nan for k, v in kinds.items()} for name, kinds in timings.items()}
    block_names = [t.name for t in targets if not t.e2e]
    return {
        "recipe": recipe.name,
        "device": str(dev),
        "blocks": blocks,
        "layers": targets[-1].depth,
        "batch": batch,
        "guidance": recipe.sample.guidance,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "e2e_sample_step_s": med["e2e"]["sample"],
        "block_sample_step_s": [med[n]["sample"] for n in block_names],
        "e2e_train_step_s": med["e2e"]["train"],
        "block_train_step_s": [med[n]["train"] for n in block_names],
        "sample_step_ratio": med["e2e"]["sample"] / max(med[n]["sample"] for n in block_names),
        "train_step_ratio": nan if sampling_only else med["e2e"]["train"] / max(med[n]["train"] for n in block_names),
        **generation_rates(with_blocks(recipe, blocks), targets, med, batch, family.generated_unit,
                           family.protocol_units),
        "raw_seconds": timings,
    }


def generation_rates(recipe: Recipe, targets: list[BenchTarget], med: dict[str, dict[str, float]], batch: int,
                     unit: str, protocol_units: int) -> dict[str, Any]:
    """Generated units (images, or tokens for text) per second with `sample.steps` steps each, and the hours
    the paper's evaluation protocol (`protocol_units` of them) takes at those rates.

    Blocks: each step runs the block owning its sigma (the EDM schedule decides how many steps each block
    gets); e2e: every step runs all layers. Model loading and, for text, extending the prompt cache by
    one token per unit are not included: this is the cost of the denoising steps.
    """
    from dbconvert.noise_process import owner_of
    from dbconvert.split import plan_blocks

    steps = recipe.sample.steps
    _, plans = plan_blocks(recipe, targets[-1].depth)
    owned = [tuple(p["owned_range"]) for p in plans]
    ts = recipe.noise.settings().schedule(steps, recipe.sample.rho)
    per_unit = sum(med[targets[owner_of(t, owned)].name]["sample"] for t in ts[:-1])
    rates = {"block_units_per_s": batch / per_unit, "e2e_units_per_s": batch / (steps * med["e2e"]["sample"])}
    return {"unit": unit, "sample_steps": steps, **rates, "protocol_units": protocol_units,
            "block_protocol_hours": protocol_units / rates["block_units_per_s"] / 3600,
            "e2e_protocol_hours": protocol_units / rates["e2e_units_per_s"] / 3600}


# --- worker entry point --------------------------------------------------------------------


def _worker() -> None:
    """`python -m dbconvert.bench`: read {recipe, target, batch} as JSON on stdin, print one JSON line."""
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])  # the same setting as the process that asked
    recipe = validate_recipe(spec["recipe"], "bench worker")
    t = spec["target"]
    target = BenchTarget(t["name"], t["depth"], tuple(t["layers"]), tuple(t["sigma_range"]), t["e2e"])
    print(json.dumps(measure_cpu_step(recipe, target, int(spec["batch"]))), flush=True)


if __name__ == "__main__":
    _worker()
