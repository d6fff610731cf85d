"""The DiT denoiser (EDM preconditioning, DESIGN 3) and its training loss.

Noise conditioning (DESIGN 5, written down here as promised): the reference DiT's timestep
embedder was trained on DDPM timesteps t in [0, 999]. We feed it an affine map of EDM's
c_noise = ln(sigma)/4 onto that range,

    t(sigma) = 999 * (c_noise(sigma) - c_noise(sigma_min)) / (c_noise(sigma_max) - c_noise(sigma_min)),

so sigma_min -> t = 0 (least noise, as in DDPM) and sigma_max -> t = 999 (most noise), and
t is monotone (linear in ln sigma) in between.
"""

from __future__ import annotations

import torch
from torch import nn

from dbconvert import noise as nz
from dbconvert.families.contract import shard_slice
from dbconvert.families.dit.model import DiT


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


def edm_loss(
    denoiser: EDMDenoiser,
    batch: list[torch.Tensor],
    sigma_range: tuple[float, float],
    label_dropout: float,
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, dict[str, float]]:
    """lambda(sigma) ||D(x + sigma eps, sigma, y) - x||^2, labels dropped to the null class (DESIGN 3, 4)."""
    x, y = batch
    n, keep = shard_slice(x.shape[0], shard)  # draws for the global batch, this rank's slice kept
    noise = denoiser.noise
    sigma = nz.sample_sigmas(n, *sigma_range, noise, generator)[keep]
    eps = torch.randn((n, *x.shape[1:]), generator=generator)[keep]
    drop = (torch.rand(n, generator=generator) < label_dropout)[keep]
    sigma, eps, drop = sigma.to(x.device), eps.to(x.device), drop.to(x.device)
    y = torch.where(drop, torch.full_like(y, denoiser.null_class), y)
    s = sigma.reshape(-1, 1, 1, 1)
    d = denoiser(x + s * eps, sigma, y)
    weight = nz.loss_weight(s, noise.sigma_data)
    loss = (weight * (d - x) ** 2).mean()
    log_sigma = sigma.log()
    return loss, {"sigma_min": sigma.min().item(), "sigma_max": sigma.max().item(), "log_sigma_mean": log_sigma.mean().item()}
