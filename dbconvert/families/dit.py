"""The DiT family: image diffusion transformers cut into diffusion blocks.

Noise conditioning (DESIGN 5, written down here as promised): the reference DiT's timestep
embedder was trained on DDPM timesteps t in [0, 999]. We feed it an affine map of EDM's
c_noise = ln(sigma)/4 onto that range,

    t(sigma) = 999 * (c_noise(sigma) - c_noise(sigma_min)) / (c_noise(sigma_max) - c_noise(sigma_min)),

so sigma_min -> t = 0 (least noise, as in DDPM) and sigma_max -> t = 999 (most noise), and
t is monotone (linear in ln sigma) in between.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from dbconvert import noise as nz
from dbconvert.checkpoint import KeyMap, apply_key_map, file_sha256, load_strict, read_checkpoint
from dbconvert.config import ModelConfig, Recipe
from dbconvert.data.images import ImageData, load_images
from dbconvert.errors import DataError
from dbconvert.families.base import Family, Source, shard_slice
from dbconvert.families.dit_model import ARCHS, DiT, DiTShape, variance_channel_mask

if TYPE_CHECKING:
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult

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


class DiTConfig(ModelConfig):
    """A DiT: a named architecture (`DiT-S/2`, ...) plus the data shape it models."""

    family: Literal["dit"] = "dit"
    arch: str = "DiT-Tiny/2"
    depth: int | None = Field(None, ge=1)
    input_size: int = Field(32, ge=1)
    in_channels: int = Field(3, ge=1)
    num_classes: int = Field(10, ge=0)
    learn_sigma: bool = False
    init_seed: int = 0

    @model_validator(mode="after")
    def _arch(self) -> "DiTConfig":
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.input_size % ARCHS[self.arch].patch_size:
            raise ValueError(f"model.input_size {self.input_size} is not divisible by the patch size of {self.arch}")
        return self

    def shape(self, learn_sigma: bool | None = None) -> DiTShape:
        a = ARCHS[self.arch]
        return DiTShape(
            input_size=self.input_size,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            depth=self.depth or a.depth,
            hidden_size=a.hidden_size,
            num_heads=a.num_heads,
            patch_size=a.patch_size,
            learn_sigma=self.learn_sigma if learn_sigma is None else learn_sigma,
        )


def sigma_to_timestep(sigma: torch.Tensor, noise: nz.NoiseSettings) -> torch.Tensor:
    """EDM c_noise mapped affinely onto DiT's DDPM timestep range [0, 999] (see module docstring)."""
    lo = nz.c_noise(torch.tensor(noise.sigma_min, dtype=torch.float64)).item()
    hi = nz.c_noise(torch.tensor(noise.sigma_max, dtype=torch.float64)).item()
    return 999.0 * (nz.c_noise(sigma) - lo) / (hi - lo)


class EDMDenoiser(nn.Module):
    """D(z, sigma, y) = c_skip z + c_out F(c_in z, t(c_noise), y): EDM preconditioning around a DiT."""

    def __init__(self, net: DiT, noise: nz.NoiseSettings) -> None:
        super().__init__()
        self.net = net
        self.noise = noise
        self.null_class = net.shape.num_classes

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sd = self.noise.sigma_data
        sigma = sigma.to(torch.float32).reshape(-1)
        s = sigma.reshape(-1, 1, 1, 1)
        f = self.net(nz.c_in(s, sd) * z, sigma_to_timestep(sigma, self.noise), y)
        return nz.c_skip(s, sd) * z + nz.c_out(s, sd) * f.to(torch.float32)


def block_key_map(start: int, end: int) -> KeyMap:
    """Block key -> source key for the block holding source layers [start, end)."""
    key_map = {key: key for key in SHARED_KEYS}
    for local, src in enumerate(range(start, end)):
        for name in LAYER_KEYS:
            key_map[f"blocks.{local}.{name}"] = f"blocks.{src}.{name}"
    return key_map


def _is_layer_key(key: str, num_layers: int) -> bool:
    parts = key.split(".", 2)
    return len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < num_layers and parts[2] in LAYER_KEYS


class DiTFamily(Family):
    name = "dit"
    config_cls = DiTConfig

    def source(self, recipe: Recipe) -> Source:
        cfg: DiTConfig = recipe.model  # type: ignore[assignment]
        shape = cfg.shape(learn_sigma=False)
        if cfg.checkpoint is None:
            torch.manual_seed(cfg.init_seed)
            return Source(DiT(shape), shape.depth)
        reference = DiT(cfg.shape())
        what = f"checkpoint {cfg.checkpoint} vs {cfg.arch} (input_size={cfg.input_size}, learn_sigma={cfg.learn_sigma})"
        load_strict(reference, read_checkpoint(cfg.checkpoint), what)
        net = DiT(shape)
        net.load_state_dict(self._drop_variance(reference.state_dict(), cfg, shape.depth))
        return Source(net, shape.depth, checkpoint_sha256=file_sha256(cfg.checkpoint))

    @staticmethod
    def _drop_variance(state: dict[str, torch.Tensor], cfg: DiTConfig, depth: int) -> dict[str, torch.Tensor]:
        """learn_sigma checkpoints predict (mean, variance) channels; the EDM denoiser keeps the mean."""
        transforms = {}
        if cfg.learn_sigma:
            keep = variance_channel_mask(ARCHS[cfg.arch].patch_size, cfg.in_channels)
            transforms = {"final_layer.linear.weight": lambda w: w[keep], "final_layer.linear.bias": lambda b: b[keep]}
        return apply_key_map(state, block_key_map(0, depth), transforms=transforms, what="DiT checkpoint conversion")

    def block_network(self, recipe: Recipe, depth: int) -> nn.Module:
        cfg: DiTConfig = recipe.model  # type: ignore[assignment]
        return DiT(cfg.shape(learn_sigma=False).with_depth(depth))

    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        return apply_key_map(
            source.network.state_dict(),
            block_key_map(start, end),
            ignored=lambda key: _is_layer_key(key, source.num_layers),
            what=f"DiT block of layers [{start}, {end})",
        )

    def denoiser(self, recipe: Recipe, network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        assert isinstance(network, DiT)
        return EDMDenoiser(network, noise)

    def load_data(self, recipe: Recipe, split: str | None = None) -> ImageData:
        cfg: DiTConfig = recipe.model  # type: ignore[assignment]
        data = load_images(recipe.data, split)
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if tuple(data.x.shape[1:]) != expected:
            raise DataError(
                f"data set {recipe.data.source!r} has images of shape {tuple(data.x.shape[1:])}, but the model "
                f"expects {expected} (set model.in_channels / model.input_size to match)"
            )
        if cfg.num_classes and data.num_classes > cfg.num_classes:
            raise DataError(
                f"data set {recipe.data.source!r} has {data.num_classes} classes but model.num_classes is {cfg.num_classes}"
            )
        return data

    def sample(self, run: "Run", request: "SampleRequest") -> "SampleResult":
        from dbconvert.sampling import sample_images

        return sample_images(run, request)

    def training_loss(
        self,
        denoiser: nn.Module,
        batch: Any,
        sigma_range: tuple[float, float],
        recipe: Recipe,
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        n, keep = shard_slice(x.shape[0], shard)  # draws for the global batch, this rank's slice kept
        noise = denoiser.noise
        sigma = nz.sample_sigmas(n, *sigma_range, noise, generator)[keep]
        eps = torch.randn((n, *x.shape[1:]), generator=generator)[keep]
        drop = (torch.rand(n, generator=generator) < recipe.train.label_dropout)[keep]
        sigma, eps, drop = sigma.to(x.device), eps.to(x.device), drop.to(x.device)
        y = torch.where(drop, torch.full_like(y, denoiser.null_class), y)
        s = sigma.reshape(-1, 1, 1, 1)
        d = denoiser(x + s * eps, sigma, y)
        weight = nz.loss_weight(s, noise.sigma_data)
        loss = (weight * (d - x) ** 2).mean()
        log_sigma = sigma.log()
        return loss, {"sigma_min": sigma.min().item(), "sigma_max": sigma.max().item(), "log_sigma_mean": log_sigma.mean().item()}
