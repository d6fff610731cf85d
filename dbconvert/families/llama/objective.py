"""The Llama denoiser over the shared target table, its loss, and the autoregressive reference."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dbconvert import noise as nz
from dbconvert.families.contract import shard_slice
from dbconvert.families.llama.model import KVCache, LlamaBlockNet


class LlamaDenoiser(nn.Module):
    """Logits for the token under a noisy target embedding, and D(z, sigma) = softmax(logits) @ T."""

    def __init__(self, net: LlamaBlockNet, table: torch.Tensor, noise: nz.NoiseSettings) -> None:
        super().__init__()
        self.net = net
        self.noise = noise
        self.register_buffer("table", table.to(torch.float32), persistent=False)
        self.register_buffer("table_sq", table.to(torch.float32).pow(2).sum(-1), persistent=False)

    def likelihood(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log N(z; T_v, sigma^2 I) up to a constant in v, for every row v (float32)."""
        z = z.to(torch.float32)
        return (z @ self.table.T - 0.5 * self.table_sq) / sigma.to(torch.float32)[..., None] ** 2

    def forward(self, tokens: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Training forward: tokens (B, T), z (B, T, H), sigma (B, T) -> logits (B, T, V) at the noisy positions."""
        s = sigma[..., None]
        head = self.net.forward_train(tokens, nz.c_in(s, self.noise.sigma_data) * z, nz.c_noise(sigma))
        return head.to(torch.float32) + self.likelihood(z, sigma)

    def step(self, cache: KVCache | None, z: torch.Tensor, sigma: float, position: int,
             pad: torch.Tensor | None = None) -> torch.Tensor:
        """D(z, sigma) of one new token at column `position`, attending to the cached clean prefix; z (B, H).

        `pad` (B,) left-padding columns per row (see `model.decode_geometry`).
        """
        s = torch.full((z.shape[0], 1), sigma, dtype=torch.float32, device=z.device)
        head = self.net.noisy_step(cache, (nz.c_in(s, self.noise.sigma_data) * z)[:, None], nz.c_noise(s), position, pad)
        logits = head.to(torch.float32) + self.likelihood(z, s[:, 0])
        return torch.softmax(logits, dim=-1) @ self.table

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the table row nearest to each z (Euclidean)."""
        return (z.to(torch.float32) @ self.table.T - 0.5 * self.table_sq).argmax(-1)


class CausalLM(nn.Module):
    """The e2e baseline: the unsplit network as an ordinary next-token model."""

    def __init__(self, net: LlamaBlockNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net.forward_causal(tokens)


@functools.lru_cache(maxsize=64)
def mean_loss_weight(lo: float, hi: float, noise: nz.NoiseSettings, points: int = 4096) -> float:
    """E[lambda(sigma)] for sigma from the log-normal restricted to [lo, hi] (midpoint rule in probability)."""
    f_lo, f_hi = noise.cdf(lo), noise.cdf(hi)
    u = f_lo + (f_hi - f_lo) * (torch.arange(points, dtype=torch.float64) + 0.5) / points
    sigma = torch.exp(noise.p_mean + noise.p_std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).clamp(lo, hi)
    return float(nz.loss_weight(sigma, noise.sigma_data).mean())


def diffusion_loss(
    denoiser: LlamaDenoiser,
    tokens: torch.Tensor,
    sigma_range: tuple[float, float],
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy of every token at its noisy position, one sigma per position (DESIGN 5)."""
    b, t = tokens.shape
    n, keep = shard_slice(b, shard)  # draws for the global batch, this rank's slice kept
    noise: nz.NoiseSettings = denoiser.noise
    table: torch.Tensor = denoiser.table
    sigma = nz.sample_sigmas(n * t, *sigma_range, noise, generator).view(n, t)[keep].to(tokens.device)
    eps = torch.randn((n, t, table.shape[1]), generator=generator)[keep].to(tokens.device)
    z = table[tokens] + sigma[..., None] * eps
    logits = denoiser(tokens, z, sigma)
    ce = F.cross_entropy(logits.reshape(b * t, -1), tokens.reshape(-1), reduction="none").view(b, t)
    weight = nz.loss_weight(sigma, noise.sigma_data) / mean_loss_weight(*sigma_range, noise)
    loss = (weight * ce).mean()
    with torch.no_grad():
        acc = (logits.argmax(-1) == tokens).float().mean().item()
    return loss, {
        "ce": ce.mean().item(),
        "accuracy": acc,
        "sigma_min": sigma.min().item(),
        "sigma_max": sigma.max().item(),
        "log_sigma_mean": sigma.log().mean().item(),
    }


def ar_loss(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Ordinary causal next-token cross-entropy of the unsplit network (the AR reference; no randomness)."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    return loss, {"ce": loss.item(), "ppl": math.exp(min(loss.item(), 50.0))}
