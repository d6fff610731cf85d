"""Recipes: every shipped recipe validates; bad recipes give one-line errors naming the key."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from dbconvert.config import load_recipe, override_recipe, shipped_recipes
from dbconvert.errors import RecipeError


def test_the_three_required_recipes_ship() -> None:
    assert {"dit-tiny-digits", "dit-s2-cifar10", "dit-l2-imagenet256"} <= set(shipped_recipes())


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates_and_opens_with_a_run_comment(name: str) -> None:
    text = (resources.files("dbconvert.recipes") / f"{name}.yaml").read_text()
    assert text.startswith("# Run: dbconvert "), "the first line must show how to run the recipe"
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description


def test_top_level_recipes_folder_is_the_package_folder() -> None:
    """`recipes/` at the top of a checkout is a link to `dbconvert/recipes/`: one copy, nothing to keep in sync."""
    top = Path(__file__).resolve().parents[1] / "recipes"
    if not top.exists():
        pytest.skip("not running from a source checkout")
    package = Path(str(resources.files("dbconvert.recipes"))).resolve()
    assert top.is_symlink() and top.resolve() == package
    assert {p.stem for p in top.glob("*.yaml")} == set(shipped_recipes())


def test_paper_cifar10_setting() -> None:
    r = load_recipe("dit-s2-cifar10")
    assert (r.model.arch, r.blocks.num, r.noise.gamma, r.train.batch_size) == ("DiT-S/2", 4, 0.1, 512)
    assert (r.train.optimizer, r.train.lr, r.train.epochs, r.train.label_dropout) == ("adamw", 1e-4, 100, 0.1)
    assert (r.sample.guidance, r.sample.solver) == (2.0, "euler")


def test_overrides_are_typed_and_nested() -> None:
    r = load_recipe(
        "dit-tiny-digits", ["train.lr=3e-4", "noise.partition=uniform", "blocks.num=2", "train.betas=[0.8, 0.9]"]
    )
    assert r.train.lr == 3e-4 and r.noise.partition == "uniform" and r.blocks.num == 2
    assert r.train.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "override,match",
    [
        (["train.lrr=1"], r"unknown key 'train\.lrr'"),
        (["bogus.x=1"], r"unknown key 'bogus'"),
        (["train.lr=fast"], r"key 'train\.lr'"),
        (["train.lr=-1"], r"key 'train\.lr'.*greater than 0"),
        (["noise.gamma=2"], r"key 'noise\.gamma'"),
        (["noise.partition=cosine"], r"key 'noise\.partition'"),
        (["model.arch=DiT-Huge/2"], r"DiT-Huge/2"),
        (["model.patch=2"], r"unknown key 'model\.patch'"),  # keys of the family's section keep their 'model.'
        (["model.input_size=big"], r"key 'model\.input_size'"),
        (["model.family=gpt"], r"unknown family 'gpt'"),
        (["noise.sigma_min=100"], r"sigma_min must be smaller"),
        (["train.steps=null", "train.epochs=null"], r"set train\.steps or train\.epochs"),
        (["trainlr"], r"not of the form key\.sub=value"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(override: list[str], match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe("dit-tiny-digits", override)
    assert "\n" not in str(info.value)


def test_malformed_and_missing_recipe_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="malformed YAML at line"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(RecipeError, match="no recipe named"):
        load_recipe("not-a-recipe")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(str(listy))


def test_after_split_only_training_sections_can_be_overridden() -> None:
    r = load_recipe("dit-tiny-digits")
    assert override_recipe(r, ["train.lr=0.5"], ("train",)).train.lr == 0.5
    with pytest.raises(RecipeError, match="fixed when the run is split"):
        override_recipe(r, ["noise.gamma=0.2"], ("train", "sample"))
