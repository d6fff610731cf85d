"""The cached sampling path computes the training forward's function (DESIGN 5), for real trained blocks.

Training runs every noisy query against the whole [clean ; noisy] sequence under the block-diffusion
mask; sampling caches the clean prefix (`net.extend`) and runs one noisy query at a time
(`net.noisy_hidden` / `LlamaDenoiser.step`). They agree only if clean positions carry no sigma
modulation at all, so every parameter is made non-zero here (the zero-initialised adaLN weights
AND biases included, and the attention / MLP biases the recipe switches on), then each block takes
a few real optimizer steps, and the two paths are compared at several positions and prompt
lengths, in batches of equal rows and of left-padded rows of different lengths.
"""

from __future__ import annotations


import pytest
import torch

from dbconvert import noise as nz
from dbconvert.checkpoint import load_strict, load_weights, save_weights
from dbconvert.config import load_recipe
from dbconvert.rundir import Run
from dbconvert.split import split
from dbconvert.train import train_block

from tests.families.llama_tiny import tiny_overrides, write_corpus

TOL = {"atol": 1e-5, "rtol": 1e-5}
POSITIONS = (0, 1, 5, 14)


NARROW = {"model.target_dim": 8, "model.head": "tied-table"}
"""A target space narrower than the hidden state, with the head projected onto it (the fast-sampling setting)."""


LOW_RANK = {"model.target_dim": 8, "model.head_rank": 4}
"""A narrower target space and a trainable low-rank head."""


@pytest.fixture(
    scope="module",
    params=[{}, NARROW, LOW_RANK],
    ids=["hidden-width-targets", "narrow-targets-tied-head", "narrow-targets-rank-4-head"],
)
def trained_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Run:
    """B = 2, biases everywhere, every split weight perturbed, then 3 optimizer steps per block."""
    folder = tmp_path_factory.mktemp("parity")
    recipe = load_recipe(
        "llama-tiny-shakespeare",
        tiny_overrides(
            write_corpus(folder),
            **{
                "model.attention_bias": "true",
                "model.mlp_bias": "true",
                "train.steps": 3,
                "train.lr": "1e-3",
                "train.checkpoint_every": 3,
                **request.param,
            },
        ),
    )
    run = split(recipe, out=folder / "run", make_current=False)
    gen = torch.Generator().manual_seed(0)
    for block in run.blocks:
        folder_ = run.model_dir(Run.block_name(block.index))
        state = load_weights(folder_ / "init.safetensors")
        noisy = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        assert all(bool((v != 0).all()) for v in noisy.values())
        for name in ("init", "model"):
            (folder_ / f"{name}.safetensors").unlink()
            save_weights(folder_ / f"{name}.safetensors", noisy)
        train_block(run, block.index, progress=False)
    return run


def trained_denoiser(run: Run, index: int) -> torch.nn.Module:
    family = run.family()
    net = family.block_network(run.recipe, run.blocks[index].layers[1] - run.blocks[index].layers[0])
    path = run.model_dir(Run.block_name(index)) / "model.safetensors"
    load_strict(net, load_weights(path), str(path))
    return family.denoiser(run.recipe, net, run.noise()).eval()


def block_under_test(run: Run, index: int, seed: int) -> tuple[torch.nn.Module, float, float, torch.Generator]:
    """Block `index`'s trained denoiser, its training sigma range and a generator seeded for this test."""
    lo, hi = run.blocks[index].train_range
    return trained_denoiser(run, index), lo, hi, torch.Generator().manual_seed(seed)


def training_logits(
    net: torch.nn.Module, tokens: torch.Tensor, noisy: torch.Tensor, c_noise: torch.Tensor
) -> torch.Tensor:
    """Head logits at the noisy positions of the training forward over [clean tokens ; noisy inputs]."""
    return net.head(net.hidden_train(tokens, noisy, c_noise))


def cached_logits(
    net: torch.nn.Module,
    cache: list | None,
    noisy: torch.Tensor,
    c_noise: torch.Tensor,
    position: int,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head logits of one noisy query through the sampler's cached path."""
    return net.head(net.noisy_hidden(cache, noisy, c_noise, position, pad))


def test_the_blocks_under_test_have_every_parameter_non_zero_and_trained(trained_run: Run) -> None:
    for block in trained_run.blocks:
        name = Run.block_name(block.index)
        den = trained_denoiser(trained_run, block.index)
        params = dict(den.net.named_parameters())
        assert den.table.shape[1] == (trained_run.recipe.model.target_dim or trained_run.recipe.model.hidden)
        assert any(".self_attn.q_proj.bias" in k for k in params) and any(".mlp.down_proj.bias" in k for k in params)
        assert all(bool((p != 0).all()) for p in params.values())
        assert all(bool(params[k].abs().min() > 0) for k in params if "adaLN_modulation.1" in k)
        assert trained_run.status(name).step == 3
        init = load_weights(trained_run.model_dir(name) / "init.safetensors")
        assert all(not torch.equal(init[k], p.detach()) for k, p in params.items() if p.requires_grad)


@pytest.mark.parametrize("index", [0, 1])
def test_cached_noisy_steps_equal_the_training_forward(trained_run: Run, index: int) -> None:
    den, lo, hi, gen = block_under_test(trained_run, index, 10 + index)
    net, sd = den.net, den.noise.sigma_data
    b, t, h = 2, 16, den.table.shape[1]
    tokens = torch.randint(0, den.table.shape[0], (b, t), generator=gen)
    z = torch.randn(b, t, h, generator=gen)
    sigma = lo * (hi / lo) ** torch.rand(b, t, generator=gen)  # a different sigma at every position
    with torch.no_grad():
        head = training_logits(net, tokens, nz.c_in(sigma[..., None], sd) * z, nz.c_noise(sigma))
        logits = den(tokens, z, sigma)
        for j in POSITIONS:
            cache = None
            for a, e in ((0, j // 2), (j // 2, j)):  # the prefix in two pieces, as sampling extends it
                if e > a:
                    cache, _ = net.extend(cache, tokens[:, a:e], a)
            s = sigma[:, j : j + 1]
            cached = cached_logits(net, cache, (nz.c_in(s, sd) * z[:, j])[:, None], nz.c_noise(s), j)
            torch.testing.assert_close(cached, head[:, j], **TOL)
            one = float(sigma[0, j])  # `step` takes one sigma for the batch: D of row 0 at that sigma
            step = den.step(cache, z[:, j], one, j)
            want = torch.softmax(den(tokens, z, torch.full_like(sigma, one))[:, j], -1) @ den.table
            torch.testing.assert_close(step, want, **TOL)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("index", [0, 1])
def test_left_padded_rows_of_different_lengths_equal_each_row_alone(trained_run: Run, index: int) -> None:
    den, lo, hi, gen = block_under_test(trained_run, index, 20 + index)
    net, sd = den.net, den.noise.sigma_data
    vocab, h = den.table.shape
    lengths = [9, 3, 6, 1]  # prompt lengths of the rows; the batch is left-padded to the longest
    width = max(lengths)
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    pad = torch.tensor([width - n for n in lengths])
    batch = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    z = torch.randn(len(lengths), h, generator=gen)
    sigma = lo * (hi / lo) ** torch.rand(len(lengths), 1, generator=gen)
    with torch.no_grad():
        cache, _ = net.extend(None, batch[:, :4], 0, pad=pad)
        cache, _ = net.extend(cache, batch[:, 4:], 4, pad=pad)
        cached = cached_logits(net, cache, (nz.c_in(sigma, sd) * z)[:, None], nz.c_noise(sigma), width, pad=pad)
        for r, prompt in enumerate(prompts):
            n = len(prompt)
            tokens = torch.cat([prompt, torch.zeros(1, dtype=torch.long)])[None]  # the token at n is never seen
            zs = torch.zeros(1, n + 1, h)
            zs[0, n] = z[r]
            sig = torch.full((1, n + 1), float(sigma[r, 0]))
            alone = training_logits(net, tokens, nz.c_in(sig[..., None], sd) * zs, nz.c_noise(sig))[0, n]
            torch.testing.assert_close(cached[r], alone, **TOL)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("padded", [False, True], ids=["equal-rows", "left-padded"])
def test_fused_extend_and_query_equals_extend_then_query(trained_run: Run, index: int, padded: bool) -> None:
    """One forward of [new clean tokens ; next noisy query] computes what `extend` then `noisy_hidden` compute:
    the same hidden state of the query and the same cache (decoding speed relies on it, `bench speed`)."""
    den, lo, hi, gen = block_under_test(trained_run, index, 30 + index)
    net, sd = den.net, den.noise.sigma_data
    vocab, h = den.table.shape
    b, width = 3, 9
    batch = torch.randint(0, vocab, (b, width), generator=gen)
    pad = torch.tensor([0, 4, 7]) if padded else None
    z = torch.randn(b, h, generator=gen)
    sigma = lo * (hi / lo) ** torch.rand(b, 1, generator=gen)
    noisy, c_noise = (nz.c_in(sigma, sd) * z)[:, None], nz.c_noise(sigma)
    with torch.no_grad():
        for cut in (0, 5):  # the whole prompt in the fused forward, or a cached part plus 4 new tokens
            cache = net.extend(None, batch[:, :cut], 0, pad)[0] if cut else None
            two, _ = net.extend(cache, batch[:, cut:], cut, pad)
            want = net.noisy_hidden(two, noisy, c_noise, width, pad)
            fused, got = net.extend_and_query(cache, batch[:, cut:], noisy, c_noise, pad)
            torch.testing.assert_close(got, want, **TOL)
            for (fk, fv), (tk, tv) in zip(fused, two):
                torch.testing.assert_close(fk, tk, **TOL)
                torch.testing.assert_close(fv, tv, **TOL)
