"""`dbconvert bench`: the measuring code itself (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from dbconvert.cli.app import app

from tests.conftest import TINY_OVERRIDES

# DiT-Micro/2 (4 layers) on 16x16 inputs at batch 64: activations of a few MiB per layer,
# far above the page-level noise of peak RSS, yet each step takes well under a second.
BENCH_OVERRIDES = [*TINY_OVERRIDES, "model.input_size=16", "train.batch_size=64", "sample.num=8"]

runner = CliRunner()


@pytest.fixture(scope="module")
def memory_json() -> dict:
    result = runner.invoke(app, ["bench", "memory", "dit-tiny-digits", *BENCH_OVERRIDES, "--blocks", "2", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_memory_json_has_documented_fields(memory_json: dict) -> None:
    for key in ("device", "method", "blocks", "batch", "e2e_peak_bytes", "block_peak_bytes", "ratio"):
        assert key in memory_json
    assert memory_json["device"] == "cpu"
    assert "subprocess" in memory_json["method"]
    assert memory_json["blocks"] == 2 and memory_json["batch"] == 64
    assert len(memory_json["block_peak_bytes"]) == 2
    assert memory_json["ratio"] == pytest.approx(memory_json["e2e_peak_bytes"] / max(memory_json["block_peak_bytes"]))


def test_block_step_needs_less_memory_than_e2e(memory_json: dict) -> None:
    assert 0 < max(memory_json["block_peak_bytes"]) < memory_json["e2e_peak_bytes"]


def test_memory_breakdown_is_measured_and_consistent(memory_json: dict) -> None:
    """Exact tensor sizes (AdamW keeps two moments) and two measured parts that each bound what must be in them."""
    e2e, block = memory_json["breakdown"]["e2e"], memory_json["breakdown"]["block-0"]
    mib = 2**20
    for row in (e2e, block):
        assert row["optimizer_state"] >= 2 * row["gradients"] > 0
        # held between steps: at least the parameters, optimizer state and EMA (within allocator rounding)
        assert row["resident_before_step"] >= row["parameters"] + row["optimizer_state"] + row["ema"] - 4 * mib
        # the step's growth holds at least everything autograd saved for backward
        assert row["step_peak"] >= row["saved_activations"] - 4 * mib > 0
        assert abs(row["resident_before_step"] + row["step_peak"] - row["peak_bytes"]) <= mib
    assert block["parameters"] < e2e["parameters"] and block["step_peak"] < e2e["step_peak"]
    assert block["layers"] == [0, 2] and e2e["layers"] == [0, 4]


def test_speed_json_has_documented_fields() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "speed",
            "dit-tiny-digits",
            *BENCH_OVERRIDES,
            "--blocks",
            "2",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "device",
        "blocks",
        "batch",
        "sample_step_ratio",
        "train_step_ratio",
        "e2e_sample_step_s",
        "block_sample_step_s",
        "e2e_train_step_s",
        "block_train_step_s",
    ):
        assert key in data
    assert len(data["block_sample_step_s"]) == len(data["block_train_step_s"]) == 2
    assert data["sample_step_ratio"] > 0 and data["train_step_ratio"] > 0


def test_library_targets_follow_split() -> None:
    from dbconvert.bench import bench_targets
    from dbconvert.config import load_recipe
    from dbconvert.split import plan_blocks

    recipe = load_recipe("dit-tiny-digits", [*BENCH_OVERRIDES, "blocks.num=4"])
    targets = bench_targets(recipe, 4)
    _, plans = plan_blocks(recipe, 4)
    assert [t.layers for t in targets[:-1]] == [tuple(p["layers"]) for p in plans]
    assert [t.level_range for t in targets[:-1]] == [tuple(p["train_range"]) for p in plans]
    assert targets[-1].e2e and targets[-1].layers == (0, 4)


@pytest.mark.parametrize("command", ["memory", "speed"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-recipe"], "no recipe named"),
        (["dit-tiny-digits", "--blocks", "0"], "--blocks must be at least 1"),
        (["dit-tiny-digits", "--blocks", "3"], "do not divide"),
        (["dit-tiny-digits", "--blocks", "2", "--batch", "0"], "--batch must be at least 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(command: str, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", command, *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in result.output


def test_speed_sampling_only_times_no_training_step_and_reports_rates() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "speed",
            "dit-tiny-digits",
            *BENCH_OVERRIDES,
            "--blocks",
            "2",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--sampling-only",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert math.isnan(data["train_step_ratio"]) and all(
        not t for t in (v["train"] for v in data["raw_seconds"].values())
    )
    assert data["sample_step_ratio"] > 0 and data["unit"] == "image" and data["block_units_per_s"] > 0
    assert data["protocol_units"] == 50_000  # FID-50k
    assert data["e2e_protocol_hours"] == pytest.approx(50_000 / data["e2e_units_per_s"] / 3600)


# --- activation checkpointing beside blocks (issue 19) -------------------------------------


def test_memory_measures_the_four_networks_and_their_ratios(memory_json: dict) -> None:
    rows, ck = memory_json["breakdown"], memory_json["checkpointing"]
    assert {"block-0", "block-1", "e2e", "block-0+ckpt", "e2e+ckpt"} == set(rows)  # DiT has no causal LM
    assert ck["block_ckpt_target"] == "block-0+ckpt" and ck["unit"] == "bytes"
    assert ck["e2e_over_block_ckpt"] == pytest.approx(rows["e2e"]["peak_bytes"] / rows["block-0+ckpt"]["peak_bytes"])
    assert ck["e2e_ckpt_over_block_ckpt"] == pytest.approx(
        rows["e2e+ckpt"]["peak_bytes"] / rows["block-0+ckpt"]["peak_bytes"]
    )
    for name in ("block-0", "e2e"):
        plain, recomputed = rows[name], rows[name + "+ckpt"]
        assert recomputed["checkpointing"] and not plain["checkpointing"]
        # the same tensors held, far fewer activations saved for backward (one layer's inputs, not its insides)
        for key in ("parameters", "gradients", "optimizer_state", "ema"):
            assert recomputed[key] == plain[key]
        assert recomputed["saved_activations"] < plain["saved_activations"] / 2
        assert recomputed["step_peak"] < plain["step_peak"]


def test_app_g_formulas_use_the_measured_p_and_a(memory_json: dict) -> None:
    rows = memory_json["breakdown"]
    p, a = rows["e2e"]["app_g"]["P"], rows["e2e"]["app_g"]["A"]
    assert p > 0 and a > 0 and rows["block-0"]["app_g"]["P"] == p  # every layer is the same layer
    # A is what the layers saved: all but the embedders' and the final layer's share of the network's saved bytes
    assert 0.5 * rows["e2e"]["saved_activations"] < 4 * a <= rows["e2e"]["saved_activations"]
    assert rows["e2e"]["app_g"] == {"formula": "(4P + A)·L", "bytes": (4 * p + a) * 4, "P": p, "A": a, "depth": 4}
    assert rows["e2e+ckpt"]["app_g"]["bytes"] == 4 * p * 4 + a  # its twin's P and A
    a0 = rows["block-0"]["app_g"]["A"]
    assert a0 == pytest.approx(a, rel=0.01) and rows["block-0"]["app_g"]["bytes"] == (4 * p + a0) * 2
    assert rows["block-0+ckpt"]["app_g"] == {
        "formula": "4P·L/B + A",
        "bytes": 4 * p * 2 + a0,
        "P": p,
        "A": a0,
        "depth": 2,
    }


def test_memory_table_shows_the_four_and_the_ratio_lines() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "memory",
            "dit-tiny-digits",
            *BENCH_OVERRIDES,
            "--blocks",
            "2",
            "--batch",
            "8",
            "--deepest-block",
            "--skip",
            "e2e",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    for row in ("block-0", "block-0+ckpt", "e2e+ckpt", "App. G"):
        assert row in out
    assert "block-1" not in out  # --deepest-block
    assert "ratio e2e / block-0+ckpt: not measured, e2e+ckpt / block-0+ckpt:" in out
    assert "not measured (--skip): e2e" in out and "4P·L + A" in out
    # a checkpointed network whose plain twin was skipped takes P and A from a measured network of its objective
    data = json.loads(
        runner.invoke(
            app,
            [
                "bench",
                "memory",
                "dit-tiny-digits",
                *BENCH_OVERRIDES,
                "--blocks",
                "2",
                "--batch",
                "8",
                "--deepest-block",
                "--skip",
                "e2e",
                "--json",
            ],
        ).stdout
    )
    assert data["breakdown"]["e2e+ckpt"]["app_g"]["A"] == data["breakdown"]["block-0"]["app_g"]["A"]


def test_static_covers_the_four() -> None:
    result = runner.invoke(
        app, ["bench", "memory", "dit-tiny-digits", *BENCH_OVERRIDES, "--blocks", "2", "--static", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["breakdown"]
    assert rows["e2e+ckpt"]["total_bytes"] == rows["e2e"]["total_bytes"]
    assert rows["block-0+ckpt"]["total_bytes"] == rows["block-0"]["total_bytes"]
    assert data["checkpointing"]["e2e_over_block_ckpt"] == pytest.approx(data["ratio"])
    p = rows["e2e"]["app_g_static"]["P"]
    assert rows["e2e"]["app_g_static"]["bytes"] == 4 * p * 4 and rows["block-1"]["app_g_static"]["bytes"] == 4 * p * 2
    plain = runner.invoke(
        app,
        [
            "bench",
            "memory",
            "dit-tiny-digits",
            *BENCH_OVERRIDES,
            "--blocks",
            "2",
            "--static",
            "--no-checkpointing",
            "--json",
        ],
    )
    assert set(json.loads(plain.stdout)["breakdown"]) == {"block-0", "block-1", "e2e"}


def test_static_honours_skip() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "memory",
            "dit-tiny-digits",
            *BENCH_OVERRIDES,
            "--blocks",
            "2",
            "--static",
            "--skip",
            "e2e",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["breakdown"]) == {"block-0", "block-1", "block-0+ckpt", "e2e+ckpt"} and data["skipped"] == ["e2e"]
    assert data["e2e_static_bytes"] is None and data["ratio"] is None and len(data["block_static_bytes"]) == 2
    ck = data["checkpointing"]
    assert ck["e2e_over_block_ckpt"] is None and ck["e2e_ckpt_over_block_ckpt"] > 1
    table = runner.invoke(
        app, ["bench", "memory", "dit-tiny-digits", *BENCH_OVERRIDES, "--blocks", "2", "--static", "--skip", "e2e"]
    )
    assert table.exit_code == 0 and "(static part only): not measured" in table.stdout
    assert "static training memory, MiB" in table.stdout and " 0.00 " not in table.stdout  # a tiny recipe: MiB


def test_static_tables_read_in_the_unit_of_their_largest_row() -> None:
    from dbconvert.bench import table_unit

    assert table_unit(3 * 2**30) == ("GiB", 2**30) and table_unit(2**30) == ("GiB", 2**30)
    assert table_unit(5 * 2**20) == ("MiB", 2**20) and table_unit(100) == ("KiB", 2**10)


def test_speed_times_the_checkpointed_training_steps() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "speed",
            "dit-tiny-digits",
            *BENCH_OVERRIDES,
            "--blocks",
            "2",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ck, raw = data["checkpointing"], data["raw_seconds"]
    assert ck["unit"] == "seconds" and ck["block_ckpt"] == raw["block-0+ckpt"]["train"][0] > 0
    assert ck["block_ckpt_over_block"] == pytest.approx(ck["block_ckpt"] / raw["block-0"]["train"][0])
    assert ck["e2e_over_block_ckpt"] == pytest.approx(raw["e2e"]["train"][0] / ck["block_ckpt"])
    assert raw["e2e+ckpt"]["sample"] == [] and len(raw["e2e+ckpt"]["train"]) == 1  # samples as its twin


@pytest.mark.parametrize("command", ["memory", "speed"])
def test_skip_of_an_unknown_network_is_one_line(command: str) -> None:
    from tests.cli_helpers import assert_user_error, invoke

    assert_user_error(
        invoke("bench", command, "dit-tiny-digits", "--blocks", "2", "--skip", "e2e-ckpt"),
        "--skip e2e-ckpt: no such network here",
    )
