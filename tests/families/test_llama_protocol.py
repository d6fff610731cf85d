"""The later paper's text protocol (few-step): one step per block, greedy final token, AR top-p 0.95."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dbconvert.config import load_recipe
from dbconvert.families.llama.generate import Decoding, diffuse
from dbconvert.families.llama.protocol import cdf_steps, get_protocol
from dbconvert.noise import boundaries
from dbconvert.noise_process import owned_ranges, owner_of
from tests.cli_helpers import assert_user_error, invoke
from tests.families.llama_tiny import CORPUS, tiny_overrides
from tests.families.test_llama_objective import NOISE, denoiser


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 6])
def test_few_step_schedule_puts_one_step_in_each_block(blocks: int) -> None:
    owned = owned_ranges(boundaries(NOISE, blocks))
    ts = cdf_steps(blocks, NOISE)
    assert ts[0] == NOISE.sigma_max and ts[-1] == 0.0 and len(ts) == blocks + 1
    assert ts[-2] == (NOISE.sigma_min if blocks > 1 else NOISE.sigma_max)  # one step: at sigma_max, greedy
    assert [owner_of(t, owned) for t in ts[:-1]] == list(range(blocks))


def test_few_step_token_is_the_argmax_of_the_last_steps_logits() -> None:
    d = denoiser().eval()
    rows, seeds = [[3, 4, 5], [6, 7]], [11, 12]
    owned = owned_ranges(boundaries(NOISE, 2))
    dec = Decoding(max_new_tokens=1, context=32, eos=(), seed=0, steps=2, protocol="few-step")
    got, _ = diffuse([d, d], owned, rows, dec, seeds, torch.device("cpu"))
    ts = cdf_steps(2, NOISE)
    for row, seed, token in zip(rows, seeds, got):
        with torch.no_grad():  # by hand: one Euler step from sigma_max, then the greedy token at sigma_min
            cache, _ = d.net.extend(None, torch.tensor([row]), 0)
            eps = torch.randn(d.table.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            z = (ts[0] * eps).to(torch.float32)[None]
            z = z + (ts[1] - ts[0]) * (z - d.step(cache, z, ts[0], len(row))) / ts[0]
            assert token == [int(d.step_logits(cache, z, ts[1], len(row)).argmax(-1))]
    default, _ = diffuse(
        [d, d], owned, rows, Decoding(max_new_tokens=3, context=32, eos=(), seed=0, steps=2), seeds, torch.device("cpu")
    )
    assert len(default[0]) == 3  # the default protocol still decodes (nearest row to the final z)


@pytest.mark.parametrize("protocol,steps", [("few-step", 2), ("default", 5)])
def test_fused_decoding_writes_what_a_separate_extend_writes_with_one_forward_per_block_and_token(
    protocol: str, steps: int
) -> None:
    """`diffuse(fuse=True)` (the default) enters the new clean token in the same forward as the next noisy query;
    the text is the same as with a separate `extend` forward, and at one step per block each block runs once per
    token (the calls counted are the forwards run: fused, no extend forward is added)."""
    d = denoiser().eval()
    rows, seeds = [[3, 4, 5], [6, 7], [8]], [11, 12, 13]
    owned = owned_ranges(boundaries(NOISE, 2))
    dec = Decoding(max_new_tokens=6, context=32, eos=(), seed=0, steps=steps, protocol=protocol)
    forwards = []
    run_layers = d.net.run_layers
    d.net.run_layers = lambda *a, **k: forwards.append(1) or run_layers(*a, **k)  # count the network's forwards
    rows_modulated: list[int] = []  # one sigma per step: the modulation runs on one row and is broadcast
    d.net.layers[0].adaLN_modulation.register_forward_pre_hook(lambda _m, a: rows_modulated.append(a[0].shape[0]))
    fused_calls, split_calls = [0, 0], [0, 0]
    fused, _ = diffuse([d, d], owned, rows, dec, seeds, torch.device("cpu"), fused_calls)
    fused_forwards = len(forwards)
    apart, _ = diffuse([d, d], owned, rows, dec, seeds, torch.device("cpu"), split_calls, fuse=False)
    assert fused == apart and all(len(r) == 6 for r in fused)
    assert fused_calls == split_calls and fused_forwards == sum(fused_calls)  # no extend forward of its own
    assert len(forwards) - fused_forwards == sum(split_calls) + 2 * 6  # apart: one extend per block and token
    assert rows_modulated and set(rows_modulated) == {1}
    if protocol == "few-step":
        assert fused_calls == [6, 6]  # one forward per block per token


def test_sample_and_eval_take_the_protocol_by_name_or_from_the_recipe(in_tmp: Path) -> None:
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    assert (
        invoke("split", "llama-tiny-shakespeare", *tiny_overrides(corpus), "--blocks", "2", "--out", "run").exit_code
        == 0
    )
    for i in (0, 1):
        assert invoke("train-block", str(i), "--steps", "1", "-q").exit_code == 0
    res = invoke("sample", "--protocol", "few-step", "--prompt", "ROMEO:", "--max-new-tokens", "5", "--num", "2", "-q")
    assert res.exit_code == 0, res.output
    folder = in_tmp / "run" / "samples" / "blocks-few-step-euler-2steps-seed0"  # steps = B = 2
    assert len((folder / "samples.jsonl").read_text().splitlines()) == 2

    from dbconvert.families import get_family
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest

    run = Run.open(in_tmp / "run")
    family = get_family("llama")
    result = family.generate(
        run, SampleRequest(num=1, options=family.sample_options(prompt="ROMEO:", max_new_tokens=4, protocol="few-step"))
    )
    tokens = sum(r["new_tokens"] for r in result.records)
    assert result.calls == [tokens, tokens]  # one forward of each block per token
    assert result.sampler["protocol"] == "few-step" and "greedy final token" in result.sampler["name"]

    # the recipe's sample.protocol is the default; eval mauve records it
    assert invoke("train-e2e", "--objective", "ar", "--steps", "1", "-q").exit_code == 0
    res = invoke(
        "eval",
        "mauve",
        "--model",
        "ar",
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "4",
        "--num-prompts",
        "3",
        "--samples-per-prompt",
        "1",
        "--featurizer",
        "minilm",
        "--seeds",
        "1",
        "--protocol",
        "few-step",
        "--json",
    )
    assert res.exit_code == 0, res.output
    sampler = json.loads(res.stdout.strip().splitlines()[-1])["sampler"]
    assert sampler["protocol"] == "few-step" and sampler["top_p"] == 0.95  # the paper's AR baseline nucleus
    assert_user_error(invoke("sample", "--protocol", "many-step", "-q"), "--protocol must be one of default, few-step")


def test_recipes_say_which_protocol_they_use() -> None:
    assert load_recipe("llama-tiny-shakespeare").sample.protocol == "default"
    assert load_recipe("llama-lm1b").sample.protocol == "few-step"
    assert get_protocol(None).name == "default"


def test_openwebtext_recipe_is_the_papers_setting_and_refused_offline_in_one_line(in_tmp: Path) -> None:
    from dbconvert.tokenizer import train_bpe

    recipe = load_recipe("llama-openwebtext")
    assert (recipe.model.context, recipe.data.kind, recipe.data.source) == (1024, "hub", "Skylion007/openwebtext")
    assert recipe.sample.protocol == "few-step"
    bpe = train_bpe(
        [CORPUS], 300, in_tmp / "bpe.json"
    )  # the network shrunk to a CPU second; the data set is the recipe's
    small = [
        "model.layers=2",
        "model.hidden=32",
        "model.heads=4",
        "model.kv_heads=2",
        "model.intermediate=48",
        "model.vocab_size=300",
        "model.context=16",
        f"model.tokenizer={bpe}",
        "model.adaln_rank=4",
        "model.target_dim=16",
        "blocks.num=2",
    ]
    res = invoke("split", "llama-openwebtext", *small, "--out", "run")
    assert res.exit_code == 0, res.output
    assert_user_error(
        invoke("train-block", "0", "--steps", "1", "-q"),
        "text data set 'Skylion007/openwebtext' could not be loaded from the Hugging Face hub (offline",
    )
