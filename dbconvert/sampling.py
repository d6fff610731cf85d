"""Sampling (DESIGN 4): EDM steps, Euler / Heun, owning-block dispatch, classifier-free guidance.

At every step only the block that owns the current sigma runs; Heun's correction at
t_{j+1} runs the block that owns t_{j+1}. Each family's `generate` drives this (images for DiT,
one token at a time for Llama) and writes its files into the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dbconvert.noise_process import owner_of
from dbconvert.building import load_network
from dbconvert.checkpoint import load_weights
from dbconvert.errors import DbconvertError
from dbconvert.rundir import Run
from dbconvert.solvers import check_solver, get_solver
from dbconvert.source_ref import source_state

if TYPE_CHECKING:
    from dbconvert.schema import SampleConfig

Denoise = Callable[[int, torch.Tensor, float], torch.Tensor]
"""(block index, z, sigma) -> D(z, sigma) of that block."""


@dataclass(kw_only=True)
class SampleRequest:
    """What to generate: the settings every family shares, and the family's own `options`.

    `options` is an instance of the family's `Family.sample_options_type` (DiT: guidance and class; a
    language model: prompts and decoding), built by keyword with `Family.sample_options`; None = its defaults.
    """

    model: str = "blocks"
    steps: int | None = None
    solver: str | None = None
    num: int | None = None
    seed: int | None = None
    weights: str | None = None
    out: Path | None = None
    options: Any = None
    progress: bool = False
    """Show a progress bar (the CLI sets it; library calls stay quiet)."""
    on_progress: Callable[[int, int], None] | None = None
    """(done, total) callback, e.g. for a log line every so often."""

    def settings(self, cfg: "SampleConfig", **family: Any) -> SamplerSettings:
        """This request's sampler settings, the recipe's where it leaves them unset; `family` holds the family's own
        settings that the recipe also has a default for (guidance, temperature, top_p)."""
        return resolve_sampler(
            cfg, steps=self.steps, solver=self.solver, num=self.num, seed=self.seed, weights=self.weights, **family
        )


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler's settings after `resolve_sampler`: every value set."""

    steps: int
    solver: str
    guidance: float
    num: int
    seed: int
    weights: str
    temperature: float
    top_p: float
    rho: float


WEIGHTS = ("ema", "model")


def check_sampler_choices(solver: str | None, weights: str | None) -> None:
    """The one check of --solver / --weights (None = the recipe's, which its schema has checked); the solvers
    are those of the registry (`solvers.py`)."""
    if solver is not None:
        check_solver(solver)
    if weights is not None and weights not in WEIGHTS:
        raise DbconvertError(f"--weights must be {' or '.join(WEIGHTS)}, not {weights!r}")


def resolve_sampler(
    cfg: "SampleConfig",
    *,
    steps: int | None = None,
    solver: str | None = None,
    guidance: float | None = None,
    num: int | None = None,
    seed: int | None = None,
    weights: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> SamplerSettings:
    """Each setting as given, else the recipe's `sample` section: the one place this choice is written."""
    check_sampler_choices(solver, weights)
    return SamplerSettings(
        steps=steps or cfg.steps,
        solver=solver or cfg.solver,
        guidance=cfg.guidance if guidance is None else guidance,
        num=num or cfg.num,
        seed=cfg.seed if seed is None else seed,
        weights=weights or cfg.weights,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p if top_p is None else top_p,
        rho=cfg.rho,
    )


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
    """Integrate the probability-flow ODE over the steps `ts` (ending in 0) from z = t_0 * eps with the registered
    `solver` (`solvers.py`), each evaluation by the block that owns its level."""
    step = get_solver(solver)
    blocks = list(owned)

    def denoised(x: torch.Tensor, level: float) -> torch.Tensor:
        return denoise(owner_of(level, blocks), x, level)

    for t, t_next in zip(ts[:-1], ts[1:]):
        z = step(denoised, z, t, t_next)
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
    models = []
    for name, depth in run.model_targets(model):
        models.append(load_model(run, name, depth, model, weights, device))
    return models


class ResidentModels(Sequence[nn.Module]):
    """The networks of `model` (as `load_models` gives them), each loaded when first asked for and at most
    `resident` of them held at once (the least recently used is dropped).

    An image sampler walks the blocks in order from high noise to low and never returns to a block it has left
    (Heun's correction across a boundary evaluates the next block, which the following step keeps), so with
    `resident=1` it holds one block's weights at a time, a peak no end-to-end network can offer. Text decoding
    needs every block for every token and loads them all (`load_models`).
    """

    def __init__(self, run: Run, model: str, weights: str, device: torch.device, resident: int = 1) -> None:
        run.require_trained(model)
        self.run, self.model, self.weights, self.device, self.resident = run, model, weights, device, resident
        self.targets = run.model_targets(model)
        self.held: dict[int, nn.Module] = {}
        self.loads = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> nn.Module:  # type: ignore[override]
        if index not in self.held:
            while len(self.held) >= self.resident:
                self.held.pop(next(iter(self.held)))
            name, depth = self.targets[index]
            self.held[index] = load_model(self.run, name, depth, self.model, self.weights, self.device)
            self.loads += 1
        else:
            self.held[index] = self.held.pop(index)  # most recently used last
        return self.held[index]


def load_model(run: Run, name: str, depth: int, model: str, weights: str, device: torch.device) -> nn.Module:
    """One network of `run` (a block, e2e, a reference or the source), wrapped for generation on `device`.

    Built with its parameters on the meta device and filled by assignment (`building.load_network`): no second
    copy of its weights, and no random init. Weights are float32 here whatever the run stores (bf16 blocks are
    widened, one tensor at a time). The source comes from the run's copy or its checkpoint (`source_ref.py`).
    """
    family = run.family()
    if name == "source":
        state, what = source_state(run), f"the source of {run.root}"
    else:
        path = run.weights_file(name, weights)
        state, what = load_weights(path, f"retrain {name} with --restart"), str(path)
    net = load_network(lambda: family.block_network(run.recipe, depth), state, what, torch.float32)
    return family.wrap(model, run.recipe, net, run.noise()).to(device).eval()


def check_finite_samples(folder: Path) -> None:
    """A sample folder's `samples.npz` (written by `sample`) must hold finite values: PNGs cannot show a NaN, so
    images of NaN samples would be scored as if they were pictures. Folders without one are not checked."""
    import numpy as np

    from dbconvert.errors import DataError

    path = Path(folder) / "samples.npz"
    if not path.is_file():
        return
    try:
        with np.load(path, allow_pickle=False) as data:
            x = data["x"] if "x" in data.files else None
            bad = 0 if x is None else int((~np.isfinite(x.reshape(len(x), -1))).any(axis=1).sum())
    except (OSError, ValueError, KeyError):
        raise DataError(f"{path} cannot be read; remove it or make the samples again") from None
    if bad:
        raise DataError(
            f"{bad} of the samples in {path} are not finite (NaN or inf); their images mean nothing: "
            "make the samples again (lower --guidance)"
        )
