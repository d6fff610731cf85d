"""Llama objective and generation: loss weights, the tied/fused head, chunked CE, frozen embedding, batched decoding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError
from dbconvert.families import get_family
from dbconvert.families.llama.convert import normalised_table
from dbconvert.families.llama.generate import Decoding, ancestral, diffuse, filter_logits
from dbconvert.families.llama.model import LlamaBlockNet, LlamaShape
from dbconvert.families.llama.objective import (
    BUCKETS,
    LlamaDenoiser,
    diffusion_loss,
    loss_weights,
    sigma_bucket,
    token_ce,
)
from dbconvert.noise import NoiseSettings, sample_sigmas, truncated_quantile
from dbconvert.split import split
from dbconvert.train import train_block, train_e2e
from dbconvert.trainstep import build_state
from tests.families.test_llama import CORPUS, tiny_overrides

NOISE = NoiseSettings(0.002, 80.0, 0.5, -1.2, 1.2)


def shape(**kw: object) -> LlamaShape:
    base = dict(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        max_positions=32,
    )
    base.update(kw)
    return LlamaShape(**base)  # type: ignore[arg-type]


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net


def denoiser(**kw: object) -> LlamaDenoiser:
    torch.manual_seed(0)
    s = shape(**kw)
    table = normalised_table(torch.randn(s.vocab_size, s.target_size))
    return LlamaDenoiser(randomised(LlamaBlockNet(s)), table, NOISE)


@pytest.mark.parametrize("kind", ["lambda", "uniform", "network-share"])
@pytest.mark.parametrize("sigma_range", [(0.002, 0.2), (0.42, 80.0), (0.002, 80.0)])
def test_loss_weights_average_one_over_the_blocks_training_distribution(kind: str, sigma_range: tuple) -> None:
    sigma = sample_sigmas(200_000, *sigma_range, NOISE, torch.Generator().manual_seed(0)).double()
    assert loss_weights(sigma, sigma_range, NOISE, kind).mean().item() == pytest.approx(1.0, rel=0.03)


def test_network_share_weight_grows_with_noise_and_lambda_falls() -> None:
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0])
    share = loss_weights(sigma, (0.002, 80.0), NOISE, "network-share")
    lam = loss_weights(sigma, (0.002, 80.0), NOISE, "lambda")
    assert bool((share[1:] > share[:-1]).all()) and bool((lam[1:] < lam[:-1]).all())
    assert torch.allclose(loss_weights(sigma, (0.002, 80.0), NOISE, "uniform"), torch.ones(4))


def test_sigma_buckets_split_the_training_distribution_in_equal_probability() -> None:
    rng = (0.05, 3.0)
    sigma = sample_sigmas(40_000, *rng, NOISE, torch.Generator().manual_seed(1))
    counts = torch.bincount(sigma_bucket(sigma, rng, NOISE), minlength=BUCKETS).float() / len(sigma)
    assert torch.allclose(counts, torch.full((BUCKETS,), 1 / BUCKETS), atol=0.01)
    mids = truncated_quantile((torch.arange(BUCKETS) + 0.5) / BUCKETS, *rng, NOISE)
    assert sigma_bucket(mids, rng, NOISE).tolist() == list(range(BUCKETS))


def test_tied_table_head_is_the_table_times_a_scale_fused_with_the_likelihood() -> None:
    d = denoiser(head="tied-table")
    assert not hasattr(d.net, "lm_head") and d.net.head_scale.shape == ()
    hn, z = torch.randn(3, 16), torch.randn(3, 16)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    expected = d.net.head_scale * hn @ d.table.T + d.likelihood(z, sigma)
    torch.testing.assert_close(d.logits(hn, z, sigma), expected, atol=1e-4, rtol=1e-4)


def test_narrow_targets_project_the_tied_head_and_fuse_it_with_the_likelihood() -> None:
    d = denoiser(head="tied-table", target_dim=6)
    assert d.table.shape == (40, 6) and d.net.noisy_in.in_features == 6
    assert not hasattr(d.net, "head_scale") and d.net.head_proj.weight.shape == (6, 16)
    hn, z = torch.randn(3, 16), torch.randn(3, 6)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    expected = (hn @ d.net.head_proj.weight.T) @ d.table.T + d.likelihood(z, sigma)
    torch.testing.assert_close(d.logits(hn, z, sigma), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.net.head(hn), (hn @ d.net.head_proj.weight.T) @ d.table.T)


@pytest.mark.parametrize("head,target_dim", [("trainable", None), ("tied-table", None), ("tied-table", 6)])
def test_head_gain_scales_the_head_logits_and_not_the_likelihood(head: str, target_dim: int | None) -> None:
    """`head_gain` (a converted block's calibrated start, undone in training) is a temperature on the head only."""
    d = denoiser(head=head, target_dim=target_dim)
    hn, z = torch.randn(3, 16), torch.randn(3, d.table.shape[1])
    sigma = torch.tensor([0.05, 1.0, 30.0])
    head, full = d.net.head(hn), d.logits(hn, z, sigma)
    d.net.head_gain.fill_(0.25)
    torch.testing.assert_close(d.net.head(hn), 0.25 * head)
    torch.testing.assert_close(d.logits(hn, z, sigma), full - 0.75 * head.float(), atol=1e-4, rtol=1e-4)
    assert "head_gain" not in str(list(d.net.state_dict()))  # not a weight: never saved


@pytest.mark.parametrize(
    "head,target_dim", [("trainable", None), ("tied-table", None), ("tied-table", 6), ("trainable", 6)]
)
def test_chunked_cross_entropy_equals_the_whole_vocabulary_pass_values_and_gradients(
    head: str, target_dim: int | None
) -> None:
    d = denoiser(head=head, target_dim=target_dim)
    width = d.table.shape[1]
    tokens = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(2))
    sigma = torch.rand(2, 5, generator=torch.Generator().manual_seed(3)) * 2 + 0.01
    z = d.table[tokens] + sigma[..., None] * torch.randn(2, 5, width, generator=torch.Generator().manual_seed(4))
    grads = []
    for chunk in (0, 3):
        d.zero_grad()
        ce, hit = token_ce(d, d.hidden(tokens, z, sigma), z, sigma, tokens, chunk)
        ce.sum().backward()
        grads.append([p.grad.clone() for p in d.parameters() if p.grad is not None])
        if chunk == 0:
            ref = (ce.detach(), hit)
            logits = d(tokens, z, sigma)
            torch.testing.assert_close(
                ce.detach(),
                F.cross_entropy(logits.reshape(10, -1), tokens.reshape(-1), reduction="none").view(2, 5).detach(),
            )
    torch.testing.assert_close(ce.detach(), ref[0])
    assert torch.equal(hit, ref[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_diffusion_loss_logs_ce_per_bucket_and_rejects_unknown_weightings() -> None:
    d = denoiser()
    tokens = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(5))
    loss, stats = diffusion_loss(d, tokens, (0.002, 80.0), torch.Generator().manual_seed(0), weighting="uniform")
    assert math.isfinite(loss.item()) and {"ce", "ce_q0", "ce_q3", "accuracy"} <= set(stats)
    assert loss.item() == pytest.approx(stats["ce"], rel=1e-5)  # uniform weights: the loss is the plain CE
    with pytest.raises(ValueError, match="unknown loss weighting"):
        diffusion_loss(d, tokens, (0.002, 80.0), torch.Generator(), weighting="snr")


def test_filter_logits_keeps_the_smallest_set_reaching_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, 1.0, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(logits, 1.0, 0.1).isfinite().sum() == 1  # the most likely token always stays
    torch.testing.assert_close(filter_logits(logits, 2.0, 1.0), logits / 2)


def test_batched_decoding_of_prompts_of_different_lengths_matches_one_row_at_a_time() -> None:
    d = denoiser().eval()
    rows = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    seeds = [11, 12, 13]
    dec = Decoding(max_new_tokens=4, context=32, eos=(), seed=0, steps=6)
    owned = [(0.002, 80.0)]
    together, _ = diffuse([d], owned, rows, dec, seeds, torch.device("cpu"))
    alone = [diffuse([d], owned, [r], dec, [s], torch.device("cpu"))[0][0] for r, s in zip(rows, seeds)]
    assert together == alone and all(len(r) == 4 for r in together)
    net = d.net
    together, _ = ancestral(net, rows, dec, seeds, torch.device("cpu"))
    alone = [ancestral(net, [r], dec, [s], torch.device("cpu"))[0][0] for r, s in zip(rows, seeds)]
    assert together == alone


def test_decoding_stops_at_eos_and_the_context() -> None:
    d = denoiser().eval()
    dec = Decoding(max_new_tokens=10, context=8, eos=(), seed=0, temperature=0.0)
    new, why = ancestral(d.net, [[1, 2, 3, 4, 5]], dec, [0], torch.device("cpu"))
    assert len(new[0]) == 3 and why == ["context"]
    first = new[0][0]
    dec = Decoding(max_new_tokens=10, context=32, eos=(first,), seed=0, temperature=0.0)
    new, why = ancestral(d.net, [[1, 2, 3, 4, 5]], dec, [0], torch.device("cpu"))
    assert new[0] == [] and why == ["eos"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_memory_options_train_sample_and_keep_the_frozen_embedding(in_tmp: Path, corpus: Path) -> None:
    opts = {
        "model.head": "tied-table",
        "model.freeze_embedding": "true",
        "model.adaln_rank": 4,
        "model.loss_chunk": 16,
        "train.val_every": 2,
    }
    run = split(load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **opts)), out=in_tmp / "run")
    family = run.family()
    state = build_state(family, run.recipe, 2, run.noise(), torch.device("cpu"))
    assert not state.network.embed_tokens.weight.requires_grad
    assert state.ema.embed_tokens.weight.data_ptr() == state.network.embed_tokens.weight.data_ptr()
    assert all(p.requires_grad for p in state.trainable) and len(state.trainable) < len(
        list(state.network.parameters())
    )
    init = run.model_dir("block-00") / "model.safetensors"
    from dbconvert.checkpoint import load_weights

    before = load_weights(init)["embed_tokens.weight"].clone()
    assert "lm_head.weight" not in load_weights(init) and "head_scale" in load_weights(init)
    for i in range(run.num_blocks):
        train_block(run, i, progress=False)
    after = load_weights(run.model_dir("block-00") / "model.safetensors")
    assert torch.equal(after["embed_tokens.weight"], before)  # frozen: not trained
    record = json.loads(run.metrics_path("block-00").read_text().splitlines()[-1])
    assert {"val_ce", "val_ce_top", "val_context_tv", "ce_q0"} <= set(record)
    from dbconvert.sampling import SampleRequest

    result = family.generate(
        run, SampleRequest(steps=4, num=2, options=family.sample_options(prompt="ROMEO:", max_new_tokens=3))
    )
    assert len(result.records) == 2 and result.sampler["steps"] == 4
    train_e2e(run, objective="ar", progress=False)
    ar = json.loads(run.metrics_path("ar").read_text().splitlines()[-1])
    assert "val_ce" in ar and "val_ce_top" not in ar
    result = family.generate(
        run, SampleRequest(model="ar", options=family.sample_options(prompt="ROMEO:", max_new_tokens=3))
    )
    assert result.sampler["solver"] == "ancestral"


def test_dit_rejects_text_loss_weights(tiny_run) -> None:  # noqa: ANN001
    with pytest.raises(DbconvertError, match="text-family option"):
        train_block(tiny_run, 0, overrides=["train.loss_weight=uniform"], progress=False)
    assert get_family("dit").default_metric(tiny_run.recipe) == "fid"


def test_model_kinds_are_one_line_errors_where_a_family_has_no_such_model(tiny_run) -> None:  # noqa: ANN001
    from tests.cli_helpers import assert_user_error, invoke

    assert_user_error(invoke("sample", "--model", "ar", "--run", str(tiny_run.root)), "--model must be one of")
    assert_user_error(
        invoke("train-e2e", "--objective", "ar", "--run", str(tiny_run.root)),
        "--objective ar: a dit run has no plain reference to train",
    )
    assert_user_error(
        invoke("train-e2e", "--objective", "mse", "--run", str(tiny_run.root)), "--objective mse: a dit run has no"
    )


def test_anchored_noisy_input_keeps_the_converted_source_exact_and_trains(in_tmp: Path, corpus: Path) -> None:
    run = split(
        load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.noisy_anchor": "true"})),
        out=in_tmp / "run",
    )
    from dbconvert.checkpoint import load_weights

    block = load_weights(run.model_dir("block-00") / "model.safetensors")
    assert block["noisy_in.bias"].norm() > 0 and block["noisy_in.weight"].abs().max() > 0
    assert train_block(run, 0, progress=False).step == 4
