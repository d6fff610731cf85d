"""The masking (absorbing-state) noise process of masked diffusion (MD4 / MDLM; DESIGN 5 "Masked diffusion").

A level is a masking time t: each token is independently replaced by [MASK] with probability
1 - alpha(t), alpha(0) = 1 (clean), alpha(1) = 0 (all masked).

- Schedules: `linear` alpha(t) = 1 - t (MD4's default) and `cosine` alpha(t) = 1 - cos(pi/2 (1 - t)).
- Loss weight (MD4's continuous-time ELBO): w(t) = -alpha'(t) / (1 - alpha(t)); 1/t for the linear schedule,
  (pi/2) tan(pi/2 (1 - t)) for the cosine one.
- Full range [t_min, 1] (decision): w(t) grows like 1/t at t -> 0, so training and the bound stop at
  t_min = noise.t_min > 0 (default 1e-3, MDLM's sampling epsilon; MD4 instead offsets alpha by 1e-4, GenMD4
  uses "a small non-zero t1" as here). The piece [0, t_min] of the ELBO is replaced by its reconstruction
  term E[CE on the tokens masked at t_min] (see `families/llama/masked.py`), so the bound stays exact.
- Training density: t ~ U(t_min, 1); a block's mass is its share of that length. A batch's times are
  drawn as MD4 draws them: one uniform offset, spread evenly over the range (`draw`).
- Partitions: `equiprobable` = equal decrements of alpha over the full range (alpha_b = 1 - b/B, up to
  t_min: boundaries t_b = alpha^-1(alpha(t_min) - b/B (alpha(t_min) - alpha(1))); with the linear schedule
  they are equally spaced in t), `uniform` = equal widths in t.
- Overlap: the contract's generic rule in t (gamma times the width on each side, clamped to [t_min, 1]).
- Sampling schedule: N + 1 levels from 1 down to 0, linear in t; the last step (to t = 0) unmasks every
  token still masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from dbconvert.noise_process import NoiseProcess

if TYPE_CHECKING:
    from dbconvert.schema import NoiseConfig

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class MaskingProcess(NoiseProcess):
    """Masked diffusion's noise process: a masking time t in [t_min, 1] and a schedule alpha(t)."""

    name: ClassVar[str] = "masking"
    level_name: ClassVar[str] = "t"
    level_symbol: ClassVar[str] = "t"
    coordinate_label: ClassVar[str] = "t"

    alpha_schedule: str = "linear"
    t_min: float = 1e-3

    def __post_init__(self) -> None:
        if self.alpha_schedule not in SCHEDULES:
            raise ValueError(f"unknown masking schedule {self.alpha_schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"noise.t_min must lie in (0, 1), got {self.t_min}")

    # -- the schedule ------------------------------------------------------------------------

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still unmasked at time t."""
        if self.alpha_schedule == "linear":
            return 1.0 - t
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha'(t)."""
        if self.alpha_schedule == "linear":
            return -torch.ones_like(t)
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """MD4's ELBO weight -alpha'(t) / (1 - alpha(t)): 1/t (linear), (pi/2) tan(pi/2 (1 - t)) (cosine)."""
        if self.alpha_schedule == "linear":
            return 1.0 / t
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * (1.0 - t))

    def alpha_inverse(self, a: float) -> float:
        """The t with alpha(t) = a."""
        if self.alpha_schedule == "linear":
            return 1.0 - a
        return 1.0 - 2.0 / math.pi * math.acos(1.0 - a)

    def unmask_probability(self, t: float, s: float) -> float:
        """Probability that a token masked at t is unmasked at s < t: (alpha(s) - alpha(t)) / (1 - alpha(t))."""
        at, as_ = (float(self.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
        return (as_ - at) / (1.0 - at)

    # -- the NoiseProcess contract -----------------------------------------------------------

    @classmethod
    def from_config(cls, config: "NoiseConfig") -> "MaskingProcess":
        return cls(config.schedule, config.t_min)

    def full_range(self) -> tuple[float, float]:
        return self.t_min, 1.0

    def boundaries(self, num_blocks: int, partition: str = "equiprobable") -> list[float]:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        lo, hi = self.full_range()
        if partition == "equiprobable":
            a0 = float(self.alpha(torch.tensor(lo, dtype=torch.float64)))
            inner = [self.alpha_inverse(a0 - k / num_blocks * a0) for k in range(1, num_blocks)]
        elif partition == "uniform":
            inner = [lo + k / num_blocks * (hi - lo) for k in range(1, num_blocks)]
        else:
            raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(self.partitions)}")
        return [lo, *inner, hi]

    def mass(self, lo: float, hi: float) -> float:
        low, high = self.full_range()
        return (hi - lo) / (high - low)

    def draw(self, n: int, lo: float, hi: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """n times, each uniform on [lo, hi], drawn as MD4 draws a batch's: one uniform offset u0 and
        u_i = (u0 + i / n) mod 1 (low-discrepancy: the batch covers the range evenly, a lower-variance loss)."""
        u0 = torch.rand((), generator=generator, dtype=torch.float64)
        u = torch.remainder(u0 + torch.arange(n, dtype=torch.float64) / n, 1.0)
        return (lo + (hi - lo) * u).clamp(lo, hi).to(torch.float32)

    def schedule(self, num_steps: int, rho: float = 7.0) -> list[float]:
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        return [1.0 - j / num_steps for j in range(num_steps + 1)]

    def coordinate(self, level: float | np.ndarray) -> float | np.ndarray:
        return level

    def level_at(self, x: float) -> float:
        return x

    def density(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.full_range()
        return np.where((x >= lo) & (x <= hi), 1.0 / (hi - lo), 0.0)

    def describe(self) -> str:
        return f"t ~ U({self.t_min:g}, 1), {self.alpha_schedule} masking schedule"

    def ticks(self) -> list[float]:
        return [self.t_min, 0.25, 0.5, 0.75, 1.0]
