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
