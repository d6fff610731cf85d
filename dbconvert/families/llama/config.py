"""The Llama recipe section: a Hugging Face checkpoint folder (its config.json wins) or these fields."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from dbconvert.families.llama.model import LlamaShape
from dbconvert.schema import ModelConfig, Seed


class LlamaConfig(ModelConfig):
    """A Llama: either a Hugging Face checkpoint folder (its config.json wins) or these fields."""

    family: Literal["llama"] = "llama"
    data_modality: ClassVar[str] = "text"
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
    init_seed: Seed = 0
    objective: Literal["continuous", "masked"] = "continuous"
    """continuous: diffusion over the next token's embedding (DESIGN 5); masked: masked (absorbing-state)
    diffusion, MD4-style, with bidirectional attention (needs noise.process=masking; docs/families/masked.md)."""
    tokenizer_type: Literal["bpe", "char"] = "bpe"
    """What split trains when there is no tokenizer to take: a byte-level BPE of model.vocab_size, or a
    character-level tokenizer (one id per character of the data; bits per character, text8)."""
    # --- the vocabulary cost of a block (docs/results/memory.md, "Memory of language-model blocks") ---
    freeze_embedding: bool = False
    """Input embedding frozen: no gradient, no optimizer state, no EMA copy (its EMA is the same tensor)."""
    head: Literal["trainable", "tied-table"] = "trainable"
    """tied-table: the head is the run's frozen target table times a learned scale (no V x H weight per block);
    it is also fused with the likelihood term into one matmul. A checkpoint's own lm_head is then not used."""
    head_rank: int | None = Field(None, ge=1)
    """A trainable head of rank r: Linear(H, r) then Linear(r, V) instead of one V x H matrix (a checkpoint's
    lm_head is factorised by its best rank-r approximation). Per sampling step the head then costs V x r;
    with model.target_dim it is what makes a step ~B-fold cheaper than e2e (docs/results/speed.md)."""
    target_dim: int | None = Field(None, ge=2)
    """Dimension of the shared target space (the diffusion variable). None = model.hidden (the source embedding,
    rows normalised). Smaller: the embedding's top principal directions, rows normalised; the likelihood term and
    D = softmax @ T then cost V x target_dim per sampling step instead of V x hidden, and with head=tied-table
    the head becomes a learned H -> target_dim projection times the table (docs/results/speed.md)."""
    noisy_anchor: bool = False
    """The noisy input path: False = EDM's c_in * z through a scaled identity (at high sigma every noisy position
    is a different random vector); True = that at 1/10 the gain plus a shared learned vector, so the noisy
    query is the same at high noise and can learn to read the context at once (docs/results/quality-llama.md)."""
    adaln_rank: int | None = Field(None, ge=1)
    """Low-rank sigma modulation: Linear(H, r) then Linear(r, 6H) instead of Linear(H, 6H) per layer."""
    calibrate_output: bool = True
    """With model.checkpoint: where a block's copied head starts worse than none, its head logits start scaled by the
    factor in (0, 1] with the lowest step-0 training loss, and training undoes the scale over the warm-up steps
    (families/llama/calibrate.py): the start is no worse than a fresh block's and the later advantage is kept
    (docs/results/quality-llama.md, "What converting a pretrained language model buys"). The weights and the
    source are unchanged."""
    loss_chunk: int = Field(0, ge=0)
    """Cross-entropy over this many positions at a time, recomputed in backward: the full (positions x V)
    logits are never alive at once. 0 = all positions at once."""

    @model_validator(mode="after")
    def _shapes(self) -> "LlamaConfig":
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"model.hidden {self.hidden} is not divisible by model.heads {self.heads}")
        if self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"model.heads {self.heads} is not a multiple of model.kv_heads {self.kv_heads}")
        if self.head_rank is not None and self.head != "trainable":
            raise ValueError(
                f"model.head_rank factorises a trainable head; model.head={self.head} has none "
                "(drop model.head_rank or set model.head=trainable)"
            )
        if self.head_rank is not None and self.head_rank >= self.hidden:
            raise ValueError(
                f"model.head_rank {self.head_rank} is not below model.hidden {self.hidden}; "
                f"use a rank < {self.hidden} (null = the full V x H head)"
            )
        if self.adaln_rank is not None and self.adaln_rank >= self.hidden:
            raise ValueError(
                f"model.adaln_rank {self.adaln_rank} is not below model.hidden {self.hidden}; "
                f"use a rank < {self.hidden} (null = the full Linear(H, 6H) modulation, which is smaller)"
            )
        if self.target_dim is not None and self.target_dim > self.hidden:
            raise ValueError(
                f"model.target_dim {self.target_dim} is larger than model.hidden {self.hidden}; "
                f"use at most {self.hidden} (null = hidden)"
            )
        if self.tokenizer_type == "char" and self.tokenizer is not None:
            raise ValueError(
                "model.tokenizer_type=char builds a tokenizer from the data; unset model.tokenizer "
                "(or drop model.tokenizer_type to use the named tokenizer)"
            )
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
            head=self.head,
            adaln_rank=self.adaln_rank,
            noisy_anchor=self.noisy_anchor,
            target_dim=self.target_dim,
            head_rank=self.head_rank,
        )
