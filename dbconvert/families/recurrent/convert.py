"""Huginn checkpoints in and out, as explicit key maps (data), and the fresh network's initialisation.

The network's own key names below `transformer.` and `lm_head` ARE Huginn's (its Hugging Face modeling file,
`raven_modeling_minimal.py`), so the map is the identity on them; the diffusion path (`noisy_in`, `sigma_embed`,
each core / coda layer's `adaLN_modulation.1`) is new and created here. Unknown or missing keys, layer counts
other than the recipe's and shape mismatches are one-line errors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dbconvert.checkpoint import KeyMap, apply_key_map, open_checkpoint, save_weights
from dbconvert.errors import CheckpointError
from dbconvert.families.llama.model import SigmaEmbedder
from dbconvert.families.recurrent.model import RecurrentNet, RecurrentShape

LAYER_KEYS = (
    "norm_1.weight",
    "attn.Wqkv.weight",
    "attn.proj.weight",
    "norm_2.weight",
    "mlp.fc.weight",
    "mlp.proj.weight",
    "norm_3.weight",
    "norm_4.weight",
)
"""A sandwich block's keys in Huginn's layout (plus `attn.qk_bias` with qk_bias)."""
QK_BIAS = "attn.qk_bias"
MOD_KEYS = ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
"""The sigma modulation of a core / coda layer (new)."""
STACKS = {"prelude": "prelude_layers", "core_block": "core_layers", "coda": "coda_layers"}
"""Huginn's three stacks under `transformer.`, and the recipe field giving each one's layer count."""
IGNORED = ("freqs_cis",)
"""Checkpoint keys that are not weights: Huginn stores its rotary table as a buffer (recomputed from rope_theta)."""


def layer_keys(shape: RecurrentShape) -> tuple[str, ...]:
    return LAYER_KEYS + ((QK_BIAS,) if shape.qk_bias else ())


def new_keys(shape: RecurrentShape) -> tuple[str, ...]:
    """Keys a Huginn checkpoint does not have: the diffusion path."""
    keys = [
        "noisy_in.weight",
        *(["noisy_in.bias"] if shape.noisy_anchor else []),
        *(f"sigma_embed.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    ]
    for stack in ("core_block", "coda"):
        for i in range(getattr(shape, STACKS[stack])):
            keys += [f"transformer.{stack}.{i}.{k}" for k in MOD_KEYS]
    return tuple(keys)


def huginn_key_map(shape: RecurrentShape) -> KeyMap:
    """Network key -> Huginn checkpoint key, for everything a Huginn checkpoint holds."""
    out = {k: k for k in ("transformer.wte.weight", "transformer.adapter.weight", "transformer.ln_f.weight")}
    if not shape.tie_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    for stack, count in STACKS.items():
        for i in range(getattr(shape, count)):
            out.update({f"transformer.{stack}.{i}.{k}": f"transformer.{stack}.{i}.{k}" for k in layer_keys(shape)})
    return out


def network_key_map(shape: RecurrentShape) -> KeyMap:
    """Block key -> source key: every block is a whole copy of the network (the core is the block)."""
    keys = {**huginn_key_map(shape), **{k: k for k in new_keys(shape)}}
    return dict(sorted(keys.items()))


def layer_counts(keys: list[str]) -> dict[str, int]:
    """How many layers each of Huginn's stacks has in a checkpoint's keys."""
    counts = {}
    for stack in STACKS:
        found = {int(m.group(1)) for k in keys if (m := re.match(rf"transformer\.{stack}\.(\d+)\.", k))}
        counts[stack] = max(found) + 1 if found else 0
    return counts


def checkpoint_files(path: str | Path) -> list[Path]:
    """A .safetensors / .pt file, or the weight files of a folder (save_pretrained)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin")) or sorted(p.glob("*.pt"))
        if files:
            return files
        raise CheckpointError(
            f"model.checkpoint {path} holds no .safetensors, .bin or .pt weights; give a Huginn "
            "checkpoint folder or file"
        )
    raise CheckpointError(f"model.checkpoint {path} not found; give a Huginn checkpoint folder or file")


def read_huginn(path: str | Path, shape: RecurrentShape) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The network's Huginn tensors from a checkpoint, checked against `shape` (layer counts, keys, shapes)."""
    files = checkpoint_files(path)
    state = open_checkpoint(files)
    keys = list(state)
    counts = layer_counts(keys)
    want = {stack: getattr(shape, field) for stack, field in STACKS.items()}
    if counts != want:
        got = "/".join(str(counts[s]) for s in STACKS)
        fix = " ".join(f"model.{STACKS[s]}={counts[s]}" for s in STACKS)
        raise CheckpointError(
            f"checkpoint {path} has {got} prelude/core/coda layers, the recipe "
            f"{'/'.join(str(want[s]) for s in STACKS)}; set {fix}"
        )
    key_map = huginn_key_map(shape)
    tied_head = shape.tie_embeddings and "lm_head.weight" in keys  # Huginn ties lm_head to wte; the copy is unused
    out = apply_key_map(
        state,
        key_map,
        ignored=lambda k: k in IGNORED or (tied_head and k == "lm_head.weight"),
        what=f"Huginn checkpoint {path}",
    )
    expected = {k: v.shape for k, v in reference_shapes(shape).items()}
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise CheckpointError(
                f"checkpoint {path}: {key} has shape {tuple(tensor.shape)}, the recipe's network "
                f"{tuple(expected[key])}; set model.hidden / heads / intermediate / vocab_size to "
                "the checkpoint's"
            )
    return out, files


def reference_shapes(shape: RecurrentShape) -> dict[str, torch.Tensor]:
    """The network's tensors on the meta device (their shapes, for checking a checkpoint)."""
    with torch.device("meta"):
        return RecurrentNet(shape).state_dict()


def new_parameters(shape: RecurrentShape, seed: int) -> dict[str, torch.Tensor]:
    """The diffusion path, created at conversion (seeded): the sigma embedder (random), the zero modulation, and
    `noisy_in`: at high noise c_in * z is ~ N(0, I), so a gain of Huginn's state std (init_std * embed_scale) on
    it (a scaled identity, or orthonormal columns for a narrower target space) makes the noisiest state the
    distribution of Huginn's own initial state s_0."""
    s = shape
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    sigma = SigmaEmbedder(s.hidden_size, s.sigma_features)
    out = {f"sigma_embed.{k}": v.detach() for k, v in sigma.state_dict().items()}
    if s.target_size == s.hidden_size:
        weight = torch.eye(s.hidden_size)
    else:
        q, _ = torch.linalg.qr(torch.randn(s.hidden_size, s.target_size, generator=gen))
        weight = q * math.sqrt(s.hidden_size / s.target_size)
    gain = s.state_std / (10 if s.noisy_anchor else 1)
    out["noisy_in.weight"] = gain * weight
    if s.noisy_anchor:
        out["noisy_in.bias"] = s.state_std * torch.randn(s.hidden_size, generator=gen)
    for stack in ("core_block", "coda"):
        for i in range(getattr(s, STACKS[stack])):
            out[f"transformer.{stack}.{i}.adaLN_modulation.1.weight"] = torch.zeros(6 * s.hidden_size, s.hidden_size)
            out[f"transformer.{stack}.{i}.adaLN_modulation.1.bias"] = torch.zeros(6 * s.hidden_size)
    return out


def fresh_huginn_state(shape: RecurrentShape, seed: int) -> dict[str, torch.Tensor]:
    """A fresh network's Huginn weights (seeded): normal(0, init_std) weights, output projections scaled down by
    sqrt(2 * unrolled depth) (Huginn's scaled init of residual outputs), unit norms, zero qk bias."""
    s = shape
    gen = torch.Generator().manual_seed(seed)
    depth = s.prelude_layers + s.core_layers * s.mean_recurrence + s.coda_layers
    out: dict[str, torch.Tensor] = {}
    for key, like in reference_shapes(s).items():
        if key not in huginn_key_map(s):
            continue
        if key.endswith("norm_1.weight") or ".norm_" in key or key.endswith("ln_f.weight"):
            out[key] = torch.ones(like.shape)
        elif key.endswith(QK_BIAS):
            out[key] = torch.zeros(like.shape)
        else:
            std = s.init_std / math.sqrt(2 * depth) if key.endswith("proj.weight") else s.init_std
            out[key] = std * torch.randn(like.shape, generator=gen)
    return out


def source_state(
    shape: RecurrentShape, seed: int, huginn: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The whole converted network's state: Huginn's weights (a checkpoint's, or fresh) plus the new diffusion path,
    checked to be exactly the network's keys."""
    state = {**(dict(huginn) if huginn is not None else fresh_huginn_state(shape, seed)), **new_parameters(shape, seed)}
    expected = set(reference_shapes(shape))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(
            f"the converted network's keys do not match it (missing {missing[:3]}, extra {extra[:3]})"
        )
    return state


def huginn_config(shape: RecurrentShape, context: int) -> dict[str, object]:
    """config.json in Huginn's (RavenConfig) names, for an exported folder."""
    return {
        "architectures": ["RavenForCausalLM"],
        "model_type": "huginn_raven",
        "n_embd": shape.hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "n_layers_in_prelude": shape.prelude_layers,
        "n_layers_in_recurrent_block": shape.core_layers,
        "n_layers_in_coda": shape.coda_layers,
        "mean_recurrence": shape.mean_recurrence,
        "mean_backprop_depth": shape.backprop_depth,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "padded_vocab_size": shape.vocab_size,
        "rope_base": shape.rope_theta,
        "norm_eps": shape.norm_eps,
        "qk_bias": shape.qk_bias,
        "tie_embeddings": shape.tie_embeddings,
        "block_size": context,
        "bias": False,
        "init_values": {"std": shape.init_std, "embed_scale": shape.embed_scale},
    }


def write_huginn_folder(network: nn.Module, out: Path, context: int) -> None:
    """model.safetensors in Huginn's key layout (the diffusion path left out) and its config.json."""
    assert isinstance(network, RecurrentNet)
    shape = network.shape
    state = network.state_dict()
    tensors = {
        src: state[dst].detach().to(torch.float32).contiguous().clone() for dst, src in huginn_key_map(shape).items()
    }
    if shape.tie_embeddings:  # Huginn's file declares lm_head tied to wte; write it, as save_pretrained does
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "model.safetensors", tensors, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(huginn_config(shape, context), indent=2) + "\n")
