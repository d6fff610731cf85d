"""What a model family must provide to the generic split / train / sample machinery."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from dbconvert.config import ModelConfig, Recipe
    from dbconvert.noise import NoiseSettings
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult


@dataclass
class Source:
    """The source network ready to be cut: its layer count and its state dict (reference names)."""

    network: nn.Module
    num_layers: int
    checkpoint_sha256: str | None = None


def shard_slice(local: int, shard: tuple[int, int]) -> tuple[int, slice]:
    """(global batch, this rank's slice of it) for a local batch of `local` examples."""
    rank, world = shard
    return local * world, slice(rank * local, (rank + 1) * local)


class Family(ABC):
    """One model family (DiT, Llama, ...). Stateless: every method takes the resolved recipe."""

    name: ClassVar[str]
    config_cls: ClassVar[type["ModelConfig"]]

    @abstractmethod
    def source(self, recipe: "Recipe") -> Source:
        """Build the source network from the recipe's config, or load it from its checkpoint."""

    @abstractmethod
    def block_network(self, recipe: "Recipe", depth: int) -> nn.Module:
        """An empty stand-alone network of `depth` layers, the skeleton a block's weights load into."""

    @abstractmethod
    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        """State dict of the block holding source layers [start, end), through an explicit key map."""

    @abstractmethod
    def denoiser(self, recipe: "Recipe", network: nn.Module, noise: "NoiseSettings") -> nn.Module:
        """Wrap a network into the family's denoiser (preconditioning + noise conditioning)."""

    @abstractmethod
    def load_data(self, recipe: "Recipe", split: str | None = None) -> Any:
        """The training data, validated against the model config."""

    @abstractmethod
    def training_loss(
        self,
        denoiser: nn.Module,
        batch: Any,
        sigma_range: tuple[float, float],
        recipe: "Recipe",
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch with sigmas drawn inside `sigma_range`; returns (loss, sigma stats).

        `shard` = (rank, world size) under data parallelism: `batch` is slice `rank` of a global
        batch `world` times larger. Draw the randomness for the global batch and keep that slice
        (`shard_slice`), so every example gets the same noise as in a single-process run.
        """

    def e2e_model(self, recipe: "Recipe", network: nn.Module, noise: "NoiseSettings") -> nn.Module:
        """What `train-e2e` trains around the full network. Default: the same denoiser as a block."""
        return self.denoiser(recipe, network, noise)

    def e2e_loss(
        self, model: nn.Module, batch: Any, recipe: "Recipe", noise: "NoiseSettings", generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the e2e baseline. Default: the block loss over the full [sigma_min, sigma_max]."""
        return self.training_loss(model, batch, (noise.sigma_min, noise.sigma_max), recipe, generator, shard)

    @abstractmethod
    def sample(self, run: "Run", request: "SampleRequest") -> "SampleResult":
        """Generate with the run's blocks (or its e2e network) and write the output into the run."""

    def bind(self, run: "Run") -> "Family":
        """This family for one run, for families that read its shared artefacts (tokenizer, target table).

        Returns a new object rather than mutating the registry's shared instance. Default: itself.
        """
        return self

    def prepare_run(self, recipe: "Recipe", run_dir: Path, source: Source) -> None:
        """Write shared artefacts into a new run (e.g. a text target table). Default: nothing."""
