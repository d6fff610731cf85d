"""ViT checkpoint conversion as data: timm's key names, the Hugging Face key maps, the key map of each block,
the checks of a checkpoint against the recipe, the label table and the exports back to timm and Hugging Face.

Our network uses timm's names (`model.py`), so a timm state dict maps by identity; a Hugging Face
`ViTForImageClassification` folder maps through `hf_key_map` (query / key / value concatenated into timm's
fused qkv). Both layouts of Hugging Face keys are read: transformers 4's (`vit.encoder.layer.{k}.attention.
attention.query`) and transformers 5's (`vit.layers.{k}.attention.q_proj`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dbconvert.building import load_network, meta_specs
from dbconvert.checkpoint import KeyMap, apply_key_map, check_state, layer_slice_key_map, map_lazily, open_checkpoint
from dbconvert.errors import CheckpointError
from dbconvert.families.vit.model import Block, PatchEmbed, TimestepEmbedder, ViTNet, ViTShape
from dbconvert.quiet_transformers import quiet_transformers
from dbconvert.tensorio import LazyState, Spec, spec_of, specs_of

LABELS_FILE = "labels.safetensors"
"""RUN/shared/labels.safetensors: {"table": (num_classes, embed_dim)}, rows of unit L2 norm, fixed at split."""

TIMM_SHARED = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
)
TIMM_LAYER = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
"""timm's keys below `blocks.{k}.`."""
OWN_LAYER = ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
"""What dbconvert adds below `blocks.{k}.` (zero at conversion): the full-width modulation Linear(D, 6D)."""
OWN_LAYER_LOW_RANK = ("adaLN_modulation.1.weight", "adaLN_modulation.2.weight", "adaLN_modulation.2.bias")
"""The same with model.adaln_rank: Linear(D, r, bias=False) then Linear(r, 6D), the last zero at conversion."""


def timm_keys(depth: int) -> list[str]:
    return [*TIMM_SHARED, *(f"blocks.{k}.{name}" for k in range(depth) for name in TIMM_LAYER)]


def own_layer_keys(net_keys: Iterable[str]) -> tuple[str, ...]:
    """The modulation keys of the network whose state has `net_keys`: low rank when its second Linear is there."""
    return OWN_LAYER_LOW_RANK if "blocks.0.adaLN_modulation.2.weight" in set(net_keys) else OWN_LAYER


def block_key_map(net_keys: list[str], start: int, end: int) -> KeyMap:
    """Block key -> source key for the block holding source layers [start, end): every non-layer key kept."""
    shared = [key for key in net_keys if not key.startswith("blocks.")]
    return layer_slice_key_map(shared, "blocks", (*TIMM_LAYER, *own_layer_keys(net_keys)), start, end)


def is_layer_key(key: str) -> bool:
    return key.startswith("blocks.") and key.split(".", 2)[2] in (*TIMM_LAYER, *OWN_LAYER, *OWN_LAYER_LOW_RANK)


# --- Hugging Face layouts ----------------------------------------------------------------------

HF_SHARED = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
}
HF_LAYER = {  # layout -> (prefix, {timm name: hf name}); q, k, v listed apart (fused into qkv)
    "v4": (
        "vit.encoder.layer.{k}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
            "q": "attention.attention.query",
            "k": "attention.attention.key",
            "v": "attention.attention.value",
        },
    ),
    "v5": (
        "vit.layers.{k}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
            "q": "attention.q_proj",
            "k": "attention.k_proj",
            "v": "attention.v_proj",
        },
    ),
}


def hf_layout(state: dict[str, torch.Tensor]) -> str:
    for layout, (prefix, _) in HF_LAYER.items():
        if any(key.startswith(prefix.format(k=0)) for key in state):
            return layout
    raise CheckpointError(
        "the Hugging Face checkpoint has no ViT layers (no vit.encoder.layer.0. nor vit.layers.0. "
        "keys); is it a ViTForImageClassification?"
    )


def hf_layer_map(depth: int, layout: str) -> KeyMap:
    """timm key -> Hugging Face key of every layer tensor but q, k, v (which timm fuses into qkv), and the shared
    ones."""
    prefix, names = HF_LAYER[layout]
    key_map: KeyMap = dict(HF_SHARED)
    for k in range(depth):
        p = prefix.format(k=k)
        for ours, theirs in names.items():
            if ours in ("q", "k", "v"):
                continue
            for leaf in ("weight", "bias"):
                key_map[f"blocks.{k}.{ours}.{leaf}"] = p + f"{theirs}.{leaf}"
    return key_map


def hf_full_map(depth: int, layout: str) -> KeyMap:
    """timm key -> Hugging Face key of every tensor, q, k and v under the timm-style names `blocks.{k}.{q,k,v}.*`."""
    prefix, names = HF_LAYER[layout]
    key_map = hf_layer_map(depth, layout)
    for k in range(depth):
        for c in "qkv":
            for leaf in ("weight", "bias"):
                key_map[f"blocks.{k}.{c}.{leaf}"] = prefix.format(k=k) + f"{names[c]}.{leaf}"
    return key_map


def as_lazy(state: Mapping[str, torch.Tensor]) -> LazyState:
    """`state` as a LazyState (an in-memory state dict is wrapped; its tensors are handed out as they are)."""
    if isinstance(state, LazyState):
        return state
    tensors = dict(state)
    return LazyState({k: (lambda v=v: v) for k, v in tensors.items()}, {k: spec_of(v) for k, v in tensors.items()})


def hf_to_timm(state: Mapping[str, torch.Tensor], depth: int, what: str) -> LazyState:
    """A ViTForImageClassification state dict in timm's names, through explicit maps, lazily: nothing is read here,
    and each fused qkv is the concatenation of its three tensors, read when the qkv is asked for."""
    state = as_lazy(state)
    layout = hf_layout(state)
    full = hf_full_map(depth, layout)
    qkv = {key: src for key, src in full.items() if key.startswith("blocks.") and key.split(".")[2] in ("q", "k", "v")}
    missing = sorted(src for src in qkv.values() if src not in state)
    if missing:
        raise CheckpointError(f"{what}: source is missing key {missing[0]!r} ({len(missing)} missing in all)")
    qkv_keys = set(qkv.values())
    key_map = hf_layer_map(depth, layout)
    expected = {dst: state.specs[src] for dst, src in key_map.items() if src in state.specs}
    mapped = map_lazily(state, key_map, expected, ignored=lambda key: key in qkv_keys, what=what)
    loaders, specs, origins = dict(mapped.loaders), dict(mapped.specs), dict(mapped.origins)
    for k in range(depth):
        for leaf in ("weight", "bias"):
            parts = [qkv[f"blocks.{k}.{c}.{leaf}"] for c in "qkv"]
            first = state.specs[parts[0]]
            if any(state.specs[part].shape != first.shape for part in parts):
                raise CheckpointError(f"{what}: {', '.join(parts)} differ in shape; they cannot be fused into qkv")
            key = f"blocks.{k}.attn.qkv.{leaf}"
            loaders[key] = lambda parts=parts: torch.cat([state[part] for part in parts])
            specs[key] = Spec(first.dtype, (3 * first.shape[0], *first.shape[1:]))
            origins[key] = " + ".join(parts)
    return LazyState(loaders, specs, state.release, origins)


def reorder_head(state: LazyState, order: list[int]) -> LazyState:
    """`state` with the head's rows in `order` (the data's class order), reordered when the head is read."""
    loaders = dict(state.loaders)
    for key in ("head.weight", "head.bias"):
        loaders[key] = lambda read=loaders[key]: read()[order]
    return LazyState(loaders, state.specs, state.release, state.origins)


def timm_to_hf(state: dict[str, torch.Tensor], depth: int, layout: str) -> dict[str, torch.Tensor]:
    """The reverse of `hf_to_timm` (qkv split into q, k, v), for the installed transformers' `layout`."""
    prefix, names = HF_LAYER[layout]
    out = {theirs: state[ours].clone() for ours, theirs in hf_layer_map(depth, layout).items()}
    for k in range(depth):
        p = prefix.format(k=k)
        for leaf in ("weight", "bias"):
            for c, part in zip("qkv", state[f"blocks.{k}.attn.qkv.{leaf}"].chunk(3)):
                out[p + f"{names[c]}.{leaf}"] = part.clone()
    return out


# --- reading a checkpoint ----------------------------------------------------------------------


def open_source(path: str) -> tuple[LazyState, dict | None, list[Path]]:
    """(the tensors of a timm file or a Hugging Face folder, read lazily; the HF config or None; the weight file).

    Nothing but the file's header (or a `.pth`'s mapped index) is read here: each tensor is read when asked for."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            raise CheckpointError(
                f"model.checkpoint {path} is a folder without a readable config.json; give a timm "
                ".pth/.safetensors file or a Hugging Face ViTForImageClassification folder"
            ) from None
        if config.get("model_type") != "vit":
            raise CheckpointError(
                f"model.checkpoint {path} is a Hugging Face {config.get('model_type')!r} model, not "
                "a ViT (model_type 'vit'); use the recipe of its family"
            )
        weights = folder / "model.safetensors"
        if not weights.is_file():
            weights = folder / "pytorch_model.bin"
        return open_checkpoint([weights]), config, [weights]
    return open_checkpoint([folder]), None, [folder]


def checkpoint_shape(state: Mapping[str, torch.Tensor], what: str) -> dict[str, float]:
    """The sizes a timm-named state dict implies (to check against the recipe), from its specs: nothing is read."""
    specs = specs_of(state)
    if "x_embedder.proj.weight" in specs or "y_embedder.embedding_table.weight" in specs:
        raise CheckpointError(
            f"{what} is a DiT checkpoint, not a ViT classifier; split it with a DiT recipe (model.family=dit)"
        )
    if "model.embed_tokens.weight" in specs or "embed_tokens.weight" in specs:
        raise CheckpointError(f"{what} is a language model checkpoint, not a ViT classifier")
    for key in ("patch_embed.proj.weight", "pos_embed", "head.weight"):
        if key not in specs:
            raise CheckpointError(
                f"{what}: missing key {key!r}; a timm VisionTransformer state dict (or a Hugging "
                "Face ViTForImageClassification folder) is expected"
            )
    proj = specs["patch_embed.proj.weight"]
    layers = {int(k.split(".")[1]) for k in specs if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    found: dict[str, float] = {
        "patch_size": int(proj.shape[-1]),
        "embed_dim": int(proj.shape[0]),
        "in_chans": int(proj.shape[1]),
        "depth": max(layers) + 1 if layers else 0,
        "num_classes": int(specs["head.weight"].shape[0]),
        "tokens": int(specs["pos_embed"].shape[1]),
    }
    if "blocks.0.mlp.fc1.weight" in specs:
        found["mlp_ratio"] = int(specs["blocks.0.mlp.fc1.weight"].shape[0]) / found["embed_dim"]
    return found


def check_against(found: dict[str, float], shape: ViTShape, what: str) -> None:
    """One line listing every size on which the checkpoint and the recipe disagree, with the recipe key to set for
    each (issue 33: they came one at a time, as bare tensor shapes)."""
    want = {
        "patch_size": shape.patch_size,
        "embed_dim": shape.embed_dim,
        "in_chans": shape.in_chans,
        "depth": shape.depth,
        "num_classes": shape.num_classes,
        "mlp_ratio": shape.mlp_ratio,
    }
    differ = [key for key, value in want.items() if key in found and abs(found[key] - value) > 1e-9]
    if differ:
        has = ", ".join(f"{key}={found[key]:g} (recipe {want[key]:g})" for key in differ)
        fix = " ".join(f"model.{key}={found[key]:g}" for key in differ)
        raise CheckpointError(
            f"{what} differs from the recipe: {has}; set {fix} (or use a checkpoint of the recipe's architecture)"
        )
    if found["tokens"] != 1 + shape.num_patches:
        raise CheckpointError(
            f"{what} has {found['tokens'] - 1} patch positions but model.img_size={shape.img_size} "
            f"with patch {shape.patch_size} gives {shape.num_patches}; set model.img_size to the "
            "checkpoint's image size"
        )


def hf_shape_fields(config: dict, what: str) -> dict:
    """Recipe fields a Hugging Face ViTConfig fixes (compared with the recipe by `check_against`)."""
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise CheckpointError(
            f"{what}: hidden_act={config.get('hidden_act')!r}, qkv_bias={config.get('qkv_bias')} "
            "differ from timm's ViT (gelu, qkv bias); this family does not convert it"
        )
    ratio = config.get("intermediate_size", 3072) / config.get("hidden_size", 768)
    return {
        "norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "mlp_ratio": ratio,
        "num_heads": int(config.get("num_attention_heads", 12)),
    }


def new_parameters(shape: ViTShape, seed: int) -> dict[str, torch.Tensor]:
    """The randomly initialised parameters dbconvert adds that are not zero: the timestep embedder's weights (and,
    with model.adaln_rank, each layer's modulation down-projection).

    Exactly the values `ViTNet(shape)` gives them after `torch.manual_seed(seed)` (the init of every conversion so
    far), without building the network: the modules built before them are built alone, one at a time and in the
    network's order, and `initialize_weights` draws its trunc-normal values over tensors of each Linear's shape in
    `nn.Module.apply`'s order (children first), only to draw the same random numbers (tested against the network).
    """
    s = shape
    torch.manual_seed(seed)
    PatchEmbed(s)
    for _ in range(s.depth):
        Block(s)
    nn.Linear(s.embed_dim, s.num_classes)  # the head (LayerNorms and zero tables draw nothing)
    t_embedder = TimestepEmbedder(s.embed_dim, s.frequency_size)
    nn.Linear(s.embed_dim, 2 * s.embed_dim)  # norm_modulation
    d, r = s.embed_dim, s.adaln_rank
    modulation = [(6 * d, d)] if r is None else [(r, d), (6 * d, r)]
    out: dict[str, torch.Tensor] = {}
    for k in range(s.depth):  # initialize_weights: every Linear, children first
        for shape_ in [(3 * d, d), (d, d), (s.mlp_hidden, d), (d, s.mlp_hidden)]:
            nn.init.trunc_normal_(torch.empty(shape_), std=0.02)
        for i, shape_ in enumerate(modulation):
            drawn = nn.init.trunc_normal_(torch.empty(shape_), std=0.02)
            if r is not None and i == 0:
                out[f"blocks.{k}.adaLN_modulation.1.weight"] = drawn
    nn.init.trunc_normal_(torch.empty(s.num_classes, d), std=0.02)
    for name in ("mlp.0", "mlp.2"):
        linear = t_embedder.get_submodule(name)
        out[f"t_embedder.{name}.weight"] = nn.init.trunc_normal_(linear.weight.detach().clone(), std=0.02)
        out[f"t_embedder.{name}.bias"] = torch.zeros_like(linear.bias.detach())
    nn.init.trunc_normal_(torch.empty(2 * d, d), std=0.02)  # norm_modulation (zeroed after)
    nn.init.trunc_normal_(torch.empty(1, 1 + s.num_patches, d), std=0.02)  # pos_embed (the checkpoint's)
    nn.init.normal_(torch.empty(1, 1, d), std=1e-6)  # cls_token (the checkpoint's)
    return out


def source_state(timm_state: Mapping[str, torch.Tensor], shape: ViTShape, seed: int, what: str) -> LazyState:
    """The state dict of the source network of all layers, lazily: the checkpoint's timm-named tensors read when
    asked for, the new parameters (timestep embedder, modulation, `label_pos`) their seeded init (`new_parameters`,
    the rest zero, made when asked for). Every key and shape is checked here, before anything is read."""
    timm_state = as_lazy(timm_state)
    expected = meta_specs(lambda: ViTNet(shape))
    keys = set(timm_keys(shape.depth))
    check_state({k: v for k, v in expected.items() if k in keys}, timm_state.specs, what)
    fresh = new_parameters(shape, seed)
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    specs: dict[str, Spec] = {}
    for key, spec in expected.items():
        if key in keys:
            loaders[key], specs[key] = timm_state.loaders[key], Spec(timm_state.specs[key].dtype, spec.shape)
        elif key in fresh:
            loaders[key], specs[key] = (lambda value=fresh[key]: value.clone()), spec_of(fresh[key])
        else:
            loaders[key], specs[key] = (lambda spec=spec: torch.zeros(spec.shape, dtype=spec.dtype)), spec
    origins = {k: timm_state.origins.get(k, k) for k in keys}
    return LazyState(loaders, specs, timm_state.release, origins)


# --- the function check -------------------------------------------------------------------------


def layer_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The float32 tensors of `state` below `prefix` (one layer's), named as that layer's module names them."""
    return {k[len(prefix) :]: state[k].float() for k in state if k.startswith(prefix)}


def not_layer(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The float32 tensors of `state` outside every layer (`prefixes`): what stays resident through a streamed pass."""
    return {k: state[k].float() for k in state if not k.startswith(prefixes)}


class StreamedLayers(nn.Module):
    """A library's layer list (built on the meta device) whose layers hold real weights only while they run: each
    is loaded when reached and put back on the meta device when the next is reached (or the pass ends), so a
    function check of a whole network holds one layer's weights. Iterated (transformers) or called (timm's
    `self.blocks(x)`), it runs the library's own layer code."""

    def __init__(self, layers: nn.ModuleList, load: Callable[[int], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.layers, self.load = layers, load

    def __iter__(self) -> Iterator[nn.Module]:
        for k, layer in enumerate(self.layers):
            layer.load_state_dict(self.load(k), strict=True, assign=True)
            try:
                yield layer
            finally:
                layer.to("meta")

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: slice) -> StreamedLayers:
        """The layers of `index` (a slice), streamed as well: a library that iterates `layers[:n]` still loads them."""
        if not isinstance(index, slice):
            raise TypeError("streamed layers are reached by iteration or a slice, not one by one")
        picked = range(len(self.layers))[index]
        return StreamedLayers(nn.ModuleList([self.layers[k] for k in picked]), lambda i: self.load(picked[i]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


def converted_forward(
    state: Mapping[str, torch.Tensor], shape: ViTShape, what: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The converted classifier's forward (`ViTNet.classify`) over a lazy source state, one layer resident at a time:
    the tokens, then each layer loaded, run and dropped, then the readout and head."""
    net = load_network(lambda: ViTNet(shape.with_depth(0)), not_layer(state, ("blocks.",)), what).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = net.tokens(x, None)
        for k in range(shape.depth):
            block = load_network(lambda: Block(shape), layer_state(state, f"blocks.{k}."), what).eval()
            h = block(h)
            del block
        return net.head(net.readout(h, None, None))

    return forward


def timm_reference(shape: ViTShape, raw: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """timm's VisionTransformer of `shape` holding the checkpoint's own tensors, as read (every key and shape checked),
    built on the meta device: its blocks load their weights one at a time as its own forward reaches them."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        net = VisionTransformer(**timm_kwargs(shape), class_token=True, qkv_bias=True)
    check_state(net.state_dict(), specs_of(raw), what)
    net.load_state_dict(not_layer(raw, ("blocks.",)), strict=False, assign=True)
    net.blocks = StreamedLayers(net.blocks, lambda k: layer_state(raw, f"blocks.{k}."))  # type: ignore[assignment]
    return net


def hf_reference(folder: str, raw: Mapping[str, torch.Tensor], depth: int) -> nn.Module:
    """transformers' ViTForImageClassification of the folder's config, built on the meta device and returning plain
    logits: its layers load the folder's tensors one at a time as its own forward reaches them (a folder saved in the
    other transformers layout is read through both layouts' key maps)."""
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTForImageClassification

    with quiet_transformers():
        config = HFViTConfig.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    installed, stored = hf_layout(model.state_dict()), hf_layout(raw)
    theirs = hf_full_map(depth, stored)
    file_key = {ours: theirs[key] for key, ours in hf_full_map(depth, installed).items()}
    prefix = HF_LAYER[installed][0]
    mine = {k: raw[file_key[k]].float() for k in model.state_dict() if not k.startswith(prefix.split("{")[0])}
    model.load_state_dict(mine, strict=False, assign=True)
    owner = model.vit if hasattr(model.vit, "layers") else model.vit.encoder
    name = "layers" if owner is model.vit else "layer"

    def load(k: int) -> dict[str, torch.Tensor]:
        p = prefix.format(k=k)
        return {key[len(p) :]: raw[file_key[key]].float() for key in file_key if key.startswith(p)}

    setattr(owner, name, StreamedLayers(getattr(owner, name), load))

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=x).logits

    return Logits()


def generic_labels(id2label: dict) -> bool:
    """transformers' placeholder names (LABEL_0, LABEL_1, ...): a config that says nothing about its classes (its
    keys already read as class indices)."""
    return all(str(name) == f"LABEL_{int(i)}" for i, name in id2label.items())


def label_order(id2label: dict, classes: list[str] | None, what: str) -> tuple[list[int] | None, str | None]:
    """(head rows in the data's class order, a note) from a Hugging Face config's `id2label` and the data's class
    names (issue 34: a classifier saved with its rows in another order scored near zero).

    The rows are reordered when `id2label` names exactly the data's classes in another order; kept when it names
    them in the same order or says nothing (placeholder names); a note says so when the names cannot be matched.
    """
    if not id2label:
        return None, None
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{what}: config.json's id2label has keys that are not class indices "
            f"({sorted(map(str, id2label))[:4]}); fix the config"
        ) from None
    if generic_labels(id2label):
        return None, None
    if classes is None:
        return None, (
            f"{what}: id2label names its classes ({', '.join(names[:5])}...) but the data's classes have no "
            "names to match them to (a .npz or hub data set): head rows kept in the checkpoint's order, "
            "row k for label k"
        )
    if names == list(classes):
        return None, None
    if sorted(names) == sorted(classes) and len(set(names)) == len(names):
        index = {name: i for i, name in enumerate(names)}
        shown = ", ".join(classes[:5]) + ("..." if len(classes) > 5 else "")
        return [index[c] for c in classes], (
            f"{what}: head rows reordered by the checkpoint's id2label to the data's class order ({shown})"
        )
    return None, (
        f"{what}: id2label names other classes ({', '.join(names[:5])}...) than the data's "
        f"({', '.join(classes[:5])}...): head rows kept in the checkpoint's order, row k for data class k "
        "(a classifier of other classes, to be trained on these)"
    )


class ReorderedLogits(torch.nn.Module):
    """A reference classifier's logits in the data's class order (`label_order`), for the function check."""

    def __init__(self, reference: torch.nn.Module, order: list[int]) -> None:
        super().__init__()
        self.reference, self.order = reference, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x)[:, self.order]


def check_function(
    ours: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module, shape: ViTShape, library: str, what: str
) -> float:
    """Split's function check (issue 32): the converted classifier (`converted_forward`) and the original library's
    forward of the same checkpoint agree on random images to float tolerance, or split refuses in one line. Keys and
    shapes can all match while the function differs (a key map that swaps rows, a layout read as another); this is
    what sees it. Both run one layer resident at a time. Returns the largest difference found."""
    s = shape
    x = torch.randn(2, s.in_chans, s.img_size, s.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours(x).float()
        ref = reference.eval()(x).float()
    err = float((mine - ref).abs().max())
    tol = 1e-4 * (1.0 + float(ref.abs().max()))
    if not err <= tol:
        raise CheckpointError(
            f"{what}: the converted classifier's logits differ from {library}'s forward of the same "
            f"weights by up to {err:.3g} (tolerance {tol:.2g}); the checkpoint's layout is not the "
            "one this conversion reads, so nothing was written"
        )
    return err


# --- the label table ---------------------------------------------------------------------------


def label_table(choice: str, head: torch.Tensor, seed: int) -> torch.Tensor:
    """(num_classes, embed_dim) rows of unit norm: the head's rows or a seeded random orthonormal set."""
    if choice == "head":
        return F.normalize(head.detach().float(), dim=-1).clone()
    n, d = head.shape
    gen = torch.Generator().manual_seed(seed)
    if n <= d:  # n orthonormal rows: the columns of a QR factor of a (d, n) Gaussian
        rows = torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=torch.float64))[0].T
    else:  # more classes than dimensions: random unit rows, only near-orthogonal
        rows = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return F.normalize(rows[:n, :d].float(), dim=-1).contiguous()


# --- export ------------------------------------------------------------------------------------

TIMM_SUFFIXES = (".pth", ".pt", ".safetensors")


def export_timm_state(net: ViTNet) -> dict[str, torch.Tensor]:
    """timm's keys of `net` (the noise modulation, its embedder and `label_pos` left out: a classifier never uses
    them)."""
    keys = timm_keys(net.shape.depth)
    own = set(net.state_dict()) - set(keys)
    return apply_key_map(net.state_dict(), {k: k for k in keys}, ignored=lambda key: key in own, what="export to timm")


def timm_kwargs(shape: ViTShape) -> dict:
    """timm.create_model keyword arguments that rebuild `shape` (with the export's checkpoint_path)."""
    return {
        "img_size": shape.img_size,
        "patch_size": shape.patch_size,
        "in_chans": shape.in_chans,
        "num_classes": shape.num_classes,
        "embed_dim": shape.embed_dim,
        "depth": shape.depth,
        "num_heads": shape.num_heads,
        "mlp_ratio": shape.mlp_ratio,
        "global_pool": shape.global_pool,
        "fc_norm": False,
    }


def hf_config(shape: ViTShape):  # noqa: ANN201 - transformers.ViTConfig
    if shape.global_pool != "token":
        raise CheckpointError(
            f"a Hugging Face ViTForImageClassification reads the CLS token; this run's classifier "
            f"pools with global_pool={shape.global_pool!r}: export to a timm .pth/.safetensors"
        )
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=shape.embed_dim,
        num_hidden_layers=shape.depth,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.mlp_hidden,
        hidden_act="gelu",
        layer_norm_eps=shape.norm_eps,
        image_size=shape.img_size,
        patch_size=shape.patch_size,
        num_channels=shape.in_chans,
        num_labels=shape.num_classes,
        qkv_bias=shape.qkv_bias,
        hidden_dropout_prob=shape.dropout,
        attention_probs_dropout_prob=0.0,
    )


def write_hf_folder(net: ViTNet, out: Path) -> None:
    """A ViTForImageClassification folder (save_pretrained) holding `net`'s classifier weights."""
    config = hf_config(net.shape)  # refuses what the format cannot hold, before transformers is imported
    from transformers import ViTForImageClassification

    model = ViTForImageClassification(config)
    layout = hf_layout(model.state_dict())
    state = timm_to_hf(export_timm_state(net), net.shape.depth, layout)
    check_state(model.state_dict(), state, "export to Hugging Face")
    model.load_state_dict(state, strict=True)
    with quiet_transformers():
        model.save_pretrained(str(out))
