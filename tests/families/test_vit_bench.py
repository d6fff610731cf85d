"""`dbconvert bench` on the ViT family: it runs through the Family contract (no timing assertions)."""

from __future__ import annotations

import json

from tests.cli_helpers import invoke
from tests.families.test_vit import TINY


def test_speed_times_classification_steps_of_blocks_and_e2e() -> None:
    result = invoke(
        "bench",
        "speed",
        "vit-tiny-digits",
        *TINY,
        "--blocks",
        "3",
        "--batch",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["unit"] == "image" and data["protocol_units"] == 10_000
    assert len(data["block_sample_step_s"]) == len(data["block_train_step_s"]) == 3
    assert data["sample_step_ratio"] > 0 and data["train_step_ratio"] > 0


def test_static_memory_of_a_block_is_a_third_of_the_layers() -> None:
    result = invoke("bench", "memory", "vit-tiny-digits", *TINY, "--blocks", "3", "--static", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    e2e, block = data["breakdown"]["e2e"], data["breakdown"]["block-0"]
    assert e2e["layers"] == [0, 3] and block["layers"] == [0, 1]
    assert block["parameters"] < e2e["parameters"] and data["ratio"] > 1
    # the family's plain reference (Family.reference_kind), without and with checkpointing: no generic code names it
    assert data["checkpointing"]["reference"] == "classifier"
    assert data["breakdown"]["classifier+ckpt"]["objective"] == "classifier"
    assert data["breakdown"]["classifier"]["parameters"] <= e2e["parameters"]
