"""Gen-PPL: the judge's perplexity of the continuations, checked against transformers; the CLI; bad judges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import assert_user_error, invoke
from tests.families.llama_tiny import CORPUS, tiny_overrides


@pytest.fixture
def trained_run(in_tmp: Path) -> Path:
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    split = invoke(
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(corpus, **{"model.max_positions": 64}),
        "--blocks",
        "2",
        "--out",
        "run",
    )
    assert split.exit_code == 0, split.output
    for i in (0, 1):
        assert invoke("train-block", str(i), "--steps", "1", "-q").exit_code == 0
    assert invoke("export", in_tmp / "judge", "--model", "source").exit_code == 0  # a judge that reads the run's text
    return in_tmp / "run"


ARGS = ("eval", "genppl", "--prompt-tokens", "4", "--new-tokens", "6", "--num-prompts", "3", "--steps", "2", "-q")


def test_genppl_is_the_judges_perplexity_of_the_continuations(trained_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = trained_run.parent / "judge"
    res = invoke(*ARGS, "--judge", judge, "--seeds", "2", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["metric"] == "genppl" and r["model"] == "blocks" and r["features"].startswith("judge:judge@")
    assert r["seeds"] == [0, 1] and len(r["values"]) == 2 and r["std"] >= 0 and r["sampler"]["steps"] == 2
    assert r["mean"] == pytest.approx(sum(r["values"]) / 2)

    # each seed's value is exp(mean NLL of the continuation tokens) as transformers computes it
    model = AutoModelForCausalLM.from_pretrained(str(judge)).eval()
    tok = AutoTokenizer.from_pretrained(str(judge))
    for k, folder in enumerate(r["samples"]):
        rows = [json.loads(line) for line in (Path(folder) / "genppl.jsonl").read_text().splitlines()]
        total, count = 0.0, 0
        for row in rows:
            head = tok(row["prompt"])["input_ids"]
            tail = tok(row["generation"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([head + tail])
            labels = ids.clone()
            labels[0, : len(head)] = -100
            with torch.no_grad():
                loss = float(model(ids, labels=labels).loss)
            total += loss * len(tail)
            count += len(tail)
        assert r["values"][k] == pytest.approx(math.exp(total / count), rel=1e-4)
        assert r["per_seed"][k]["tokens"] == count

    table = invoke("eval", "compare")
    assert table.exit_code == 0 and f"Gen-PPL with features {r['features']} (lower is better)" in table.stdout
    assert "entropy" in table.stdout

    # a second judge folder of the same name: its own result file and its own table, the first one kept
    import shutil

    other = trained_run.parent / "other" / "judge"
    shutil.copytree(judge, other)
    res2 = invoke(*ARGS, "--judge", other, "--seeds", "2", "--json")
    r2 = json.loads(res2.stdout.strip().splitlines()[-1])
    assert r2["features"] != r["features"] and r2["file"] != r["file"] and Path(r["file"]).is_file()
    tables = invoke("eval", "compare").stdout
    assert f"features {r['features']}" in tables and f"features {r2['features']}" in tables


def test_bad_judges_are_one_line(trained_run: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    assert_user_error(invoke(*ARGS), "eval genppl needs --judge MODEL")
    assert_user_error(invoke(*ARGS, "--split", "test", "--judge", "x"), "local text has the splits train and val")
    assert_user_error(invoke(*ARGS, "--judge", "no-such-org/no-such-judge"), "offline (HF_HUB_OFFLINE=1)")
    empty = trained_run.parent / "empty"
    empty.mkdir()
    assert_user_error(invoke(*ARGS, "--judge", empty), "cannot load a Hugging Face causal LM")

    # a judge whose word-level tokenizer knows four words: the generated text becomes its unknown token
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "ROMEO": 1, "JULIET": 2, ":": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    narrow = trained_run.parent / "narrow"
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(str(narrow))
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=4,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(narrow))
    assert_user_error(invoke(*ARGS, "--judge", narrow), "its tokenizer cannot read this text")
