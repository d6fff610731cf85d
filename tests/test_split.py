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


# --- writes that report success are never lost (issue 34) ------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_split_force_refuses_while_a_block_of_the_run_is_being_trained(tiny_run: Run, tiny_recipe) -> None:  # noqa: ANN001
    from dbconvert import locks
    from tests.cli_helpers import assert_user_error, invoke
    from tests.conftest import TINY_OVERRIDES

    before = _files(tiny_run.root)
    lock = tiny_run.model_dir("block-02") / locks.LOCK_NAME
    with locks.hold(lock, "block-02"):  # a live train-block 2 (this process) on the run
        before = _files(tiny_run.root)
        result = invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "--out", tiny_run.root, "--force")
        assert_user_error(result, f"{tiny_run.root} cannot be replaced: block-02 is being trained by pid")
        assert _files(tiny_run.root) == before
    assert split(tiny_recipe, out=tiny_run.root, force=True).num_blocks == 4  # once it ends, --force replaces


def test_a_training_that_starts_during_split_force_keeps_its_run(
    tiny_run: Run,
    tiny_recipe,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dbconvert import locks
    from dbconvert.families.dit.family import DiTFamily

    lock = tiny_run.model_dir("block-01") / locks.LOCK_NAME
    held: list[dict] = []
    real = DiTFamily.prepare_run

    def start_training(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        held.append(locks.acquire(lock, "block-01"))  # train-block 1 starts while the new run is being written
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiTFamily, "prepare_run", start_training)
    before = _files(tiny_run.root)
    with pytest.raises(RunError, match="block-01 is being trained"):
        split(tiny_recipe, out=tiny_run.root, force=True)
    locks.release(lock, held[0])
    assert _files(tiny_run.root) == {k: v for k, v in before.items()}  # the old run, its other locks released
    assert not list(tiny_run.root.parent.glob(f".{tiny_run.root.name}.*"))  # no staging folder, no split lock


def test_a_training_of_a_run_replaced_after_it_was_opened_trains_nothing(tiny_run: Run, tiny_recipe) -> None:  # noqa: ANN001
    from dbconvert.errors import DbconvertError
    from dbconvert.train import train_block

    split(tiny_recipe, out=tiny_run.root, force=True)  # after `tiny_run` was opened
    with pytest.raises(DbconvertError, match="was replaced by a new split after this training opened it"):
        train_block(tiny_run, 2, progress=False)
    assert not Run.open(tiny_run.root).status("block-02").trained


def test_a_second_split_to_a_folder_being_written_refuses(in_tmp: Path, tiny_recipe) -> None:  # noqa: ANN001
    from dbconvert import locks
    from dbconvert.errors import DbconvertError
    from dbconvert.split import split_lock

    out = in_tmp / "run"
    with locks.hold(split_lock(out), f"run folder {out}", doing="written"):  # another split at work
        with pytest.raises(DbconvertError, match=f"run folder {out} is already being written by pid"):
            split(tiny_recipe, out=out)
    assert not out.exists()


def test_two_splits_started_together_write_one_run_and_the_other_refuses(in_tmp: Path, tiny_recipe) -> None:  # noqa: ANN001
    import threading

    from dbconvert.errors import DbconvertError

    out = in_tmp / "run"
    start = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def one(name: str) -> None:
        recipe = tiny_recipe.model_copy(update={"name": name})
        start.wait()
        try:
            outcome[name] = split(recipe, out=out, make_current=False).recipe.name
        except DbconvertError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=one, args=(name,)) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = [name for name, got in outcome.items() if got == name]
    refused = [got for got in outcome.values() if isinstance(got, DbconvertError)]
    assert len(written) == 1 and len(refused) == 1, outcome
    assert "already being written" in str(refused[0]) or "already holds a run" in str(refused[0])
    assert Run.open(out).recipe.name == written[0]  # the run that was reported written is the one on disk


def test_a_run_made_meanwhile_by_another_process_is_never_replaced(
    in_tmp: Path,
    tiny_recipe,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dbconvert.families.dit.family import DiTFamily

    out = in_tmp / "run"
    real = DiTFamily.prepare_run

    def someone_writes_out(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        (out / "blocks").mkdir(parents=True)  # a folder that appears at `out` without taking the split's lock
        (out / "blocks" / "theirs.txt").write_text("theirs")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiTFamily, "prepare_run", someone_writes_out)
    with pytest.raises(RunError, match="was created by another process while this split ran"):
        split(tiny_recipe, out=out)
    assert _files(out) == {"blocks/theirs.txt": b"theirs"}
    assert not list(in_tmp.glob(".run.*"))
