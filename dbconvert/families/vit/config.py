"""The ViT recipe section: an architecture (a CPU-sized name or any plain timm ViT name) plus the data shape.

Fields left `null` (patch_size, embed_dim, depth, num_heads, mlp_ratio) come from the architecture; a
checkpoint must agree with the recipe on every one of them (one-line error otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator

from dbconvert.families.vit.model import LABEL_TOKENS, ViTShape
from dbconvert.schema import ModelConfig, Section, Seed


@dataclass(frozen=True)
class ViTArch:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    img_size: int = 224


ARCHS: dict[str, ViTArch] = {
    "vit-micro": ViTArch(2, 64, 6, 4, 2.0, 8),
    "vit-mini": ViTArch(2, 96, 6, 4, 4.0, 8),
    "vit-cifar": ViTArch(4, 128, 12, 4, 4.0, 32),
}
"""CPU-sized architectures (not timm names): vit-micro / vit-mini for 8x8 digits, vit-cifar the paper's CIFAR ViT
(12 layers, width 128, 4 heads, patch 4). Any timm VisionTransformer name (vit_tiny_patch16_224, ...) works too."""


@lru_cache(maxsize=None)
def timm_arch(name: str) -> ViTArch:
    """The sizes of timm architecture `name`, read from the model built on the meta device (no weights)."""
    import timm
    import torch

    if name not in timm.list_models():
        raise ValueError(
            f"model.arch {name!r} is neither one of {', '.join(ARCHS)} nor a timm architecture name "
            "(e.g. vit_tiny_patch16_224)"
        )
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    if type(net).__name__ != "VisionTransformer":
        raise ValueError(f"model.arch {name!r} is a timm {type(net).__name__}, not a VisionTransformer")
    block = net.blocks[0]
    plain = (
        net.has_class_token
        and net.reg_token is None
        and not net.no_embed_class
        and net.global_pool == "token"
        and type(block.ls1).__name__ == "Identity"
        and type(block.attn.q_norm).__name__ == "Identity"
        and type(net.norm_pre).__name__ == "Identity"
        and type(net.fc_norm).__name__ == "Identity"
    )
    if not plain:
        raise ValueError(
            f"model.arch {name!r} is a timm ViT variant (register tokens, layer scale, pooling or "
            "extra norms) this family does not convert; use a plain ViT such as vit_small_patch16_224"
        )
    return ViTArch(
        net.patch_embed.patch_size[0],
        net.embed_dim,
        len(net.blocks),
        block.attn.num_heads,
        block.mlp.fc1.out_features / net.embed_dim,
        net.patch_embed.img_size[0],
    )


def arch_sizes(name: str) -> ViTArch:
    return ARCHS[name] if name in ARCHS else timm_arch(name)


class Augment(Section):
    """Training-time augmentation (the paper's: random crop with padding, horizontal flip, RandAugment)."""

    crop_padding: int = Field(0, ge=0)
    """Random crop of the image padded by this many pixels on each side (0 = none)."""
    flip: bool = False
    """Random horizontal flip (off for digits: a mirrored digit is another shape)."""
    randaugment: str | None = None
    """timm's RandAugment config string, e.g. `rand-m9-n2-mstd0.5` (None = off)."""


class ViTConfig(ModelConfig):
    """A ViT classifier: an architecture plus the data shape; a timm file or Hugging Face folder as checkpoint."""

    family: Literal["vit"] = "vit"
    arch: str = "vit-micro"
    img_size: int = Field(8, ge=1)
    in_chans: int = Field(1, ge=1)
    num_classes: int = Field(10, ge=2)
    patch_size: int | None = Field(None, ge=1)
    embed_dim: int | None = Field(None, ge=2)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout after the position embeddings, the attention projection and both MLP linears (timm's
    drop_rate / proj_drop_rate; Hugging Face's hidden_dropout_prob)."""
    norm_eps: float = Field(1e-6, gt=0)
    """LayerNorm eps: timm's 1e-6; a Hugging Face checkpoint's layer_norm_eps replaces it."""
    label_token: Literal["cls", "append"] = "cls"
    """Where the noisy label (times c_in) enters: the CLS slot (the official code) or an appended token. Chosen by
    measurement (docs/results/quality-vit.md, "ViT decisions and the measurements behind them")."""
    label_table: Literal["auto", "head", "orthonormal"] = "auto"
    """The shared label table (rows L2-normalised, fixed at split): the source head's rows (`head`), or a seeded
    random orthonormal one; `auto` = head for a checkpoint, orthonormal for a fresh network."""
    global_pool: Literal["token", "avg"] | None = None
    """The classifier's readout, timm's `global_pool`: `token` (the CLS token) or `avg` (the mean of the normed
    patch tokens, timm's `fc_norm=False`). A timm file does not record it (an avg-pooled ViT has exactly a CLS ViT's
    keys), so split refuses a timm checkpoint until it is said; null is `token` for a fresh network and for a
    Hugging Face folder (ViTForImageClassification always reads CLS)."""
    init_seed: Seed = 0
    adaln_rank: int | None = Field(None, ge=1)
    """Low-rank noise modulation of every layer: Linear(D, r) then Linear(r, 6D) instead of Linear(D, 6D), as the
    Llama family's model.adaln_rank (null: DiT's full width, the default; docs/checkpoints.md, "Models of the size
    you hold")."""
    augment: Augment = Field(default_factory=Augment)

    @model_validator(mode="after")
    def _shape(self) -> "ViTConfig":
        a = arch_sizes(self.arch)
        patch = self.patch_size or a.patch_size
        dim, heads = self.embed_dim or a.embed_dim, self.num_heads or a.num_heads
        if self.img_size % patch:
            raise ValueError(f"model.img_size {self.img_size} is not divisible by the patch size {patch}")
        if dim % heads:
            raise ValueError(f"model.embed_dim {dim} is not divisible by model.num_heads {heads}")
        if self.label_token not in LABEL_TOKENS:  # pragma: no cover - Literal already refuses
            raise ValueError(f"model.label_token must be one of {LABEL_TOKENS}")
        return self

    def shape(self, depth: int | None = None) -> ViTShape:
        a = arch_sizes(self.arch)
        return ViTShape(
            img_size=self.img_size,
            patch_size=self.patch_size or a.patch_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dim=self.embed_dim or a.embed_dim,
            depth=depth or self.depth or a.depth,
            num_heads=self.num_heads or a.num_heads,
            mlp_ratio=self.mlp_ratio or a.mlp_ratio,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            label_token=self.label_token,
            adaln_rank=self.adaln_rank,
            global_pool=self.global_pool or "token",
        )
