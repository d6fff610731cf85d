"""Llama checkpoint conversion as data: Hugging Face key maps, reading save_pretrained folders, the target table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from pydantic import ValidationError

from dbconvert.building import load_network, meta_specs
from dbconvert.checkpoint import KeyMap, apply_key_map, layer_slice_key_map, load_strict, map_lazily, open_checkpoint
from dbconvert.errors import CheckpointError, RecipeError
from dbconvert.families.llama.config import LlamaConfig
from dbconvert.families.llama.model import DecoderLayer, LlamaBlockNet, LlamaShape, SigmaEmbedder
from dbconvert.schema import one_line
from dbconvert.tensorio import LazyState, Spec, spec_of
from dbconvert.quiet_transformers import quiet_transformers

TARGETS_FILE = "targets.safetensors"

NEW_KEYS: tuple[str, ...] = (
    "noisy_in.weight",
    "sigma_embed.mlp.0.weight",
    "sigma_embed.mlp.0.bias",
    "sigma_embed.mlp.2.weight",
    "sigma_embed.mlp.2.bias",
)
"""Keys a Hugging Face checkpoint does not have: the noisy-input path, created at conversion."""


def head_keys(shape: LlamaShape) -> tuple[str, ...]:
    """The head's keys: a trainable V x H matrix, or (tied-table) one learned scale on the run's target
    table, or a learned H -> target_dim projection when the target space is narrower than the hidden state."""
    if shape.head == "trainable":
        return ("lm_head.0.weight", "lm_head.1.weight") if shape.head_rank else ("lm_head.weight",)
    return ("head_proj.weight",) if shape.projected_targets else ("head_scale",)


def shared_keys(shape: LlamaShape) -> tuple[str, ...]:
    """Keys every block copies from the source network: embedding, noise input, final norm, head."""
    anchor = ("noisy_in.bias",) if shape.noisy_anchor else ()
    return ("embed_tokens.weight", *NEW_KEYS, *anchor, "norm.weight", *head_keys(shape))


def mod_keys(shape: LlamaShape) -> tuple[str, ...]:
    """The sigma modulation's keys below a layer: full Linear(H, 6H), or low rank H -> r -> 6H."""
    if shape.adaln_rank is None:
        return ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
    return ("adaLN_modulation.1.weight", "adaLN_modulation.2.weight", "adaLN_modulation.2.bias")


HF_LAYER_KEYS: tuple[str, ...] = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
ATTN_BIAS_KEYS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias")
MLP_BIAS_KEYS = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")

# --- key maps ------------------------------------------------------------------------------


def layer_keys(shape: LlamaShape) -> tuple[str, ...]:
    """Keys of one decoder layer below `layers.{k}.` in the block network."""
    bias = (ATTN_BIAS_KEYS if shape.attention_bias else ()) + (MLP_BIAS_KEYS if shape.mlp_bias else ())
    return HF_LAYER_KEYS + bias + mod_keys(shape)


def hf_key_map(shape: LlamaShape, tied: bool) -> KeyMap:
    """Block-network key -> Hugging Face LlamaForCausalLM key, for everything the checkpoint has."""
    bias = (ATTN_BIAS_KEYS if shape.attention_bias else ()) + (MLP_BIAS_KEYS if shape.mlp_bias else ())
    hf_layer = HF_LAYER_KEYS + bias
    key_map = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if shape.head == "trainable":
        key_map["lm_head.weight"] = "model.embed_tokens.weight" if tied else "lm_head.weight"
    for k in range(shape.num_layers):
        for name in hf_layer:
            key_map[f"layers.{k}.{name}"] = f"model.layers.{k}.{name}"
    return key_map


def block_key_map(shape: LlamaShape, start: int, end: int) -> KeyMap:
    """Block key -> source-network key for the block holding source layers [start, end)."""
    return layer_slice_key_map(shared_keys(shape), "layers", layer_keys(shape), start, end)


def normalised_table(embed: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm: the shared target space (see the module docstring)."""
    embed = embed.detach().to(torch.float32)
    return embed / embed.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def principal_directions(rows: torch.Tensor, dim: int, centre: bool) -> torch.Tensor:
    """(dim, H) orthonormal rows: the top eigenvectors of the rows' H x H second-moment matrix (centred or not).

    float64 eigh, cheap for any vocabulary; each sign is fixed so that the largest component is positive,
    which makes the result the same on every machine.
    """
    rows = rows.detach().to(torch.float64)
    if centre:
        rows = rows - rows.mean(0)
    _, vectors = torch.linalg.eigh(rows.T @ rows)  # ascending eigenvalues
    basis = vectors[:, -dim:].flip(-1).T  # (dim, H), largest first
    top = basis.gather(1, basis.abs().argmax(1, keepdim=True))
    return (basis * top.sign()).to(torch.float32)


def factor_head(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """`lm_head.weight` (V x H) -> its best rank-r factors `lm_head.0.weight` (r x H) and `lm_head.1.weight` (V x r).

    W ~ (W P^T) P with P the top r right singular vectors of W (Eckart-Young), so a converted
    checkpoint's head starts as close to its own as rank r allows.
    """
    state = dict(state)
    weight = state.pop("lm_head.weight").to(torch.float32)
    basis = principal_directions(weight, rank, centre=False)
    state["lm_head.0.weight"] = basis
    state["lm_head.1.weight"] = weight @ basis.T
    return state


def full_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse for export: a factorised head multiplied out into one `lm_head.weight` (the same function)."""
    if "lm_head.0.weight" not in state:
        return state
    state = dict(state)
    first, second = state.pop("lm_head.0.weight"), state.pop("lm_head.1.weight")
    state["lm_head.weight"] = second @ first
    return state


def target_basis(embed: torch.Tensor, dim: int) -> torch.Tensor:
    """(dim, H) orthonormal rows: the top principal directions of the embedding rows (centred), largest first."""
    return principal_directions(embed, dim, centre=True)


def target_table(embed: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The run's target table: normalised embedding rows, or (dim < H) their centred projections on
    `target_basis`, normalised (DESIGN 5's one target space, narrower: cheaper per sampling step)."""
    if dim is None or dim == embed.shape[1]:
        return normalised_table(embed)
    embed = embed.detach().to(torch.float32)
    return normalised_table((embed - embed.mean(0)) @ target_basis(embed, dim).T)


# --- reading Hugging Face checkpoints -------------------------------------------------------


def open_hf_checkpoint(path: str | Path) -> tuple[Any, LazyState, list[Path]]:
    """(transformers LlamaConfig, its tensors read lazily, weight files) of a save_pretrained folder.

    Nothing but the shard headers is read here: each tensor is read when a block asks for it. (The files' sha256,
    the shards' sha256s hashed again in name order, is `source_ref.checkpoint_digest`, taken by split.)
    """
    hf_cfg = read_hf_config(path)
    files = weight_files(Path(path))
    state = open_checkpoint(files)  # a user's file: its errors name model.checkpoint, not "split again"
    return hf_cfg, state, files


def read_hf_config(path: str | Path) -> Any:
    """The transformers LlamaConfig of a save_pretrained folder (its config.json only; weights are not read)."""
    from transformers import LlamaConfig as HFLlamaConfig

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"model.checkpoint {folder} is not a folder; give a Hugging Face LlamaForCausalLM folder "
            "(config.json + model.safetensors, as save_pretrained writes)"
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no config.json; give the folder save_pretrained wrote")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{cfg_file} is not valid JSON; restore the checkpoint's config.json") from None
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise CheckpointError(
            f"checkpoint {folder} is a {raw.get('model_type')!r} model ({', '.join(archs) or 'no architectures'}), "
            "not a Llama; give a LlamaForCausalLM checkpoint"
        )
    return HFLlamaConfig.from_pretrained(str(folder))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a save_pretrained folder: the one file, or every shard its index names."""
    layouts = (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    )
    for single, index in layouts:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise CheckpointError(f"{folder / index} is not a valid shard index; restore it") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {folder} is missing shard {missing[0]} named in {index}")
            return [folder / n for n in names]
    raise CheckpointError(
        f"checkpoint folder {folder} has no weights (model.safetensors); save it with save_pretrained"
    )


def config_from_hf(cfg: "LlamaConfig", hf: Any, given: frozenset[str] = frozenset()) -> "LlamaConfig":
    """The recipe's model section with the architecture taken from the checkpoint's config.

    The checkpoint's values replace the recipe's defaults; a key in `given` (the `model.*` fields the user set on
    the command line, `Recipe.given`) that the checkpoint contradicts is a one-line error naming each such key with
    both values, rather than a run of another size than the one asked for."""
    fields = {
        "layers": hf.num_hidden_layers,
        "hidden": hf.hidden_size,
        "heads": hf.num_attention_heads,
        "kv_heads": hf.num_key_value_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        "intermediate": hf.intermediate_size,
        "vocab_size": hf.vocab_size,
        "max_positions": hf.max_position_embeddings,
        "rope_parameters": dict(hf.rope_parameters),
        "rope_theta": float(hf.rope_parameters.get("rope_theta", cfg.rope_theta)),
        "rms_norm_eps": hf.rms_norm_eps,
        "hidden_act": hf.hidden_act,
        "attention_bias": bool(hf.attention_bias),
        "mlp_bias": bool(getattr(hf, "mlp_bias", False)),
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }
    check_given(cfg, fields, given)
    try:
        return LlamaConfig.model_validate({**cfg.model_dump(), **fields})
    except ValidationError as exc:
        raise RecipeError(f"checkpoint {cfg.checkpoint}: {one_line(exc)}") from None


def check_given(cfg: "LlamaConfig", found: dict[str, Any], given: frozenset[str]) -> None:
    """A one-line error listing every explicitly given `model.*` value that the checkpoint's config contradicts."""

    def differs(key: str) -> bool:
        mine, theirs = getattr(cfg, key), found[key]
        if isinstance(theirs, float) and isinstance(mine, (int, float)):
            return not math.isclose(float(mine), theirs, rel_tol=1e-9, abs_tol=0.0)
        return mine != theirs

    keys = [key for key in found if f"model.{key}" in given and differs(key)]
    if keys:
        said = ", ".join(f"model.{key}={getattr(cfg, key)} (the checkpoint has {found[key]})" for key in keys)
        raise RecipeError(
            f"checkpoint {cfg.checkpoint} contradicts what was asked for: {said}; drop "
            f"{'that override' if len(keys) == 1 else 'those overrides'} (the checkpoint's config sets "
            "the architecture) or give a checkpoint of that architecture"
        )


def new_parameters(shape: LlamaShape, seed: int) -> dict[str, torch.Tensor]:
    """The randomly initialised new parameters (the sigma embedder; with model.adaln_rank, each layer's
    down-projection).

    Exactly the values `LlamaBlockNet(shape)` gives them after `torch.manual_seed(seed + 1)` (the init of every
    conversion so far), without building the network: the modules built before them are built alone, in the
    network's order, only to draw the same random numbers, and dropped (tested against the whole network).
    """
    s = shape
    torch.manual_seed(seed + 1)
    nn.Embedding(s.vocab_size, s.hidden_size)
    nn.Linear(s.target_size, s.hidden_size, bias=s.noisy_anchor)
    sigma = SigmaEmbedder(s.hidden_size, s.sigma_features)
    out = {f"sigma_embed.{k}": v.detach() for k, v in sigma.state_dict().items()}
    if s.adaln_rank is not None:
        for k in range(s.num_layers):
            out[f"layers.{k}.adaLN_modulation.1.weight"] = DecoderLayer(s).adaLN_modulation[1].weight.detach()
    return out


def hf_source_state(
    hf_state: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    tied: bool,
    seed: int,
    what: str = "fresh Llama",
    sigma_data: float = 0.5,
) -> LazyState:
    """HF LlamaForCausalLM state -> the state dict of the block network of all L layers, via the explicit key map,
    as a LazyState: a checkpoint's tensors are read when a block asks for them (the whole network never exists).

    The new parts (noisy input, sigma embedder, zero modulation) come from a seeded init (`new_parameters`);
    `noisy_in` starts as a scaled identity that maps c_in * z of a clean (unit-norm) row,
    ~T_v / sigma_data, to the RMS of the source embedding rows (with model.target_dim: the principal
    directions of the embedding lift the narrower target space back into the hidden state).
    Only the embedding is read here (once), for those starting values.
    """
    if not isinstance(hf_state, LazyState):  # an in-memory state dict (a fresh network, tests)
        tensors = dict(hf_state)
        hf_state = LazyState(
            {k: (lambda v=v: v) for k, v in tensors.items()}, {k: spec_of(v) for k, v in tensors.items()}
        )
    drop_head = tied or shape.head != "trainable"  # a tied-table head does not use the checkpoint's lm_head
    ignored = lambda key: key.endswith("rotary_emb.inv_freq") or (drop_head and key == "lm_head.weight")  # noqa: E731
    expected = meta_specs(lambda: LlamaBlockNet(shape))
    factored = shape.head == "trainable" and bool(shape.head_rank)
    if factored:
        expected["lm_head.weight"] = Spec(torch.float32, (shape.vocab_size, shape.hidden_size))
    mapped = map_lazily(hf_state, hf_key_map(shape, tied), expected, ignored=ignored, what=what)
    loaders = dict(mapped.loaders)
    specs = dict(mapped.specs)
    if factored:  # the head's best rank-r factors, computed once when a block first asks for them
        head = loaders.pop("lm_head.weight")
        specs.pop("lm_head.weight")
        memo: dict[str, torch.Tensor] = {}

        def factor(key: str) -> torch.Tensor:
            if not memo:
                memo.update(factor_head({"lm_head.weight": head()}, shape.head_rank))  # type: ignore[arg-type]
            return memo[key]

        for key in ("lm_head.0.weight", "lm_head.1.weight"):
            loaders[key] = lambda key=key: factor(key)
            specs[key] = Spec(torch.float32, expected[key].shape)

    embed = mapped["embed_tokens.weight"].to(torch.float32)
    fresh: dict[str, torch.Tensor] = new_parameters(shape, seed)
    rms = embed.pow(2).mean(-1).sqrt().mean()
    lift = torch.eye(shape.hidden_size)  # target space -> hidden: identity, or the principal directions
    if shape.projected_targets:
        lift = target_basis(embed, shape.target_size).T
    fresh["noisy_in.weight"] = lift * rms * sigma_data * math.sqrt(shape.hidden_size)
    if shape.head == "tied-table":  # the learned scale starts at 1, the projection at the principal directions
        if shape.projected_targets:
            fresh["head_proj.weight"] = lift.T.contiguous()
        else:
            fresh["head_scale"] = torch.ones(())
    if shape.noisy_anchor:  # a shared query vector: the mean embedding direction at the rows' typical norm
        mean = embed.mean(0)
        fresh["noisy_in.weight"] *= 0.1
        fresh["noisy_in.bias"] = mean / mean.norm().clamp_min(1e-12) * embed.norm(dim=-1).mean()
    del embed
    for key, spec in expected.items():  # the zero-initialised modulation: made when asked for, never held
        if key in fresh or key in loaders or not key.endswith(mod_keys(shape)):
            continue
        loaders[key] = lambda spec=spec: torch.zeros(spec.shape, dtype=spec.dtype)
        specs[key] = spec
    for key, value in fresh.items():
        loaders[key] = lambda value=value: value.clone()
        specs[key] = spec_of(value)
    missing = sorted(set(expected) - set(loaders) - ({"lm_head.weight"} if factored else set()))
    if missing:  # pragma: no cover - a new parameter of the network that the conversion does not make
        raise CheckpointError(f"{what}: the conversion makes no value for {missing[0]!r}")
    order = [k for k in expected if k in loaders]
    origins = dict(mapped.origins)
    if factored:
        head_key = origins.pop("lm_head.weight")
        factor_of = f"{head_key} (rank-{shape.head_rank} factor)"
        origins.update({k: factor_of for k in ("lm_head.0.weight", "lm_head.1.weight")})
    return LazyState({k: loaders[k] for k in order}, {k: specs[k] for k in order}, mapped.release, origins)


def convert_hf_state(
    hf_state: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    tied: bool,
    seed: int,
    what: str = "fresh Llama",
    sigma_data: float = 0.5,
) -> LlamaBlockNet:
    """The block network of all L layers holding `hf_source_state` (in memory: fresh sources, tests)."""
    state = hf_source_state(hf_state, shape, tied, seed, what, sigma_data)
    return load_network(lambda: LlamaBlockNet(shape), dict(state), what, torch.float32)


# --- export to Hugging Face -------------------------------------------------------------------


def hf_export_key_map(shape: LlamaShape) -> KeyMap:
    """Hugging Face LlamaForCausalLM key -> block-network key: the reverse of the import map, head untied."""
    return {hf: ours for ours, hf in hf_key_map(shape, tied=False).items()}


def diffusion_only(key: str) -> bool:
    """The parts a LlamaForCausalLM cannot hold: the noisy-input path and the sigma modulation.

    Clean tokens never pass through them (DESIGN 5), so the causal LM they leave behind is exact.
    """
    return key in NEW_KEYS or key == "noisy_in.bias" or ".adaLN_modulation." in key


def write_hf_folder(network: LlamaBlockNet, out: Path, bos_id: int | None, eos_ids: tuple[int, ...], what: str) -> None:
    """`network`'s causal LM as a save_pretrained folder (config.json, generation_config.json, model.safetensors)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    shape = network.shape
    if shape.head != "trainable":
        raise CheckpointError(
            f"{what}: model.head={shape.head} has no lm_head of its own (it is the run's target "
            "table times a scale); export writes Hugging Face folders of trainable-head models only"
        )
    state = apply_key_map(full_head(network.state_dict()), hf_export_key_map(shape), ignored=diffusion_only, what=what)
    config = shape.hf_config()
    config.architectures = ["LlamaForCausalLM"]
    config.bos_token_id = bos_id
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else (list(eos_ids) or None)
    model = LlamaForCausalLM(config)
    load_strict(model, state, what)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=config.eos_token_id)
    with quiet_transformers():
        model.save_pretrained(str(out))


# --- random checkpoints of a named shape (bench split) -----------------------------------------


SHARD_BYTES = 2 * 2**30
"""Shard size of the random checkpoints `bench split` writes (save_pretrained's default is about 5 GB)."""


def write_random_hf_folder(
    shape: LlamaShape, tied: bool, folder: Path, dtype: torch.dtype, seed: int, on_tensor: Any = None
) -> int:
    """A save_pretrained-style LlamaForCausalLM folder of `shape` with random weights in `dtype`, written one tensor
    at a time into shards (index json beside them): a checkpoint of any size in about one tensor's memory.

    Weights are N(0, 0.02^2) (norms 1), as transformers initialises a Llama. Returns the bytes written.
    """
    import json as jsonlib

    from transformers import LlamaForCausalLM

    from dbconvert.checkpoint import atomic_write
    from dbconvert.tensorio import write_safetensors

    config = shape.hf_config()
    config.tie_word_embeddings = tied
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    specs = {
        k: Spec(dtype, tuple(v.shape)) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        if size and size + spec.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    gen = torch.Generator().manual_seed(seed)

    def random(key: str) -> torch.Tensor:
        spec = specs[key]
        if key.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=dtype)
        return (torch.randn(spec.shape, generator=gen) * 0.02).to(dtype)

    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(
            folder / name,
            lambda tmp, keys=keys: write_safetensors(
                tmp, {k: specs[k] for k in keys}, random, {"format": "pt"}, on_tensor
            ),
        )
        weight_map.update({k: name for k in keys})
    total = sum(s.nbytes for s in specs.values())
    (folder / "model.safetensors.index.json").write_text(
        jsonlib.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(str(folder))
    return total
