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
    result = runner.invoke(app, ["bench", "speed", "dit-tiny-digits", *BENCH_OVERRIDES, "--blocks", "2",
                                 "--batch", "4", "--repeats", "1", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("device", "blocks", "batch", "sample_step_ratio", "train_step_ratio", "e2e_sample_step_s",
                "block_sample_step_s", "e2e_train_step_s", "block_train_step_s"):
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
    assert [t.sigma_range for t in targets[:-1]] == [tuple(p["train_range"]) for p in plans]
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
    result = runner.invoke(app, ["bench", "speed", "dit-tiny-digits", *BENCH_OVERRIDES, "--blocks", "2", "--batch", "4",
                                 "--repeats", "1", "--warmup", "0", "--sampling-only", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert math.isnan(data["train_step_ratio"]) and all(not t for t in
                                                        (v["train"] for v in data["raw_seconds"].values()))
    assert data["sample_step_ratio"] > 0 and data["unit"] == "image" and data["block_units_per_s"] > 0
    assert data["protocol_units"] == 50_000  # FID-50k
    assert data["e2e_protocol_hours"] == pytest.approx(50_000 / data["e2e_units_per_s"] / 3600)
