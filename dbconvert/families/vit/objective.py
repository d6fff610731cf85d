"""The ViT denoiser (DESIGN 5, ViT), its loss, the plain classifier reference and the classification sampler.

The diffused variable is the label's embedding y = T[c], a row of the run's L2-normalised label table T,
and z = y + sigma eps. The noisy label enters the network as one token, c_in(sigma) z; every layer is
modulated from the noise level (the timestep embedder is fed EDM's c_noise = ln(sigma)/4 mapped affinely
onto DiT's [0, 999], sigma_min -> 0, sigma_max -> 999, as the DiT family does). On the readout token's
final hidden state F:

    D = c_skip(sigma) z + c_out(sigma) F,     logits = head(D),

loss = lambda(sigma) * CE(logits, c) with EDM's lambda = (sigma^2 + sd^2) / (sigma sd)^2 (the official
code's loss; `train.loss_weight=uniform` drops the weight). The denoised label a sampler steps towards is
the softmax-weighted mean of the table, softmax(logits) @ T.

Inference (the official code's schedule): N noise levels evenly spaced in the training log-normal's CDF,
s_j = F^-1(F(sigma_max) + j/(N-1) (F(sigma_min) - F(sigma_max))), j = 0..N-1 (N = 1: sigma_max alone),
z_0 = sigma_max eps; at each s_j the block owning s_j gives logits_j, and but for the last level Euler
moves z to s_{j+1}: z <- z + (s_{j+1} - s_j) (z - softmax(logits_j) @ T) / s_j. The prediction is
argmax logits_{N-1}. By default N = B: one network evaluation per block. `--solver heun` adds Heun's trapezoid
correction to each move (one more evaluation at s_{j+1}, by the model owning it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dbconvert import noise as nz
from dbconvert.noise import sigma_to_timestep
from dbconvert.families.contract import shard_slice
from dbconvert.families.vit.model import ViTNet
from dbconvert.solvers import Solver, euler

WEIGHTINGS = ("lambda", "uniform")
DEFAULT_WEIGHTING = "lambda"
"""train.loss_weight=default: EDM's lambda(sigma), as the official code weights its cross-entropy."""


class ViTDenoiser(nn.Module):
    """logits(x, z, sigma) = head(c_skip z + c_out F(x, c_in z, t(sigma))) around a ViTNet; `denoised` gives D."""

    def __init__(self, net: ViTNet, table: torch.Tensor, noise: nz.NoiseSettings) -> None:
        super().__init__()
        self.net = net
        self.noise = noise
        self.register_buffer("table", table.detach().clone().float(), persistent=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.noise.sigma_data
        sigma = sigma.to(device=z.device, dtype=torch.float32).reshape(-1)
        s = sigma[:, None]
        f = self.net.features(x, nz.c_in(s, sd) * z, sigma_to_timestep(sigma, self.noise))
        d = nz.c_skip(s, sd) * z + nz.c_out(s, sd) * f.float()
        return self.net.head(d.to(self.net.head.weight.dtype)).float()

    def denoised(self, logits: torch.Tensor) -> torch.Tensor:
        """D = softmax(logits) @ T, the expected label embedding."""
        return F.softmax(logits.float(), dim=-1) @ self.table


class Classifier(nn.Module):
    """The plain classifier (timm's forward, no noise conditioning): the reference and the converted source."""

    def __init__(self, net: ViTNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classify(x).float()


def diffusion_loss(
    denoiser: ViTDenoiser,
    batch: list[torch.Tensor],
    sigma_range: tuple[float, float],
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
    weighting: str = DEFAULT_WEIGHTING,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of w(sigma) CE(head(D(T[c] + sigma eps, sigma)), c), sigmas drawn inside `sigma_range`."""
    x, y = batch
    n, keep = shard_slice(x.shape[0], shard)
    noise = denoiser.noise
    table = denoiser.table
    sigma = nz.sample_sigmas(n, *sigma_range, noise, generator)[keep].to(x.device)
    eps = torch.randn((n, table.shape[1]), generator=generator)[keep].to(x.device)
    z = table[y] + sigma[:, None] * eps
    logits = denoiser(x, z, sigma)
    ce = F.cross_entropy(logits, y, reduction="none")
    weight = nz.loss_weight(sigma, noise.sigma_data) if weighting == "lambda" else torch.ones_like(sigma)
    loss = (weight * ce).mean()
    acc = (logits.argmax(-1) == y).float().mean()
    return loss, {
        "ce": ce.mean().item(),
        "accuracy": acc.item(),
        "sigma_min": sigma.min().item(),
        "sigma_max": sigma.max().item(),
    }


def classifier_loss(model: Classifier, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the plain classifier (the paper's "end-to-end ViT")."""
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, {"ce": loss.item(), "accuracy": (logits.argmax(-1) == y).float().mean().item()}


def cdf_levels(num: int, noise: nz.NoiseSettings) -> list[float]:
    """N noise levels from sigma_max down to sigma_min, evenly spaced in the log-normal's CDF (N = 1: sigma_max)."""
    if num < 1:
        raise ValueError("the number of steps must be at least 1")
    hi, lo = noise.cdf(noise.sigma_max), noise.cdf(noise.sigma_min)
    if num == 1:
        return [noise.sigma_max]
    levels = [noise.icdf(hi + j / (num - 1) * (lo - hi)) for j in range(num)]
    levels[0], levels[-1] = noise.sigma_max, noise.sigma_min
    return levels


Logits = Callable[[int, torch.Tensor, float], torch.Tensor]
"""(model index, z, sigma) -> logits of that model at noise level sigma for the batch's images."""


def classify_steps(
    logits_of: Logits,
    denoised: Callable[[torch.Tensor], torch.Tensor],
    owned: Sequence[tuple[float, float]],
    levels: Sequence[float],
    z: torch.Tensor,
    solver: Solver = euler,
) -> list[torch.Tensor]:
    """Logits after each step of the sampler of the module docstring (owning model per level).

    `solver` moves z between levels (`solvers.py`: Euler by default; Heun's correction at s_{j+1} is one more
    evaluation, by the model owning s_{j+1}). The evaluation at s_j that gave logits_j is the solver's D(z, s_j),
    so Euler costs one evaluation per level, as before."""
    out = []
    for j, s in enumerate(levels):
        logits = logits_of(nz.owner_of(s, list(owned)), z, s)
        out.append(logits)
        if j + 1 < len(levels):
            here, d_here = z, denoised(logits)

            def d_of(
                zz: torch.Tensor, level: float, here: torch.Tensor = here, s: float = s, d_here: torch.Tensor = d_here
            ) -> torch.Tensor:
                if zz is here and level == s:
                    return d_here
                return denoised(logits_of(nz.owner_of(level, list(owned)), zz, level))

            z = solver(d_of, z, s, levels[j + 1])
    return out
