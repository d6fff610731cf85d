"""The masking noise process (masked diffusion): schedules, MD4's ELBO weight, partition, overlap, draws, steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dbconvert.config import load_recipe
from dbconvert.errors import RecipeError
from dbconvert.masking import MaskingProcess
from dbconvert.noise_process import NoiseProcess, owned_ranges, owner_of, process_class
from dbconvert.split import plan_blocks


def md4_weight(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """MD4's `get_weight` negated, written from its schedules: alpha = 1 - t (linear) or 1 - cos(pi/2 (1 - t))
    (cosine), weight = -dalpha / (1 - alpha) (the MD4 code's eps offset of alpha left out: we use t_min)."""
    if schedule == "linear":
        alpha, dalpha = 1.0 - t, -torch.ones_like(t)
    else:
        theta = math.pi / 2 * (1.0 - t)
        alpha, dalpha = 1.0 - torch.cos(theta), -math.pi / 2 * torch.sin(theta)
    return -dalpha / (1.0 - alpha)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_ends_and_md4_weight(schedule: str) -> None:
    p = MaskingProcess(schedule, 1e-3)
    ends = p.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    alpha = p.alpha(t)
    (grad,) = torch.autograd.grad(alpha.sum(), t)  # alpha'(t) by autograd, not by the closed form
    t = t.detach()
    torch.testing.assert_close(p.dalpha(t), grad)
    torch.testing.assert_close(p.weight(t), -grad / (1 - alpha.detach()))
    torch.testing.assert_close(p.weight(t), md4_weight(t, schedule))
    if schedule == "linear":
        torch.testing.assert_close(p.weight(t), 1 / t)
    # w(t) (1 - alpha(t)) integrates to alpha(t_min): the ELBO of a predictor that knows nothing is log K per token
    grid = torch.linspace(p.t_min, 1.0, 200_001, dtype=torch.float64)
    f = p.weight(grid) * (1 - p.alpha(grid))
    integral = float(((f[1:] + f[:-1]) / 2 * (grid[1:] - grid[:-1])).sum())
    assert integral == pytest.approx(float(p.alpha(torch.tensor(p.t_min, dtype=torch.float64))), rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_equiprobable_partition_is_equal_decrements_of_alpha(schedule: str) -> None:
    p = MaskingProcess(schedule, 1e-3)
    bounds = p.boundaries(4, "equiprobable")
    assert bounds[0] == p.t_min and bounds[-1] == 1.0 and bounds == sorted(bounds)
    alphas = p.alpha(torch.tensor(bounds, dtype=torch.float64))
    steps = (alphas[:-1] - alphas[1:]).tolist()
    assert steps == pytest.approx([steps[0]] * 4, rel=1e-9)
    assert float(alphas[0]) == pytest.approx(1 - p.t_min if schedule == "linear" else float(alphas[0]))
    uniform = p.boundaries(4, "uniform")
    assert np.diff(uniform).tolist() == pytest.approx([(1 - p.t_min) / 4] * 4)
    if schedule == "linear":  # alpha_b = 1 - b/B (from t_min): equal widths in t
        assert bounds == pytest.approx(uniform)
    else:
        assert bounds != pytest.approx(uniform)
    assert sum(p.mass(lo, hi) for lo, hi in owned_ranges(bounds)) == pytest.approx(1.0)
    assert p.mass(bounds[0], bounds[1]) == pytest.approx((bounds[1] - bounds[0]) / (1 - p.t_min))


def test_overlap_is_the_generic_rule_in_t() -> None:
    recipe = load_recipe("md4-tiny-shakespeare", ["noise.gamma=0.2", "noise.t_min=0.01"])
    process = recipe.noise.settings()
    assert isinstance(process, MaskingProcess) and process_class("masking") is MaskingProcess
    bounds, plans = plan_blocks(recipe, 6)
    width = (1 - 0.01) / 3
    assert [p["owned_range"] for p in plans] == owned_ranges(bounds)
    assert plans[0]["owned_range"][1] == 1.0  # block 0 = first layers = the most-masked range
    assert plans[1]["train_range"] == pytest.approx((0.01 + width - 0.2 * width, 0.01 + 2 * width + 0.2 * width))
    assert plans[0]["train_range"] == pytest.approx((0.01 + 2 * width - 0.2 * width, 1.0))  # clamped at 1
    assert plans[2]["train_range"] == pytest.approx((0.01, 0.01 + width + 0.2 * width))  # clamped at t_min
    assert process.expand(0.3, 0.5, 0.1) == NoiseProcess.expand(process, 0.3, 0.5, 0.1) == pytest.approx((0.28, 0.52))
    assert [p["mass"] for p in plans] == pytest.approx([1 / 3] * 3)


def test_draws_schedule_and_density() -> None:
    p = MaskingProcess("cosine", 0.05)
    a = p.draw(1000, 0.2, 0.4, torch.Generator().manual_seed(0))
    b = p.draw(1000, 0.2, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.float32 and 0.2 <= float(a.min()) and float(a.max()) <= 0.4
    assert float(a.mean()) == pytest.approx(0.3, abs=0.001)  # uniform in t, and spread evenly (MD4's batch draw)
    gaps = torch.diff(a.double().sort().values)
    assert torch.allclose(gaps, torch.full_like(gaps, 0.2 / 1000), atol=1e-6)
    # the first time of a batch (and so each one) is uniform on the range over the generator's draws
    offsets = torch.stack([p.draw(3, 0.0, 1.0, torch.Generator().manual_seed(s))[0] for s in range(2000)])
    assert float(offsets.mean()) == pytest.approx(0.5, abs=0.02) and float(offsets.std()) == pytest.approx(
        12**-0.5, abs=0.02
    )
    ts = p.schedule(8)
    assert ts == pytest.approx([1 - j / 8 for j in range(9)]) and ts[0] == 1.0 and ts[-1] == 0.0
    owned = owned_ranges(p.boundaries(2, "uniform"))
    assert owner_of(ts[0], owned) == 0 and owner_of(ts[-2], owned) == 1
    assert p.unmask_probability(ts[-2], 0.0) == pytest.approx(1.0)  # the last step reveals everything
    x = np.linspace(0.05, 1.0, 100_001)
    assert float(np.trapezoid(p.density(x), x)) == pytest.approx(1.0, rel=1e-6)
    assert p.full_range() == (0.05, 1.0) and "cosine" in p.describe()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("noise.schedule=quadratic", "noise.schedule"),
        ("noise.t_min=1.5", "noise.t_min"),
        ("noise.t_min=-0.1", "noise.t_min"),
        ("noise.t_min=0", "noise.t_min"),
    ],
)
def test_bad_masking_settings_are_one_line_recipe_errors(override: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe("md4-tiny-shakespeare", [override])
    assert "\n" not in str(info.value)
