"""split: layer slices, the run directory of DESIGN 6, safety of existing runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dbconvert.checkpoint import current_umask, load_weights
from dbconvert.errors import RecipeError, RunError
from dbconvert.rundir import FORMAT_VERSION, Run, resolve_run
from dbconvert.split import layer_ranges, split


def test_layer_ranges_even_and_uneven() -> None:
    assert layer_ranges(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert layer_ranges(8, 1) == [(0, 8)]
    assert layer_ranges(10, 4, uneven=True) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(RecipeError, match="do not divide"):
        layer_ranges(10, 4)
    with pytest.raises(RecipeError, match="between 1 and"):
        layer_ranges(8, 9)
    with pytest.raises(RecipeError, match="between 1 and"):
        layer_ranges(8, 0)


def test_split_writes_a_self_describing_run(tiny_run: Run) -> None:
    root = tiny_run.root
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["family"] == "dit" and manifest["num_blocks"] == 4 and manifest["num_layers"] == 4
    assert manifest["orientation"].startswith("block 0 = first source layers = highest noise")
    assert manifest["recipe"]["model"]["arch"] == "DiT-Micro/2"  # the family fields survive the round trip
    # a fresh network: copied into the run (nothing to point at), float32
    assert manifest["source"] == {"checkpoint": None, "sha256": None, "storage_dtype": "float32"}
    assert [b["layers"] for b in manifest["blocks"]] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert manifest["blocks"][0]["owned_range"][1] == 80.0 and manifest["blocks"][-1]["owned_range"][0] == 0.002
    for b in manifest["blocks"]:
        assert b["mass"] == pytest.approx(0.25, abs=1e-9)
        assert (root / "blocks" / f"block-{b['index']:02d}" / "model.safetensors").is_file()
    assert (root / "source" / "model.safetensors").is_file()
    assert not list(root.parent.glob(".run.split-*")), "staging folder left behind"


def test_blocks_of_a_fresh_network_hold_its_layers(tiny_run: Run) -> None:
    source = load_weights(tiny_run.source_weights)
    for b in tiny_run.blocks:
        block = load_weights(tiny_run.model_dir(Run.block_name(b.index)) / "model.safetensors")
        assert torch.equal(block["blocks.0.attn.qkv.weight"], source[f"blocks.{b.layers[0]}.attn.qkv.weight"])
        assert torch.equal(block["x_embedder.proj.weight"], source["x_embedder.proj.weight"])


def test_split_makes_the_run_current(tiny_run: Run, in_tmp: Path) -> None:
    assert resolve_run(None).root.resolve() == tiny_run.root.resolve()


def test_split_refuses_to_overwrite_without_force(tiny_run: Run, tiny_recipe) -> None:  # noqa: ANN001
    before = (tiny_run.root / "manifest.yaml").read_text()
    with pytest.raises(RunError, match="already holds a run"):
        split(tiny_recipe, out=tiny_run.root)
    assert (tiny_run.root / "manifest.yaml").read_text() == before
    again = split(tiny_recipe.model_copy(update={"name": "other"}), out=tiny_run.root, force=True)
    assert again.recipe.name == "other"


def test_a_failed_split_leaves_the_existing_run_untouched(tiny_run: Run, tiny_recipe) -> None:  # noqa: ANN001
    before = {p: p.read_bytes() for p in tiny_run.root.rglob("*") if p.is_file()}
    bad = tiny_recipe.model_copy(update={"model": tiny_recipe.model.model_copy(update={"checkpoint": "missing.pt"})})
    with pytest.raises(Exception, match="not found"):
        split(bad, out=tiny_run.root, force=True)
    assert {p: p.read_bytes() for p in tiny_run.root.rglob("*") if p.is_file()} == before


def test_no_current_run_is_a_clear_error(in_tmp: Path) -> None:
    with pytest.raises(RunError, match="no current run"):
        resolve_run(None)
    with pytest.raises(RunError, match="not a dbconvert run"):
        resolve_run(in_tmp)


def test_split_removes_the_staging_folders_of_killed_splits_but_not_of_running_ones(in_tmp: Path, tiny_recipe) -> None:  # noqa: ANN001
    import json
    import os
    import socket
    import time

    owners = {"dead": 2**22 + 7, "live": os.getpid()}
    for name, pid in owners.items():
        folder = in_tmp / f".run.split-{name}"
        (folder / "blocks").mkdir(parents=True)
        (folder / ".owner.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": None}))
    unowned_old, unowned_new = in_tmp / ".run.split-oldver", in_tmp / ".run.split-newver"
    unowned_old.mkdir(), unowned_new.mkdir()  # no owner file (an older version): stale after an hour unchanged
    os.utime(unowned_old, (time.time() - 7200, time.time() - 7200))
    run = split(tiny_recipe, out=in_tmp / "run")
    left = sorted(p.name for p in in_tmp.glob(".run.*"))
    assert left == [".run.split-live", ".run.split-newver"]
    assert not (run.root / ".owner.json").exists()
    assert (run.root / "source" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert run.root.stat().st_mode & 0o777 == 0o777 & ~current_umask()
