"""Split's function check for a Llama checkpoint (issue 32): a converted layer computes what transformers computes.

Keys and shapes can all fit while the function differs: q/k rows in another rotary layout (Meta's interleaved
against Hugging Face's half-split), a key map that swaps two projections, a config field (rope_theta, its scaling,
the norm eps) not carried over. So split rebuilds a few layers two ways, on random hidden states: transformers'
own `LlamaDecoderLayer` and rotary embedding from the checkpoint's config.json and its tensors as stored, and
dbconvert's `DecoderLayer` from the converted state and the recipe shape the run records. They must agree to float
tolerance, or split refuses in one line before anything is written. One layer at a time: the check holds two
copies of one layer, never the network, so it streams as split does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from dbconvert.errors import CheckpointError
from dbconvert.families.llama.convert import ATTN_BIAS_KEYS, HF_LAYER_KEYS, MLP_BIAS_KEYS
from dbconvert.families.llama.model import DecoderLayer, LlamaShape

CHECK_TOKENS = 6


def checked_layers(num_layers: int) -> list[int]:
    """The first and the last layer: a layout error shows in every layer, a per-layer config error in these."""
    return sorted({0, num_layers - 1})


def reference_layer_output(
    hf_config: Any, hf_state: Mapping[str, torch.Tensor], index: int, x: torch.Tensor
) -> torch.Tensor:
    """transformers' decoder layer `index`, from the checkpoint's own config and tensors, on hidden states x
    (causal attention, positions 0..T-1)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = copy.deepcopy(hf_config)
    config._attn_implementation = "eager"  # an explicit additive mask, the same on every transformers version
    layer = LlamaDecoderLayer(config, layer_idx=index).float().eval()
    prefix = f"model.layers.{index}."
    own = layer.state_dict()
    layer.load_state_dict({k: hf_state[prefix + k].float() for k in own}, strict=True)
    t = x.shape[1]
    positions = torch.arange(t)[None]
    rope = LlamaRotaryEmbedding(config)(x, positions)
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    return (out[0] if isinstance(out, tuple) else out).float()


def converted_layer_output(
    shape: LlamaShape, state: Mapping[str, torch.Tensor], index: int, x: torch.Tensor
) -> torch.Tensor:
    """dbconvert's layer `index` from the converted state (its zero modulation left out: cond None), same input."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    layer = DecoderLayer(shape).float().eval()
    keys = HF_LAYER_KEYS + (ATTN_BIAS_KEYS if shape.attention_bias else ()) + (MLP_BIAS_KEYS if shape.mlp_bias else ())
    layer.load_state_dict({k: state[f"layers.{index}.{k}"].float() for k in keys}, strict=False)
    t = x.shape[1]
    positions = torch.arange(t)[None]
    rope = LlamaRotaryEmbedding(shape.hf_config())(x, positions)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.no_grad():
        out, _ = layer(x, rope, mask, None)
    return out.float()


def check_llama_function(
    hf_config: Any,
    hf_state: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    state: Mapping[str, torch.Tensor],
    what: str,
) -> float:
    """Refuse (one line) when a converted layer differs from transformers' layer of the same checkpoint; returns
    the largest relative difference seen."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for index in checked_layers(shape.num_layers):
        x = torch.randn(1, CHECK_TOKENS, shape.hidden_size, generator=gen)
        ref = reference_layer_output(hf_config, hf_state, index, x) - x  # the layer's update: what it adds
        ours = converted_layer_output(shape, state, index, x) - x
        err = float((ours - ref).abs().max()) / (1e-6 + float(ref.abs().max()))
        worst = max(worst, err)
        if not err <= 1e-3:
            raise CheckpointError(
                f"{what}: layer {index} as converted differs from transformers' layer of the same "
                f"checkpoint by {err:.2g} of its output (tolerance 1e-3): the checkpoint's layout "
                "or config is not the one this conversion reads, so nothing was written"
            )
    return worst
