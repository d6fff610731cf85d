"""`dbconvert demo`: the whole pipeline on digits, and rerunning continues instead of failing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from dbconvert.demo import run_demo
from dbconvert.errors import RunError
from dbconvert.evaluation.fid import fid_of_folder
from dbconvert.rundir import resolve_run


def test_demo_runs_end_to_end_and_continues(in_tmp: Path) -> None:
    out = io.StringIO()
    result = run_demo(out=in_tmp / "demo", steps=2, progress=False, fid_samples=70, console=Console(file=out))
    assert (result.samples.directory / "grid.png").is_file() and result.e2e_samples is not None
    assert set(result.fid) == {"blocks", "e2e"}
    assert all(r["metric"] == "fid" and r["features"].startswith("builtin") for r in result.fid.values()), result.fid
    for r in result.fid.values():  # each FID is the one of its own sample folder against its reference
        again = fid_of_folder(result.run, Path(r["samples"][0]), split=r["split"], features="builtin")
        assert again["value"] == pytest.approx(r["value"], rel=1e-6) and 0 < r["value"] < 1e4
    assert len(list((in_tmp / "demo" / "eval").glob("*.json"))) == 2
    assert [p.name for p in result.figures] == ["partition.png", "loss.png", "eval.png"]
    assert all(p.is_file() and str(p) in out.getvalue() for p in result.figures)
    assert resolve_run(None).root.resolve() == (in_tmp / "demo").resolve()
    text = out.getvalue()
    assert str(result.samples.directory / "grid.png") in text and str(result.e2e_samples.directory / "grid.png") in text
    assert "built-in digits features" in text and "KID is clean-fid's raw value" in text
    blocks_ahead = result.fid["blocks"]["value"] < result.fid["e2e"]["value"]
    assert ("the blocks are ahead" if blocks_ahead else "the e2e baseline is ahead") in text
    assert "loss None" not in text and "last logged loss " in text

    again = io.StringIO()
    run_demo(out=in_tmp / "demo", steps=3, progress=False, fid=False, console=Console(file=again))
    assert "continuing the demo run" in again.getvalue() and "loss None" not in again.getvalue()
    assert result.run.status("block-00").step == 3  # resumed from step 2 to 3


def test_demo_refuses_a_folder_holding_another_run(in_tmp: Path, tiny_recipe) -> None:  # noqa: ANN001
    from dbconvert.split import split

    other = split(tiny_recipe.model_copy(update={"name": "not-the-demo"}), out=in_tmp / "other")
    with pytest.raises(RunError, match="not the demo"):
        run_demo(out=other.root, steps=1, progress=False, fid=False)
