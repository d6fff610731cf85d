"""A bad file is reported for what it is: a user's model.checkpoint is never met with "split again".

`read_checkpoint` (files the user names) and `load_weights` (files of a run, written by dbconvert)
word their errors differently, and every error is one line through the CLI (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dbconvert.rundir import Run
from dbconvert.train import train_block

from tests.cli_helpers import assert_user_error, invoke
from tests.conftest import TINY_OVERRIDES
from tests.families.llama_tiny import tiny_overrides, write_corpus

RUN_REMEDIES = ("split", "train again", "retrain", "--restart")


def split_dit(checkpoint: Path):  # noqa: ANN201 - click Result
    return invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, f"model.checkpoint={checkpoint}", "--out", "run")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_corrupt_source_checkpoint_is_the_users_file_not_the_run(in_tmp: Path, suffix: str) -> None:
    bad = in_tmp / f"dit{suffix}"
    if suffix == ".pt":
        torch.save({"w": torch.zeros(3)}, bad)
    else:
        save_file({"w": torch.zeros(3)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:40])
    result = split_dit(bad)
    assert_user_error(result, f"model.checkpoint {bad} is not a readable")
    assert not any(word in result.stderr for word in RUN_REMEDIES), result.stderr
    assert not (in_tmp / "run").exists()


def test_a_checkpoint_holding_something_else_than_tensors(in_tmp: Path) -> None:
    odd = in_tmp / "odd.pt"
    torch.save({"w": torch.zeros(1), "note": "text"}, odd)
    assert_user_error(split_dit(odd), f"model.checkpoint {odd} is not a state dict of tensors")


def test_a_llama_folder_given_to_a_dit_recipe_says_which_recipe_to_use(in_tmp: Path) -> None:
    folder = in_tmp / "hf-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    result = split_dit(folder)
    assert_user_error(result, f"model.checkpoint {folder} is a Hugging Face Llama folder")
    assert "use a llama recipe (model.family=llama)" in result.stderr and "not found" not in result.stderr
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_user_error(split_dit(folder), "is a Hugging Face GPT2 folder (config.json model_type 'gpt2')")
    (folder / "config.json").unlink()
    assert_user_error(split_dit(folder), "is a folder, not a .pt/.safetensors checkpoint file")
    missing = in_tmp / "nowhere.pt"
    assert_user_error(split_dit(missing), f"model.checkpoint {missing} not found; check model.checkpoint in the recipe")


def test_a_corrupt_file_inside_a_llama_checkpoint_folder(in_tmp: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = in_tmp / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    corpus = write_corpus(in_tmp)
    result = invoke(
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(corpus, **{"model.checkpoint": folder}),
        "--blocks",
        "2",
        "--out",
        "run",
    )
    assert_user_error(result, f"model.checkpoint {weights} is not a readable .safetensors file: corrupt or truncated")
    assert not any(word in result.stderr for word in RUN_REMEDIES), result.stderr


def test_damaged_run_files_say_they_are_run_files_and_how_to_recreate_them(tiny_run: Run) -> None:
    for index in range(tiny_run.num_blocks):
        train_block(tiny_run, index, steps=1, progress=False)
    ema = tiny_run.model_dir("block-01") / "ema.safetensors"
    ema.write_bytes(b"\0" * 64)
    assert_user_error(invoke("sample", "-q"), f"run file {ema} is damaged: corrupt or truncated")
    assert "retrain block-01 with --restart" in invoke("sample", "-q").stderr
    assert invoke("sample", "-q", "--weights", "model").exit_code == 0  # the raw weights are intact
    source = tiny_run.source_weights
    source.unlink()
    source.write_bytes(b"\0" * 64)
    assert_user_error(invoke("sample", "-q", "--model", "source"), f"run file {source} is damaged")
    assert "split again" in invoke("sample", "-q", "--model", "source").stderr
