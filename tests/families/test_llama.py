"""Llama family: conversion from transformers checkpoints, the block-diffusion mask, training, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dbconvert.config import load_recipe
from dbconvert.errors import CheckpointError, DbconvertError, RecipeError
from dbconvert.families import get_family
from dbconvert.families.llama.convert import normalised_table
from dbconvert.families.llama.objective import LlamaDenoiser
from dbconvert.families.llama.model import LlamaBlockNet, block_diffusion_mask
from dbconvert.noise import NoiseSettings

from tests.cli_helpers import assert_user_error
from tests.families.llama_tiny import CORPUS, tiny_overrides  # noqa: E402  (shared with the hardening tests)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def hf_llama(folder: Path, tie: bool = False, layers: int = 4, max_pos: int = 64, vocab: int = 300) -> torch.nn.Module:
    """A tiny transformers LlamaForCausalLM (GQA, non-default rope_theta) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def ckpt_recipe(folder: Path, corpus: Path, **extra: object):
    return load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.checkpoint": str(folder), **extra}))


# --- conversion ----------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_blocks_reproduce_source_hidden_states(tmp_path: Path, corpus: Path, tie: bool) -> None:
    hf = hf_llama(tmp_path / "hf", tie=tie)
    recipe = ckpt_recipe(tmp_path / "hf", corpus)
    family = get_family("llama")
    source = family.source(recipe)
    assert recipe.model.layers == 4 and recipe.model.rope_parameters["rope_theta"] == 500.0  # taken from config.json
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf.model(ids, output_hidden_states=True)
        hidden = out.hidden_states  # (embeddings, after layer 0, ..., final normed)
        positions = torch.arange(12)[None].expand(2, -1)
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        for start, end in [(0, 2), (2, 4)]:
            net = family.block_network(recipe, end - start)
            net.load_state_dict(family.block_state(source, start, end))
            if start == 0:
                torch.testing.assert_close(net.embed_tokens(ids), hidden[0])
            h, _ = net.run_layers(hidden[start], positions, causal)
            want = out.last_hidden_state if end == 4 else hidden[end]
            torch.testing.assert_close(net.norm(h) if end == 4 else h, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(source.network.forward_causal(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_errors(tmp_path: Path, corpus: Path) -> None:
    family = get_family("llama")
    with pytest.raises(CheckpointError, match="not a folder"):
        family.source(ckpt_recipe(tmp_path / "nowhere", corpus))
    hf_llama(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))

    def mutate(**changes: object) -> str:
        bad = dict(state)
        for key, value in changes.items():
            if value is None:
                bad.pop(key.replace("__", "."))
            else:
                bad[key.replace("__", ".")] = value  # type: ignore[assignment]
        save_file(bad, str(weights))
        with pytest.raises(CheckpointError) as err:
            family.source(ckpt_recipe(tmp_path / "hf", corpus))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "model.norm.weight" in mutate(model__norm__weight=None)
    assert "unknown key 'extra.weight'" in mutate(extra__weight=torch.zeros(2))
    assert "shape mismatch" in mutate(model__norm__weight=torch.ones(7))
    save_file(state, str(weights))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(CheckpointError, match="not a Llama"):
        family.source(ckpt_recipe(tmp_path / "hf", corpus))
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        family.source(ckpt_recipe(tmp_path / "hf", corpus))


def test_checkpoint_replaces_the_recipes_sizes_but_refuses_sizes_given_that_differ(in_tmp: Path, corpus: Path) -> None:
    """Issue 34: model.layers=2 model.hidden=64 with a 4 x 32 checkpoint was split as 4 x 32 without a word."""
    hf_llama(in_tmp / "hf")
    family = get_family("llama")
    shipped = load_recipe("llama-tiny-shakespeare")
    recipe = load_recipe("llama-tiny-shakespeare", [f"model.checkpoint={in_tmp / 'hf'}", f"data.source={corpus}"])
    assert (shipped.model.layers, shipped.model.hidden) != (4, 32)
    assert recipe.given == {"model.checkpoint", "data.source"}
    family.resolve(recipe)  # the recipe's own sizes (not given) are the checkpoint's
    assert (recipe.model.layers, recipe.model.hidden, recipe.model.vocab_size) == (4, 32, 300)
    result = invoke(
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(
            corpus,
            **{"model.checkpoint": in_tmp / "hf", "model.layers": 2, "model.hidden": 64, "model.rope_theta": 500},
        ),
    )
    assert_user_error(result, "model.layers=2 (the checkpoint has 4), model.hidden=64 (the checkpoint has 32); drop")
    assert "rope_theta" not in result.stderr  # given, and the same as the checkpoint's
    assert not (in_tmp / "runs").exists()
    bench = invoke(
        "bench",
        "memory",
        "llama-tiny-shakespeare",
        "--static",
        *tiny_overrides(corpus, **{"model.checkpoint": in_tmp / "hf", "model.heads": 2}),
    )
    assert_user_error(bench, "model.heads=2 (the checkpoint has 4)")


def test_context_longer_than_model_maximum(tmp_path: Path, corpus: Path) -> None:
    hf_llama(tmp_path / "hf", max_pos=8)
    with pytest.raises(RecipeError, match="longer than the model's maximum of 8"):
        get_family("llama").source(ckpt_recipe(tmp_path / "hf", corpus))


# --- the block-diffusion mask and what it implies ------------------------------------------


def test_mask_for_three_tokens() -> None:
    expected = torch.tensor(
        [
            # clean 0..2   noisy 0..2
            [1, 0, 0, 0, 0, 0],  # clean 0
            [1, 1, 0, 0, 0, 0],  # clean 1
            [1, 1, 1, 0, 0, 0],  # clean 2
            [0, 0, 0, 1, 0, 0],  # noisy 0: itself only
            [1, 0, 0, 0, 1, 0],  # noisy 1: clean 0 and itself
            [1, 1, 0, 0, 0, 1],  # noisy 2: clean 0, 1 and itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_diffusion_mask(3), expected)


def random_denoiser(recipe) -> LlamaDenoiser:  # noqa: ANN001
    """A block with non-zero modulation (so the sigma path is exercised too)."""
    torch.manual_seed(0)
    net = LlamaBlockNet(recipe.model.shape(2))
    for layer in net.layers:
        torch.nn.init.normal_(layer.adaLN_modulation[1].weight, std=0.1)
    table = normalised_table(torch.randn(recipe.model.vocab_size, recipe.model.hidden))
    return LlamaDenoiser(net, table, NoiseSettings()).eval()


def test_information_flow(corpus: Path) -> None:
    recipe = load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus))
    den = random_denoiser(recipe)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (1, 8), generator=gen)
    z = torch.randn(1, 8, 32, generator=gen)
    sigma = torch.rand(1, 8, generator=gen) + 0.2
    with torch.no_grad():
        base = den(tokens, z, sigma)
        k = 3
        changed = tokens.clone()
        changed[0, k] = (tokens[0, k] + 1) % 300
        diff = (den(changed, z, sigma) - base).abs().amax(-1)[0]
        assert torch.all(diff[: k + 1] == 0) and torch.all(diff[k + 1 :] > 0)
        j = 5
        z2 = z.clone()
        z2[0, j] += 1.0
        diff = (den(tokens, z2, sigma) - base).abs().amax(-1)[0]
        assert diff[j] > 0 and torch.all(diff[torch.arange(8) != j] == 0)


def test_kv_cache_step_matches_training_forward(corpus: Path) -> None:
    recipe = load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus))
    den = random_denoiser(recipe)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (1, 6), generator=gen)
    z = torch.randn(1, 6, 32, generator=gen)
    sigma = torch.full((1, 6), 0.7)
    with torch.no_grad():
        logits = den(tokens, z, sigma)
        cache, _ = den.net.extend(None, tokens[:, :2], 0)
        cache, _ = den.net.extend(cache, tokens[:, 2:4], 2)  # incremental extension, as in sampling
        want = torch.softmax(logits[0, 4], -1) @ den.table
        torch.testing.assert_close(den.step(cache, z[:, 4], 0.7, 4)[0], want, atol=1e-5, rtol=1e-5)
        full = den.net.forward_causal(tokens)
        _, last = den.net.extend(None, tokens, 0)
        torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)


def test_denoiser_tends_to_identity_at_small_sigma(corpus: Path) -> None:
    recipe = load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus))
    den = random_denoiser(recipe)
    tokens = torch.tensor([[5, 9, 11]])
    z = den.table[tokens]
    with torch.no_grad():
        d = torch.softmax(den(tokens, z, torch.full((1, 3), 0.002)), -1) @ den.table
    torch.testing.assert_close(d, z, atol=1e-4, rtol=1e-4)


# --- the CLI, end to end -------------------------------------------------------------------


def invoke(*args: str):  # noqa: ANN201
    from dbconvert.cli import app

    result = CliRunner().invoke(app, list(args))
    return result


@pytest.mark.slow
def test_split_train_sample_cli(in_tmp: Path, corpus: Path) -> None:
    res = invoke("split", "llama-tiny-shakespeare", *tiny_overrides(corpus), "--blocks", "2", "--out", "run")
    assert res.exit_code == 0, res.output
    assert (in_tmp / "run" / "shared" / "tokenizer.json").is_file()
    assert (in_tmp / "run" / "shared" / "targets.safetensors").is_file()
    assert "targets" not in "".join(load_file(str(in_tmp / "run" / "blocks" / "block-00" / "model.safetensors")))
    for i in (0, 1):
        res = invoke("train-block", str(i), "--steps", "4", "--run", "run", "-q")
        assert res.exit_code == 0, res.output
    res = invoke("train-e2e", "--steps", "4", "--run", "run", "-q")
    assert res.exit_code == 0, res.output
    line = json.loads((in_tmp / "run" / "metrics" / "block-00.jsonl").read_text().splitlines()[-1])
    assert {"ce", "accuracy", "sigma_min"} <= set(line)

    outs = []
    for _ in range(2):
        res = invoke("sample", "--prompt", "ROMEO:", "--max-new-tokens", "5", "--steps", "6", "--run", "run")
        assert res.exit_code == 0, res.output
        outs.append((in_tmp / "run" / "samples" / "blocks-euler-6steps-seed0" / "samples.txt").read_text())
    assert outs[0] == outs[1] and outs[0].startswith("ROMEO:")
    (in_tmp / "prompts.txt").write_text("JULIET:\nFRIAR:\n")
    res = invoke(
        "sample",
        "--model",
        "e2e",
        "--prompt-file",
        "prompts.txt",
        "--max-new-tokens",
        "4",
        "--num",
        "2",
        "--steps",
        "4",
        "--run",
        "run",
    )
    assert res.exit_code == 0, res.output
    records = [
        json.loads(x)
        for x in (in_tmp / "run" / "samples" / "e2e-euler-4steps-seed0" / "samples.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in records] == ["JULIET:", "JULIET:", "FRIAR:", "FRIAR:"]
    assert "--- sample 1/4 ---" in res.stdout and "--- sample 4/4 ---" in res.stdout  # completions hold newlines
    assert "tokens/s" not in res.stdout and "new tokens/s" in res.stderr  # stdout keeps results only
    # the converted source is a causal LM: sampled ancestrally (temperature 1 by default), N different continuations
    res = invoke(
        "sample", "--model", "source", "--prompt", "ROMEO:", "--max-new-tokens", "8", "--num", "3", "--run", "run"
    )
    assert res.exit_code == 0, res.output
    records = [
        json.loads(x)
        for x in (in_tmp / "run" / "samples" / "source-t1-p1-seed0" / "samples.jsonl").read_text().splitlines()
    ]
    assert len({r["completion"] for r in records}) > 1
    res = invoke("sample", "--model", "ar", "--prompt", "ROMEO:", "--run", "run")
    assert res.exit_code == 2 and "train-e2e --objective ar" in res.output and "Traceback" not in res.output

    res = invoke("sample", "--prompt", "ROMEO " * 40, "--run", "run")
    assert res.exit_code == 2 and "context" in res.output and "Traceback" not in res.output


def test_sampling_dispatches_to_owning_blocks(in_tmp: Path, corpus: Path) -> None:
    from dbconvert.sampling import SampleRequest
    from dbconvert.split import split
    from dbconvert.train import train_block

    run = split(load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"train.steps": 1})), out=in_tmp / "run")
    for i in range(run.num_blocks):
        train_block(run, i, progress=False)
    family = get_family("llama")
    result = family.generate(
        run, SampleRequest(steps=32, options=family.sample_options(prompt="ROMEO:", max_new_tokens=1))
    )
    assert len(result.calls) == 4 and all(c > 0 for c in result.calls)
    assert sum(result.calls) == 32  # one token: M Euler steps, each run by exactly one (the owning) block


def test_tokenizer_vocab_mismatch(in_tmp: Path, corpus: Path) -> None:
    from dbconvert.split import split
    from dbconvert.tokenizer import train_bpe

    big = train_bpe([CORPUS], 400, in_tmp / "big.json")
    recipe = load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.tokenizer": str(big)}))
    with pytest.raises(DbconvertError, match="vocabulary has 300 rows"):
        split(recipe, out=in_tmp / "run")
    assert not (in_tmp / "run").exists()


def test_checkpoint_split_uses_checkpoint_tokenizer_or_trains_one(in_tmp: Path, corpus: Path) -> None:
    from dbconvert.split import split

    hf_llama(in_tmp / "hf")  # no tokenizer in the folder: refused unless a new one is asked for
    with pytest.raises(DbconvertError, match="has no tokenizer .* set model.train_tokenizer=true"):
        split(ckpt_recipe(in_tmp / "hf", corpus), out=in_tmp / "run")
    run = split(ckpt_recipe(in_tmp / "hf", corpus, **{"model.train_tokenizer": "true"}), out=in_tmp / "run")
    assert run.manifest["source"]["sha256"] and run.recipe.model.layers == 4
    table = load_file(str(run.shared_dir / "targets.safetensors"))["table"]
    source = load_file(str(in_tmp / "hf" / "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(table, normalised_table(source))


def test_split_refuses_a_conversion_whose_layers_differ_from_transformers(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 32's function check: keys and shapes all fit, but q/k rows are read in Meta's interleaved rotary layout
    instead of Hugging Face's half-split one (or rope_theta is not carried over); split compares a converted layer
    with transformers' layer of the same checkpoint and refuses in one line."""
    import dbconvert.families.llama.family as llama_family
    from dbconvert.families.llama.function_check import check_llama_function
    from dbconvert.tensorio import LazyState

    hf_llama(tmp_path / "hf")
    family = get_family("llama")
    family.source(ckpt_recipe(tmp_path / "hf", corpus))  # the true layout passes
    convert = llama_family.hf_source_state

    def interleaved(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        state = convert(*args, **kwargs)
        loaders = dict(state.loaders)
        for key in ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"):

            def meta(read=loaders[key]):  # noqa: ANN001, ANN202 - each head's rows (x0, x1, ...) as pairs
                w = read()
                heads = w.shape[0] // 8
                return w.view(heads, 2, 4, -1).transpose(1, 2).reshape(w.shape)

            loaders[key] = meta
        return LazyState(loaders, state.specs)

    monkeypatch.setattr(llama_family, "hf_source_state", interleaved)
    with pytest.raises(CheckpointError, match="layer 0 as converted differs from transformers' layer") as err:
        family.source(ckpt_recipe(tmp_path / "hf", corpus))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(llama_family, "hf_source_state", convert)

    recipe = ckpt_recipe(tmp_path / "hf", corpus)
    source = family.source(recipe)
    from dbconvert.families.llama.convert import open_hf_checkpoint

    hf_cfg, hf_state, _ = open_hf_checkpoint(tmp_path / "hf")
    assert check_llama_function(hf_cfg, hf_state, source.shape, source.state, "ok") < 1e-5
    wrong_theta = recipe.model.model_copy(update={"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    with pytest.raises(CheckpointError, match="differs from transformers' layer"):
        check_llama_function(hf_cfg, hf_state, wrong_theta.shape(), source.state, "checkpoint")
