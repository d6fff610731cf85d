"""`bench memory --options` and `--fit`: static bytes equal the tensors a real training step holds, the activation
model equals what autograd saves at the asked size, and the smallest B is the first whose estimate fits."""

from __future__ import annotations

import pytest
import torch

from dbconvert.bench import BenchTarget, Trainer, bench_recipe, bench_static
from dbconvert.bench_fit import (
    OPTION_SETS,
    activation_model,
    element_counts,
    estimate,
    fit,
    option_recipe,
    option_table,
    parse_size,
    saved_bytes,
    static_bytes,
    with_context,
)
from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError
from dbconvert.split import layer_ranges, source_depth

from tests.conftest import TINY_OVERRIDES
from tests.families.llama_tiny import tiny_overrides

pytest.importorskip("torchao", reason="the memory extra (torchao) is not installed")


@pytest.fixture
def dit():  # noqa: ANN201
    return bench_recipe(load_recipe("dit-tiny-digits", TINY_OVERRIDES))


@pytest.fixture
def llama(tmp_path):  # noqa: ANN001, ANN201
    return bench_recipe(load_recipe("llama-tiny-shakespeare", tiny_overrides(tmp_path)))


def test_sizes_parse_binary_and_decimal_and_refuse_the_rest() -> None:
    assert parse_size("24GiB") == parse_size("24G") == 24 * 2**30
    assert parse_size("80GB") == 80 * 10**9 and parse_size("512MiB") == 2**29 and parse_size("1.5TiB") == 3 * 2**39
    for bad in ("", "lots", "-3G", "0GB", "24 XB"):
        with pytest.raises(DbconvertError) as err:
            parse_size(bad)
        assert "--fit" in str(err.value)


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_static_bytes_equal_the_tensors_of_a_real_step(dit, name: str) -> None:  # noqa: ANN001
    """One real training step of each option set on the CPU: its parameters, gradients (alive before the step),
    optimizer state and EMA on the device, byte for byte, are what the static formula says."""
    recipe = option_recipe(dit, OPTION_SETS[name])
    depth = source_depth(recipe)
    target = BenchTarget("block-0", depth, (0, depth), recipe.noise.settings().full_range(), False)
    trainer = Trainer(recipe, target, torch.device("cpu"))
    batch = trainer.family.synthetic_batch(recipe, 4, torch.Generator().manual_seed(0))
    trainer.step(batch)
    real = trainer.breakdown()
    static = static_bytes(recipe, element_counts(recipe, depth))
    for key in ("parameters", "optimizer_state", "ema"):
        assert real[key] == pytest.approx(static[key], abs=0), key
    assert real["gradients"] == static["gradients"]


def test_the_recipe_row_of_options_is_bench_static(llama) -> None:  # noqa: ANN001
    table = option_table(llama, 2)
    plain = bench_static(llama, 2, checkpointing=False)
    row = table["rows"][0]
    assert row["options"] == "recipe"
    assert row["block"]["total"] == plain["breakdown"]["block-0"]["total_bytes"]
    assert row["e2e"]["total"] == plain["breakdown"]["e2e"]["total_bytes"]
    totals = [r["block"]["total"] for r in table["rows"] if "refused" not in r]
    assert totals == sorted(totals, reverse=True) and len(totals) == len(OPTION_SETS)  # each set holds less


def test_the_activation_model_matches_a_direct_measurement_at_the_asked_size(llama) -> None:  # noqa: ANN001
    """Fitted from contexts 64 and 128, it predicts what one layer saves at context 256, batch 3."""
    recipe = with_context(llama, 256)
    direct = saved_bytes(recipe, 3)
    model = activation_model(llama, 3, 256)
    assert model["layer"] == pytest.approx(direct["layer"], rel=0.02)
    assert model["hidden"] == pytest.approx(direct["hidden"], rel=0.02)
    assert model["outside"] == pytest.approx(direct["total"] - direct["layer"], rel=0.05)


def test_images_scale_by_the_batch_and_refuse_a_context(dit) -> None:  # noqa: ANN001
    model = activation_model(dit, 8, None)
    direct = saved_bytes(dit, 8)
    assert model["layer"] == pytest.approx(direct["layer"], rel=0.02)
    with pytest.raises(DbconvertError) as err:
        activation_model(dit, 8, 64)
    assert "--context does not apply" in str(err.value)


def test_fit_gives_the_first_B_whose_block_fits(llama) -> None:  # noqa: ANN001
    """With a budget between the estimates of B = 1 and B = L, the smallest fitting B is the first under it, and
    more levers never need more blocks."""
    total = source_depth(llama)
    r = option_recipe(llama, [])
    acts = activation_model(r, 4, 64)
    need = {
        n: estimate(
            static_bytes(r, element_counts(r, max(b - a for a, b in layer_ranges(total, n, True)))),
            acts,
            max(b - a for a, b in layer_ranges(total, n, True)),
            False,
        )
        for n in range(1, total + 1)
    }
    assert need[1] > need[total]
    budget = int((need[1] + need[total]) / 2 / 0.9)
    result = fit(llama, budget, batch=4, context=64)
    first = result["rows"][0]
    expected = next(n for n in range(1, total + 1) if need[n] <= budget * 0.9)
    assert first["blocks"] == expected and first["e2e"] == pytest.approx(need[1])
    smallest = [row["blocks"] for row in result["rows"] if "refused" not in row]
    assert all(b is not None for b in smallest) and smallest == sorted(smallest, reverse=True)
    assert all(row["blocks_ckpt"] <= row["blocks"] for row in result["rows"] if "refused" not in row)
    tiny = fit(llama, 1024, batch=4, context=64)  # 1 KiB: nothing fits, said, not a crash
    assert all(row["blocks"] is None for row in tiny["rows"])


def test_bad_fit_inputs_are_one_line(llama) -> None:  # noqa: ANN001
    for kwargs, message in (({"headroom": 1.0}, "--headroom"), ({"batch": 0}, "--batch")):
        with pytest.raises(DbconvertError) as err:
            fit(llama, 2**30, **kwargs)
        assert message in str(err.value)


def test_bench_memory_measures_a_block_under_the_lean_options(dit) -> None:  # noqa: ANN001
    """A measured step (fresh worker process) with bf16 weights, 8-bit moments, no EMA and the optimizer in
    backward: its exact tensors are the static formula's, and App. G counts the 8-bit moments as ~1 P of bf16."""
    from dbconvert.bench import bench_memory

    recipe = option_recipe(dit, OPTION_SETS["lean"])
    result = bench_memory(recipe, 4, batch=8, checkpointing=False, every_block=False, skip=("e2e",))
    row = result["breakdown"]["block-0"]
    static = static_bytes(recipe, element_counts(recipe, row["layers"][1] - row["layers"][0]))
    assert row["ema"] == 0 and row["optimizer_state"] == static["optimizer_state"]
    assert row["app_g"]["formula"].startswith("(3.016P + A)")
