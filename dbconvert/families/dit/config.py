"""The DiT recipe section: a named architecture plus the data shape it models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dbconvert.families.dit.model import ARCHS, DiTShape
from dbconvert.schema import ModelConfig


class DiTConfig(ModelConfig):
    """A DiT: a named architecture (`DiT-S/2`, ...) plus the data shape it models."""

    family: Literal["dit"] = "dit"
    arch: str = "DiT-Tiny/2"
    depth: int | None = Field(None, ge=1)
    input_size: int = Field(32, ge=1)
    in_channels: int = Field(3, ge=1)
    num_classes: int = Field(10, ge=0)
    learn_sigma: bool = False
    init_seed: int = 0

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
