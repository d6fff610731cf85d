"""The FID reference is explicit: data set, split, size, overlap with training; rows say where they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbconvert.cli import app
from dbconvert.schema import DataConfig
from tests.cli_helpers import invoke, runner


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's feature cache (shared with test_fid): the digits CNN is trained once."""
    path = tmp_path_factory.getbasetemp() / "dbconvert-cache"
    monkeypatch.setenv("DBCONVERT_CACHE", str(path))
    return path


def test_default_reference_split_follows_the_published_protocol(tmp_path: Path) -> None:
    from dbconvert.evaluation.fid import default_split, split_overlaps_training

    assert default_split(DataConfig(source="cifar10")) == "train"  # EDM / clean-fid: the 50k training images
    assert default_split(DataConfig(source="digits")) == "test"
    assert default_split(DataConfig(source=str(tmp_path / "x.npz"))) == "test"
    assert split_overlaps_training(DataConfig(source="cifar10"), "train")
    assert not split_overlaps_training(DataConfig(source="cifar10"), "test")
    assert split_overlaps_training(DataConfig(source="digits"), "all")
    same = DataConfig(source=str(tmp_path / "x.npz"), test_source=str(tmp_path / "x.npz"))
    assert split_overlaps_training(same, "test")


def last_json(result) -> dict:  # noqa: ANN001
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fid_names_its_reference_and_flags_overlap_and_compare_names_sources(tiny_run, in_tmp: Path) -> None:  # noqa: ANN001
    from dbconvert.data.images import load_images
    from dbconvert.evaluation.fid import write_pngs
    from dbconvert.train import train_block

    for b in tiny_run.blocks:
        train_block(tiny_run, b.index, steps=1, progress=False)
    test = last_json(invoke("eval", "fid", "--num", "70", "--steps", "2", "--json", "-q"))
    assert test["split"] == "test" and test["reference_size"] == 359 and test["reference_overlaps_training"] is False
    assert "digits:test (359 images)" in test["reference"]
    assert test["source"] == {"kind": "run", "path": str(tiny_run.root.resolve())}

    train = invoke("eval", "fid", "--num", "70", "--steps", "2", "--split", "train")
    assert train.exit_code == 0, train.output
    assert "YES (the training split)" in train.stdout and "overlaps the training data" in train.stderr
    saved = json.loads(next((tiny_run.root / "eval").glob("*-train-*.json")).read_text())
    assert saved["reference_overlaps_training"] is True and saved["reference_size"] == 1438

    copies = in_tmp / "train-copies"
    write_pngs(load_images(tiny_run.recipe.data, "train").x[:80], copies)
    folder = last_json(invoke("eval", "fid", "--samples", test["samples"][0], "--reference", copies, "--json", "-q"))
    assert folder["reference_overlaps_training"] is True and folder["reference_overlap_images"] == 80
    assert folder["source"] == {"kind": "folder", "path": str(Path(test["samples"][0]).resolve())}

    table = invoke("eval", "compare")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert any(line.split()[:4] == ["blocks", "this", "run", f"{test['value']:.2f}"] for line in lines), table.stdout
    assert any(line.split()[:3] == ["-", "folder", "[1]"] for line in lines) and "OVERLAPS" in table.stdout
    narrow = runner.invoke(app, ["eval", "compare"], env={"COLUMNS": "40"})
    assert f"[1] {Path(test['samples'][0]).resolve()}" in narrow.stdout.splitlines()  # the path whole, on one line
