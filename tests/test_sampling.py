"""Samplers with the exact denoiser of Gaussian data, owning-block dispatch, guidance."""

from __future__ import annotations

import pytest
import torch

from dbconvert import noise as nz
from dbconvert.sampling import edm_sample, guided

NOISE = nz.NoiseSettings()


def gaussian_denoiser(s: float):  # noqa: ANN201
    """Posterior mean of y ~ N(0, s^2 I) given z = y + sigma * eps."""
    return lambda i, z, sigma: s**2 / (s**2 + sigma**2) * z


@pytest.mark.parametrize("solver,steps,tol", [("euler", 256, 0.03), ("heun", 40, 0.02)])
@pytest.mark.parametrize("s", [0.3, 0.5, 1.2])
def test_sampler_turns_noise_into_data_of_the_right_variance(solver: str, steps: int, tol: float, s: float) -> None:
    owned = nz.owned_ranges(nz.boundaries(NOISE, 4))
    ts = nz.edm_steps(steps, NOISE)
    z = ts[0] * torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = edm_sample(gaussian_denoiser(s), owned, ts, z, solver)
    assert x.std().item() == pytest.approx(s, rel=tol)


def test_heun_is_more_accurate_than_euler_at_equal_steps() -> None:
    owned = nz.owned_ranges(nz.boundaries(NOISE, 4))
    ts = nz.edm_steps(18, NOISE)
    z = ts[0] * torch.randn(100_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    err = {sv: abs(edm_sample(gaussian_denoiser(0.5), owned, ts, z, sv).std().item() - 0.5) for sv in ("euler", "heun")}
    assert err["heun"] < err["euler"]


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_each_block_is_called_only_inside_its_own_range(solver: str) -> None:
    owned = nz.owned_ranges(nz.boundaries(NOISE, 4))
    seen: dict[int, list[float]] = {i: [] for i in range(4)}

    def denoise(i: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
        seen[i].append(sigma)
        return 0.25 / (0.25 + sigma**2) * z

    edm_sample(denoise, owned, nz.edm_steps(30, NOISE), torch.randn(4), solver)
    for i, (lo, hi) in enumerate(owned):
        assert seen[i], f"block {i} never ran"
        assert all(lo < s <= hi or (i == 3 and s <= lo) for s in seen[i])
    expected_calls = 30 if solver == "euler" else 30 + 29  # Heun corrects every step except the last
    assert sum(len(v) for v in seen.values()) == expected_calls


class _Affine(torch.nn.Module):
    """D(z, sigma, y) = z * (1 + y): a stand-in whose conditional and null outputs differ."""

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return z * (1 + y.to(z.dtype)).reshape(-1, 1)


def test_classifier_free_guidance_formula() -> None:
    z = torch.ones(3, 2)
    y = torch.tensor([1, 2, 3])
    null = 9
    cond, uncond = z * (1 + y.reshape(-1, 1)), z * (1 + null)
    w = 2.5
    assert torch.allclose(guided(_Affine(), z, 1.0, y, w, null), uncond + w * (cond - uncond))
    assert torch.allclose(guided(_Affine(), z, 1.0, y, 1.0, null), cond)
    assert torch.allclose(guided(_Affine(), z, 1.0, y, 0.0, null), uncond)
