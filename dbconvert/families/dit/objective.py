"""The DiT denoisers (DESIGN 3 and 5) and their training loss, one per parameterisation.

`edm` (fresh networks): EDM preconditioning, D = c_skip z + c_out F(c_in z, t). The timestep
embedder was built for DDPM timesteps t in [0, 999], so it is fed an affine map of EDM's
c_noise = ln(sigma)/4 onto that range,

    t(sigma) = 999 * (c_noise(sigma) - c_noise(sigma_min)) / (c_noise(sigma_max) - c_noise(sigma_min)),

so sigma_min -> t = 0 (least noise, as in DDPM) and sigma_max -> t = 999 (most noise), and
t is monotone (linear in ln sigma) in between.

`ddpm-eps` (a pretrained reference DiT, a discrete DDPM epsilon-predictor): wrapped as an EDM
denoiser the way the EDM paper and k-diffusion wrap discrete VP models. With alphabar_t of the
linear-beta schedule and sigma_t = sqrt((1 - alphabar_t) / alphabar_t), the VE variable
z = x0 + sigma_t eps and the DDPM variable x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps
are related by x_t = z / sqrt(1 + sigma_t^2), and the DDPM x0 prediction
(x_t - sqrt(1 - alphabar_t) eps_hat) / sqrt(alphabar_t) equals z - sigma_t eps_hat. So

    D(z, sigma) = z - sigma * eps_hat(z / sqrt(1 + sigma^2), t(sigma)),

with t(sigma) interpolated linearly in ln(sigma) between the discrete steps (a fractional t goes
into the sinusoidal timestep embedder). Outside [sigma_0, sigma_{T-1}] of the schedule t is
clamped to [0, T-1]: below sigma_0 the error of D is at most sigma * |eps_hat| (D -> z anyway);
above sigma_{T-1} the network is out of its training range, which is why `split` refuses a
noise.sigma_max above it. The training loss stays EDM's loss on D; only the wrapper changes.
"""

from __future__ import annotations

import torch
from torch import nn

from dbconvert import noise as nz
from dbconvert.noise import sigma_to_timestep
from dbconvert.families.contract import shard_slice
from dbconvert.families.dit.config import DDPMSchedule
from dbconvert.families.dit.model import DiT


def ddpm_sigmas(schedule: DDPMSchedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - alphabar_t) / alphabar_t) for t = 0..T-1 of the linear-beta schedule (float64)."""
    betas = torch.linspace(schedule.beta_start, schedule.beta_end, schedule.timesteps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def ddpm_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional DDPM timestep of `sigma`: linear in ln(sigma) between the discrete steps, clamped to [0, T-1].

    `log_sigmas` = ln(ddpm_sigmas), increasing. Computed in float64 so an integer step's sigma maps
    back to (very nearly) that integer; k-diffusion's `DiscreteSchedule.sigma_to_t` does the same.
    """
    log_sigma = sigma.to(torch.float64).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
    return low.to(torch.float64) + w


class DiTDenoiser(nn.Module):
    """What every DiT denoiser carries: the network, the run's noise settings and the null class for guidance."""

    def __init__(self, net: DiT, noise: nz.NoiseSettings) -> None:
        super().__init__()
        self.net = net
        self.noise = noise
        self.null_class = net.shape.num_classes


class EDMDenoiser(DiTDenoiser):
    """D(z, sigma, y) = c_skip z + c_out F(c_in z, t(c_noise), y): EDM preconditioning around a DiT."""

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sd = self.noise.sigma_data
        sigma = sigma.to(torch.float32).reshape(-1)
        s = sigma.reshape(-1, 1, 1, 1)
        f = self.net(nz.c_in(s, sd) * z, sigma_to_timestep(sigma, self.noise), y)
        return nz.c_skip(s, sd) * z + nz.c_out(s, sd) * f.to(torch.float32)


class DDPMEpsDenoiser(DiTDenoiser):
    """D(z, sigma, y) = z - sigma eps_hat(z / sqrt(1 + sigma^2), t(sigma), y): a DDPM epsilon-predictor as an EDM
    denoiser (see the module docstring)."""

    def __init__(self, net: DiT, noise: nz.NoiseSettings, schedule: DDPMSchedule) -> None:
        super().__init__(net, noise)
        self.schedule = schedule
        self.log_sigmas = ddpm_sigmas(schedule).log()  # not a buffer: it must stay float64 whatever .to() does
        self.on_device: dict[torch.device, torch.Tensor] = {}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma) in float64 (on the CPU for devices without float64), handed over as float32 like the embedder
        uses it."""
        where = sigma.device if sigma.device.type in ("cpu", "cuda") else torch.device("cpu")
        if where not in self.on_device:  # one copy per device, not one per forward
            self.on_device[where] = self.log_sigmas.to(where)
        t = ddpm_timestep(sigma.to(where), self.on_device[where])
        return t.to(device=sigma.device, dtype=torch.float32)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1)
        s = sigma.reshape(-1, 1, 1, 1)
        eps = self.net(z / torch.sqrt(1.0 + s**2), self.timestep(sigma), y)
        return z - s * eps.to(torch.float32)


def edm_loss(
    denoiser: DiTDenoiser,
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
    return loss, {
        "sigma_min": sigma.min().item(),
        "sigma_max": sigma.max().item(),
        "log_sigma_mean": log_sigma.mean().item(),
    }
