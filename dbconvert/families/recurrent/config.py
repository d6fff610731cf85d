"""The recurrent family's recipe section: a Huginn-style prelude / recurrent core / coda language model."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from dbconvert.families.recurrent.model import RecurrentShape
from dbconvert.schema import ModelConfig, Seed

HUGINN_MEAN_RECURRENCE = 32
"""Huginn's mean recurrence r (its training draws r around it; inference runs it)."""
HUGINN_BACKPROP_DEPTH = 8
"""Huginn's k: gradients flow through the last k of the r core applications only."""


class RecurrentConfig(ModelConfig):
    """A recurrent-depth LM: `prelude_layers` embed the tokens to e, the `core_layers` block is applied r times to
    a state s on adapter(concat(s, e)), `coda_layers` and the (tied) head read the last state.

    model.checkpoint: a folder (or .safetensors file) in the key layout of Huginn's Hugging Face modeling file;
    the recipe's sizes must describe it (a disagreement is an error, not a guess)."""

    family: Literal["recurrent"] = "recurrent"
    data_modality: ClassVar[str] = "text"
    prelude_layers: int = Field(2, ge=1)
    core_layers: int = Field(4, ge=1)
    coda_layers: int = Field(2, ge=1)
    hidden: int = Field(128, ge=2)
    heads: int = Field(4, ge=1)
    intermediate: int | None = Field(None, ge=1)
    vocab_size: int = Field(512, ge=2)
    context: int = Field(128, ge=2)
    max_positions: int | None = Field(None, ge=2)
    rope_theta: float = Field(50000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    qk_bias: bool = True
    tie_embeddings: bool = True
    embed_scale: float | None = Field(None, gt=0)
    """Input embeddings are multiplied by this (Huginn: sqrt(hidden)); None = sqrt(hidden)."""
    init_std: float | None = Field(None, gt=0)
    """Std of the initial recurrent state (and of fresh weights), before embed_scale; None = sqrt(2 / (5 hidden))."""
    mean_recurrence: int = Field(HUGINN_MEAN_RECURRENCE, ge=1)
    """Huginn training: r ~ Poisson(lognormal rate of this mean) + 1; Huginn decoding: r = this. It is also the
    source's depth in recurrences (a block of a B-way split owns mean_recurrence / B of them)."""
    backprop_depth: int = Field(HUGINN_BACKPROP_DEPTH)
    """Huginn training: gradients through the last k = backprop_depth core applications (the rest without grad)."""
    tokenizer: str | None = None
    train_tokenizer: bool = False
    tokenizer_type: Literal["bpe", "char"] = "bpe"
    init_seed: Seed = 0
    target_dim: int | None = Field(None, ge=2)
    """Width of the shared target space (as Llama's model.target_dim); None = hidden."""
    noisy_anchor: bool = False
    """As Llama's: a shared learned vector on the noisy input (and a 10x smaller weight)."""
    loss_chunk: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _shapes(self) -> "RecurrentConfig":
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"model.hidden {self.hidden} must be model.heads {self.heads} times an even head width")
        if not 0 < self.backprop_depth <= self.mean_recurrence:
            raise ValueError(
                f"model.backprop_depth {self.backprop_depth} must be in [1, model.mean_recurrence "
                f"{self.mean_recurrence}] (gradients flow through the last k of r ~ mean_recurrence "
                "core applications)"
            )
        if self.target_dim is not None and self.target_dim > self.hidden:
            raise ValueError(
                f"model.target_dim {self.target_dim} is larger than model.hidden {self.hidden}; "
                f"use at most {self.hidden} (null = hidden)"
            )
        if self.tokenizer_type == "char" and self.tokenizer is not None:
            raise ValueError("model.tokenizer_type=char builds a tokenizer from the data; unset model.tokenizer")
        if self.max_positions is not None and self.context > self.max_positions:
            raise ValueError(f"model.context {self.context} is longer than model.max_positions {self.max_positions}")
        return self

    def shape(self) -> RecurrentShape:
        return RecurrentShape(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            num_heads=self.heads,
            intermediate_size=self.intermediate or 32 * math.ceil(8 * self.hidden / 3 / 32),
            prelude_layers=self.prelude_layers,
            core_layers=self.core_layers,
            coda_layers=self.coda_layers,
            max_positions=self.max_positions or self.context,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            qk_bias=self.qk_bias,
            tie_embeddings=self.tie_embeddings,
            embed_scale=self.embed_scale or math.sqrt(self.hidden),
            init_std=self.init_std or math.sqrt(2 / (5 * self.hidden)),
            mean_recurrence=self.mean_recurrence,
            backprop_depth=self.backprop_depth,
            target_dim=self.target_dim,
            noisy_anchor=self.noisy_anchor,
        )
