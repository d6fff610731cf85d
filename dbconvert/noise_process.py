"""The noise-process contract: what split / train / sample / bench / plot need to know about a noise process.

A run's noise process fixes what a "noise level" is and how blocks share them out. The default is the
variance-exploding EDM process (`noise.NoiseSettings`: continuous sigma, log-normal training density;
DESIGN 2). A discrete masking process (masked diffusion: a masking time t in [0, 1]) plugs in the same
way: one `NoiseProcess` subclass and one entry in `PROCESSES` (or `register_process` at run time, which
`$DBCONVERT_NOISE_PROCESSES` hands to the processes dbconvert starts).

Generic code only calls these methods; it never tests a process's name or reads its fields:

- `full_range` / `boundaries` / `expand` / `mass`: the partition into blocks (split, the partition figure);
- `draw`: training noise levels inside a block's range (the family's loss);
- `schedule`: the sampling steps, highest noise first;
- `coordinate` / `density` / `ticks` / `describe` / `format_level`: how a level is shown (figures, `info`).

Orientation is the same for every process: block 0 owns the HIGHEST noise range (`owned_ranges`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from dbconvert.registry import Registry

if TYPE_CHECKING:
    import torch  # annotations only: the CLI's help path never imports torch

    from dbconvert.schema import NoiseConfig

PROCESSES: dict[str, str] = {
    "edm": "dbconvert.noise:NoiseSettings",
    "masking": "dbconvert.masking:MaskingProcess",
}
"""process name -> "module:Class" of its `NoiseProcess` subclass (imported on first use)."""

PROCESSES_ENV = "DBCONVERT_NOISE_PROCESSES"
"""Noise processes registered at run time, as JSON {name: "module:Class"} (handed to child processes)."""

REGISTRY = Registry("noise process", PROCESSES, PROCESSES_ENV, error=ValueError)
"""The noise processes (`registry.Registry`); an unknown name is a ValueError (the recipe schema reports it)."""


class NoiseProcess(ABC):
    """One noise process. Instances are immutable settings (built from a recipe's `noise` section)."""

    name: ClassVar[str]
    level_name: ClassVar[str]
    """How a level is called in tables and JSON (`sigma`, `t`)."""
    level_symbol: ClassVar[str]
    """How a level is written in figures (`σ`, `t`)."""
    coordinate_label: ClassVar[str]
    """The figure axis of `coordinate` (`ln σ`, `t`)."""
    partitions: ClassVar[tuple[str, ...]] = ("equiprobable", "uniform")
    """The partition rules `boundaries` knows; the first is the default."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: "NoiseConfig") -> "NoiseProcess":
        """The process a recipe's `noise` section describes (raise ValueError on settings it cannot take)."""

    @abstractmethod
    def full_range(self) -> tuple[float, float]:
        """(lowest, highest) noise level: the e2e baseline trains on all of it."""

    @abstractmethod
    def boundaries(self, num_blocks: int, partition: str) -> list[float]:
        """The B+1 increasing boundaries, from the lowest level to the highest."""

    @abstractmethod
    def mass(self, lo: float, hi: float) -> float:
        """The share of the training distribution in [lo, hi] (the blocks' masses sum to 1)."""

    @abstractmethod
    def draw(self, n: int, lo: float, hi: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training noise levels from the training distribution restricted to [lo, hi] (float32)."""

    @abstractmethod
    def schedule(self, num_steps: int, rho: float = 7.0) -> list[float]:
        """The sampling steps' levels, highest first, ending where sampling ends (0 for EDM).

        `rho` is EDM's step-spacing exponent; a process without one ignores it."""

    @abstractmethod
    def coordinate(self, level: float | np.ndarray) -> float | np.ndarray:
        """Where a level sits on the axis that overlap and figures treat as linear (ln sigma, t)."""

    @abstractmethod
    def level_at(self, x: float) -> float:
        """The inverse of `coordinate`."""

    @abstractmethod
    def density(self, x: np.ndarray) -> np.ndarray:
        """Training density over `coordinate` on the full range (integrates to 1): the partition figure's curve."""

    @abstractmethod
    def describe(self) -> str:
        """One line naming the process and its settings (figure titles)."""

    def validate(self) -> None:
        """A RecipeError when the settings leave blocks nothing to own (checked by split before `boundaries`)."""

    def settings_text(self) -> str:
        """The settings that decide how mass is spread, as the user writes them (error messages)."""
        return f"noise.process={self.name}"

    def widen_hint(self) -> str:
        """How to give a too-narrow block more mass (error messages)."""
        return "spread the training distribution wider"

    def expand(self, lo: float, hi: float, gamma: float) -> tuple[float, float]:
        """The training range of a block owning [lo, hi] with overlap gamma.

        The rule for every process: widen by gamma times the range's width on each side, measured in
        `coordinate`, clamped to the full range (for EDM: [lo / a, hi * a], a = (hi / lo) ** gamma).
        """
        x_lo, x_hi = float(self.coordinate(lo)), float(self.coordinate(hi))
        pad = gamma * (x_hi - x_lo)
        low, high = self.full_range()
        return max(self.level_at(x_lo - pad), low), min(self.level_at(x_hi + pad), high)

    def ticks(self) -> list[float]:
        """Levels worth labelling on a figure's level axis. Default: the two ends of the full range."""
        return list(self.full_range())

    def format_level(self, level: float) -> str:
        return f"{level:.4g}"


def owned_ranges(bounds: Sequence[float]) -> list[tuple[float, float]]:
    """Owned [lo, hi] per block, in block order: block 0 gets the highest range (every process)."""
    num_blocks = len(bounds) - 1
    return [(bounds[num_blocks - 1 - i], bounds[num_blocks - i]) for i in range(num_blocks)]


def owner_of(level: float, owned: Sequence[tuple[float, float]]) -> int:
    """Index of the block that owns `level` at sampling time (un-expanded ranges).

    Ranges are half-open: block i owns lo_i < level <= hi_i, so a boundary level belongs to the
    lower-noise block. Levels above the highest range go to block 0, levels at or below the lowest
    to the last block.
    """
    for i, (lo, hi) in enumerate(owned):
        if lo < level <= hi:
            return i
    return 0 if level > owned[0][1] else len(owned) - 1


def process_names() -> list[str]:
    return REGISTRY.names()


def register_process(name: str, path: str) -> None:
    """Register a process by "module:Class" (plug-ins and tests); child processes inherit it."""
    REGISTRY.register(name, path)


def unregister_process(name: str) -> None:
    REGISTRY.unregister(name)


def process_class(name: str) -> type[NoiseProcess]:
    """The class of the process called `name` (ValueError naming the choices otherwise)."""
    return REGISTRY.load(name)


__all__ = [
    "PROCESSES",
    "PROCESSES_ENV",
    "REGISTRY",
    "NoiseProcess",
    "owned_ranges",
    "owner_of",
    "process_class",
    "process_names",
    "register_process",
    "unregister_process",
]
