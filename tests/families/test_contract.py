"""Adding a family = one package and one line: a toy family defined in the tests runs the whole tool.

`tests/families/toy_family.py` implements `Family` (a residual MLP denoiser over 4-dim vectors)
and is registered here with one `families.register(...)` call; nothing in `dbconvert/` knows it.
split -> train-block (every block) -> sample -> train-e2e -> bench memory / speed then run through
the CLI exactly as for DiT and Llama, and the samples show that the blocks really learnt the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import dbconvert
from dbconvert import families
from dbconvert.config import load_recipe
from dbconvert.errors import RecipeError
from dbconvert.rundir import Run
from dbconvert.sampling import SampleRequest

from tests.cli_helpers import assert_user_error, invoke
from tests.families.toy_family import ToyConfig, ToyFamily, corner_distance

MODULE = "tests.families.toy_family"
ROOT = Path(dbconvert.__file__).resolve().parents[1]

RECIPE = """\
name: toy
description: the toy family of tests/families/toy_family.py
model: {family: toy, dim: 4, hidden: 16, layers: 4}
data: {source: toy}
blocks: {num: 2}
train: {batch_size: 32, steps: 200, lr: 3.0e-3, warmup_steps: 0, ema_decay: 0.99, log_every: 50,
        checkpoint_every: 50, label_dropout: 0.0, device: cpu}
sample: {steps: 16, num: 256}
"""


@pytest.fixture
def toy() -> Iterator[str]:
    """The toy family (and with it its own metric), registered for one test (one line), then unregistered."""
    families.register("toy", f"{MODULE}:ToyFamily", f"{MODULE}:ToyConfig")
    yield "toy"
    families.unregister("toy")


@pytest.fixture
def toy_recipe(in_tmp: Path, toy: str) -> Path:
    path = in_tmp / "toy.yaml"
    path.write_text(RECIPE)
    return path


def test_the_registered_family_is_known_to_recipes(toy_recipe: Path) -> None:
    assert "toy" in families.family_names() and families.config_class("toy") is ToyConfig
    assert isinstance(families.get_family("toy"), ToyFamily)
    recipe = load_recipe(str(toy_recipe))
    assert isinstance(recipe.model, ToyConfig) and recipe.model.dim == 4
    with pytest.raises(RecipeError, match="unknown key 'model.depth'"):  # validated against the toy's section
        load_recipe(str(toy_recipe), ["model.depth=3"])


def test_sample_options_are_found_with_or_without_a_torch_free_path(toy: str) -> None:
    """A registry entry's third path names the family's `sample_options_type` without importing the family (issue
    33: `sample --help` without torch); it must be the class the family uses. A plug-in without it (the toy) is read
    from the family itself."""
    from tests.families.toy_family import ToySampleOptions

    for name in families.family_names():
        assert families.sample_options_type(name) is families.get_family(name).sample_options_type, name
    assert len(families.REGISTRY.paths("toy")) == 2 and families.sample_options_type("toy") is ToySampleOptions
    families.register("toy", f"{MODULE}:ToyFamily", f"{MODULE}:ToyConfig", f"{MODULE}:ToySampleOptions")
    assert families.REGISTRY.paths("toy")[2] == f"{MODULE}:ToySampleOptions"
    with pytest.raises(ValueError, match="expected 2 to 4 'module:attribute' path"):
        families.REGISTRY.register("toy", f"{MODULE}:ToyFamily")


def test_own_metrics_are_found_with_or_without_a_torch_free_path(toy: str) -> None:
    """A registry entry's fourth path names the family's `own_metrics` table without importing the family (issue
    33: `eval --help` without torch); it must be the table the family has. A plug-in without it (the toy) is read
    from the family itself; the fourth path needs the third."""
    for name in families.family_names():
        assert families.own_metrics(name) == families.get_family(name).own_metrics, name
    assert all(len(families.REGISTRY.paths(n)) == 4 for n in families.FAMILIES)  # every built-in one is torch-free
    assert len(families.REGISTRY.paths("toy")) == 2 and families.own_metrics("toy") is ToyFamily.own_metrics
    with pytest.raises(ValueError, match="give both"):
        families.register("toy", f"{MODULE}:ToyFamily", f"{MODULE}:ToyConfig", metrics="dbconvert.x:METRICS")
    table = "dbconvert.families.metric_tables:NO_METRICS"
    families.register("toy", f"{MODULE}:ToyFamily", f"{MODULE}:ToyConfig", f"{MODULE}:ToySampleOptions", table)
    assert families.REGISTRY.paths("toy")[3] == table and families.own_metrics("toy") == {}


def test_split_train_sample_bench_through_the_cli(toy_recipe: Path) -> None:
    # split: the toy's network is cut into two blocks of two layers, written as any other run
    result = invoke("split", toy_recipe, "--out", "run")
    assert result.exit_code == 0, result.output
    run = Run.open("run")
    assert run.family_name == "toy" and run.num_layers == 4 and [b.layers for b in run.blocks] == [(0, 2), (2, 4)]
    for block in run.blocks:
        assert (run.model_dir(Run.block_name(block.index)) / "model.safetensors").is_file()
    info = json.loads(invoke("info", "--json").stdout)
    assert [b["params"] for b in info] == [2388, 2388]  # embed 80 + sigma 32 + head 68 + 2 layers x 1104

    assert_user_error(invoke("sample", "-q"), "untrained blocks: block-00, block-01")
    for index in (0, 1):
        result = invoke("train-block", index, "-q")
        assert result.exit_code == 0, result.output
        assert run.status(Run.block_name(index)).finished

    # sample: the generic command drives the toy's generate; the samples sit on the two clusters
    result = invoke("sample", "-q")
    assert result.exit_code == 0, result.output
    samples = next(Path("run/samples").glob("blocks-*/samples.npz"))
    x = np.load(samples)["x"]
    assert x.shape == (256, 4)
    source = family_samples(run, "source")  # the untrained, unsplit source: what the blocks started from
    assert corner_distance(x) < 0.2 and corner_distance(x) < corner_distance(source) / 3
    assert 0.2 < (x.mean(axis=1) > 0).mean() < 0.8  # both clusters, not one

    # each sampling step ran the block that owns its sigma: block 0 the high-noise steps, block 1 the rest
    out = run.family().generate(run, SampleRequest(num=8, steps=10, solver="heun", out=Path("heun")))
    assert len(out.calls) == 2 and all(c > 0 for c in out.calls) and sum(out.calls) == 10 + 9

    # the toy's own sampling option is a generated flag of `sample`; DiT's is a one-line error on a toy run
    result = invoke("sample", "--clip", "0.1", "--num", "16", "--out", "clipped", "-q")
    assert result.exit_code == 0, result.output
    assert np.abs(np.load("clipped/samples.npz")["x"]).max() <= 0.1
    assert_user_error(
        invoke("sample", "--guidance", "2", "-q"),
        "--guidance does not apply to a toy run (its sampling options: --clip); drop it",
    )
    assert_user_error(invoke("sample", "--clip", "-1", "-q"), "--clip")  # its declared minimum
    shown = invoke("sample", "--help").stdout  # on a toy run: the toy's options, not the other families'
    assert "--clip" in shown and "--guidance" not in shown and "--prompt" not in shown

    # the e2e baseline and the model kinds the family declares
    result = invoke("train-e2e", "--steps", "20", "-q")
    assert result.exit_code == 0, result.output
    assert invoke("sample", "--model", "e2e", "-q").exit_code == 0
    assert_user_error(
        invoke("sample", "--model", "ar", "-q"), "--model must be one of blocks, e2e, source for a toy run"
    )

    # bench: the speed comparison runs in this process, the memory one in fresh worker processes,
    # which know the toy family because `register` hands it down through the environment
    result = invoke(
        "bench", "speed", toy_recipe, "--blocks", "2", "--batch", "8", "--repeats", "1", "--warmup", "0", "--json"
    )
    assert result.exit_code == 0, result.output
    speed = json.loads(result.stdout)
    assert len(speed["block_sample_step_s"]) == 2 and speed["e2e_sample_step_s"] > 0

    # eval: the toy's own metric through the registry (nothing generic knows it), blocks and e2e
    scores = {}
    for model in ("blocks", "e2e"):
        result = invoke("eval", "corner", "--model", model, "--num", "128", "--json", "-q")
        assert result.exit_code == 0, result.output
        scores[model] = json.loads(result.stdout)
    blocks = scores["blocks"]
    assert blocks["metric"] == "corner" and len(blocks["values"]) == 2 and Path(blocks["file"]).is_file()
    again = family_samples(run, "blocks", num=128, seed=run.recipe.sample.seed + 1)
    assert blocks["values"][1] == pytest.approx(corner_distance(again))  # the number is the samples' distance
    assert blocks["value"] < 0.2  # trained blocks: near the clusters (the untrained source is 3x further, above)
    result = invoke("eval", "corner", "--num", "1")  # the metric's own option bounds, from its declaration
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_user_error(invoke("eval", "fid", "--num", "100", "-q"), "eval fid does not apply to this toy run")

    # eval compare and plot eval render the toy's results with its title and direction
    table = invoke("eval", "compare").stdout
    assert "corner distance with features coordinates (lower is better)" in table
    assert f"{blocks['value']:.4f}" in table and f"{scores['e2e']['value']:.4f}" in table
    result = invoke("plot", "eval")
    assert result.exit_code == 0, result.output
    assert (run.root / "plots" / "eval.png").stat().st_size > 10_000


def test_bench_memory_measures_the_toy_in_worker_processes(toy_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = invoke("bench", "memory", toy_recipe, "model.hidden=64", "--blocks", "2", "--batch", "64", "--json")
    assert result.exit_code == 0, result.output
    memory = json.loads(result.stdout)
    assert memory["blocks"] == 2 and memory["layers"] == 4 and len(memory["block_peak_bytes"]) == 2
    block, e2e = memory["breakdown"]["block-0"], memory["breakdown"]["e2e"]
    assert block["layers"] == [0, 2] and e2e["layers"] == [0, 4]
    assert (
        0 < block["parameters"] < e2e["parameters"] and block["optimizer_state"] >= 2 * block["gradients"]
    )  # AdamW: two moments (+ step counters)


def family_samples(run: Run, model: str, num: int = 256, seed: int | None = None) -> np.ndarray:
    result = run.family().generate(run, SampleRequest(model=model, num=num, seed=seed, out=Path(f"check-{model}")))
    return np.load(result.files[0])["x"]


# --- the registry -------------------------------------------------------------------------


def test_child_processes_inherit_a_registered_family(toy: str) -> None:
    code = (
        "from dbconvert.families import family_names, get_family; "
        "print(family_names(), type(get_family('toy')).__name__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['dit', 'llama', 'recurrent', 'toy', 'vit'] ToyFamily"


def test_unregister_forgets_the_family(in_tmp: Path) -> None:
    families.register("toy", f"{MODULE}:ToyFamily", f"{MODULE}:ToyConfig")
    families.unregister("toy")
    assert families.family_names() == ["dit", "llama", "recurrent", "vit"] and families.PLUGINS_ENV not in os.environ
    (in_tmp / "toy.yaml").write_text(RECIPE)
    with pytest.raises(RecipeError, match="unknown family 'toy'; choose one of dit, llama, recurrent, vit"):
        load_recipe(str(in_tmp / "toy.yaml"))


def test_bad_plugin_settings_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(families.PLUGINS_ENV, "{not json")
    with pytest.raises(RecipeError, match="must be a JSON object"):
        families.family_names()
    monkeypatch.setenv(families.PLUGINS_ENV, json.dumps({"gone": ["no_such_module:Family", "no_such_module:Config"]}))
    with pytest.raises(RecipeError, match="family class no_such_module:Config cannot be loaded .*PYTHONPATH"):
        families.config_class("gone")


def test_ablate_scores_variants_with_the_familys_metric(toy_recipe: Path) -> None:
    from dbconvert.ablate import run_ablation

    result = run_ablation(
        "overlap",
        str(toy_recipe),
        ["sample.steps=4"],
        steps=30,
        out=Path("abl"),
        num=16,
        values=(0.0, 0.2),
        progress=False,
    )
    rows = result.summary["rows"]
    assert result.summary["metric"] == "corner" and [r["value"] for r in rows] == [0.0, 0.2]
    for row in rows:  # each score is the variant's own evaluation, read back from its run
        stored = json.loads(next((Path(row["run"]) / "eval").glob("corner-*.json")).read_text())
        assert row["score"] == stored["value"] and row["spread"] == stored["std"] and row["samples"] == 16
    best = min(rows, key=lambda r: r["score"])["value"]  # the metric's direction: lower is better
    assert result.summary["best"] == best
    markdown = result.markdown.read_text()
    assert "| corner distance | ± std |" in markdown and "lower is better" in markdown
    assert "Time = training + corner distance" in markdown
