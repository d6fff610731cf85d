"""DESIGN 2-4 formulas: partition, overlap, per-block sigma sampling, preconditioning, steps."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dbconvert import noise as nz

NOISE = nz.NoiseSettings()


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("partition", ["equiprobable", "uniform"])
def test_boundaries_are_monotone_from_sigma_min_to_sigma_max(num_blocks: int, partition: str) -> None:
    b = nz.boundaries(NOISE, num_blocks, partition)
    assert len(b) == num_blocks + 1
    assert b[0] == NOISE.sigma_min and b[-1] == NOISE.sigma_max
    assert all(lo < hi for lo, hi in zip(b, b[1:]))


@pytest.mark.parametrize("num_blocks", [2, 3, 4, 6, 8])
def test_equiprobable_blocks_each_hold_mass_one_over_b(num_blocks: int) -> None:
    owned = nz.owned_ranges(nz.boundaries(NOISE, num_blocks, "equiprobable"))
    for lo, hi in owned:
        assert NOISE.truncated_mass(lo, hi) == pytest.approx(1 / num_blocks, abs=1e-9)


def test_equiprobable_boundaries_follow_the_formula() -> None:
    c0, c1 = NOISE.cdf(NOISE.sigma_min), NOISE.cdf(NOISE.sigma_max)
    b = nz.boundaries(NOISE, 4)
    for k in range(5):
        u = c0 + k / 4 * (c1 - c0)
        expected = math.exp(NOISE.p_mean + NOISE.p_std * stats.norm.ppf(u))
        assert b[k] == pytest.approx(expected, rel=1e-10)


def test_uniform_partition_cuts_equal_widths_in_log_sigma() -> None:
    b = nz.boundaries(NOISE, 5, "uniform")
    widths = [math.log(hi) - math.log(lo) for lo, hi in zip(b, b[1:])]
    assert widths == pytest.approx([widths[0]] * 5, rel=1e-12)
    assert sum(widths) == pytest.approx(math.log(80 / 0.002))


def test_block_zero_owns_the_highest_range() -> None:
    owned = nz.owned_ranges(nz.boundaries(NOISE, 4))
    assert owned[0][1] == NOISE.sigma_max
    assert owned[-1][0] == NOISE.sigma_min
    assert all(a[0] == b[1] for a, b in zip(owned, owned[1:]))  # contiguous, descending


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.1, 0.2])
def test_overlap_follows_the_formula_and_stays_inside(gamma: float) -> None:
    for lo, hi in nz.owned_ranges(nz.boundaries(NOISE, 4)):
        a = (hi / lo) ** gamma
        tlo, thi = NOISE.expand(lo, hi, gamma)
        assert tlo == pytest.approx(max(lo / a, NOISE.sigma_min))
        assert thi == pytest.approx(min(hi * a, NOISE.sigma_max))
        assert NOISE.sigma_min <= tlo <= lo and hi <= thi <= NOISE.sigma_max
    if gamma == 0.0:
        assert NOISE.expand(0.1, 0.3, gamma) == (0.1, 0.3)


def test_sampled_sigmas_follow_the_restricted_lognormal() -> None:
    """Kolmogorov-Smirnov test against the log-normal truncated to the block's range."""
    lo, hi = 0.13, 0.68
    sigma = nz.sample_sigmas(20000, lo, hi, NOISE, torch.Generator().manual_seed(0)).double()
    assert sigma.min() >= lo * (1 - 1e-6) and sigma.max() <= hi * (1 + 1e-6)
    f_lo, f_hi = NOISE.cdf(lo), NOISE.cdf(hi)

    def cdf(s):  # noqa: ANN001, ANN202
        return (stats.norm.cdf((torch.log(torch.as_tensor(s)).numpy() - NOISE.p_mean) / NOISE.p_std) - f_lo) / (
            f_hi - f_lo
        )

    assert stats.kstest(sigma.numpy(), cdf).pvalue > 0.01
    # and it is NOT log-uniform on the same range (the test has power)
    log_uniform = lambda s: (torch.log(torch.as_tensor(s)).numpy() - math.log(lo)) / math.log(hi / lo)  # noqa: E731
    assert stats.kstest(sigma.numpy(), log_uniform).pvalue < 1e-6


def test_sampled_sigmas_are_reproducible_by_generator() -> None:
    a = nz.sample_sigmas(8, 0.01, 1.0, NOISE, torch.Generator().manual_seed(3))
    b = nz.sample_sigmas(8, 0.01, 1.0, NOISE, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_owner_of_uses_unexpanded_half_open_ranges() -> None:
    owned = nz.owned_ranges(nz.boundaries(NOISE, 4))
    assert nz.owner_of(80.0, owned) == 0
    assert nz.owner_of(100.0, owned) == 0
    assert nz.owner_of(0.002, owned) == 3
    assert nz.owner_of(0.0001, owned) == 3
    boundary = owned[1][0]  # between blocks 1 and 2
    assert nz.owner_of(boundary, owned) == 2
    assert nz.owner_of(boundary * 1.0001, owned) == 1


def test_preconditioning_identities() -> None:
    sd = 0.5
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    assert torch.allclose(nz.c_skip(sigma, sd) + nz.c_out(sigma, sd) ** 2 / sd**2, torch.ones_like(sigma))
    tiny = torch.tensor(1e-8, dtype=torch.float64)
    assert nz.c_skip(tiny, sd).item() == pytest.approx(1.0) and nz.c_out(tiny, sd).item() == pytest.approx(
        0.0, abs=1e-7
    )
    assert torch.allclose(nz.c_in(sigma, sd), 1 / torch.sqrt(sigma**2 + sd**2))
    assert torch.allclose(nz.c_noise(sigma), torch.log(sigma) / 4)
    assert torch.allclose(nz.loss_weight(sigma, sd), (sigma**2 + sd**2) / (sigma * sd) ** 2)
    # lambda * c_out^2 = 1: the effective target of F has unit weight (EDM's design)
    assert torch.allclose(nz.loss_weight(sigma, sd) * nz.c_out(sigma, sd) ** 2, torch.ones_like(sigma))


def test_edm_steps_follow_the_rho_formula() -> None:
    ts = nz.edm_steps(18, NOISE, rho=7)
    assert len(ts) == 19 and ts[-1] == 0.0
    assert ts[0] == pytest.approx(80.0) and ts[-2] == pytest.approx(0.002)
    j = 5
    expected = (80 ** (1 / 7) + j / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert ts[j] == pytest.approx(expected)
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        nz.boundaries(NOISE, 0)
    with pytest.raises(ValueError):
        nz.boundaries(NOISE, 2, "cosine")
