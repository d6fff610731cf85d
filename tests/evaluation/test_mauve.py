"""MAUVE: parity with mauve.compute_mauve, the featurisers, the CLI on a tiny Llama run, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.families.test_llama import CORPUS, tiny_overrides
from tests.cli_helpers import assert_user_error, invoke


def test_wrapper_equals_compute_mauve_on_same_features() -> None:
    import mauve

    from dbconvert.evaluation.mauve import mauve_scores

    rng = np.random.default_rng(0)
    p = rng.normal(size=(60, 16)).astype(np.float32)
    q = (rng.normal(size=(80, 16)) + 0.3).astype(np.float32)
    ours = mauve_scores(p, q, [25, 26])
    direct = [mauve.compute_mauve(p_features=p, q_features=q, seed=s).mauve for s in (25, 26)]
    assert ours == pytest.approx(direct, abs=1e-12)
    assert 0.0 < ours[0] < 1.0
    assert mauve_scores(p, p, [25])[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "context,given,expected",
    [
        (256, (None, None), (50, 50)),  # SEDD's protocol when it fits
        (64, (None, None), (32, 32)),  # the tiny recipe: half the context each
        (16, (10, None), (10, 6)),  # one length given: the other takes what the context leaves
        (16, (None, 4), (12, 4)),
        (64, (20, 30), (20, 30)),  # both given: used as they are
    ],
)
def test_protocol_lengths_fit_the_context(context: int, given: tuple, expected: tuple) -> None:
    from dbconvert.evaluation.mauve import protocol_lengths

    said: list[str] = []
    assert protocol_lengths(context, *given, said.append) == expected
    assert bool(said) == (expected != (50, 50) and None in given)  # a default that is not 50 + 50 is announced
    if said:
        assert f"model.context = {context}" in said[0] and "--prompt-tokens" in said[0]


@pytest.mark.parametrize("given", [(16, None), (10, 10), (None, 20)])
def test_protocol_lengths_that_do_not_fit_are_refused_before_any_announcement(given: tuple) -> None:
    from dbconvert.errors import DataError
    from dbconvert.evaluation.mauve import protocol_lengths

    said: list[str] = []
    with pytest.raises(DataError, match="text too short for the protocol: sequences are model.context = 16"):
        protocol_lengths(16, *given, said.append)  # (16, None): no room left for a continuation
    assert said == []


def test_minilm_featurizer_offline() -> None:
    import torch

    from dbconvert.evaluation.mauve import resolve_featurizer

    feat = resolve_featurizer("minilm", torch.device("cpu"))
    x = feat.encode(["ROMEO: But soft, what light", "", "a plague on both your houses"])
    assert x.shape == (3, 384) and np.isfinite(x).all()
    assert "minilm" in feat.name and feat.info["pooling"] == "mean"
    assert np.allclose(feat.encode(["ROMEO: But soft, what light"]), x[:1], atol=1e-5)


@pytest.fixture
def llama_run(in_tmp: Path) -> Path:
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    res = invoke("split", "llama-tiny-shakespeare", *tiny_overrides(corpus), "--blocks", "2", "--out", "run")
    assert res.exit_code == 0, res.output
    return in_tmp / "run"


def test_cli_mauve_blocks_and_e2e(llama_run: Path) -> None:
    args = (
        "eval",
        "mauve",
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "4",
        "--num-prompts",
        "4",
        "--samples-per-prompt",
        "2",
        "--featurizer",
        "minilm",
        "--seeds",
        "2",
        "--steps",
        "2",
        "-q",
    )
    assert_user_error(invoke(*args), "untrained blocks")
    for i in (0, 1):
        assert invoke("train-block", str(i), "--steps", "1", "-q").exit_code == 0
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    saved = json.loads(Path(out["file"]).read_text())
    assert saved["metric"] == "mauve" and saved["model"] == "blocks" and saved["split"] == "val"
    assert saved["reference_overlaps_training"] is False
    assert_user_error(invoke(*args, "--split", "test"), "local text has the splits train and val")  # not the train rows
    assert saved["num_samples"] == 8 and saved["num_prompts"] == 4 and len(saved["values"]) == 2
    assert all(0.0 <= v <= 1.0 for v in saved["values"]) and saved["mean"] == pytest.approx(np.mean(saved["values"]))
    assert saved["features"].startswith("minilm") and saved["sampler"]["steps"] == 2
    gens = (Path(saved["samples"][0]) / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 8 and {"prompt", "truth", "generation"} <= set(json.loads(gens[0]))

    # the e2e baseline is the same denoiser, sampled by the same diffusion sampler; ar is the AR reference
    assert_user_error(invoke(*args[:-1], "--model", "ar"), "train-e2e --objective ar")
    assert invoke("train-e2e", "--steps", "1", "-q").exit_code == 0
    assert invoke("train-e2e", "--objective", "ar", "--steps", "1", "-q").exit_code == 0
    res = invoke(*args[:-1], "--model", "e2e", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["sampler"]["solver"] == "euler"
    res = invoke(*args[:-1], "--model", "ar", "--json")
    assert res.exit_code == 0, res.output
    sampler = json.loads(res.stdout.strip().splitlines()[-1])["sampler"]
    assert sampler["solver"] == "ancestral" and sampler["temperature"] == 1.0
    table = invoke("eval", "compare")
    assert table.exit_code == 0 and "MAUVE with features minilm" in table.stdout
    assert all(m in table.stdout for m in ("blocks", "e2e", "ar"))

    # without lengths, a 16-token context gets 8-token prompts and continuations (SEDD's 50 + 50 do not fit)
    res = invoke(
        "eval",
        "mauve",
        "--num-prompts",
        "2",
        "--samples-per-prompt",
        "1",
        "--featurizer",
        "minilm",
        "--seeds",
        "1",
        "--steps",
        "2",
    )
    assert res.exit_code == 0, res.output
    assert "8-token prompts, 8-token continuations (model.context = 16" in res.stderr
    newest = max((llama_run / "eval").glob("*.json"), key=lambda f: f.stat().st_mtime_ns)
    saved = json.loads(newest.read_text())
    assert (saved["prompt_tokens"], saved["new_tokens"], saved["num_prompts"]) == (8, 8, 2)

    # bad input
    assert_user_error(
        invoke(*args[:2], "--prompt-tokens", "10", "--new-tokens", "10", "-q"), "too short for the protocol"
    )
    assert_user_error(invoke(*args, "--num-prompts", "100000"), "too short for the protocol")
    assert_user_error(invoke(*args, "--featurizer", "no-such-featurizer"), "--featurizer must be")
    offline = invoke(*args, "--featurizer", "gpt2-large")
    assert_user_error(offline, "could not be loaded")
    assert_user_error(
        invoke("eval", "fid", "--num", "70", "-q"), "eval fid does not apply to this llama run; use eval mauve"
    )
    assert_user_error(invoke("sample", "--guidance", "2", "-q"), "--guidance does not apply to a llama run")
    assert_user_error(invoke("sample", "--class", "2", "-q"), "--class does not apply to a llama run")


def test_cli_mauve_of_a_masked_run_samples_by_unmasking(in_tmp: Path) -> None:
    """Issue 34: every masked run failed with "drop --solver" though no --solver was given (the recipe's was passed)."""
    from tests.families.llama_tiny import write_corpus
    from tests.families.test_llama_masked import masked_overrides

    overrides = masked_overrides(write_corpus(in_tmp), **{"model.layers": 2, "blocks.num": 2, "train.steps": 1})
    assert invoke("split", "md4-tiny-shakespeare", *overrides, "--out", "md4").exit_code == 0
    for i in (0, 1):
        assert invoke("train-block", str(i), "-q").exit_code == 0
    args = (
        "eval",
        "mauve",
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
        "-q",
    )
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    saved = json.loads(res.stdout.strip().splitlines()[-1])
    assert saved["sampler"]["solver"] == "unmask" and saved["sampler"]["name"].startswith("ancestral unmasking")
    assert_user_error(invoke(*args, "--solver", "heun"), "--solver does not apply to the blocks of a masked-diffusion")
