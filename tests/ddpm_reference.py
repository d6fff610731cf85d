"""A reference DDPM epsilon-prediction model, written from the published formulas (Ho et al. 2020; DiT's
`gaussian_diffusion.py`), independent of dbconvert's wrapper, to test that conversion keeps what it knows.

    betas linear in [beta_start, beta_end] over T steps, alphabar_t = prod_{s <= t} (1 - beta_s)
    x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps                  (forward process)
    x0_hat = (x_t - sqrt(1 - alphabar_t) eps_hat(x_t, t)) / sqrt(alphabar_t)  (the model's x0 prediction)
    training: t ~ U{0..T-1}, loss = ||eps_hat(x_t, t) - eps||^2           (the "simple" objective)

A learn_sigma network outputs (mean, variance) channels; the epsilon prediction is the first half,
as the reference splits it (`th.split(model_output, C, dim=1)`).
"""

from __future__ import annotations

import torch
from torch import nn


def alphas_cumprod(beta_start: float = 1e-4, beta_end: float = 0.02, timesteps: int = 1000) -> torch.Tensor:
    """alphabar_t, t = 0..T-1, in float64 (the reference computes its schedule in float64 numpy)."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def eps_prediction(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The network's epsilon: its output, or the first C channels of a learn_sigma output."""
    out = net(x_t, t, y)
    return out[:, : x_t.shape[1]]


def x0_prediction(
    net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """(x_t - sqrt(1 - alphabar_t) eps_hat) / sqrt(alphabar_t) at integer steps t (computed in float64)."""
    a = abar[t].reshape(-1, 1, 1, 1)
    eps = eps_prediction(net, x_t.float(), t, y).double()
    return (x_t.double() - (1 - a).sqrt() * eps) / a.sqrt()


def train_ddpm(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    null_class: int | None = None,
    label_dropout: float = 0.1,
) -> nn.Module:
    """Pretrain `net` with the reference DDPM epsilon objective (uniform t, MSE on epsilon), as DiT does."""
    abar = alphas_cumprod().to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        x0, labels = x[idx], y[idx]
        t = torch.randint(0, abar.shape[0], (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        if null_class is not None:
            drop = torch.rand(batch, generator=gen) < label_dropout
            labels = torch.where(drop, torch.full_like(labels, null_class), labels)
        a = abar[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (eps_prediction(net, x_t, t, labels) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
