"""train.activation_checkpointing: every layer recomputed in backward, through the family contract's `layers`.

Gradients equal those without it (every family, both Llama objectives), eval / no-grad paths and the saved
weights are untouched, training resumes exactly with it on, and the recipe schema takes it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dbconvert import families
from dbconvert.checkpoint import load_weights
from dbconvert.config import load_recipe
from dbconvert.errors import RecipeError
from dbconvert.families import get_family
from dbconvert.rundir import Run
from dbconvert.train import train_block, train_e2e
from dbconvert.trainstep import build_state, checkpointed_forward

from tests.conftest import TINY_OVERRIDES
from tests.families.llama_tiny import tiny_overrides, write_corpus

TOY = "tests.families.toy_family"


@pytest.fixture
def toy() -> Iterator[None]:
    families.register("toy", f"{TOY}:ToyFamily", f"{TOY}:ToyConfig")
    yield
    families.unregister("toy")


def _recipes(name: str, tmp_path: Path):  # noqa: ANN202
    if name == "dit":
        return lambda *o: load_recipe("dit-tiny-digits", [*TINY_OVERRIDES, "model.input_size=16", *o])
    if name == "vit":
        return lambda *o: load_recipe(
            "vit-tiny-digits",
            ["model.embed_dim=32", "model.depth=4", "model.num_heads=2", "train.steps=3", "train.epochs=null", *o],
        )
    if name == "llama":
        text = write_corpus(tmp_path)
        return lambda *o: load_recipe("llama-tiny-shakespeare", [*tiny_overrides(text), *o])
    path = tmp_path / "toy.yaml"
    path.write_text(
        "name: toy\nmodel: {family: toy, dim: 4, hidden: 16, layers: 4}\ndata: {source: toy}\n"
        "train: {batch_size: 8, steps: 4, device: cpu}\n"
    )
    return lambda *o: load_recipe(str(path), list(o))


def _gradients(recipe, objective: str) -> tuple[float, dict[str, torch.Tensor], object]:  # noqa: ANN001
    family = get_family(recipe.model.family).for_bench(recipe)
    torch.manual_seed(0)
    state = build_state(family, recipe, 2, recipe.noise.settings(), torch.device("cpu"), objective)
    batch = family.synthetic_batch(recipe, 4, torch.Generator().manual_seed(1))
    state.model.train()
    loss, _ = state.loss(state.model, batch, (0.01, 10.0), torch.Generator().manual_seed(2))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in state.network.named_parameters() if p.grad is not None}
    return loss.item(), grads, state


@pytest.mark.parametrize(
    ("name", "objective"),
    [
        ("dit", "denoiser"),
        ("llama", "denoiser"),
        ("llama", "ar"),
        ("vit", "denoiser"),
        ("vit", "classifier"),
        ("toy", "denoiser"),
    ],
)
def test_gradients_equal_those_without_checkpointing(name: str, objective: str, tmp_path: Path, toy: None) -> None:
    recipe = _recipes(name, tmp_path)
    loss, grads, plain = _gradients(recipe(), objective)
    loss_ck, grads_ck, state = _gradients(recipe("train.activation_checkpointing=true"), objective)
    layers = state.family.layers(state.network)  # type: ignore[attr-defined]
    assert len(layers) == 2 and all(layer.forward.__func__ is checkpointed_forward for layer in layers)
    assert not any(
        getattr(layer.forward, "__func__", None) is checkpointed_forward for layer in plain.family.layers(plain.network)
    )  # type: ignore[attr-defined]
    assert loss_ck == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ck.keys() and len(grads) > 0
    for key in grads:
        torch.testing.assert_close(grads_ck[key], grads[key], rtol=1e-5, atol=1e-6, msg=key)
    # same weights, keys and EMA: checkpointing changes how backward gets its activations, nothing saved
    assert state.network.state_dict().keys() == plain.network.state_dict().keys()  # type: ignore[attr-defined]
    assert all(getattr(m.forward, "__func__", None) is not checkpointed_forward for m in state.ema.modules())  # type: ignore[attr-defined]


def test_layers_recompute_in_backward_only_when_training_with_gradients(tmp_path: Path, toy: None) -> None:
    """The recompute is real (each layer's forward runs again in backward), and eval / no-grad run it once."""
    recipe = _recipes("toy", tmp_path)("train.activation_checkpointing=true")
    family = get_family("toy")
    state = build_state(family, recipe, 2, recipe.noise.settings(), torch.device("cpu"))
    calls = []
    for layer in family.layers(state.network):
        layer.register_forward_hook(lambda *_: calls.append(1))
        layer.fc1.register_forward_hook(lambda *_: calls.append(2))
    batch = family.synthetic_batch(recipe, 4, torch.Generator().manual_seed(1))
    state.step(batch, (0.01, 10.0), torch.Generator().manual_seed(2))
    assert calls.count(1) == 2 and calls.count(2) == 4  # fc1 ran in the forward and again in backward
    calls.clear()
    with torch.no_grad():
        state.model(batch[0], torch.ones(4))
    state.model.eval()
    state.model(batch[0], torch.ones(4))
    assert calls.count(2) == 2 * 2
    # a deep copy of a checkpointed network runs its own layers, not the original's
    twin = copy.deepcopy(state.network)
    assert all(layer.forward.__self__ is layer for layer in family.layers(twin))


def test_resume_with_checkpointing_equals_uninterrupted(tiny_run: Run, tmp_path: Path) -> None:
    import shutil

    on = ["train.activation_checkpointing=true"]
    other = Run.open(shutil.copytree(tiny_run.root, tmp_path / "copy"))
    train_block(tiny_run, 1, steps=4, progress=False, overrides=on)
    train_block(other, 1, steps=2, progress=False, overrides=on)
    train_block(other, 1, steps=4, progress=False, overrides=on)
    for name in ("model", "ema"):
        a = load_weights(tiny_run.model_dir("block-01") / f"{name}.safetensors")
        b = load_weights(other.model_dir("block-01") / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the same run without it: the same weights to float tolerance (same data, noise and gradients)
    plain = Run.open(shutil.copytree(tmp_path / "copy", tmp_path / "plain"))
    train_block(plain, 1, steps=4, restart=True, progress=False)
    c = load_weights(plain.model_dir("block-01") / "model.safetensors")
    a = load_weights(tiny_run.model_dir("block-01") / "model.safetensors")
    assert all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6) for k in a)
    e2e = train_e2e(tiny_run, steps=2, progress=False, overrides=on)
    assert e2e.step == 2


def test_recipe_schema_accepts_it() -> None:
    assert load_recipe("dit-tiny-digits").train.activation_checkpointing is False
    assert load_recipe("dit-tiny-digits", ["train.activation_checkpointing=true"]).train.activation_checkpointing
    with pytest.raises(RecipeError, match="activation_checkpointing"):
        load_recipe("dit-tiny-digits", ["train.activation_checkpointing=sometimes"])
