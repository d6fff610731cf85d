"""`dbconvert bench` on a Llama recipe: tokens/s and the protocol's hours, and exact static bytes per option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import invoke
from tests.families.llama_tiny import tiny_overrides, write_corpus

VOCAB, HIDDEN = 300, 32  # tiny_overrides' model


@pytest.fixture
def overrides(tmp_path: Path) -> list[str]:
    return tiny_overrides(write_corpus(tmp_path))


def test_speed_reports_tokens_per_second_and_the_protocols_hours(overrides: list[str]) -> None:
    args = ("bench", "speed", "llama-tiny-shakespeare", *overrides, "model.target_dim=8", "model.head_rank=4",
            "--blocks", "2", "--batch", "2", "--context", "12", "--repeats", "1", "--warmup", "0", "--sampling-only")
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["unit"] == "token" and data["sample_steps"] == 4 and data["sample_step_ratio"] > 0
    assert data["protocol_units"] == 1000 * 5 * 50  # SEDD's MAUVE protocol: prompts x samples x tokens
    for who in ("block", "e2e"):
        rate = data[f"{who}_units_per_s"]
        assert rate > 0 and data[f"{who}_protocol_hours"] == pytest.approx(250_000 / rate / 3600)
    table = invoke(*args)
    assert table.exit_code == 0, table.output
    assert "the paper's evaluation protocol (250,000 tokens)" in table.stdout and "tokens/s" in table.stdout


def test_static_bytes_of_a_low_rank_head_are_exact(overrides: list[str]) -> None:
    def gradients(*extra: str) -> dict[str, int]:
        result = invoke("bench", "memory", "llama-tiny-shakespeare", *overrides, *extra, "--static", "--blocks", "2",
                        "--json")
        assert result.exit_code == 0, result.output
        return {name: row["gradients"] for name, row in json.loads(result.stdout)["breakdown"].items()}

    full, rank4 = gradients(), gradients("model.head_rank=4")
    saved = (VOCAB * HIDDEN - 4 * (HIDDEN + VOCAB)) * 4  # fp32: V x H head -> H x 4 and 4 x V factors
    assert all(full[name] - rank4[name] == saved for name in full)
    narrow = gradients("model.target_dim=8")
    assert all(full[name] - narrow[name] == (HIDDEN - 8) * HIDDEN * 4 for name in full)  # noisy_in: 32 -> 8 inputs
