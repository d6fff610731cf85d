"""The ViT network: timm's `VisionTransformer` (same key names, same maths) plus zero-initialised noise modulation.

One class serves the source (all L layers), every block (a slice), the e2e denoiser and the plain
classifier reference. Parameter names are timm's (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{k}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2`, `norm`, `head`), so a timm
state dict loads through an identity key map (see `convert.py`). What dbconvert adds:

- `t_embedder.mlp.{0,2}`: DiT's timestep embedder, fed the noise level (see `objective.py`);
- `blocks.{k}.adaLN_modulation.1`: SiLU then Linear(H, 6H) giving (shift, scale, gate) for the attention
  and the MLP input of every layer,

      h = LN(x) * (1 + scale) + shift,   x <- x + (1 + gate) * sublayer(h),

  zero-initialised, so a freshly split layer computes exactly what the timm layer computes (tested
  against timm to 0.0; DiT's own adaLN-zero gates with `gate` alone, which would turn a copied layer off);
- `norm_modulation.1`: the same (shift, scale) for the final norm;
- `label_pos` (label token `append` only): the position embedding of the appended label token.

Without a noise level (`cond=None`) nothing is modulated: that is the plain classifier (timm's forward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from dbconvert.embeddings import sinusoidal_embedding

LABEL_TOKENS = ("cls", "append")
GLOBAL_POOLS = ("token", "avg")
"""timm's `global_pool` values this family converts: `token` reads the CLS token, `avg` the mean of the normed
patch tokens (with `fc_norm=False`, the keys of a CLS ViT: weights cannot tell the two apart, issue 32)."""
"""Where the noisy label enters: in the CLS slot (the official code) or as a token appended after the patches."""


@dataclass(frozen=True)
class ViTShape:
    """Everything that fixes a ViT's parameter shapes (and its LayerNorm eps)."""

    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    label_token: str = "cls"
    frequency_size: int = 256
    adaln_rank: int | None = None
    """None: adaLN_modulation = SiLU, Linear(D, 6D) (DiT's); r: SiLU, Linear(D, r, no bias), Linear(r, 6D)."""
    global_pool: str = "token"
    """The plain classifier's readout (`GLOBAL_POOLS`); the denoisers always read their label token."""

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def with_depth(self, depth: int) -> "ViTShape":
        return replace(self, depth=depth)

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """DiT's sinusoidal timestep embedding followed by an MLP (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, hidden: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.frequency_size = frequency_size

    @staticmethod
    def embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        return sinusoidal_embedding(t, dim, max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed (key `proj`): a strided convolution, flattened to (N, tokens, H)."""

    def __init__(self, s: ViTShape) -> None:
        super().__init__()
        self.proj = nn.Conv2d(s.in_chans, s.embed_dim, kernel_size=s.patch_size, stride=s.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's Attention: fused qkv, scaled dot-product attention, output projection."""

    def __init__(self, s: ViTShape) -> None:
        super().__init__()
        self.num_heads = s.num_heads
        self.head_dim = s.embed_dim // s.num_heads
        self.qkv = nn.Linear(s.embed_dim, 3 * s.embed_dim, bias=s.qkv_bias)
        self.proj = nn.Linear(s.embed_dim, s.embed_dim)
        self.proj_drop = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(n, t, c)))


class Mlp(nn.Module):
    def __init__(self, s: ViTShape) -> None:
        super().__init__()
        self.fc1 = nn.Linear(s.embed_dim, s.mlp_hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(s.dropout)
        self.fc2 = nn.Linear(s.mlp_hidden, s.embed_dim)
        self.drop2 = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """timm's pre-norm Block plus `adaLN_modulation` (zero-initialised: see the module docstring)."""

    def __init__(self, s: ViTShape) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(s.embed_dim, eps=s.norm_eps)
        self.attn = Attention(s)
        self.norm2 = nn.LayerNorm(s.embed_dim, eps=s.norm_eps)
        self.mlp = Mlp(s)
        if s.adaln_rank is None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(s.embed_dim, 6 * s.embed_dim))
        else:  # low rank: 6D x (D + r) parameters instead of 6D x D (the official code conditions through D/6)
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(s.embed_dim, s.adaln_rank, bias=False), nn.Linear(s.adaln_rank, 6 * s.embed_dim)
            )
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:  # the plain classifier: timm's Block exactly
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).chunk(6, dim=-1)
        x = x + (1 + gate1.unsqueeze(1)) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + (1 + gate2.unsqueeze(1)) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class ViTNet(nn.Module):
    """A timm-compatible VisionTransformer of `shape.depth` layers with noise conditioning (module docstring)."""

    def __init__(self, shape: ViTShape) -> None:
        super().__init__()
        s = self.shape = shape
        self.patch_embed = PatchEmbed(s)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + s.num_patches, s.embed_dim))
        self.pos_drop = nn.Dropout(s.dropout)
        if s.label_token == "append":
            self.label_pos = nn.Parameter(torch.zeros(1, 1, s.embed_dim))
        self.blocks = nn.ModuleList([Block(s) for _ in range(s.depth)])
        self.norm = nn.LayerNorm(s.embed_dim, eps=s.norm_eps)
        self.head = nn.Linear(s.embed_dim, s.num_classes)
        self.t_embedder = TimestepEmbedder(s.embed_dim, s.frequency_size)
        self.norm_modulation = nn.Sequential(nn.SiLU(), nn.Linear(s.embed_dim, 2 * s.embed_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """timm's defaults (trunc-normal 0.02 linears and position table, cls_token 1e-6); modulation zero."""

        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.norm_modulation[-1].weight)
        nn.init.zeros_(self.norm_modulation[-1].bias)

    def check_images(self, x: torch.Tensor) -> None:
        s = self.shape
        if tuple(x.shape[1:]) != (s.in_chans, s.img_size, s.img_size):
            from dbconvert.errors import DataError

            raise DataError(
                f"images of shape {tuple(x.shape[1:])} do not fit the model, which takes "
                f"({s.in_chans}, {s.img_size}, {s.img_size}); resize them or set model.img_size / "
                "model.in_chans"
            )

    def tokens(self, x: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """The input sequence: [CLS or label token, patches] (+ appended label token), position embeddings added."""
        patches = self.patch_embed(x) + self.pos_embed[:, 1:]
        first = self.cls_token.expand(x.shape[0], -1, -1)
        if label is not None and self.shape.label_token == "cls":
            # the label takes the CLS slot; `0 * cls_token` keeps cls_token in the graph (a zero gradient), so data
            # parallelism without find_unused_parameters sees every parameter used
            first = label.unsqueeze(1).to(patches.dtype) + 0 * first
        seq = [first + self.pos_embed[:, :1], patches]
        if label is not None and self.shape.label_token == "append":
            seq.append(label.unsqueeze(1).to(patches.dtype) + self.label_pos)
        return self.pos_drop(torch.cat(seq, dim=1))

    def features(
        self, x: torch.Tensor, label: torch.Tensor | None = None, t: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final-normed hidden state of the readout token: CLS (classifier, `cls`) or the appended label token.

        `label` is the noisy label input (c_in z), `t` the noise level fed to the timestep embedder; both None
        is the plain classifier.
        """
        cond = self.t_embedder(t) if t is not None else None
        h = self.tokens(x, label)
        for block in self.blocks:
            h = block(h, cond)
        return self.readout(h, label, cond)

    def readout(self, h: torch.Tensor, label: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor:
        """The final-normed readout of the last layer's hidden state `h` (apart from `features`, so a forward can
        run its layers one at a time: the function check at split)."""
        if label is None and self.shape.global_pool == "avg":  # timm: norm every token, then average the patches
            return self.norm(h[:, 1:]).mean(dim=1)
        out = h[:, -1] if label is not None and self.shape.label_token == "append" else h[:, 0]
        out = self.norm(out)
        if cond is not None:
            shift, scale = self.norm_modulation(cond).chunk(2, dim=-1)
            out = out * (1 + scale) + shift
        return out

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward: head(norm(CLS)) (or the mean of the normed patches, `global_pool` avg), no noise
        conditioning (the plain classifier)."""
        return self.head(self.features(x))


def parameter_count(shape: ViTShape) -> int:
    with torch.device("meta"):
        net = ViTNet(shape)
    return sum(p.numel() for p in net.parameters())
