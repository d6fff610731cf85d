"""The per-step vocabulary work: model.target_dim (a narrower target space) and model.head_rank (a low-rank head)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dbconvert.checkpoint import load_weights
from dbconvert.config import load_recipe
from dbconvert.errors import RecipeError
from dbconvert.families import get_family
from dbconvert.rundir import Run
from dbconvert.source_ref import source_state
from dbconvert.families.llama.convert import (
    TARGETS_FILE,
    factor_head,
    full_head,
    normalised_table,
    target_basis,
    target_table,
)
from dbconvert.sampling import SampleRequest
from dbconvert.split import split
from dbconvert.train import train_block

from tests.families.llama_tiny import tiny_overrides, write_corpus


def anisotropic_embedding(rows: int = 500, seed: int = 0) -> torch.Tensor:
    """Rows whose variance is largest along coordinates 3, 0, 5 (in that order), plus a common offset.

    The centred columns are exactly orthogonal, so the sample covariance is diagonal and the principal
    directions are exactly those coordinate axes.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 12, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    scale = torch.full((12,), 0.1, dtype=torch.float64)
    scale[3], scale[0], scale[5] = 5.0, 3.0, 2.0
    return (q * scale * rows**0.5 + 7.0).to(torch.float32)


def test_full_width_target_table_is_the_normalised_embedding() -> None:
    embed = anisotropic_embedding()
    torch.testing.assert_close(target_table(embed, None), normalised_table(embed))
    torch.testing.assert_close(target_table(embed, 12), normalised_table(embed))


def test_narrow_target_table_keeps_the_top_principal_directions() -> None:
    embed = anisotropic_embedding()
    basis = target_basis(embed, 3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    assert basis.abs().argmax(1).tolist() == [3, 0, 5]  # largest variance first, the offset removed by centring
    assert bool((basis.gather(1, basis.abs().argmax(1, keepdim=True)) > 0).all())  # signs fixed
    shuffled = embed[torch.randperm(len(embed), generator=torch.Generator().manual_seed(1))]
    torch.testing.assert_close(target_basis(shuffled, 3), basis)  # the same basis whatever the row order
    table = target_table(embed, 3)
    assert table.shape == (500, 3)
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(500))
    centred = embed - embed.mean(0)
    torch.testing.assert_close(table, normalised_table(centred[:, [3, 0, 5]]), atol=1e-4, rtol=0)


def test_target_dim_wider_than_hidden_is_a_one_line_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="model.target_dim 64 is larger than model.hidden 32") as err:
        load_recipe("llama-tiny-shakespeare", tiny_overrides(write_corpus(tmp_path), **{"model.target_dim": 64}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"model.head_rank": 8, "model.head": "tied-table"}, "model.head_rank factorises a trainable head"),
        ({"model.head_rank": 32}, "model.head_rank 32 is not below model.hidden 32"),
    ],
)
def test_head_rank_errors_are_one_line(tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe("llama-tiny-shakespeare", tiny_overrides(write_corpus(tmp_path), **extra))
    assert "\n" not in str(err.value)


def test_head_factors_are_the_best_rank_r_approximation_and_multiply_back() -> None:
    weight = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
    factors = factor_head({"lm_head.weight": weight, "norm.weight": torch.ones(12)}, 4)
    assert set(factors) == {"lm_head.0.weight", "lm_head.1.weight", "norm.weight"}
    assert factors["lm_head.0.weight"].shape == (4, 12) and factors["lm_head.1.weight"].shape == (50, 4)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]  # Eckart-Young
    product = full_head(factors)
    assert set(product) == {"lm_head.weight", "norm.weight"}
    torch.testing.assert_close(product["lm_head.weight"].double(), best, atol=1e-4, rtol=1e-4)
    exact = full_head(factor_head({"lm_head.weight": weight}, 12))["lm_head.weight"]
    torch.testing.assert_close(exact, weight, atol=1e-4, rtol=1e-4)


def test_bench_table_has_the_target_width(tmp_path: Path) -> None:
    recipe = load_recipe("llama-tiny-shakespeare", tiny_overrides(write_corpus(tmp_path), **{"model.target_dim": 8}))
    assert tuple(get_family("llama").for_bench(recipe).table().shape) == (300, 8)


@pytest.mark.parametrize(
    "head",
    [{"model.head": "tied-table"}, {"model.head": "trainable"}, {"model.head": "trainable", "model.head_rank": 4}],
    ids=["tied", "trainable", "rank4"],
)
def test_split_train_and_sample_in_a_narrow_target_space(tmp_path: Path, head: dict) -> None:
    overrides = tiny_overrides(write_corpus(tmp_path), **{"model.target_dim": 8, "train.steps": 2, **head})
    run = split(load_recipe("llama-tiny-shakespeare", overrides), out=tmp_path / "run", make_current=False)
    table = load_weights(run.shared_dir / TARGETS_FILE)["table"]
    assert table.shape == (300, 8)
    family = run.family()
    source = family.source(run.recipe).network
    torch.testing.assert_close(table, target_table(source.embed_tokens.weight, 8))
    # the noisy input lifts a target row back along the embedding's principal directions
    lift = source.noisy_in.weight.detach() @ table.T  # (H, V)
    centred = source.embed_tokens.weight.detach() - source.embed_tokens.weight.detach().mean(0)
    cosine = torch.nn.functional.cosine_similarity(lift.T, centred, dim=-1)
    assert cosine.mean() > 0.3
    if head["model.head"] == "tied-table":
        torch.testing.assert_close(source.head_proj.weight.detach(), target_basis(source.embed_tokens.weight, 8))
    # at sigma_min a fresh denoiser returns the clean row: the likelihood term works in the narrow space too
    den = family.denoiser(run.recipe, source, run.noise()).eval()
    tokens = torch.tensor([[5, 9, 11, 200]])
    with torch.no_grad():
        d = torch.softmax(den(tokens, table[tokens], torch.full((1, 4), 0.002)), -1) @ den.table
    torch.testing.assert_close(d, table[tokens], atol=1e-4, rtol=1e-4)
    for block in run.blocks:
        train_block(run, block.index, progress=False)
    result = run.family().generate(
        run, SampleRequest(steps=4, num=2, options=run.family().sample_options(prompt="ROMEO:", max_new_tokens=3))
    )
    assert len(result.records) == 2 and all(r["prompt"] == "ROMEO:" for r in result.records)


def test_a_checkpoints_head_is_factorised_at_split_and_multiplied_back_at_export(in_tmp: Path) -> None:
    from transformers import LlamaForCausalLM

    from tests.cli_helpers import invoke
    from tests.families.test_llama_tokenizer import checkpoint_with_tokenizer

    checkpoint_with_tokenizer(in_tmp / "hf")
    original = LlamaForCausalLM.from_pretrained(in_tmp / "hf").eval()
    overrides = tiny_overrides(
        write_corpus(in_tmp), **{"model.checkpoint": str(in_tmp / "hf"), "model.head_rank": 8, "model.target_dim": 8}
    )
    result = invoke("split", "llama-tiny-shakespeare", *overrides, "--out", "run")
    assert result.exit_code == 0, result.output
    run = Run.open(in_tmp / "run")
    source = dict(source_state(run))  # by reference: the checkpoint read again, factorised as at split
    u, s, vh = torch.linalg.svd(original.lm_head.weight.detach().double(), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    torch.testing.assert_close(
        (source["lm_head.1.weight"] @ source["lm_head.0.weight"]).double(), best, atol=1e-4, rtol=1e-4
    )
    block = load_weights(run.model_dir(Run.block_name(0)) / "model.safetensors")
    assert torch.equal(block["lm_head.0.weight"], source["lm_head.0.weight"]) and "lm_head.weight" not in block
    result = invoke("export", "exported", "--run", "run")
    assert result.exit_code == 0, result.output
    exported = LlamaForCausalLM.from_pretrained(in_tmp / "exported").eval()
    tokens = torch.randint(0, 280, (2, 10), generator=torch.Generator().manual_seed(0))
    network = run.family().source(run.recipe).network.eval()
    with torch.no_grad():
        ours = network.forward_causal(tokens)
        torch.testing.assert_close(exported(tokens).logits, ours, atol=1e-5, rtol=1e-5)
        # the layers are the checkpoint's own: only the head differs, by its rank-8 approximation
        hidden = original.model(tokens).last_hidden_state
        torch.testing.assert_close(ours, (hidden.double() @ best.T).float(), atol=1e-4, rtol=1e-4)
