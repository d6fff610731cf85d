"""Noise levels of the variance-exploding (EDM) diffusion and their partition into blocks.

Everything here is DESIGN.md sections 2-4 written as functions: the log-normal training
distribution, the equi-probability / uniform partition, overlap, per-block sigma sampling,
EDM preconditioning, the loss weight and the EDM sampling-step discretisation.

Orientation (DESIGN 2): block 0 holds the HIGHEST noise range, block B-1 the lowest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from dbconvert.errors import RecipeError
from dbconvert.noise_process import NoiseProcess, owned_ranges, owner_of  # noqa: F401  (re-exported: nz.owner_of)

if TYPE_CHECKING:
    from dbconvert.schema import NoiseConfig

_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class NoiseSettings(NoiseProcess):
    """The EDM noise process (the default): the sigma settings a run fixes at split time (all recipe fields)."""

    name: ClassVar[str] = "edm"
    level_name: ClassVar[str] = "sigma"
    level_symbol: ClassVar[str] = "σ"
    coordinate_label: ClassVar[str] = "ln σ"

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def cdf(self, sigma: float) -> float:
        """F(sigma) of the log-normal ln(sigma) ~ N(P_mean, P_std^2)."""
        x = (math.log(sigma) - self.p_mean) / (self.p_std * _SQRT2)
        return 0.5 * (1.0 + math.erf(x))

    def icdf(self, u: float) -> float:
        """F^-1(u): sigma = exp(P_mean + P_std * PhiInv(u))."""
        return math.exp(self.p_mean + self.p_std * _phi_inv(u))

    def truncated_mass(self, lo: float, hi: float) -> float:
        """Probability mass of [lo, hi] under the log-normal truncated to [sigma_min, sigma_max]."""
        return (self.cdf(hi) - self.cdf(lo)) / (self.cdf(self.sigma_max) - self.cdf(self.sigma_min))

    # -- the NoiseProcess contract (each method is one of the formulas below) --------------

    @classmethod
    def from_config(cls, config: "NoiseConfig") -> "NoiseSettings":
        return cls(config.sigma_min, config.sigma_max, config.sigma_data, config.p_mean, config.p_std)

    def full_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def settings_text(self) -> str:
        return f"noise.p_mean={self.p_mean:g}, noise.p_std={self.p_std:g}"

    def widen_hint(self) -> str:
        return "widen noise.p_std (default 1.2)"

    def validate(self) -> None:
        """The log-normal must put mass in [sigma_min, sigma_max] (p_mean = 50 puts none: quantiles fail)."""
        total = self.cdf(self.sigma_max) - self.cdf(self.sigma_min)
        if not total > 1e-9:
            raise RecipeError(
                f"{self.settings_text()}: the training log-normal puts (almost) no mass ({total:.3g}) in "
                f"[noise.sigma_min, noise.sigma_max] = [{self.sigma_min:g}, {self.sigma_max:g}]; choose "
                f"p_mean inside [{math.log(self.sigma_min):.3g}, {math.log(self.sigma_max):.3g}] (ln sigma) "
                "and a p_std near 1.2"
            )

    def boundaries(self, num_blocks: int, partition: str = "equiprobable") -> list[float]:
        return boundaries(self, num_blocks, partition)

    def expand(self, lo: float, hi: float, gamma: float) -> tuple[float, float]:
        """DESIGN 2's overlap in closed form: [lo / a, hi * a], a = (hi / lo) ** gamma, clamped to [sigma_min,
        sigma_max] (what `NoiseProcess.expand` computes in ln sigma, without its rounding)."""
        a = (hi / lo) ** gamma
        return max(lo / a, self.sigma_min), min(hi * a, self.sigma_max)

    def mass(self, lo: float, hi: float) -> float:
        return self.truncated_mass(lo, hi)

    def draw(self, n: int, lo: float, hi: float, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_sigmas(n, lo, hi, self, generator)

    def schedule(self, num_steps: int, rho: float = 7.0) -> list[float]:
        return edm_steps(num_steps, self, rho)

    def coordinate(self, level: float | np.ndarray) -> float | np.ndarray:
        return np.log(level) if isinstance(level, np.ndarray) else math.log(level)

    def level_at(self, x: float) -> float:
        return math.exp(x)

    def density(self, x: np.ndarray) -> np.ndarray:
        """Density of ln(sigma) ~ N(P_mean, P_std^2) truncated to [sigma_min, sigma_max] (integrates to 1)."""
        z = (x - self.p_mean) / self.p_std
        pdf = np.exp(-0.5 * z**2) / (self.p_std * math.sqrt(2.0 * math.pi))
        return pdf / (self.cdf(self.sigma_max) - self.cdf(self.sigma_min))

    def describe(self) -> str:
        return f"ln σ ~ N({self.p_mean:g}, {self.p_std:g}²) truncated to [{self.sigma_min:g}, {self.sigma_max:g}]"

    def ticks(self) -> list[float]:
        inner = [v for v in (0.002, 0.01, 0.1, 1.0, 10.0, 80.0) if self.sigma_min <= v <= self.sigma_max]
        return sorted({self.sigma_min, self.sigma_max, *inner})


def _phi_inv(u: float) -> float:
    """Standard normal quantile, via torch's float64 erfinv (exact to double precision)."""
    if not 0.0 < u < 1.0:
        raise ValueError(f"quantile argument must lie in (0, 1), got {u}")
    return _SQRT2 * torch.erfinv(torch.tensor(2.0 * u - 1.0, dtype=torch.float64)).item()


def boundaries(noise: NoiseSettings, num_blocks: int, partition: str = "equiprobable") -> list[float]:
    """The B+1 increasing sigma boundaries b_0 = sigma_min < ... < b_B = sigma_max.

    `equiprobable`: b_k = F^-1(c0 + k/B (c1 - c0)), so every piece holds mass 1/B of the
    truncated log-normal. `uniform`: equal widths in ln(sigma) (the paper's ablation).
    """
    if num_blocks < 1:
        raise ValueError("num_blocks must be >= 1")
    if partition == "equiprobable":
        c0, c1 = noise.cdf(noise.sigma_min), noise.cdf(noise.sigma_max)
        inner = [noise.icdf(c0 + k / num_blocks * (c1 - c0)) for k in range(1, num_blocks)]
    elif partition == "uniform":
        a, b = math.log(noise.sigma_min), math.log(noise.sigma_max)
        inner = [math.exp(a + k / num_blocks * (b - a)) for k in range(1, num_blocks)]
    else:
        raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(noise.partitions)}")
    return [noise.sigma_min, *inner, noise.sigma_max]


def truncated_quantile(u: torch.Tensor, lo: float, hi: float, noise: NoiseSettings) -> torch.Tensor:
    """sigma at probability u in [0, 1] of the global log-normal restricted to [lo, hi] (float64).

    p = F(lo) + u (F(hi) - F(lo)), sigma = exp(P_mean + P_std * PhiInv(p)), in float64 so tails near
    sigma_min/sigma_max do not lose mass to rounding.
    """
    f_lo, f_hi = noise.cdf(lo), noise.cdf(hi)
    p = f_lo + (f_hi - f_lo) * u.to(torch.float64)
    p = p.clamp(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    z = _SQRT2 * torch.erfinv(2.0 * p - 1.0)
    return torch.exp(noise.p_mean + noise.p_std * z).clamp(lo, hi)


def truncated_position(sigma: torch.Tensor, lo: float, hi: float, noise: NoiseSettings) -> torch.Tensor:
    """The inverse of `truncated_quantile`: where each sigma lies in probability within [lo, hi] (float64)."""
    f_lo, f_hi = noise.cdf(lo), noise.cdf(hi)
    f = 0.5 * (1.0 + torch.erf((sigma.double().log() - noise.p_mean) / (noise.p_std * _SQRT2)))
    return (f - f_lo) / (f_hi - f_lo)


def sample_sigmas(
    n: int, lo: float, hi: float, noise: NoiseSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n training sigmas from the global log-normal restricted to [lo, hi] (inverse-CDF sampling).

    u ~ U(0, 1), sigma = `truncated_quantile(u)`.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return truncated_quantile(u, lo, hi, noise).to(torch.float32)


# --- EDM preconditioning (DESIGN 3) -------------------------------------------------------


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return 1.0 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(sigma) / 4.0


def sigma_to_timestep(sigma: torch.Tensor, noise: NoiseSettings, top: float = 999.0) -> torch.Tensor:
    """EDM c_noise mapped affinely onto a timestep embedder's range [0, top] (sigma_min -> 0, sigma_max -> top):
    how DiT and ViT feed the noise level to the timestep embedder they were built with."""
    lo = c_noise(torch.tensor(noise.sigma_min, dtype=torch.float64)).item()
    hi = c_noise(torch.tensor(noise.sigma_max, dtype=torch.float64)).item()
    return top * (c_noise(sigma) - lo) / (hi - lo)


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# --- Sampling steps (DESIGN 4) ------------------------------------------------------------


def edm_steps(num_steps: int, noise: NoiseSettings, rho: float = 7.0) -> list[float]:
    """t_0 = sigma_max > ... > t_{N-1} = sigma_min, then t_N = 0 (EDM, Karras et al. eq. 5)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if num_steps == 1:
        return [noise.sigma_max, 0.0]
    a, b = noise.sigma_max ** (1 / rho), noise.sigma_min ** (1 / rho)
    ts = [(a + j / (num_steps - 1) * (b - a)) ** rho for j in range(num_steps)]
    return [*ts, 0.0]
