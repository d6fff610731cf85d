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


def test_non_finite_samples_are_an_error_and_nothing_is_written(tiny_run) -> None:  # noqa: ANN001
    from dbconvert.checkpoint import load_weights, save_weights
    from tests.cli_helpers import assert_user_error, invoke

    state = load_weights(tiny_run.source_weights)  # a fresh DiT's zero final layer ignores the class: wake it up
    gen = torch.Generator().manual_seed(0)
    for key in state:
        if key.startswith(("final_layer.", "y_embedder.")):
            state[key] = torch.randn(state[key].shape, generator=gen)
    save_weights(tiny_run.source_weights, state)
    result = invoke("sample", "--run", tiny_run.root, "--model", "source", "--guidance", "1e30", "--num", "2", "-q")
    assert_user_error(result, "samples are not finite")
    assert not (tiny_run.root / "samples").exists()


def test_result_names_keep_the_sign_of_the_guidance_exponent() -> None:
    from dbconvert.evaluation.results import result_name

    def name(guidance: float) -> str:
        return result_name(
            {
                "metric": "fid",
                "model": "blocks",
                "features": "x",
                "num_samples": 4,
                "seed": 0,
                "sampler": {"solver": "heun", "steps": 4, "guidance": guidance},
            }
        )

    assert name(1e30) != name(1e-30) and "g1e+30" in name(1e30)


def test_image_sampling_holds_one_block_at_a_time(tiny_run, monkeypatch) -> None:  # noqa: ANN001
    """The sampler walks the blocks from high noise to low: each is loaded once and dropped when the next comes
    (Heun's correction across a boundary included), so one block's weights are resident at a time."""
    from dbconvert import sampling
    from dbconvert.sampling import SampleRequest
    from dbconvert.train import train_block

    for i in range(tiny_run.num_blocks):
        train_block(tiny_run, i, progress=False)
    seen: list[int] = []
    real = sampling.ResidentModels.__getitem__

    def spy(self, index):  # noqa: ANN001, ANN202
        model = real(self, index)
        seen.append(len(self.held))
        spy.loads = self.loads
        return model

    monkeypatch.setattr(sampling.ResidentModels, "__getitem__", spy)
    for solver in ("euler", "heun"):
        result = tiny_run.family().generate(tiny_run, SampleRequest(steps=12, solver=solver, num=2))
        assert max(seen) == 1 and spy.loads == tiny_run.num_blocks  # one at a time, each loaded once
        assert sum(result.calls) == (12 if solver == "euler" else 23)
