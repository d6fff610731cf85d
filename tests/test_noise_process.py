"""The noise-process contract: EDM is one implementation (its formulas unchanged), others plug in."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml

from dbconvert import noise as nz
from dbconvert.config import load_recipe
from dbconvert.errors import RecipeError
from dbconvert.noise_process import NoiseProcess, owned_ranges, process_names, register_process, unregister_process
from dbconvert.rundir import MANIFEST, Run
from dbconvert.split import plan_blocks

from tests.conftest import TINY_OVERRIDES


def test_edm_process_is_the_formulas_bit_for_bit() -> None:
    recipe = load_recipe("dit-tiny-digits", TINY_OVERRIDES)
    process = recipe.noise.settings()
    assert isinstance(process, nz.NoiseSettings) and process.name == "edm" and "edm" in process_names()
    settings = nz.NoiseSettings()
    assert process.boundaries(4, "equiprobable") == nz.boundaries(settings, 4, "equiprobable")
    a = (1.0 / 0.1) ** 0.1  # DESIGN 2: [lo / a, hi * a], a = (hi / lo) ** gamma
    assert process.expand(0.1, 1.0, 0.1) == (0.1 / a, 1.0 * a)
    assert process.mass(0.1, 1.0) == settings.truncated_mass(0.1, 1.0)
    assert process.schedule(7, 7.0) == nz.edm_steps(7, settings, 7.0)
    a = process.draw(64, 0.1, 1.0, torch.Generator().manual_seed(3))
    b = nz.sample_sigmas(64, 0.1, 1.0, settings, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # the generic overlap rule (gamma times the width on each side, in ln sigma) is EDM's rule
    assert NoiseProcess.expand(process, 0.1, 1.0, 0.1) == pytest.approx(settings.expand(0.1, 1.0, 0.1))


def test_plan_blocks_goes_through_the_process() -> None:
    recipe = load_recipe("dit-tiny-digits", TINY_OVERRIDES)
    bounds, plans = plan_blocks(recipe, 4)
    assert [tuple(p["owned_range"]) for p in plans] == owned_ranges(bounds)
    assert plans[0]["owned_range"][1] == 80.0  # block 0 = highest noise
    assert sum(p["mass"] for p in plans) == pytest.approx(1.0)


@dataclass(frozen=True)
class LinearProcess(NoiseProcess):
    """A toy process: levels uniform on [0, 1] (a plug-in written in a test, nothing generic edited for it)."""

    name: ClassVar[str] = "linear-toy"
    level_name: ClassVar[str] = "t"
    level_symbol: ClassVar[str] = "t"
    coordinate_label: ClassVar[str] = "t"
    partitions: ClassVar[tuple[str, ...]] = ("uniform",)

    @classmethod
    def from_config(cls, config) -> "LinearProcess":  # noqa: ANN001
        return cls()

    def full_range(self) -> tuple[float, float]:
        return 0.0, 1.0

    def boundaries(self, num_blocks: int, partition: str) -> list[float]:
        return [k / num_blocks for k in range(num_blocks + 1)]

    def mass(self, lo: float, hi: float) -> float:
        return hi - lo

    def draw(self, n: int, lo: float, hi: float, generator: torch.Generator | None = None) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def schedule(self, num_steps: int, rho: float = 7.0) -> list[float]:
        return [1 - j / num_steps for j in range(num_steps + 1)]

    def coordinate(self, level):  # noqa: ANN001, ANN201
        return level

    def level_at(self, x: float) -> float:
        return x

    def density(self, x: np.ndarray) -> np.ndarray:
        return np.ones_like(x)

    def describe(self) -> str:
        return "t ~ U(0, 1)"


@pytest.fixture
def linear_toy() -> Iterator[str]:
    """The toy process, registered for one test (one line), then unregistered."""
    register_process("linear-toy", f"{__name__}:LinearProcess")
    yield "linear-toy"
    unregister_process("linear-toy")


def test_a_plugged_in_process_plans_blocks_with_the_generic_overlap_rule(linear_toy: str) -> None:
    recipe = load_recipe(
        "dit-tiny-digits", [*TINY_OVERRIDES, "noise.process=linear-toy", "noise.partition=uniform", "noise.gamma=0.5"]
    )
    _, plans = plan_blocks(recipe, 4)
    assert [p["owned_range"] for p in plans] == [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]
    assert plans[1]["train_range"] == pytest.approx((0.375, 0.875))  # widened by gamma * width each side
    assert plans[0]["train_range"] == pytest.approx((0.625, 1.0))  # clamped to the full range
    with pytest.raises(RecipeError, match="not a partition of the linear-toy"):
        plan_blocks(load_recipe("dit-tiny-digits", [*TINY_OVERRIDES, "noise.process=linear-toy"]), 4)


def test_unknown_process_and_a_process_the_family_does_not_take_are_one_line_errors(in_tmp, linear_toy) -> None:  # noqa: ANN001
    from tests.cli_helpers import assert_user_error, invoke

    assert_user_error(
        invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "noise.process=nope"),
        "unknown noise process 'nope'; choose one of edm, linear-toy, masking",
    )
    assert_user_error(
        invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "noise.process=linear-toy", "noise.partition=uniform"),
        "does not apply to the dit family",
    )
    assert not any(in_tmp.iterdir())


def test_a_manifest_written_before_noise_processes_still_loads(tiny_run: Run) -> None:
    path = tiny_run.root / MANIFEST
    manifest = yaml.safe_load(path.read_text())
    for b in manifest["blocks"]:
        b["sigma_range"] = b.pop("owned_range")
    manifest["recipe"]["noise"].pop("process")
    path.write_text(yaml.safe_dump(manifest))
    old = Run.open(tiny_run.root)
    assert old.owned_ranges() == tiny_run.owned_ranges() and old.noise() == tiny_run.noise()
    assert math.isclose(old.blocks[0].owned_range[1], 80.0)
