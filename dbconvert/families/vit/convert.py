"""ViT checkpoint conversion as data: timm's key names, the Hugging Face key maps, the key map of each block,
the checks of a checkpoint against the recipe, the label table and the exports back to timm and Hugging Face.

Our network uses timm's names (`model.py`), so a timm state dict maps by identity; a Hugging Face
`ViTForImageClassification` folder maps through `hf_key_map` (query / key / value concatenated into timm's
fused qkv). Both layouts of Hugging Face keys are read: transformers 4's (`vit.encoder.layer.{k}.attention.
attention.query`) and transformers 5's (`vit.layers.{k}.attention.q_proj`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from dbconvert.checkpoint import KeyMap, apply_key_map, check_state, file_sha256, layer_slice_key_map, read_checkpoint
from dbconvert.errors import CheckpointError
from dbconvert.families.vit.model import ViTNet, ViTShape
from dbconvert.quiet_transformers import quiet_transformers

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


def hf_to_timm(state: dict[str, torch.Tensor], depth: int, what: str) -> dict[str, torch.Tensor]:
    """A ViTForImageClassification state dict in timm's names, through explicit maps (q, k, v fused into qkv)."""
    layout = hf_layout(state)
    prefix, names = HF_LAYER[layout]
    key_map = hf_layer_map(depth, layout)
    qkv_keys = {
        p + f"{names[c]}.{leaf}"
        for k in range(depth)
        for p in [prefix.format(k=k)]
        for c in "qkv"
        for leaf in ("weight", "bias")
    }
    missing = sorted(key for key in qkv_keys if key not in state)
    if missing:
        raise CheckpointError(f"{what}: source is missing key {missing[0]!r} ({len(missing)} missing in all)")
    out = apply_key_map(state, key_map, ignored=lambda key: key in qkv_keys, what=what)
    for k in range(depth):
        p = prefix.format(k=k)
        for leaf in ("weight", "bias"):
            out[f"blocks.{k}.attn.qkv.{leaf}"] = torch.cat([state[p + f"{names[c]}.{leaf}"] for c in "qkv"]).clone()
    return out


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


def read_source(path: str) -> tuple[dict[str, torch.Tensor], dict | None, str, list[Path]]:
    """(state dict in timm's names or raw, HF config or None, sha256, the weight file) of a timm file or a Hugging
    Face folder. Read whole: ViT sources are built in memory (the largest timm ViTs are about 0.6B parameters)."""
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
        state = read_checkpoint(weights)
        return state, config, file_sha256(weights), [weights]
    state = read_checkpoint(path)
    return state, None, file_sha256(path), [Path(path).expanduser()]


def checkpoint_shape(state: dict[str, torch.Tensor], what: str) -> dict[str, float]:
    """The sizes a timm-named state dict implies (to check against the recipe)."""
    if "x_embedder.proj.weight" in state or "y_embedder.embedding_table.weight" in state:
        raise CheckpointError(
            f"{what} is a DiT checkpoint, not a ViT classifier; split it with a DiT recipe (model.family=dit)"
        )
    if "model.embed_tokens.weight" in state or "embed_tokens.weight" in state:
        raise CheckpointError(f"{what} is a language model checkpoint, not a ViT classifier")
    for key in ("patch_embed.proj.weight", "pos_embed", "head.weight"):
        if key not in state:
            raise CheckpointError(
                f"{what}: missing key {key!r}; a timm VisionTransformer state dict (or a Hugging "
                "Face ViTForImageClassification folder) is expected"
            )
    proj = state["patch_embed.proj.weight"]
    layers = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    found: dict[str, float] = {
        "patch_size": int(proj.shape[-1]),
        "embed_dim": int(proj.shape[0]),
        "in_chans": int(proj.shape[1]),
        "depth": max(layers) + 1 if layers else 0,
        "num_classes": int(state["head.weight"].shape[0]),
        "tokens": int(state["pos_embed"].shape[1]),
    }
    if "blocks.0.mlp.fc1.weight" in state:
        found["mlp_ratio"] = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / found["embed_dim"]
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


def load_source(net: ViTNet, timm_state: dict[str, torch.Tensor], what: str) -> None:
    """Copy a timm-named state dict into `net` (the new modulation / embedder weights keep their init)."""
    depth = net.shape.depth
    keys = timm_keys(depth)
    if not net.shape.qkv_bias:  # pragma: no cover - the family always builds qkv biases
        keys = [k for k in keys if not k.endswith("qkv.bias")]
    expected = {k: v for k, v in net.state_dict().items() if k in keys}
    check_state(expected, timm_state, what)
    net.load_state_dict(timm_state, strict=False)


# --- the function check -------------------------------------------------------------------------


def timm_reference(shape: ViTShape, raw: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's VisionTransformer of `shape` holding the checkpoint's own tensors, as read (strict)."""
    from timm.models.vision_transformer import VisionTransformer

    net = VisionTransformer(**timm_kwargs(shape), class_token=True, qkv_bias=True)
    net.load_state_dict({k: v.float() for k, v in raw.items()}, strict=True)
    return net


def hf_reference(folder: str) -> torch.nn.Module:
    """transformers' ViTForImageClassification as it loads the folder itself, returning plain logits."""
    from transformers import ViTForImageClassification

    with quiet_transformers():
        model = ViTForImageClassification.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.float()

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


def check_function(net: ViTNet, reference: torch.nn.Module, library: str, what: str) -> float:
    """Split's function check (issue 32): the converted classifier and the original library's forward of the same
    checkpoint agree on random images to float tolerance, or split refuses in one line. Keys and shapes can all match
    while the function differs (a key map that swaps rows, a layout read as another); this is what sees it.
    Returns the largest difference found."""
    s = net.shape
    x = torch.randn(2, s.in_chans, s.img_size, s.img_size, generator=torch.Generator().manual_seed(0))
    was = net.training
    with torch.no_grad():
        ours = net.eval().classify(x).float()
        ref = reference.eval()(x).float()
    net.train(was)
    err = float((ours - ref).abs().max())
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
