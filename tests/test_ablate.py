"""`dbconvert ablate`: one row per variant, matched layer updates, resume without retraining, bad inputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from dbconvert.ablate import plan_ablation, run_ablation
from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError, RecipeError
from dbconvert.rundir import Run
from tests.conftest import TINY_OVERRIDES
from tests.cli_helpers import assert_user_error, invoke

TINY = [*TINY_OVERRIDES, "train.log_every=1"]  # DiT-Micro/2 (4 layers); the ablation sets the steps
NUM = 70  # FID on the built-in 64-d features needs >= 65 samples
GAMMAS = (0.0, 0.1, 0.2)  # a subset of the paper's five, to keep the file fast


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One feature/statistics cache for the session: the digits CNN is trained once."""
    path = tmp_path_factory.getbasetemp() / "dbconvert-cache"
    monkeypatch.setenv("DBCONVERT_CACHE", str(path))
    return path


def _snapshot(folder: Path) -> dict[str, int]:
    """mtime (ns) of every training state and evaluation file below the ablation folder."""
    files = [*folder.glob("*/blocks/*/state.safetensors"), *folder.glob("*/eval/*.json")]
    return {str(p): p.stat().st_mtime_ns for p in files}


def test_overlap_one_row_per_gamma_matched_updates_and_resume(in_tmp: Path) -> None:
    out = in_tmp / "abl"
    log = io.StringIO()
    result = run_ablation(
        "overlap",
        "dit-tiny-digits",
        TINY,
        steps=2,
        out=out,
        num=NUM,
        values=GAMMAS,
        progress=False,
        console=Console(file=log, width=200),
    )
    rows = result.rows
    assert [r["value"] for r in rows] == list(GAMMAS)
    assert all(r["steps_per_block"] == 2 and r["blocks"] == 4 and r["samples"] == NUM for r in rows)
    assert {r["layer_updates"] for r in rows} == {2 * 4}  # S steps x L layers, for every variant
    assert all(r["metric"] == "fid" and r["features"].startswith("builtin") for r in rows)
    for r in rows:  # each row's score and spread are its variant's own FID and KID, as evaluated and stored
        stored = json.loads(next((Path(r["run"]) / "eval").glob("fid-*.json")).read_text())
        assert r["score"] == stored["value"] and r["spread"] == stored["kid"]["min"] and stored["num_samples"] == NUM
    for r in rows:
        run = Run.open(r["run"])
        assert run.manifest["gamma"] == r["value"] and Path(r["run"]).parent == out
        assert all(run.status(Run.block_name(b.index)).step == 2 for b in run.blocks)
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["variable"] == "gamma" and len(saved["rows"]) == 3
    md = (out / "ablation.md").read_text()
    assert md.count("\n| ") == 1 + 3  # header + one row per variant
    assert "| gamma | FID | KID | steps/block |" in md

    before = _snapshot(out)
    assert len(before) == 3 * 4 + 3
    again = io.StringIO()
    rerun = run_ablation(
        "overlap",
        "dit-tiny-digits",
        TINY,
        steps=2,
        out=out,
        num=NUM,
        values=GAMMAS,
        progress=False,
        console=Console(file=again, width=200),
    )
    assert _snapshot(out) == before  # nothing retrained, nothing re-evaluated
    assert [r["score"] for r in rerun.rows] == [r["score"] for r in rows]
    assert again.getvalue().count("skipped") == 3 and "trained to step" not in again.getvalue()


def test_blocks_ablation_deepens_the_network_so_every_b_divides_it(in_tmp: Path) -> None:
    result = run_ablation(
        "blocks",
        "dit-tiny-digits",
        TINY,
        steps=2,
        out=in_tmp / "b",
        num=NUM,
        values=(3, 4),
        progress=False,
        console=Console(file=io.StringIO()),
    )
    rows = result.rows
    assert [(r["blocks"], r["layers"], r["layers_per_block"]) for r in rows] == [(3, 12, 4), (4, 12, 3)]
    assert rows[0]["layer_updates"] == rows[1]["layer_updates"] == 2 * 12
    assert "model.depth=12" in result.summary["overrides"] and "depth 12" in result.summary["notes"][0]


def test_default_variants_are_the_papers() -> None:
    recipe = load_recipe("dit-tiny-digits")
    assert [v.name for v in plan_ablation("overlap", recipe).variants] == [
        "gamma-0",
        "gamma-0.05",
        "gamma-0.1",
        "gamma-0.15",
        "gamma-0.2",
    ]
    partition = plan_ablation("partition", recipe)
    assert [v.value for v in partition.variants] == ["equiprobable", "uniform"] and partition.common == [
        "noise.gamma=0"
    ]
    blocks = plan_ablation("blocks", recipe)
    assert [v.value for v in blocks.variants] == [1, 2, 3, 4, 6] and blocks.common == ["model.depth=12"]


def test_blocks_plan_keeps_the_depth_when_uneven_and_refuses_an_explicit_depth() -> None:
    uneven = plan_ablation("blocks", load_recipe("dit-tiny-digits", ["blocks.uneven=true"]))
    assert uneven.common == [] and "uneven" in uneven.notes[0]
    assert [v.value for v in uneven.variants] == [1, 2, 3, 4, 6]
    assert plan_ablation("blocks", load_recipe("dit-tiny-digits"), values=(1, 2, 4, 8)).common == []
    with pytest.raises(RecipeError, match="blocks.uneven=true"):
        plan_ablation("blocks", load_recipe("dit-tiny-digits", ["model.depth=8"]), ["model.depth=8"])


def test_cli_partition_writes_both_tables_and_refuses_changed_settings(in_tmp: Path) -> None:
    out = in_tmp / "p"
    result = invoke("ablate", "partition", "dit-tiny-digits", *TINY, "--steps", 1, "--num", NUM, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "equiprobable" in result.stdout and "uniform" in result.stdout
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["value"], r["gamma"], r["partition"]) for r in rows] == [
        ("equiprobable", 0.0, "equiprobable"),
        ("uniform", 0.0, "uniform"),
    ]
    assert (out / "ablation.md").is_file()
    changed = invoke(
        "ablate", "partition", "dit-tiny-digits", *TINY, "train.lr=5e-4", "--steps", 1, "--num", NUM, "--out", out, "-q"
    )
    assert_user_error(changed, "other settings (train.lr")


def test_bad_inputs_are_one_line_errors(in_tmp: Path) -> None:
    unknown = invoke("ablate", "depth", "dit-tiny-digits")
    assert unknown.exit_code == 2 and "No such command" in unknown.output
    assert_user_error(invoke("ablate", "overlap", "llama-tiny-shakespeare", "--num", "1", "-q"), "prompts for MAUVE")
    assert_user_error(
        invoke("ablate", "blocks", "dit-tiny-digits", "model.depth=8", "--values", "2,3", "-q"), "blocks.uneven=true"
    )
    assert_user_error(invoke("ablate", "overlap", "dit-tiny-digits", "--num", 10, "-q"), "at least 65")
    assert_user_error(invoke("ablate", "overlap", "dit-tiny-digits", "--values", "0,2", "-q"), "[0, 1]")
    assert_user_error(invoke("ablate", "partition", "dit-tiny-digits", "--values", "random", "-q"), "equiprobable")
    assert not (in_tmp / "runs").exists()  # nothing trained or split on bad input
    with pytest.raises(DbconvertError, match="unknown ablation"):
        run_ablation("depth", "dit-tiny-digits")


def test_the_memory_ablation_varies_one_memory_option_each() -> None:
    from dbconvert.ablate import parse_values
    from dbconvert.errors import DbconvertError

    plan = plan_ablation("memory", load_recipe("dit-tiny-digits"))
    assert [v.name for v in plan.variants] == [
        "options-fp32",
        "options-bf16-true",
        "options-adamw8bit",
        "options-ema-off",
    ]
    assert plan.variants[0].overrides == () and all(len(v.overrides) == 1 for v in plan.variants[1:])
    for v in plan.variants:  # each is a valid recipe
        load_recipe("dit-tiny-digits", list(v.overrides))
    assert parse_values("memory", "fp32,ema-off") == ("fp32", "ema-off")
    with pytest.raises(DbconvertError, match="--values for memory"):
        parse_values("memory", "fp32,fp8")


def test_a_masked_recipe_ablates_every_variant_with_its_bound(in_tmp: Path) -> None:
    """Issue 34: the recipe's sampler steps reached eval bpc, which refused them after the first variant's training."""
    from tests.families.llama_tiny import write_corpus
    from tests.families.test_llama_masked import masked_overrides

    overrides = masked_overrides(write_corpus(in_tmp), **{"model.layers": 2, "blocks.num": 2})
    result = run_ablation(
        "overlap",
        "md4-tiny-shakespeare",
        overrides,
        steps=1,
        out=in_tmp / "abl",
        num=2,
        values=[0.0, 0.1],
        progress=False,
        console=Console(file=io.StringIO()),
    )
    assert [row["value"] for row in result.rows] == [0.0, 0.1] and result.summary["metric"] == "bpc"
    assert all(row["score"] > 0 for row in result.rows)
    text = result.markdown.read_text()
    assert "ema weights, sampling seed 0" in text and " steps, " not in text.split("samples per variant")[1][:40]
