"""Sampling (DESIGN 4): EDM steps, Euler / Heun, owning-block dispatch, classifier-free guidance.

At every step only the block that owns the current sigma runs; Heun's correction at
t_{j+1} runs the block that owns t_{j+1}. Each family's `generate` drives this (images for DiT,
one token at a time for Llama) and writes its files into the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dbconvert import noise as nz
from dbconvert.checkpoint import load_strict, load_weights
from dbconvert.rundir import Run

Denoise = Callable[[int, torch.Tensor, float], torch.Tensor]
"""(block index, z, sigma) -> D(z, sigma) of that block."""


@dataclass
class SampleRequest:
    model: str = "blocks"
    steps: int | None = None
    solver: str | None = None
    guidance: float | None = None
    num: int | None = None
    seed: int | None = None
    class_label: int | None = None
    weights: str | None = None
    out: Path | None = None
    prompt: str | None = None
    prompt_file: Path | None = None
    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    progress: bool = False
    """Show a progress bar (the CLI sets it; library calls stay quiet)."""
    prompt_ids: list[list[int]] | None = None
    """Text families: prompts as token ids (evaluation protocols), instead of --prompt text."""
    on_progress: Callable[[int, int], None] | None = None
    """(done, total) callback, e.g. for a log line every so often."""
    images: Path | None = None
    """Classifier families: a folder of images to classify (instead of the data set's test split)."""


@dataclass
class SampleResult:
    directory: Path
    files: list[Path] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    tokens_per_second: float | None = None
    sampler: dict = field(default_factory=dict)
    """How the samples were drawn (solver/steps or temperature/top-p, weights, seed): goes into results."""


def edm_sample(
    denoise: Denoise,
    owned: Sequence[tuple[float, float]],
    ts: Sequence[float],
    z: torch.Tensor,
    solver: str = "euler",
) -> torch.Tensor:
    """Integrate the probability-flow ODE over the steps `ts` (ending in 0) from z = t_0 * eps."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r}")
    for t, t_next in zip(ts[:-1], ts[1:]):
        d = (z - denoise(nz.owner_of(t, list(owned)), z, t)) / t
        z_next = z + (t_next - t) * d
        if solver == "heun" and t_next > 0:
            d_next = (z_next - denoise(nz.owner_of(t_next, list(owned)), z_next, t_next)) / t_next
            z_next = z + (t_next - t) * 0.5 * (d + d_next)
        z = z_next
    return z


def guided(model: nn.Module, z: torch.Tensor, sigma: float, y: torch.Tensor, scale: float, null: int) -> torch.Tensor:
    """D_uncond + w (D_cond - D_uncond), both halves in one batched forward; w = 1 skips the null pass."""
    s = torch.full((z.shape[0],), sigma, device=z.device)
    if scale == 1.0:
        return model(z, s, y)
    both = model(torch.cat([z, z]), torch.cat([s, s]), torch.cat([y, torch.full_like(y, null)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


def load_models(run: Run, model: str, weights: str, device: torch.device) -> list[nn.Module]:
    """The trained models of `run` for `model` (see `Run.model_targets`), wrapped by the run's family.

    `blocks` and `e2e` are denoisers; `ar` is the family's autoregressive reference; `source`
    is the unsplit converted source (its weights as `split` wrote them, no training needed).
    """
    run.require_trained(model)
    family = run.family()
    models = []
    for name, depth in run.model_targets(model):
        net = family.block_network(run.recipe, depth)
        file = "model" if name == "source" else weights
        path = run.model_dir(name) / f"{file}.safetensors"
        remedy = "split again" if name == "source" else f"retrain {name} with --restart"
        load_strict(net, load_weights(path, remedy), str(path))
        models.append(family.wrap(model, run.recipe, net, run.noise()).to(device).eval())
    return models
