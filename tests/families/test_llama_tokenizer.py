"""Llama conversion keeps its tokenizer's behaviour: no silent new tokenizer, BOS as the checkpoint adds it,
EOS ids from its config (stop on any), and no vocab_size hint where config.json fixes the vocabulary.

Everything offline: a tiny transformers LlamaForCausalLM and a tiny `tokenizers` BPE saved with save_pretrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError
from dbconvert.families.llama.generate import Decoding, ancestral
from dbconvert.rundir import Run
from dbconvert.split import split
from dbconvert.tokenizer import SETTINGS_FILE, run_tokenizer, train_bpe
from tests.cli_helpers import assert_user_error, invoke
from tests.families.test_llama import CORPUS, hf_llama, tiny_overrides


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def save_tokenizer(folder: Path, vocab: int = 280, bos_template: bool = True) -> dict[str, int]:
    """A byte-level BPE plus <s>, </s>, <|eot_id|>, saved with save_pretrained; returns the special ids.

    With `bos_template` its post-processor puts <s> in front (as Llama-3's tokenizer.json does).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    train_bpe([CORPUS], vocab, folder.parent / "bpe.json")
    tok = Tokenizer.from_file(str(folder.parent / "bpe.json"))
    tok.add_special_tokens(["<s>", "</s>", "<|eot_id|>"])
    ids = {t: tok.token_to_id(t) for t in ("<s>", "</s>", "<|eot_id|>")}
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])]
        )
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return ids


def checkpoint_with_tokenizer(folder: Path, **tokenizer: object) -> dict[str, int]:
    """hf_llama's checkpoint with the tokenizer, config.json's eos = </s>, generation_config's eos = [</s>,
    <|eot_id|>]."""
    hf_llama(folder)
    ids = save_tokenizer(folder, **tokenizer)  # type: ignore[arg-type]
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["</s>"], ids["<|eot_id|>"]]}))
    return ids


def split_args(corpus: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(corpus, **{"model.checkpoint": str(checkpoint)}),
        *extra,
        "--out",
        "run",
    ]


def test_checkpoint_without_tokenizer_is_refused_unless_one_is_named_or_asked_for(in_tmp: Path, corpus: Path) -> None:
    hf_llama(in_tmp / "hf")
    assert_user_error(invoke(*split_args(corpus, in_tmp / "hf")), "has no tokenizer")
    assert not (in_tmp / "run").exists()
    save_tokenizer(in_tmp / "tok")
    named = invoke(*split_args(corpus, in_tmp / "hf", f"model.tokenizer={in_tmp / 'tok' / 'tokenizer.json'}"))
    assert named.exit_code == 0, named.output
    assert run_tokenizer(Run.open("run").shared_dir).bos_id is not None  # the named tokenizer's BOS behaviour
    trained = invoke(*split_args(corpus, in_tmp / "hf", "model.train_tokenizer=true", "--force"))
    assert trained.exit_code == 0, trained.output
    tok = run_tokenizer(Run.open("run").shared_dir)
    assert tok.bos_id is None and tok.stop_ids == (tok.eos_id,)


def test_bos_and_eos_follow_the_checkpoint_in_training_data_and_prompts(in_tmp: Path, corpus: Path) -> None:
    ids = checkpoint_with_tokenizer(in_tmp / "hf")
    run = split(
        load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.checkpoint": str(in_tmp / "hf")})),
        out=in_tmp / "run",
    )
    settings = json.loads((run.shared_dir / SETTINGS_FILE).read_text())
    assert settings["add_bos"] is True and settings["bos_id"] == ids["<s>"] and settings["eos_id"] == ids["</s>"]
    assert settings["stop_ids"] == [ids["</s>"], ids["<|eot_id|>"]]
    family = run.family()
    tok = family.tokenizer()
    assert tok.encode("ROMEO:")[0] == ids["<s>"] and tok.encode("") == [ids["<s>"]]  # prompts start with BOS
    rows = family.load_data(run.recipe).tokens.tolist()
    after_eos = [row[i + 1] for row in rows for i, t in enumerate(row[:-1]) if t == ids["</s>"]]
    assert after_eos and set(after_eos) == {ids["<s>"]}  # every packed document is <s> ... </s>
    result = invoke("sample", "--model", "source", "--prompt", "ROMEO:", "--max-new-tokens", "4", "--run", "run", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(
        (next((in_tmp / "run" / "samples").glob("source-*")) / "samples.jsonl").read_text().splitlines()[0]
    )
    assert record["prompt"] == "ROMEO:" and record["text"].startswith("ROMEO:")  # BOS is never shown


def test_tokenizer_config_add_bos_token_wins_over_the_post_processor(in_tmp: Path, corpus: Path) -> None:
    ids = checkpoint_with_tokenizer(in_tmp / "hf")
    config = json.loads((in_tmp / "hf" / "tokenizer_config.json").read_text())
    (in_tmp / "hf" / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    run = split(
        load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.checkpoint": str(in_tmp / "hf")})),
        out=in_tmp / "run",
    )
    tok = run.family().tokenizer()
    assert tok.bos_id is None and ids["<s>"] not in tok.encode("ROMEO:") and tok.encode("") == []
    assert "add_bos_token" in tok.settings.origin


def test_no_bos_without_a_template_or_config(in_tmp: Path, corpus: Path) -> None:
    checkpoint_with_tokenizer(in_tmp / "hf", bos_template=False)
    run = split(
        load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.checkpoint": str(in_tmp / "hf")})),
        out=in_tmp / "run",
    )
    assert run.family().tokenizer().bos_id is None


class ScriptedLM(torch.nn.Module):
    """A causal LM stub whose next token is fixed by position: it emits `script` one token after another."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab = script, vocab

    def extend(self, cache: int | None, tokens: torch.Tensor, start: int, pad: torch.Tensor | None = None):  # noqa: ANN201
        done = (cache or 0) + tokens.shape[1]
        logits = torch.full((tokens.shape[0], self.vocab), -1e9)
        logits[:, self.script[min(done - 2, len(self.script) - 1)]] = 0.0  # prompt of 2 tokens, then the script
        return done, logits


def test_generation_stops_at_any_of_the_checkpoints_eos_ids() -> None:
    eos, eot = 281, 282
    net = ScriptedLM([5, 6, eot, 7, eos, 8], vocab=300)
    dec = Decoding(max_new_tokens=6, context=32, eos=(eos, eot), seed=0, temperature=0.0)
    new, why = ancestral(net, [[1, 2]], dec, [0], torch.device("cpu"))
    assert new == [[5, 6]] and why == ["eos"]
    new, why = ancestral(
        net,
        [[1, 2]],
        Decoding(max_new_tokens=6, context=32, eos=(eos,), seed=0, temperature=0.0),
        [0],
        torch.device("cpu"),
    )
    assert new == [[5, 6, eot, 7]] and why == ["eos"]


def test_no_vocab_size_hint_where_the_checkpoint_fixes_the_vocabulary(in_tmp: Path, corpus: Path) -> None:
    hf_llama(in_tmp / "hf")  # vocab 300
    save_tokenizer(in_tmp / "hf", vocab=400)
    with pytest.raises(DbconvertError) as err:
        split(
            load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.checkpoint": str(in_tmp / "hf")})),
            out=in_tmp / "run",
        )
    assert "vocabulary has 300 rows" in str(err.value) and "config.json" in str(err.value)
    assert "model.vocab_size" not in str(err.value)


def test_sentencepiece_checkpoint_adds_bos_like_llama_tokenizer(in_tmp: Path, corpus: Path) -> None:
    import sentencepiece as spm

    hf_llama(in_tmp / "hf")  # config.json: bos_token_id 1, eos_token_id 2 (transformers' Llama defaults)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_prefix=str(in_tmp / "hf" / "tokenizer"),
        vocab_size=60,
        minloglevel=2,
    )
    run = split(
        load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.checkpoint": str(in_tmp / "hf")})),
        out=in_tmp / "run",
    )
    tok = run.family().tokenizer()
    assert tok.bos_id == 1 and tok.encode("ROMEO:")[0] == 1 and tok.stop_ids == (2,)
