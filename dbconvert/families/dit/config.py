"""The DiT recipe section: a named architecture plus the data shape it models."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from dbconvert.families.dit.model import ARCHS, DiTShape
from dbconvert.schema import ModelConfig, Section, Seed


class DDPMSchedule(Section):
    """The discrete DDPM schedule a `ddpm-eps` network was trained on: linear betas over `timesteps` steps.

    The defaults are the reference DiT's (facebookresearch/DiT `create_diffusion`: linear, 1e-4..0.02, 1000).
    """

    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    timesteps: int = Field(1000, ge=2)

    @model_validator(mode="after")
    def _increasing(self) -> "DDPMSchedule":
        if self.beta_start > self.beta_end:
            raise ValueError(
                f"model.ddpm.beta_start {self.beta_start:g} is above model.ddpm.beta_end {self.beta_end:g}: "
                "a DDPM schedule adds noise, its betas increase (the reference DiT's: 1e-4 to 0.02)"
            )
        return self


class DiTConfig(ModelConfig):
    """A DiT: a named architecture (`DiT-S/2`, ...) plus the data shape it models."""

    family: Literal["dit"] = "dit"
    data_modality: ClassVar[str] = "image"
    arch: str = "DiT-Tiny/2"
    depth: int | None = Field(None, ge=1)
    input_size: int = Field(32, ge=1)
    in_channels: int = Field(3, ge=1)
    num_classes: int = Field(10, ge=0)
    learn_sigma: bool = False
    init_seed: Seed = 0
    parameterization: Literal["auto", "edm", "ddpm-eps"] = "auto"
    """`auto`: `ddpm-eps` for a checkpoint (unless its dbconvert metadata says otherwise), `edm` for a fresh
    network. `split` records the resolved value in the run; an `auto` left in a run's recipe comes from a
    run split before parameterisations were recorded, which always used `edm`."""
    ddpm: DDPMSchedule = Field(default_factory=DDPMSchedule)

    @model_validator(mode="after")
    def _arch(self) -> "DiTConfig":
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.input_size % ARCHS[self.arch].patch_size:
            raise ValueError(f"model.input_size {self.input_size} is not divisible by the patch size of {self.arch}")
        return self

    def shape(self, learn_sigma: bool | None = None) -> DiTShape:
        a = ARCHS[self.arch]
        return DiTShape(
            input_size=self.input_size,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            depth=self.depth or a.depth,
            hidden_size=a.hidden_size,
            num_heads=a.num_heads,
            patch_size=a.patch_size,
            learn_sigma=self.learn_sigma if learn_sigma is None else learn_sigma,
        )
