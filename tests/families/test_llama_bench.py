"""`dbconvert bench` on a Llama recipe: tokens/s and the protocol's hours, and exact static bytes per option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import assert_user_error, invoke
from tests.families.llama_tiny import tiny_overrides, write_corpus

VOCAB, HIDDEN = 300, 32  # tiny_overrides' model


@pytest.fixture
def overrides(tmp_path: Path) -> list[str]:
    return tiny_overrides(write_corpus(tmp_path))


def test_speed_reports_tokens_per_second_and_the_protocols_hours(overrides: list[str]) -> None:
    args = (
        "bench",
        "speed",
        "llama-tiny-shakespeare",
        *overrides,
        "model.target_dim=8",
        "model.head_rank=4",
        "--blocks",
        "2",
        "--batch",
        "2",
        "--context",
        "12",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--sampling-only",
    )
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
    decoding = data["decoding"]  # whole decodes: blocks at the few-step protocol vs AR decoding, KV cache both
    assert (decoding["steps"], decoding["protocol"], decoding["layers"], decoding["batch"]) == (2, "few-step", 4, 2)
    assert (decoding["prompt_tokens"], decoding["new_tokens"]) == (3, 9)  # a quarter of the context, the rest new
    rates = decoding["tokens_per_s"]
    assert set(rates) == {"ar", "blocks", "blocks (separate extend)"} and all(r > 0 for r in rates.values())
    assert decoding["blocks_over_ar"] == pytest.approx(rates["blocks"] / rates["ar"])
    assert all(len(s) == 1 for s in decoding["raw_seconds"].values())  # --repeats 1, --warmup 0
    assert "decoding, tokens/s" in table.stdout and "blocks / AR" in table.stdout


def test_speed_decoding_options(overrides: list[str]) -> None:
    args = (
        "bench",
        "speed",
        "llama-tiny-shakespeare",
        *overrides,
        "--blocks",
        "2",
        "--batch",
        "1",
        "--context",
        "12",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--sampling-only",
        "--json",
    )
    off = invoke(*args, "--no-decoding")
    assert off.exit_code == 0, off.output
    assert json.loads(off.stdout)["decoding"] is None
    short = invoke(*args, "--decode-tokens", "2")
    assert short.exit_code == 0, short.output
    assert json.loads(short.stdout)["decoding"]["new_tokens"] == 2
    assert_user_error(invoke(*args, "--decode-tokens", "10"), "--decode-tokens must be between 1 and 9")


def test_static_bytes_of_a_low_rank_head_are_exact(overrides: list[str]) -> None:
    def gradients(*extra: str) -> dict[str, int]:
        result = invoke(
            "bench", "memory", "llama-tiny-shakespeare", *overrides, *extra, "--static", "--blocks", "2", "--json"
        )
        assert result.exit_code == 0, result.output
        return {name: row["gradients"] for name, row in json.loads(result.stdout)["breakdown"].items()}

    full, rank4 = gradients(), gradients("model.head_rank=4")
    saved = (VOCAB * HIDDEN - 4 * (HIDDEN + VOCAB)) * 4  # fp32: V x H head -> H x 4 and 4 x V factors
    assert all(full[name] - rank4[name] == saved for name in full)
    narrow = gradients("model.target_dim=8")
    assert all(full[name] - narrow[name] == (HIDDEN - 8) * HIDDEN * 4 for name in full)  # noisy_in: 32 -> 8 inputs


def test_memory_measures_the_same_network_as_a_plain_causal_lm(overrides: list[str]) -> None:
    """The user's own alternative: the e2e network trained autoregressively, without and with checkpointing."""
    result = invoke(
        "bench",
        "memory",
        "llama-tiny-shakespeare",
        *overrides,
        "--blocks",
        "2",
        "--batch",
        "2",
        "--deepest-block",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows, ck = data["breakdown"], data["checkpointing"]
    assert set(rows) == {"block-0", "e2e", "block-0+ckpt", "e2e+ckpt", "ar", "ar+ckpt"}
    assert rows["ar"]["objective"] == "ar" and rows["ar+ckpt"]["checkpointing"] and rows["ar"]["layers"] == [0, 4]
    assert ck["ar_over_block_ckpt"] == pytest.approx(rows["ar"]["peak_bytes"] / rows["block-0+ckpt"]["peak_bytes"])
    # the causal LM never uses the noise modulation or the noisy-input path: no gradient, no AdamW state for them
    assert rows["ar"]["gradients"] < rows["e2e"]["gradients"]
    assert rows["ar"]["gradients"] == rows["ar+ckpt"]["gradients"]
    assert 0 <= rows["ar"]["optimizer_state"] - 2 * rows["ar"]["gradients"] < 1024  # two moments + a step count each
    assert rows["ar+ckpt"]["saved_activations"] < rows["ar"]["saved_activations"]
    # the causal LM measured with checkpointing only: no causal-LM A measured, so no App. G value for it
    alone = invoke(
        "bench",
        "memory",
        "llama-tiny-shakespeare",
        *overrides,
        "--blocks",
        "2",
        "--batch",
        "2",
        "--deepest-block",
        "--skip",
        "e2e",
        "--skip",
        "e2e+ckpt",
        "--skip",
        "ar",
        "--json",
    )
    assert alone.exit_code == 0, alone.output
    rows = json.loads(alone.stdout)["breakdown"]
    assert rows["ar+ckpt"]["app_g"] is None and rows["block-0+ckpt"]["app_g"]["A"] == rows["block-0"]["app_g"]["A"]
    table = invoke("bench", "memory", "llama-tiny-shakespeare", *overrides, "--blocks", "2", "--static")
    assert table.exit_code == 0, table.output
    assert "ar+ckpt" in table.stdout and "plain causal LM (ar) / block-0+ckpt" in table.stdout


def test_bench_with_a_checkpoint_builds_the_network_split_builds(tmp_path: Path, overrides: list[str]) -> None:
    """model.checkpoint=X: the checkpoint's architecture (its config.json), not the recipe's fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dbconvert.checkpoint import load_weights
    from dbconvert.config import load_recipe
    from dbconvert.split import split

    # the recipe's own sizes give way to the checkpoint's; sizes given on the command line that differ would be
    # refused (issue 34), so the tiny overrides' sizes are left out here
    overrides = [o for o in overrides if not o.startswith(("model.layers=", "model.hidden=", "model.intermediate="))]
    folder = tmp_path / "hf"
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # bench reads the config only: no weights needed ...
    args = (
        "bench",
        "memory",
        "llama-tiny-shakespeare",
        *overrides,
        f"model.checkpoint={folder}",
        "--blocks",
        "2",
        "--static",
        "--json",
        "--no-checkpointing",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["breakdown"]
    assert rows["e2e"]["layers"] == [0, 6] and rows["block-0"]["layers"] == [0, 3]
    LlamaForCausalLM(cfg).save_pretrained(folder)  # ... split does: its block holds exactly what bench counted
    run = split(
        load_recipe(
            "llama-tiny-shakespeare",
            [*overrides, f"model.checkpoint={folder}", "blocks.num=2", "model.train_tokenizer=true"],
        ),
        out=tmp_path / "run",
    )
    block = load_weights(run.model_dir("block-00") / "model.safetensors")
    assert rows["block-0"]["gradients"] == sum(t.numel() * t.element_size() for t in block.values())
    missing = [a if not a.startswith("model.checkpoint=") else f"model.checkpoint={tmp_path / 'no'}" for a in args]
    assert_user_error(invoke(*missing), "is not a folder")
