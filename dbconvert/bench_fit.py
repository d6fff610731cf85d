"""`bench memory --options` and `bench memory --fit SIZE`: what each memory option costs a block, and which B fits.

The static part (weights, gradients, optimizer state, EMA) is exact: element counts of the family's own networks
built on the meta device, times the bytes a parameter each option keeps (`optimizers.bytes_per_parameter`).
The activations are measured, not modelled: one layer of the recipe's widths is run forward on the CPU at batch 1
and a small context (its parameters uninitialised fresh pages, untouched: no memory for an 8B model's layer),
counting the bytes autograd saves for backward (`bench.SavedActivations`: inside the layer, outside it, and the
layer's output, which is all a checkpointed layer keeps). At batch 1 and 2 and two contexts: the part a row adds
and the part rows share (a T x T attention mask) are each fitted as a T + b T^2 (the T^2 term: masks, or the
attention weights of a kernel that saves them) and scaled to the asked batch and context. An image family has no
context: two batch sizes give the bytes an example and the shared part. Docs: docs/memory.md, "Does it fit".
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dbconvert.bench import SavedActivations, bench_recipe, with_blocks
from dbconvert.building import empty_parameters
from dbconvert.config import Recipe, apply_overrides, validate_recipe
from dbconvert.errors import DbconvertError, RecipeError
from dbconvert.families import get_family
from dbconvert.optimizers import bytes_per_parameter, describe, optimizer_state_bytes
from dbconvert.split import layer_ranges, source_depth
from dbconvert.trainstep import checkpoint_layers, precision_context

OPTION_SETS: dict[str, list[str]] = {
    "recipe": [],
    "ema-cpu": ["train.ema=cpu"],
    "bf16-true": ["train.precision=bf16-true", "train.ema=cpu"],
    "bf16-true+8bit": ["train.precision=bf16-true", "train.optimizer=adamw8bit", "train.ema=cpu"],
    "lean": [
        "train.precision=bf16-true",
        "train.optimizer=adamw8bit",
        "train.ema=off",
        "train.optimizer_in_backward=true",
        "train.grad_clip=null",
        "train.grad_accumulation=1",
    ],
}
"""The ladder `--options` and `--fit` walk, each adding levers to the one before (the recipe's own settings
first). `lean` holds the least: bf16 weights, 8-bit moments, no EMA, one gradient at a time (so no clipping by
the global norm and no accumulation, as torchtune's optimizer_in_bwd)."""

SMALL_CONTEXTS = (32, 64)
"""The two contexts one layer's activations are measured at (a context at or below the first is measured as is)."""

HEADROOM = 0.10
"""The share of the budget left for what the estimate leaves out (temporaries, allocator slack, CUDA context)."""

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|TiB|TB|G|M|T)?\s*$", re.IGNORECASE)
_UNITS = {
    "gib": 2**30,
    "g": 2**30,
    "gb": 10**9,
    "mib": 2**20,
    "m": 2**20,
    "mb": 10**6,
    "tib": 2**40,
    "t": 2**40,
    "tb": 10**12,
}


def parse_size(text: str) -> int:
    """'24GiB' / '24G' (binary) or '24GB' (decimal) -> bytes; a one-line error otherwise."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise DbconvertError(f"--fit {text!r}: give a memory size such as 24GiB, 80GB or 40G (G = GiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "G").lower()])


def option_recipe(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with one option set's overrides (validated: a combination the schema refuses is one line)."""
    return validate_recipe(apply_overrides(recipe.to_dict(), overrides), "recipe") if overrides else recipe


# --- static tensors, exact -------------------------------------------------------------------------------------


def bench_family(recipe: Recipe) -> Any:
    """The recipe's family for benchmarks (its stand-ins for run artefacts, e.g. a text family's target table, are
    drawn once: build it once per report)."""
    return get_family(recipe.model.family).for_bench(recipe)


def element_counts(recipe: Recipe, depth: int, family: Any = None) -> dict[str, Any]:
    """Elements of a network of `depth` layers wrapped as its denoiser (a wrapper may add frozen tensors, e.g. a
    text family's target embedding), built on the meta device: trainable, frozen, the largest trainable parameter,
    and buffer bytes (buffers are not trained and keep their dtype)."""
    family = family or bench_family(recipe)
    net, _ = meta_denoiser(family, recipe, depth)
    # the EMA copy is built from block_network alone: its buffers, not those the denoiser adds
    own_buffers = sum(b.numel() * b.element_size() for b in meta_network(family, recipe, depth).buffers())
    trainable = [p.numel() for p in net.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    return {
        "trainable": sum(trainable),
        "frozen": frozen,
        "largest": max(trainable, default=0),
        "buffer_bytes": buffers,
        "ema_buffer_bytes": own_buffers,
        "sizes": trainable,
    }


def static_bytes(recipe: Recipe, counts: dict[str, Any]) -> dict[str, float]:
    """Bytes of parameters, gradients, optimizer state and EMA (on the device; `ema_host` off it) of a network."""
    t = recipe.train
    per = bytes_per_parameter(t, counts["largest"] / max(1, counts["trainable"]))
    n = counts["trainable"]
    out = {
        "parameters": per["parameters"] * (n + counts["frozen"]) + counts["buffer_bytes"],
        "gradients": per["gradients"] * n,
        "optimizer_state": optimizer_state_bytes(t, counts["sizes"]),
        "ema": per["ema"] * n + (counts["ema_buffer_bytes"] if t.ema == "device" else 0),  # its buffers
        "ema_host": per["ema_host"] * n,
    }
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer_state"] + out["ema"]
    out["bytes_per_parameter"] = out["total"] / max(1, n + counts["frozen"])
    return out


# --- activations, measured at a small size and scaled -----------------------------------------------------------


def meta_network(family: Any, recipe: Recipe, depth: int) -> nn.Module:
    """`block_network(recipe, depth)` on the meta device: no memory, no random numbers (a network computing a value
    from its settings at build time: its parameters on meta, that computation on the CPU)."""
    try:
        with torch.device("meta"):
            return family.block_network(recipe, depth)
    except (RuntimeError, NotImplementedError):
        with empty_parameters():
            return family.block_network(recipe, depth)


def meta_denoiser(family: Any, recipe: Recipe, depth: int) -> tuple[nn.Module, nn.Module]:
    """(network, its denoiser) built as `meta_network` (the wrapper may add tensors to the network)."""
    net = meta_network(family, recipe, depth)
    try:
        with torch.device("meta"):
            model = family.denoiser(recipe, net, recipe.noise.settings())
    except (RuntimeError, NotImplementedError):
        with empty_parameters():
            model = family.denoiser(recipe, net, recipe.noise.settings())
    return net, model


def empty_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Give meta parameters and buffers real, uninitialised ones (fresh pages cost no memory until written: a vocab
    table read by one row at a time stays almost free); floating parameters in `dtype`, the rest as they are.
    Their values mean nothing: only the sizes of what the forward saves are read."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                kind = dtype if p.is_floating_point() else p.dtype
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=kind), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)  # indices and masks: valid values


def saved_bytes(recipe: Recipe, batch: int, checkpointing: bool = False, family: Any = None) -> dict[str, int]:
    """Bytes autograd saves in one training forward of a one-layer network of the recipe: inside the layer, in all,
    and the layer's output (what a checkpointed layer keeps of its input)."""
    family = family or bench_family(recipe)
    dtype = torch.bfloat16 if recipe.train.precision == "bf16-true" else torch.float32
    net, model = meta_denoiser(family, recipe, 1)
    empty_tensors(model, dtype)
    layers = family.layers(net)
    if checkpointing:
        checkpoint_layers(layers)
    model.train()
    gen = torch.Generator().manual_seed(0)
    data = family.synthetic_batch(recipe, batch, gen)
    out_bytes: list[int] = []
    hook = layers[0].register_forward_hook(lambda m, a, o: out_bytes.append(_nbytes(o)))
    autocast, _ = precision_context(recipe.train.precision, torch.device("cpu"))
    try:
        with SavedActivations(net, layers) as saved, autocast():
            family.training_loss(model, data, recipe.noise.settings().full_range(), recipe, gen)
    finally:
        hook.remove()
    out = {"layer": saved.per_layer, "total": saved.nbytes, "hidden": out_bytes[0] if out_bytes else 0}
    del model, net, layers, saved
    gc.collect()  # the next measurement must not stand on this one's tensors
    return out


def _nbytes(out: Any) -> int:
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.numel() * first.element_size() if isinstance(first, torch.Tensor) else 0


def sequence_length(recipe: Recipe) -> int | None:
    """The context of a sequence family (its sample is a 1-d sequence), None for an image family."""
    shape = get_family(recipe.model.family).sample_shape(recipe)
    return int(shape[0]) if len(shape) == 1 else None


def with_context(recipe: Recipe, context: int) -> Recipe:
    try:
        return validate_recipe(apply_overrides(recipe.to_dict(), [f"model.context={context}"]), "recipe")
    except RecipeError as exc:
        raise DbconvertError(f"--context does not apply to the {recipe.model.family} family ({exc})") from None


def activation_model(recipe: Recipe, batch: int, context: int | None, family: Any = None) -> dict[str, Any]:
    """Activation bytes of one layer (`layer`), of what is outside the layers (`outside`) and of a layer's output
    (`hidden`) at `batch` and `context`, from two small measurements (see the module docstring)."""
    family = family or bench_family(recipe)
    seq = sequence_length(recipe)
    if seq is None:
        if context is not None:
            raise DbconvertError(
                f"--context does not apply to the {recipe.model.family} family (its inputs are images): drop it"
            )
        a, b = saved_bytes(recipe, 1, family=family), saved_bytes(recipe, 2, family=family)
        scale = lambda key: a[key] + (b[key] - a[key]) * (batch - 1)  # noqa: E731  linear in examples
        parts = {"layer": scale("layer"), "outside": scale("total") - scale("layer"), "hidden": scale("hidden")}
        how = "measured at batch 1 and 2 on the CPU, linear in the batch"
        return {**parts, "method": how, "context": None}
    target = context or seq
    small = [c for c in SMALL_CONTEXTS if c < target] or [target]
    if len(small) == 1 and small[0] == target:
        a = saved_bytes(with_context(recipe, target), 1, family=family)
        parts = {
            "layer": a["layer"] * batch,
            "outside": (a["total"] - a["layer"]) * batch,
            "hidden": a["hidden"] * batch,
        }
        return {
            **parts,
            "method": f"measured at batch 1, context {target} on the CPU, times the batch",
            "context": target,
        }
    t1, t2 = SMALL_CONTEXTS
    m = {(n, t): saved_bytes(with_context(recipe, t), n, family=family) for n in (1, 2) for t in (t1, t2)}

    def quadratic(y1: float, y2: float) -> float:
        """y(T) = a T + b T^2 through (t1, y1), (t2, y2), at the target context."""
        b = max(0.0, (y2 / t2 - y1 / t1) / (t2 - t1))
        return target * (y1 / t1 - b * t1 + b * target)

    def fit(key: Callable[[dict[str, int]], int]) -> float:
        # per row (what the second row adds) and shared by the rows (e.g. a T x T attention mask)
        row = [key(m[(2, t)]) - key(m[(1, t)]) for t in (t1, t2)]
        shared = [key(m[(1, t)]) - r for t, r in zip((t1, t2), row)]
        return batch * quadratic(*row) + quadratic(*shared)

    parts = {
        "layer": fit(lambda x: x["layer"]),
        "outside": fit(lambda x: x["total"] - x["layer"]),
        "hidden": fit(lambda x: x["hidden"]),
    }
    how = (
        f"measured at batch 1 and 2, contexts {t1} and {t2} on the CPU with torch's SDPA (its CPU kernel is fused: "
        "no T x T attention weights are saved, as with flash attention on CUDA): a part a row and a part the rows "
        "share, each fitted as a T + b T^2 and scaled to the batch and context"
    )
    return {**parts, "method": how, "context": target}


def estimate(static: dict[str, float], acts: dict[str, Any], depth: int, checkpointing: bool) -> float:
    """Peak estimate of a network of `depth` layers: its static tensors plus what autograd saves at once (all
    layers' activations; with checkpointing each layer's input and one layer's activations)."""
    layers = depth * acts["hidden"] + acts["layer"] if checkpointing else depth * acts["layer"]
    return static["total"] + layers + acts["outside"]


# --- the two reports -------------------------------------------------------------------------------------------


def option_table(recipe: Recipe, blocks: int) -> dict[str, Any]:
    """Static bytes of the deepest block and the e2e network under each option set (`--options --static`)."""
    recipe = bench_recipe(with_blocks(recipe, blocks))
    total = source_depth(recipe)
    depth = max(b - a for a, b in layer_ranges(total, blocks, recipe.blocks.uneven))
    family = bench_family(recipe)
    counts = {"block": element_counts(recipe, depth, family), "e2e": element_counts(recipe, total, family)}
    rows = []
    for name, overrides in OPTION_SETS.items():
        try:
            r = option_recipe(recipe, overrides)
        except DbconvertError as exc:
            rows.append({"options": name, "refused": str(exc)})
            continue
        rows.append(
            {
                "options": name,
                "label": describe(r.train),
                "overrides": overrides,
                **{net: static_bytes(r, c) for net, c in counts.items()},
            }
        )
    return {
        "recipe": recipe.name,
        "blocks": blocks,
        "layers": total,
        "block_layers": depth,
        "rows": rows,
        "device": "meta (static)",
    }


def fit(
    recipe: Recipe, budget: int, batch: int | None = None, context: int | None = None, headroom: float = HEADROOM
) -> dict[str, Any]:
    """For each option set: the smallest B whose deepest block fits `budget` (without and with activation
    checkpointing), and whether the whole network fits end to end (without and with), from `estimate`."""
    if not 0 <= headroom < 1:
        raise DbconvertError(f"--headroom must be in [0, 1), got {headroom}")
    recipe = bench_recipe(recipe)
    if context is not None:
        recipe = with_context(recipe, context)
    batch = recipe.train.batch_size if batch is None else batch
    if batch < 1:
        raise DbconvertError(f"--batch must be at least 1, got {batch}")
    total = source_depth(recipe)
    usable = budget * (1 - headroom)
    depths = sorted({max(b - a for a, b in layer_ranges(total, n, True)) for n in range(1, total + 1)}, reverse=True)
    family = bench_family(recipe)
    counts = {d: element_counts(recipe, d, family) for d in depths}
    acts_by_precision: dict[str, dict[str, Any]] = {}
    rows = []
    for name, overrides in OPTION_SETS.items():
        try:
            r = option_recipe(recipe, overrides)
        except DbconvertError as exc:
            rows.append({"options": name, "refused": str(exc)})
            continue
        precision = r.train.precision
        if precision not in acts_by_precision:
            acts_by_precision[precision] = activation_model(r, batch, context, family)
        acts = acts_by_precision[precision]
        need = {d: {ck: estimate(static_bytes(r, counts[d]), acts, d, ck) for ck in (False, True)} for d in depths}
        row: dict[str, Any] = {
            "options": name,
            "label": describe(r.train),
            "overrides": overrides,
            "e2e": need[total][False],
            "e2e_ckpt": need[total][True],
        }
        for ck, key in ((False, "blocks"), (True, "blocks_ckpt")):
            fitting = [
                n
                for n in range(1, total + 1)
                if need[max(b - a for a, b in layer_ranges(total, n, True))][ck] <= usable
            ]
            smallest = fitting[0] if fitting else None
            row[key] = smallest
            row[key + "_even"] = next((n for n in fitting if total % n == 0), None)
            row[key + "_bytes"] = (
                need[max(b - a for a, b in layer_ranges(total, smallest, True))][ck]
                if smallest
                else need[min(depths)][ck]
            )
        rows.append(row)
    first = next(iter(acts_by_precision.values()))
    return {
        "recipe": recipe.name,
        "budget_bytes": budget,
        "headroom": headroom,
        "usable_bytes": usable,
        "batch": batch,
        "context": first["context"],
        "layers": total,
        "rows": rows,
        "activations": {p: {k: a[k] for k in ("layer", "outside", "hidden")} for p, a in acts_by_precision.items()},
        "method": first["method"],
    }


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def options_report(r: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    table = Table(
        title=f"static training memory by option, GiB ({r['recipe']}, {r['layers']} layers, B={r['blocks']}: "
        f"deepest block {r['block_layers']} layers, meta device)"
    )
    for col in (
        "options",
        "block total",
        "params",
        "grads",
        "optim",
        "EMA (host)",
        "bytes/param",
        "e2e total",
        "e2e bytes/param",
    ):
        table.add_column(col, justify="left" if col == "options" else "right")
    for row in r["rows"]:
        if "refused" in row:
            continue
        b, e = row["block"], row["e2e"]
        ema = _gib(b["ema"]) if b["ema"] or not b["ema_host"] else f"({_gib(b['ema_host'])})"
        table.add_row(
            row["label"],
            _gib(b["total"]),
            _gib(b["parameters"]),
            _gib(b["gradients"]),
            _gib(b["optimizer_state"]),
            ema,
            f"{b['bytes_per_parameter']:.2f}",
            _gib(e["total"]),
            f"{e['bytes_per_parameter']:.2f}",
        )
    refused = [f"{row['options']}: {row['refused']}" for row in r["rows"] if "refused" in row]
    return [
        table,
        *refused,
        "totals are what stays on the training device: an EMA in parentheses lives in host "
        "memory (train.ema=cpu); activations are not included (`bench memory --fit` adds them).",
    ]


def fit_report(r: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    ctx = f", context {r['context']}" if r["context"] else ""
    table = Table(
        title=f"does it fit {_gib(r['budget_bytes'])} GiB? ({r['recipe']}, {r['layers']} layers, batch "
        f"{r['batch']}{ctx}; estimate <= {_gib(r['usable_bytes'])} GiB after {r['headroom']:.0%} "
        "headroom)"
    )
    for col in ("options", "e2e", "e2e+ckpt", "smallest B", "smallest B +ckpt"):
        table.add_column(col, justify="left" if col == "options" else "right")
    mark = lambda need: f"{_gib(need)} {'fits' if need <= r['usable_bytes'] else 'no'}"  # noqa: E731

    def blocks(row: dict[str, Any], key: str) -> str:
        if row[key] is None:
            return f"none (B={r['layers']}: {_gib(row[key + '_bytes'])})"
        even = row[key + "_even"]
        alt = f"; even split B={even}" if even and even != row[key] else ""
        return f"B={row[key]} ({_gib(row[key + '_bytes'])}{alt})"

    for row in r["rows"]:
        if "refused" in row:
            continue
        table.add_row(
            row["label"], mark(row["e2e"]), mark(row["e2e_ckpt"]), blocks(row, "blocks"), blocks(row, "blocks_ckpt")
        )
    refused = [f"{row['options']}: {row['refused']}" for row in r["rows"] if "refused" in row]
    return [
        table,
        *refused,
        f"estimate = exact static tensors (meta device) + activations {r['method']}. Smallest B allows an uneven "
        "split (blocks.uneven=true); the even split beside it divides the layers. It leaves out temporaries and "
        "allocator slack (the headroom).",
    ]
