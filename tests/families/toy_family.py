"""A toy model family that lives outside `dbconvert/`: the worked example of "adding a family".

Everything a family needs is here, in one module, written only against the public contract
(`dbconvert.families.contract.Family`) and public helpers (`dbconvert.noise`,
`dbconvert.sampling`, `dbconvert.checkpoint`). Registering it is one line:

    families.register("toy", "tests.families.toy_family:ToyFamily", "tests.families.toy_family:ToyConfig")

The source network is a residual MLP over `dim`-dimensional vectors: an input projection and a
noise embedding (shared, copied into every block), `layers` residual MLP layers (cut into
blocks), and an output head (shared). Its data are points of a fixed two-cluster mixture, so a
few hundred CPU steps train it. Its metric, `corner` (`CornerMetric`: how far generated points lie
from the data's cluster centres), comes with the family (`ToyFamily.own_metrics`): registering the
family registers it.

`tests/families/test_contract.py` runs split, train-block, sample, bench, eval, eval compare, ablate and
plot through them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import time

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dbconvert import noise as nz
from dbconvert.checkpoint import apply_key_map, atomic_write, layer_slice_key_map
from dbconvert.devices import resolve_device
from dbconvert.evaluation.metric import Log, Metric, MetricOption, nolog
from dbconvert.families.contract import Family, Source, shard_slice
from dbconvert.families.sample_options import sample_flag
from dbconvert.sampling import SampleRequest, SampleResult, edm_sample, load_models
from dbconvert.schema import ModelConfig

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.rundir import Run

SHARED_KEYS = ("embed.weight", "embed.bias", "sigma_embed.weight", "sigma_embed.bias", "head.weight", "head.bias")
LAYER_KEYS = ("norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class ToyConfig(ModelConfig):
    """The toy family's `model` section: vector size, width and depth."""

    family: Literal["toy"] = "toy"
    dim: int = Field(4, ge=1)
    hidden: int = Field(16, ge=1)
    layers: int = Field(4, ge=1)
    init_seed: int = 0


class ResidualMLP(nn.Module):
    """One layer: x + fc2(silu(fc1(norm(x))))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h))))


class ToyNet(nn.Module):
    """Input projection + noise embedding, `depth` residual layers, output head."""

    def __init__(self, dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.sigma_embed = nn.Linear(1, hidden)
        self.layers = nn.ModuleList(ResidualMLP(hidden) for _ in range(depth))
        self.head = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.sigma_embed(c_noise[:, None])
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class ToyDenoiser(nn.Module):
    """EDM preconditioning (DESIGN 3) around a ToyNet."""

    def __init__(self, net: ToyNet, noise: nz.NoiseSettings) -> None:
        super().__init__()
        self.net = net
        self.noise = noise

    def forward(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.noise.sigma_data
        s = sigma.to(torch.float32).reshape(-1, 1)
        return nz.c_skip(s, sd) * z + nz.c_out(s, sd) * self.net(nz.c_in(s, sd) * z, nz.c_noise(s[:, 0]))


class ToyData:
    """Points of a two-cluster mixture at +-0.5 (plus a little noise): `.batch(indices)` and `len()`."""

    def __init__(self, dim: int, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n, 1), generator=gen).float() * 2 - 1
        self.x = 0.5 * signs.expand(n, dim) + 0.05 * torch.randn(n, dim, generator=gen)

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return [self.x[indices]]


@dataclass
class ToySampleOptions:
    """The toy's own sampling option (a flag of `dbconvert sample`, generated from this field: nothing generic
    names it)."""

    clip: float | None = field(
        default=None, metadata=sample_flag("Clamp every generated coordinate to [-CLIP, CLIP].", min=0.0)
    )


def _cfg(recipe: "Recipe") -> ToyConfig:
    assert isinstance(recipe.model, ToyConfig)
    return recipe.model


class ToyFamily(Family):
    name = "toy"
    config_cls = ToyConfig
    metrics = ("corner",)
    own_metrics = {"corner": "tests.families.toy_family:CornerMetric"}
    sample_options_type = ToySampleOptions

    def source(self, recipe: "Recipe") -> Source:
        cfg = _cfg(recipe)
        torch.manual_seed(cfg.init_seed)
        return Source.of_network(ToyNet(cfg.dim, cfg.hidden, cfg.layers), cfg.layers)

    def block_network(self, recipe: "Recipe", depth: int) -> nn.Module:
        cfg = _cfg(recipe)
        return ToyNet(cfg.dim, cfg.hidden, depth)

    def layers(self, network: nn.Module) -> list[nn.Module]:
        return list(network.layers)  # type: ignore[union-attr, arg-type]

    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        return apply_key_map(
            source.state,
            layer_slice_key_map(SHARED_KEYS, "layers", LAYER_KEYS, start, end),
            ignored=lambda key: key.startswith("layers."),
            what=f"toy block [{start}, {end})",
        )

    def denoiser(self, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        assert isinstance(network, ToyNet)
        return ToyDenoiser(network, noise)

    def load_data(self, recipe: "Recipe", split: str | None = None) -> ToyData:
        seed = recipe.data.split_seed + (1 if (split or recipe.data.split) != "train" else 0)
        return ToyData(_cfg(recipe).dim, 512, seed)

    def training_loss(
        self,
        denoiser: nn.Module,
        batch: Any,
        sigma_range: tuple[float, float],
        recipe: "Recipe",
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch[0]
        n, keep = shard_slice(x.shape[0], shard)
        noise = recipe.noise.settings()
        sigma = nz.sample_sigmas(n, *sigma_range, noise, generator)[keep].to(x.device)
        eps = torch.randn((n, x.shape[1]), generator=generator)[keep].to(x.device)
        s = sigma[:, None]
        d = denoiser(x + s * eps, sigma)
        loss = (nz.loss_weight(s, noise.sigma_data) * (d - x) ** 2).mean()
        return loss, {"sigma_min": sigma.min().item(), "sigma_max": sigma.max().item()}

    def generate(self, run: "Run", request: SampleRequest) -> SampleResult:
        s = request.settings(run.recipe.sample)
        steps, solver, num, seed = s.steps, s.solver, s.num, s.seed
        device = resolve_device(run.recipe.train.device)
        models = load_models(run, request.model, s.weights, device)
        noise = run.noise()
        owned = run.owned_ranges() if request.model == "blocks" else [noise.full_range()]
        ts = noise.schedule(steps, s.rho)
        z = ts[0] * torch.randn((num, *self.sample_shape(run.recipe)), generator=torch.Generator().manual_seed(seed))
        calls = [0] * len(models)

        def denoise(i: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
            calls[i] += 1
            return models[i](z, torch.full((z.shape[0],), sigma, device=z.device))

        with torch.no_grad():
            x = edm_sample(denoise, owned, ts, z.to(device), solver).cpu()
        clip = self.options_of(request).clip
        if clip is not None:
            x = x.clamp(-clip, clip)
        out = (
            Path(request.out)
            if request.out
            else run.root / "samples" / f"{request.model}-{solver}-{steps}steps-seed{seed}"
        )
        file = out / "samples.npz"

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, x=x.numpy())

        atomic_write(file, save)
        return SampleResult(out, [file], calls=calls, sampler={"steps": steps, "solver": solver, "seed": seed})

    def sample_shape(self, recipe: "Recipe") -> tuple[int, ...]:
        return (_cfg(recipe).dim,)

    def synthetic_batch(self, recipe: "Recipe", batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn((batch, *self.sample_shape(recipe)), generator=generator)]

    def sampling_step(
        self, recipe: "Recipe", model: nn.Module, batch: list[torch.Tensor], sigma: float
    ) -> Callable[[], Any]:
        z = torch.randn_like(batch[0])
        s = torch.full((z.shape[0],), sigma, device=z.device)
        return lambda: model(z, s)


def corner_distance(x: np.ndarray) -> float:
    """Mean distance of each coordinate from its sample's nearest cluster centre (+-0.5 on every axis)."""
    sign = np.sign(x.mean(axis=1, keepdims=True))
    return float(np.abs(x - 0.5 * sign).mean())


class CornerMetric(Metric):
    """The toy's metric: `corner_distance` of generated points, over `repeats` sampling seeds (lower is better)."""

    name = "corner"
    title = "corner distance"
    lower_is_better = True
    help = "Mean distance of generated points from the nearest cluster centre of the toy data."
    options = (
        MetricOption("num", int, 256, "Points to generate per seed.", min=2),
        MetricOption("repeats", int, 2, "Sampling seeds (seed, seed + 1, ...).", min=1),
    )

    def evaluate(
        self,
        run: "Run",
        *,
        model: str = "blocks",
        log: Log = nolog,
        progress: bool = False,
        num: int = 256,
        repeats: int = 2,
        seed: int | None = None,
        steps: int | None = None,
        solver: str | None = None,
        weights: str | None = None,
    ) -> dict[str, Any]:
        start = time.time()
        base = run.recipe.sample.seed if seed is None else seed
        values, sampler = [], {}
        for r in range(repeats):
            out = run.root / "eval" / "samples" / f"corner-{model}-seed{base + r}-n{num}"
            result = run.family().generate(
                run,
                SampleRequest(
                    model=model, num=num, seed=base + r, steps=steps, solver=solver, weights=weights, out=out
                ),
            )
            values.append(corner_distance(np.load(result.files[0])["x"]))
            sampler = result.sampler
            log(f"seed {base + r}: corner distance {values[-1]:.4f}")
        return {
            "metric": self.name,
            "model": model,
            "value": float(np.mean(values)),
            "values": values,
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "features": "coordinates",
            "num_samples": num,
            "seed": base,
            "sampler": sampler,
            "split": None,
            "reference": "cluster centres +-0.5",
            "source": {"kind": "run", "path": str(run.root.resolve())},
            "seconds": round(time.time() - start, 2),
        }
