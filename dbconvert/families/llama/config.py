"""The Llama recipe section: a Hugging Face checkpoint folder (its config.json wins) or these fields."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from dbconvert.families.llama.model import LlamaShape
from dbconvert.schema import ModelConfig


class LlamaConfig(ModelConfig):
    """A Llama: either a Hugging Face checkpoint folder (its config.json wins) or these fields."""

    family: Literal["llama"] = "llama"
    layers: int = Field(8, ge=1)
    hidden: int = Field(128, ge=2)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=2)
    intermediate: int | None = Field(None, ge=1)
    vocab_size: int = Field(512, ge=2)
    context: int = Field(128, ge=2)
    max_positions: int | None = Field(None, ge=2)
    rope_theta: float = Field(10000.0, gt=0)
    rope_parameters: dict[str, Any] | None = None
    rms_norm_eps: float = Field(1e-6, gt=0)
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    tokenizer: str | None = None
    train_tokenizer: bool = False
    """Train a new BPE even though model.checkpoint is set and has no tokenizer (otherwise an error)."""
    init_seed: int = 0

    @model_validator(mode="after")
    def _shapes(self) -> "LlamaConfig":
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"model.hidden {self.hidden} is not divisible by model.heads {self.heads}")
        if self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"model.heads {self.heads} is not a multiple of model.kv_heads {self.kv_heads}")
        if self.max_positions is not None and self.context > self.max_positions:
            raise ValueError(
                f"model.context {self.context} is longer than the model's maximum of {self.max_positions} positions; "
                f"set model.context <= {self.max_positions}"
            )
        return self

    def shape(self, depth: int | None = None) -> LlamaShape:
        head_dim = self.head_dim or self.hidden // self.heads
        intermediate = self.intermediate or 32 * math.ceil(8 * self.hidden / 3 / 32)
        rope = self.rope_parameters or {"rope_type": "default", "rope_theta": self.rope_theta}
        return LlamaShape(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            intermediate_size=intermediate,
            num_layers=depth or self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads or self.heads,
            head_dim=head_dim,
            max_positions=self.max_positions or self.context,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            rope_parameters=dict(rope),
        )
