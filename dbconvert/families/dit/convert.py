"""DiT checkpoint conversion as data: the reference key names, and the key map of each block."""

from __future__ import annotations

import torch

from dbconvert.checkpoint import KeyMap, apply_key_map
from dbconvert.families.dit.model import ARCHS, variance_channel_mask

SHARED_KEYS: tuple[str, ...] = (
    "pos_embed",
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias",
)
"""Keys every block copies from the source: embedders, positional table, final layer."""

LAYER_KEYS: tuple[str, ...] = (
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "adaLN_modulation.1.weight",
    "adaLN_modulation.1.bias",
)
"""Keys of one transformer layer, below `blocks.{k}.`."""


def block_key_map(start: int, end: int) -> KeyMap:
    """Block key -> source key for the block holding source layers [start, end)."""
    key_map = {key: key for key in SHARED_KEYS}
    for local, src in enumerate(range(start, end)):
        for name in LAYER_KEYS:
            key_map[f"blocks.{local}.{name}"] = f"blocks.{src}.{name}"
    return key_map


def is_layer_key(key: str, num_layers: int) -> bool:
    """True for `blocks.{k}.<layer key>` with k < num_layers (the keys a block slice renames)."""
    parts = key.split(".", 2)
    return len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < num_layers and parts[2] in LAYER_KEYS


def drop_variance(state: dict[str, torch.Tensor], arch: str, in_channels: int, learn_sigma: bool,
                  depth: int) -> dict[str, torch.Tensor]:
    """learn_sigma checkpoints predict (mean, variance) channels; the EDM denoiser keeps the mean."""
    transforms = {}
    if learn_sigma:
        keep = variance_channel_mask(ARCHS[arch].patch_size, in_channels)
        transforms = {"final_layer.linear.weight": lambda w: w[keep], "final_layer.linear.bias": lambda b: b[keep]}
    return apply_key_map(state, block_key_map(0, depth), transforms=transforms, what="DiT checkpoint conversion")
