"""The DiT network with the reference implementation's layer names, shapes and initialisation.

Parameter names match facebookresearch/DiT `models.py` exactly, so its public checkpoints
(DiT-XL/2, learn_sigma=True) load with strict=True. Label dropout for classifier-free
guidance is done by the caller (the training loop replaces labels by the null class
`num_classes`), so this forward pass is deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch import nn

from dbconvert.embeddings import sinusoidal_embedding


@dataclass(frozen=True)
class DiTArch:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


# The reference configs (DiT paper table 1) plus CPU-sized ones.
ARCHS: dict[str, DiTArch] = {
    **{f"DiT-XL/{p}": DiTArch(28, 1152, 16, p) for p in (2, 4, 8)},
    **{f"DiT-L/{p}": DiTArch(24, 1024, 16, p) for p in (2, 4, 8)},
    **{f"DiT-B/{p}": DiTArch(12, 768, 12, p) for p in (2, 4, 8)},
    **{f"DiT-S/{p}": DiTArch(12, 384, 6, p) for p in (2, 4, 8)},
    **{f"DiT-Tiny/{p}": DiTArch(8, 128, 4, p) for p in (1, 2, 4)},
    **{f"DiT-Micro/{p}": DiTArch(4, 32, 2, p) for p in (1, 2)},
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar noise level -> vector: sinusoidal frequencies, then a 2-layer MLP (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        return sinusoidal_embedding(t, dim, max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row `num_classes` is the learned null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, use_null_class: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(use_null_class), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """One transformer layer with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(frozen=True)
class DiTShape:
    """Everything that fixes a DiT's parameter shapes."""

    input_size: int
    in_channels: int
    num_classes: int
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    learn_sigma: bool = False
    use_null_class: bool = True

    def with_depth(self, depth: int) -> "DiTShape":
        return DiTShape(**{**asdict(self), "depth": depth})


class DiT(nn.Module):
    """Diffusion transformer (Peebles & Xie 2023) with the reference module tree."""

    def __init__(self, shape: DiTShape) -> None:
        super().__init__()
        self.shape = shape
        self.in_channels = shape.in_channels
        self.out_channels = shape.in_channels * 2 if shape.learn_sigma else shape.in_channels
        self.patch_size = shape.patch_size
        self.x_embedder = PatchEmbed(
            shape.input_size, shape.patch_size, shape.in_channels, shape.hidden_size, bias=True
        )
        self.t_embedder = TimestepEmbedder(shape.hidden_size)
        self.y_embedder = LabelEmbedder(shape.num_classes, shape.hidden_size, shape.use_null_class)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, shape.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(shape.hidden_size, shape.num_heads, mlp_ratio=shape.mlp_ratio) for _ in range(shape.depth)]
        )
        self.final_layer = FinalLayer(shape.hidden_size, shape.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            grid = int(self.x_embedder.num_patches**0.5)
            pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); the channel index is the fastest-varying one."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def parameter_count(shape: DiTShape) -> int:
    """Trainable parameters of a DiT of `shape` (the frozen positional table excluded), counted on the meta device."""
    with torch.device("meta"):
        net = DiT(shape)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def forward_gflops(arch: DiTArch, input_size: int) -> float:
    """Multiply-adds (G) of the transformer layers for one image, the DiT paper's "Gflops" convention.

    Per layer: 12 N h^2 for qkv, projection and MLP, plus 2 N^2 h for attention (N tokens, h hidden);
    embedders and the final layer are negligible. Training a step costs about 3x a forward pass.
    """
    tokens = (input_size // arch.patch_size) ** 2
    h = arch.hidden_size
    return arch.depth * (12 * tokens * h * h + 2 * tokens * tokens * h) / 1e9


ARCH_NOTES = [
    "params: trainable parameters counted from the built network (frozen positional table excluded) for 32x32 RGB "
    "images and 10 classes; paper: the same at the DiT paper's setting (32x32x4 latents, 1000 classes, "
    "learn_sigma). A block of depth d holds the embedders and final layer plus d of the layers.",
    "tokens and Gflops at 32x32: Gflops are the multiply-adds of one forward pass of one image, as the DiT paper "
    "counts them; a training step costs about 3x that per image.",
    "patch vs image size: tokens = (model.input_size / patch)^2. Each layer costs in proportion to the tokens "
    "(and their square in attention), so halving the patch makes a network about 4x slower. Keep at least 4x4 "
    "tokens: patch 2 on 8x8 digits, 2 or 4 on 28-32 px images, /2 on the 32x32 latents of 256 px images (the paper).",
    "CPU time, measured on a 2-core CPU: the demo (DiT-Tiny/2 on 8x8 digits, batch 128, 4 blocks and the baseline, "
    "1000 steps each) takes about 8 minutes; DiT-S/2 on 32x32 RGB took 38 s per end-to-end training step at batch "
    "64 (docs/results/speed.md). Tiny and Micro are for CPUs; S and larger want a GPU.",
]


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def arch_rows() -> list[dict[str, object]]:
    """Every architecture in ARCHS with its sizes; parameters are counted from the built models.

    `params`: at 32x32 RGB with 10 classes (CIFAR-10); `paper`: at the DiT paper's setting (32x32x4
    latents of 256 px ImageNet, 1000 classes, learn_sigma), to check against its table.
    """
    rows: list[dict[str, object]] = []
    for name, a in ARCHS.items():
        small = DiTShape(32, 3, 10, a.depth, a.hidden_size, a.num_heads, a.patch_size)
        paper = DiTShape(32, 4, 1000, a.depth, a.hidden_size, a.num_heads, a.patch_size, learn_sigma=True)
        rows.append(
            {
                "arch": name,
                "depth": a.depth,
                "hidden": a.hidden_size,
                "heads": a.num_heads,
                "patch": a.patch_size,
                "params": millions(parameter_count(small)),
                "paper": millions(parameter_count(paper)),
                "tokens": (32 // a.patch_size) ** 2,
                "Gflops": f"{forward_gflops(a, 32):.3g}",
            }
        )
    return rows


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Frozen 2-D sin-cos position table of MAE/DiT: (grid_size**2, embed_dim)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def variance_channel_mask(patch_size: int, in_channels: int) -> torch.Tensor:
    """Rows of a learn_sigma final linear that predict the mean (not the variance).

    The final linear's output is laid out as (p, p, 2C) with the channel fastest, and the
    reference splits channels [0, C) (mean) from [C, 2C) (variance), so the rows to keep are
    every output whose channel index is < C -- not simply the first half of the rows.
    """
    out_channels = 2 * in_channels
    channel = torch.arange(patch_size * patch_size * out_channels) % out_channels
    return channel < in_channels
