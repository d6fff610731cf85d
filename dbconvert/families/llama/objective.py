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
    """Logits for the token under a noisy target embedding, and D(z, sigma) = softmax(logits) @ T.

    logits = head(h) + (z . T_v - |T_v|^2 / 2) / sigma^2: the head's context prior plus the exact Gaussian
    log-likelihood of z under each row. With head=tied-table both are products with T and are computed
    as one matmul, ((q(h) + z / sigma^2) . T_v) - |T_v|^2 / (2 sigma^2), q(h) = scale h, or a learned
    projection of h when the target space is narrower than the hidden state (model.target_dim).
    """

    def __init__(self, net: LlamaBlockNet, table: torch.Tensor, noise: nz.NoiseSettings) -> None:
        super().__init__()
        self.net = net
        self.noise = noise
        net.attach_table(table.to(torch.float32))
        self.register_buffer("table_sq", table.to(torch.float32).pow(2).sum(-1), persistent=False)

    @property
    def table(self) -> torch.Tensor:
        return self.net.table  # type: ignore[return-value]

    def likelihood(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log N(z; T_v, sigma^2 I) up to a constant in v, for every row v (float32)."""
        z = z.to(torch.float32)
        return (z @ self.table.T - 0.5 * self.table_sq) / sigma.to(torch.float32)[..., None] ** 2

    def logits(self, hn: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Denoiser logits from normed hidden states hn (..., H), noisy targets z (..., H), sigma (...)."""
        s2 = sigma.to(torch.float32)[..., None] ** 2
        if self.net.shape.head == "tied-table":
            query = self.net.table_query(hn.to(torch.float32)).to(torch.float32) + z.to(torch.float32) / s2
            return query @ self.table.T - 0.5 * self.table_sq / s2
        return self.net.head(hn).to(torch.float32) + self.likelihood(z, sigma)

    def hidden(self, tokens: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Normed hidden states at the noisy positions: tokens (B, T), z (B, T, H), sigma (B, T)."""
        s = sigma[..., None]
        return self.net.hidden_train(tokens, nz.c_in(s, self.noise.sigma_data) * z, nz.c_noise(sigma))

    def forward(self, tokens: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Training forward: tokens (B, T), z (B, T, H), sigma (B, T) -> logits (B, T, V) at the noisy positions."""
        return self.logits(self.hidden(tokens, z, sigma), z, sigma)

    def query_logits(
        self,
        cache: KVCache | None,
        z: torch.Tensor,
        sigma: float,
        position: int,
        pad: torch.Tensor | None = None,
        clean: torch.Tensor | None = None,
    ) -> tuple[KVCache | None, torch.Tensor]:
        """(cache, logits (B, V)) of one new token at column `position` under z (B, H), attending to the cached
        clean prefix. `clean` (B, m): the clean tokens of columns position-m .. position-1 the cache does not hold
        yet; they enter it in the same forward (`LlamaBlockNet.extend_and_query`), so a block reads its weights
        once per token. `pad` (B,): left-padding columns per row (see `model.decode_geometry`).
        """
        s = torch.full((z.shape[0], 1), sigma, dtype=torch.float32, device=z.device)
        noisy = (nz.c_in(s, self.noise.sigma_data) * z)[:, None]
        c_noise = nz.c_noise(s[:1])  # one sigma for the batch: the modulation is computed once and broadcast
        if clean is None:
            hn = self.net.noisy_hidden(cache, noisy, c_noise, position, pad)
        else:
            cache, hn = self.net.extend_and_query(cache, clean, noisy, c_noise, pad)
        return cache, self.logits(hn, z, s[:, 0])

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        """D(z, sigma) = softmax(logits) @ T: the denoised target embedding."""
        return torch.softmax(logits, dim=-1) @ self.table

    def step(
        self, cache: KVCache | None, z: torch.Tensor, sigma: float, position: int, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """D(z, sigma) of one new token at column `position`, attending to the cached clean prefix; z (B, H)."""
        return self.expected(self.query_logits(cache, z, sigma, position, pad)[1])

    def step_logits(
        self, cache: KVCache | None, z: torch.Tensor, sigma: float, position: int, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits behind `step` (B, V): the few-step protocol's greedy final token is their argmax."""
        return self.query_logits(cache, z, sigma, position, pad)[1]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the table row nearest to each z (Euclidean)."""
        return (z.to(torch.float32) @ self.table.T - 0.5 * self.table_sq).argmax(-1)


class CausalLM(nn.Module):
    """The AR reference (and the converted source): the unsplit network as an ordinary next-token model."""

    def __init__(self, net: LlamaBlockNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net.forward_causal(tokens)


WEIGHTINGS = ("lambda", "uniform", "network-share")
"""Per-sigma weights of the text cross-entropy, each normalised to mean 1 over the block's training sigmas:

- `lambda`: EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (DESIGN 5's first choice). It puts almost
  all weight on the lowest sigmas, where the likelihood term already pins the token (CE ~ 0).
- `uniform`: every noisy position counts alike (cross-entropy is already a per-token quantity).
- `network-share`: c_out^2 / sd^2 = sigma^2 / (sigma^2 + sd^2), the share of D the network supplies
  beyond the skip path (1 - c_skip): ~0 where z alone decides the token, ~1 where only context can.
"""

BUCKETS = 4
"""Cross-entropy is logged per quarter of the block's training distribution (q0 = lowest noise)."""


def raw_weight(sigma: torch.Tensor, sigma_data: float, kind: str) -> torch.Tensor:
    if kind == "lambda":
        return nz.loss_weight(sigma, sigma_data)
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "network-share":
        return sigma**2 / (sigma**2 + sigma_data**2)
    raise ValueError(f"unknown loss weighting {kind!r}; choose one of {', '.join(WEIGHTINGS)}")


@functools.lru_cache(maxsize=256)
def mean_loss_weight(
    lo: float, hi: float, noise: nz.NoiseSettings, kind: str = "lambda", points: int = 1 << 16
) -> float:
    """E[weight(sigma)] for sigma from the log-normal restricted to [lo, hi] (midpoint rule in probability)."""
    sigma = nz.truncated_quantile((torch.arange(points, dtype=torch.float64) + 0.5) / points, lo, hi, noise)
    return float(raw_weight(sigma, noise.sigma_data, kind).mean())


def loss_weights(
    sigma: torch.Tensor, sigma_range: tuple[float, float], noise: nz.NoiseSettings, kind: str
) -> torch.Tensor:
    """The weighting `kind`, normalised to mean 1 over the block's training distribution."""
    return raw_weight(sigma, noise.sigma_data, kind) / mean_loss_weight(*sigma_range, noise, kind)


def sigma_bucket(
    sigma: torch.Tensor, sigma_range: tuple[float, float], noise: nz.NoiseSettings, buckets: int = BUCKETS
) -> torch.Tensor:
    """Which quarter (by probability) of the block's training distribution each sigma falls in."""
    u = nz.truncated_position(sigma, *sigma_range, noise)
    return (u * buckets).floor().clamp(0, buckets - 1).long()


def token_ce(
    denoiser: LlamaDenoiser,
    hn: torch.Tensor,
    z: torch.Tensor,
    sigma: torch.Tensor,
    tokens: torch.Tensor,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, argmax == token) per position, (B, T) each.

    With `chunk` > 0 the positions go through the vocabulary `chunk` at a time under activation
    checkpointing: only one chunk's (chunk x V) logits are alive, forward or backward.
    """
    b, t = tokens.shape

    def part(
        hn_c: torch.Tensor, z_c: torch.Tensor, s_c: torch.Tensor, y_c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = denoiser.logits(hn_c, z_c, s_c)
        return F.cross_entropy(logits, y_c, reduction="none"), logits.detach().argmax(-1) == y_c

    flat = (hn.reshape(b * t, -1), z.reshape(b * t, -1), sigma.reshape(-1), tokens.reshape(-1))
    if not chunk or chunk >= b * t:
        ce, hit = part(*flat)
    else:
        from torch.utils.checkpoint import checkpoint

        pieces = [
            checkpoint(part, *(x[i : i + chunk] for x in flat), use_reentrant=False) for i in range(0, b * t, chunk)
        ]
        ce, hit = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    return ce.view(b, t), hit.view(b, t)


def diffusion_loss(
    denoiser: LlamaDenoiser,
    tokens: torch.Tensor,
    sigma_range: tuple[float, float],
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
    weighting: str = "lambda",
    chunk: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy of every token at its noisy position, one sigma per position (DESIGN 5).

    Logs the plain cross-entropy overall and per sigma bucket (`ce_q0` lowest noise .. `ce_q3`).
    """
    b, t = tokens.shape
    n, keep = shard_slice(b, shard)  # draws for the global batch, this rank's slice kept
    noise: nz.NoiseSettings = denoiser.noise
    table: torch.Tensor = denoiser.table
    sigma = nz.sample_sigmas(n * t, *sigma_range, noise, generator).view(n, t)[keep].to(tokens.device)
    eps = torch.randn((n, t, table.shape[1]), generator=generator)[keep].to(tokens.device)
    z = table[tokens] + sigma[..., None] * eps
    ce, hit = token_ce(denoiser, denoiser.hidden(tokens, z, sigma), z, sigma, tokens, chunk)
    loss = (loss_weights(sigma, sigma_range, noise, weighting) * ce).mean()
    with torch.no_grad():
        acc = hit.float().mean().item()
        bucket = sigma_bucket(sigma, sigma_range, noise).to(ce.device)
        per_bucket = {f"ce_q{k}": ce[bucket == k].mean().item() for k in range(BUCKETS) if bool((bucket == k).any())}
    return loss, {
        "ce": ce.mean().item(),
        **per_bucket,
        "accuracy": acc,
        "sigma_min": sigma.min().item(),
        "sigma_max": sigma.max().item(),
        "log_sigma_mean": sigma.log().mean().item(),
    }


@torch.no_grad()
def heldout_diffusion_metrics(
    denoiser: LlamaDenoiser, tokens: torch.Tensor, sigma_range: tuple[float, float], generator: torch.Generator
) -> dict[str, float]:
    """Held-out cross-entropy at each bucket's median sigma, and how much the top bucket uses the context.

    `val_context_tv`: the mean total-variation distance between the top bucket's predictions with the
    true context and with another row's context (same noisy targets): 0 = the context is ignored.
    """
    noise = denoiser.noise
    b, t = tokens.shape
    out: dict[str, float] = {}
    eps = torch.randn((b, t, denoiser.table.shape[1]), generator=generator).to(tokens.device)
    probs_top = None
    for k in range(BUCKETS):
        s = float(nz.truncated_quantile(torch.tensor([(k + 0.5) / BUCKETS]), *sigma_range, noise)[0])
        sigma = torch.full((b, t), s, device=tokens.device)
        z = denoiser.table[tokens] + s * eps
        logits = denoiser(tokens, z, sigma)
        out[f"val_ce_q{k}"] = F.cross_entropy(logits.reshape(b * t, -1), tokens.reshape(-1)).item()
        if k == BUCKETS - 1:
            probs_top = logits.softmax(-1)
            other = denoiser(tokens.roll(1, dims=0), z, sigma).softmax(-1)
            out["val_context_tv"] = 0.5 * (probs_top - other).abs().sum(-1).mean().item()
    out["val_ce"] = sum(out[f"val_ce_q{k}"] for k in range(BUCKETS)) / BUCKETS
    out["val_ce_top"] = out[f"val_ce_q{BUCKETS - 1}"]
    return out


@torch.no_grad()
def heldout_ar_metrics(model: nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Held-out next-token cross-entropy of the AR reference (comparable with a block's top-bucket CE)."""
    logits = model(tokens[:, :-1])
    return {"val_ce": F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)).item()}


def ar_loss(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Ordinary causal next-token cross-entropy of the unsplit network (the AR reference; no randomness)."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    return loss, {"ce": loss.item(), "ppl": math.exp(min(loss.item(), 50.0))}
