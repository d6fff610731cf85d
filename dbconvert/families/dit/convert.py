"""DiT checkpoint conversion as data: the reference key names, the key map of each block, and what the
weights mean (their parameterisation, recorded in the metadata of dbconvert's safetensors exports)."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from dbconvert.checkpoint import KeyMap, apply_key_map, layer_slice_key_map, map_lazily, read_metadata
from dbconvert.errors import CheckpointError, RecipeError
from dbconvert.families.dit.config import DiTConfig
from dbconvert.families.dit.model import ARCHS, variance_channel_mask
from dbconvert.families.dit.objective import ddpm_sigmas
from dbconvert.noise import NoiseSettings
from dbconvert.tensorio import LazyState, Spec

METADATA_KEY = "dbconvert"
"""safetensors metadata key of a dbconvert export: JSON holding at least {"parameterization": {"name": ...}}."""

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
    return layer_slice_key_map(SHARED_KEYS, "blocks", LAYER_KEYS, start, end)


def is_layer_key(key: str, num_layers: int) -> bool:
    """True for `blocks.{k}.<layer key>` with k < num_layers (the keys a block slice renames)."""
    parts = key.split(".", 2)
    return (
        len(parts) == 3
        and parts[0] == "blocks"
        and parts[1].isdigit()
        and int(parts[1]) < num_layers
        and parts[2] in LAYER_KEYS
    )


def drop_variance(
    state: Mapping[str, torch.Tensor],
    arch: str,
    in_channels: int,
    learn_sigma: bool,
    depth: int,
    expected: Mapping[str, Spec] | None = None,
) -> Mapping[str, torch.Tensor]:
    """learn_sigma checkpoints predict (mean, variance) channels; the EDM denoiser keeps the mean.

    A lazy `state` (with the network's `expected` specs) gives a lazy result: nothing is read here.
    """
    transforms = {}
    if learn_sigma:
        keep = variance_channel_mask(ARCHS[arch].patch_size, in_channels)
        transforms = {"final_layer.linear.weight": lambda w: w[keep], "final_layer.linear.bias": lambda b: b[keep]}
    if isinstance(state, LazyState) and expected is not None:
        return map_lazily(
            state, block_key_map(0, depth), expected, transforms=transforms, what="DiT checkpoint conversion"
        )
    return apply_key_map(state, block_key_map(0, depth), transforms=transforms, what="DiT checkpoint conversion")


# --- what the weights mean --------------------------------------------------------------------


def recorded_parameterization(checkpoint: str | Path) -> dict[str, Any] | None:
    """The parameterisation a dbconvert export recorded in its metadata; None for any other checkpoint."""
    meta = read_metadata(checkpoint)
    if METADATA_KEY not in meta:
        return None
    try:
        record = json.loads(meta[METADATA_KEY])["parameterization"]
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint {checkpoint}: its {METADATA_KEY!r} metadata has no valid parameterization "
            "record; remove the metadata or export the run again"
        ) from None
    return record


def recorded_sigma_range(checkpoint: str | Path) -> list[float] | None:
    """The owned sigma range a block export recorded in its metadata; None for a full-range network."""
    meta = read_metadata(checkpoint)
    try:
        found = json.loads(meta[METADATA_KEY]).get("sigma_range") if METADATA_KEY in meta else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return found if isinstance(found, list) and len(found) == 2 else None


def parameterization_record(cfg: DiTConfig) -> dict[str, Any]:
    """The manifest / export record of a resolved parameterisation (`auto` left in a recipe means `edm`)."""
    name = "edm" if cfg.parameterization == "auto" else cfg.parameterization
    if name != "ddpm-eps":
        return {"name": name}
    sigmas = ddpm_sigmas(cfg.ddpm)
    return {"name": name, **cfg.ddpm.model_dump(), "sigma_range": [sigmas[0].item(), sigmas[-1].item()]}


def resolve_parameterization(cfg: DiTConfig, noise: NoiseSettings, recorded: dict[str, Any] | None) -> list[str]:
    """Set `cfg.parameterization` from `auto`, check it against the checkpoint and the noise range; return notes.

    `auto` is the checkpoint's recorded parameterisation (a dbconvert export), else `ddpm-eps` for a
    checkpoint (the reference DiT is a DDPM epsilon-predictor) and `edm` for a fresh network.
    """
    where = f"checkpoint {cfg.checkpoint}"
    assumed: list[str] = []
    if cfg.parameterization == "auto":
        name = recorded["name"] if recorded else ("ddpm-eps" if cfg.checkpoint else "edm")
        if cfg.checkpoint and not recorded:
            assumed = [
                f"{where} does not say what its network predicts, so it is taken as a DDPM epsilon-predictor "
                "(ddpm-eps, as the reference DiT); if it is a .pt export of a dbconvert edm run, split it with "
                "model.parameterization=edm"
            ]
    else:
        name = cfg.parameterization
        if recorded and recorded["name"] != name:
            raise CheckpointError(
                f"{where} holds a {recorded['name']!r} network (its {METADATA_KEY} metadata says "
                f"so), but model.parameterization is {name!r}; set "
                f"model.parameterization={recorded['name']} or auto"
            )
    if name not in ("edm", "ddpm-eps"):
        raise CheckpointError(
            f"{where} records the unknown parameterization {name!r}; this dbconvert knows edm and ddpm-eps"
        )
    cfg.parameterization = name
    return assumed + ddpm_notes(cfg, noise, recorded, where) if name == "ddpm-eps" else assumed


def ddpm_notes(cfg: DiTConfig, noise: NoiseSettings, recorded: dict[str, Any] | None, where: str) -> list[str]:
    """Check a ddpm-eps source's schedule against its recorded one and the noise range; notes to show."""
    schedule = cfg.ddpm.model_dump()
    if recorded:
        mismatch = [k for k in schedule if k in recorded and recorded[k] != schedule[k]]
        if mismatch:
            want = " ".join(f"model.ddpm.{k}={recorded[k]}" for k in schedule if k in recorded)
            raise CheckpointError(
                f"{where} was trained on a DDPM schedule with {mismatch[0]}={recorded[mismatch[0]]} "
                f"(its metadata), but the recipe has "
                f"model.ddpm.{mismatch[0]}={schedule[mismatch[0]]}; "
                f"set {want}"
            )
    sigmas = ddpm_sigmas(cfg.ddpm)
    lo, hi, last = sigmas[0].item(), sigmas[-1].item(), cfg.ddpm.timesteps - 1
    if noise.sigma_max > hi * (1 + 1e-9):
        raise RecipeError(
            f"noise.sigma_max={noise.sigma_max:g} lies above the largest noise level of the ddpm-eps "
            f"schedule (sigma = {hi:.4g} at t = {last}), which the network never saw; "
            f"set noise.sigma_max <= {hi:.4g}"
        )
    if noise.sigma_min < lo:
        return [
            f"noise.sigma_min={noise.sigma_min:g} lies below the smallest noise level of the ddpm-eps schedule "
            f"(sigma = {lo:.4g} at t = 0); smaller sigmas are fed t = 0, which is harmless: D stays within "
            "sigma * |eps_hat| of z there"
        ]
    return []


# --- export -----------------------------------------------------------------------------------

EXPORT_SUFFIXES = (".pt", ".pth", ".safetensors")


def export_key_map(depth: int) -> KeyMap:
    """Reference DiT key -> network key for a DiT of `depth` layers: the reverse of the import map.

    The network already uses the reference names, so the map is the identity; it is still spelled out
    so that a key the reference does not have fails the export instead of being written.
    """
    return {ref: ours for ours, ref in block_key_map(0, depth).items()}


def export_state(network_state: dict[str, torch.Tensor], depth: int, what: str) -> dict[str, torch.Tensor]:
    """The reference-format state dict (learn_sigma=False: C output channels) of a DiT of `depth` layers."""
    return apply_key_map(network_state, export_key_map(depth), what=what)


def export_metadata(record: dict[str, Any], name: str, sigma_range: tuple[float, float] | None) -> dict[str, str]:
    """The safetensors metadata of an export: what the weights mean, so `split` with `auto` reads them right."""
    payload: dict[str, Any] = {"parameterization": record, "exported": name}
    if sigma_range is not None:
        payload["sigma_range"] = list(sigma_range)
    return {METADATA_KEY: json.dumps(payload)}
