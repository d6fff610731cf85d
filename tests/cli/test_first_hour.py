"""The first hour of a new user (issue 14): copyable recipes, unwrapped machine-readable output, talking commands."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result

from dbconvert.cli import app
from tests.cli_helpers import runner
from tests.conftest import TINY_OVERRIDES


def narrow(*args: object) -> Result:
    """`dbconvert ARGS` with a 40-column terminal width, the way a redirected or narrow output used to wrap."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "40"})


def test_recipes_show_writes_a_valid_recipe_and_paths_stay_whole_at_40_columns(in_tmp: Path) -> None:
    from dbconvert.config import read_recipe_text, shipped_recipes

    for name in shipped_recipes():
        shown = narrow("recipes", "--show", name)
        assert shown.exit_code == 0, shown.output
        assert shown.stdout == read_recipe_text(name)[0]  # byte for byte: no wrapping, no markup
    (in_tmp / "mine.yaml").write_text(narrow("recipes", "--show", "dit-tiny-digits").stdout)
    out = in_tmp / "a-folder-name-long-enough-to-be-wrapped-at-forty-columns" / "run"
    split = narrow("split", "mine.yaml", *TINY_OVERRIDES, "--out", out)
    assert split.exit_code == 0, split.output
    assert (out / "manifest.yaml").is_file()
    assert any(str(out) in line for line in split.stdout.splitlines()), split.stdout
    info = narrow("info", "--json")
    assert info.exit_code == 0 and len(json.loads(info.stdout)) == 4


def test_archs_lists_every_dit_architecture_with_parameters_counted_from_the_model() -> None:
    from dbconvert.families import get_family
    from dbconvert.families.dit.model import ARCHS, DiT, DiTShape
    from tests.cli_helpers import invoke

    res = invoke("recipes", "--archs")
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith("DiT-")}
    assert set(rows) == set(ARCHS)
    a = ARCHS["DiT-Micro/2"]
    net = DiT(DiTShape(32, 3, 10, a.depth, a.hidden_size, a.num_heads, a.patch_size))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert rows["DiT-Micro/2"][1:6] == ["4", "32", "2", "2", f"{trainable / 1e3:.1f}k"]
    assert round(float(rows["DiT-XL/2"][6].rstrip("M"))) == 675  # the DiT paper's 675M for XL/2
    assert "patch vs image size" in res.stdout and "CPU time" in res.stdout
    assert get_family("llama").architectures().rows == []  # the contract's default: sizes set in the recipe


def test_split_sample_and_eval_fid_talk_in_plain_lines_when_not_a_terminal(
    in_tmp: Path, tmp_path_factory, monkeypatch
) -> None:  # noqa: ANN001
    from tests.cli_helpers import invoke

    monkeypatch.setenv("DBCONVERT_CACHE", str(tmp_path_factory.getbasetemp() / "dbconvert-cache"))
    split = invoke("split", "dit-tiny-digits", *TINY_OVERRIDES)
    assert split.exit_code == 0, split.output
    assert "split into 4 blocks: done, 5 files in" in split.stderr and "MiB/s" in split.stderr
    for i in range(4):
        assert invoke("train-block", i, "-q").exit_code == 0
    sample = invoke("sample", "--steps", "3", "--solver", "heun")
    assert sample.exit_code == 0, sample.output
    assert "sample blocks (4 images): done, 5 steps in" in sample.stderr  # Heun: 3 + 2 corrections
    fid = invoke("eval", "fid", "--num", "70", "--steps", "2")
    assert fid.exit_code == 0, fid.output
    assert "FID samples (blocks): done, 70 images in" in fid.stderr and "images/s" in fid.stderr
    assert "FID features of the samples (blocks): done, 70 images in" in fid.stderr
    quiet = invoke("sample", "--steps", "2", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_train_block_announces_the_steps_it_runs_and_notes_a_changed_batch_size(in_tmp: Path) -> None:
    from tests.cli_helpers import invoke

    assert invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "-q").exit_code == 0  # the recipe says 4 steps
    first = invoke("train-block", "0", "--steps", "2", "train.batch_size=16", "-q")
    assert first.exit_code == 0, first.output
    announced = json.loads(next(line for line in first.stdout.splitlines() if line.startswith("{")))
    assert announced["train"]["steps"] == 2 and announced["train"]["batch_size"] == 16
    assert "block-00: step 2/2" in first.stdout and first.stderr == ""

    second = invoke("train-block", "0", "--steps", "3", "train.batch_size=8", "-q")
    assert second.exit_code == 0, second.output
    announced = json.loads(next(line for line in second.stdout.splitlines() if line.startswith("{")))
    assert announced["train"]["steps"] == 3 and announced["train"]["batch_size"] == 8
    note = second.stderr.strip()
    assert note.startswith("block-00: resuming at step 2 with train.batch_size=8 (the checkpoint was trained with 16)")
    assert "--restart" in note and len(note.splitlines()) == 1
    assert "block-00: step 3/3" in second.stdout

    deep = in_tmp / ("a-run-folder-with-a-long-name-" * 4)  # a header wider than the terminal: whole, not cut
    assert invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "--out", deep, "-q").exit_code == 0
    long = invoke("train-block", "0", "--steps", "1", "--run", deep, "-q")
    assert long.exit_code == 0 and f"training block 0 of {deep}" in long.stdout and "…" not in long.stdout


def test_run_folder_names_data_that_differ_from_the_shipped_recipe(in_tmp: Path) -> None:
    from dbconvert.config import load_recipe
    from tests.cli_helpers import invoke
    from tests.families.test_llama import CORPUS, tiny_overrides

    assert load_recipe("llama-tiny-shakespeare").output_dir() == Path("runs/llama-tiny-shakespeare-B4")
    corpus = in_tmp / "my corpus.txt"
    corpus.write_text(CORPUS)
    assert load_recipe("llama-tiny-shakespeare", [f"data.source={corpus}"]).output_dir() == Path(
        "runs/llama-tiny-shakespeare-my-corpus-B4"
    )
    assert load_recipe("llama-tiny-shakespeare", [f"data.source={corpus}", "output.dir=mine"]).output_dir() == Path(
        "mine"
    )

    res = invoke("split", "llama-tiny-shakespeare", *tiny_overrides(corpus), "--blocks", "2", "-q")
    assert res.exit_code == 0, res.output
    assert (in_tmp / "runs" / "llama-tiny-shakespeare-my-corpus-B2" / "manifest.yaml").is_file()
    assert "runs/llama-tiny-shakespeare-my-corpus-B2 (named -my-corpus because data.source=" in res.stdout
    digits = invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "-q")
    assert digits.exit_code == 0 and "named -" not in digits.stdout
    assert (in_tmp / "runs" / "dit-tiny-digits-B4").is_dir()
