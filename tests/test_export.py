"""export: a run's networks back in the reference format; export -> split gives the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dbconvert.checkpoint import load_weights
from dbconvert.families.dit.model import DiT, DiTShape
from dbconvert.rundir import Run
from dbconvert.source_ref import source_state
from tests.cli_helpers import assert_user_error, invoke
from tests.conftest import TINY_OVERRIDES
from tests.families.test_dit_parameterization import reference_checkpoint


def split_cli(out: str, *overrides: str) -> Run:
    result = invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, *overrides, "--out", out)
    assert result.exit_code == 0, result.output
    return Run.open(out)


def same_weights(a: Path, b: Path) -> None:
    left, right = load_weights(a), load_weights(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def assert_same_run_weights(a: Run, b: Run) -> None:
    left, right = dict(source_state(a)), dict(source_state(b))  # a copy in the run, or the checkpoint by reference
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    for block in a.blocks:
        name = Run.block_name(block.index)
        same_weights(a.model_dir(name) / "model.safetensors", b.model_dir(name) / "model.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_dit_source_round_trips_through_export_and_split(in_tmp: Path, suffix: str) -> None:
    first = split_cli("first")
    out = in_tmp / f"exported{suffix}"
    result = invoke("export", str(out), "--run", "first")
    assert result.exit_code == 0, result.output
    assert "exported source" in result.stdout
    assert out.is_file() and not list(in_tmp.glob(".exported*"))  # no staging folder left
    if suffix == ".safetensors":
        assert "records its parameterization (edm)" in result.stderr
        again = split_cli("again", f"model.checkpoint={out}")  # auto reads the export's metadata
    else:
        assert "split it with model.parameterization=edm" in result.stderr
        assert isinstance(torch.load(out, weights_only=True), dict)  # a plain state dict, as the reference saves
        again = split_cli("again", f"model.checkpoint={out}", "model.parameterization=edm")
    assert again.parameterization == {"name": "edm"}
    assert_same_run_weights(first, again)


def test_converted_reference_checkpoint_exports_as_the_reference_network(in_tmp: Path) -> None:
    ref = reference_checkpoint(in_tmp / "ref.pt", learn_sigma=True)  # a DDPM epsilon-predictor with variance channels
    first = split_cli("first", f"model.checkpoint={in_tmp / 'ref.pt'}", "model.learn_sigma=true")
    assert invoke("export", "out.pt", "--run", "first").exit_code == 0
    net = DiT(DiTShape(8, 1, 10, 4, 32, 2, 2, learn_sigma=False))
    net.load_state_dict(torch.load(in_tmp / "out.pt", weights_only=True), strict=True)  # learn_sigma=False layout
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 400.0, 999.0]), torch.tensor([1, 10, 4])
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x, t, y), ref(x, t, y)[:, :1])  # the mean channels
    again = split_cli("again", f"model.checkpoint={in_tmp / 'out.pt'}")
    assert again.parameterization["name"] == "ddpm-eps"
    assert_same_run_weights(first, again)


def test_dit_export_of_trained_networks(in_tmp: Path) -> None:
    run = split_cli("run")
    assert_user_error(invoke("export", "e2e.pt", "--model", "e2e", "--run", "run"), "e2e of run is not trained")
    assert_user_error(invoke("export", "b.pt", "--block", "1", "--run", "run"), "run `dbconvert train-block 1` first")
    assert_user_error(invoke("export", "x.bin", "--run", "run"), "end the path in .pt or .pth or .safetensors")
    assert_user_error(invoke("export", "x.pt", "--model", "ar", "--run", "run"), "--model must be one of")
    assert_user_error(invoke("export", "x.pt", "--model", "blocks", "--run", "run"), "pass --block I")
    assert invoke("train-e2e", "--run", "run", "--steps", "2", "-q").exit_code == 0
    assert invoke("train-block", "1", "--run", "run", "--steps", "2", "-q").exit_code == 0
    assert invoke("export", "e2e.safetensors", "--model", "e2e", "--run", "run").exit_code == 0
    same_weights(in_tmp / "e2e.safetensors", run.model_dir("e2e") / "ema.safetensors")
    assert invoke("export", "e2e-raw.pt", "--model", "e2e", "--weights", "model", "--run", "run").exit_code == 0
    raw = torch.load(in_tmp / "e2e-raw.pt", weights_only=True)
    assert torch.equal(
        raw["final_layer.linear.weight"],
        load_weights(run.model_dir("e2e") / "model.safetensors")["final_layer.linear.weight"],
    )
    result = invoke("export", "block1.safetensors", "--block", "1", "--run", "run")
    assert result.exit_code == 0 and "stand-alone denoiser of depth 1" in result.stderr
    with safe_open(str(in_tmp / "block1.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["dbconvert"])
    assert meta["exported"] == "block-01" and meta["sigma_range"] == list(run.block(1).owned_range)
    net = DiT(DiTShape(8, 1, 10, 1, 32, 2, 2))
    net.load_state_dict(load_weights(in_tmp / "block1.safetensors"), strict=True)


def test_export_to_an_existing_path_needs_force_and_never_damages_it(in_tmp: Path) -> None:
    split_cli("run")
    out = in_tmp / "out.pt"
    out.write_text("keep me")
    assert_user_error(invoke("export", str(out), "--run", "run"), "already exists; pass --force")
    assert out.read_text() == "keep me"
    folder = in_tmp / "folder.pt"
    folder.mkdir()
    (folder / "inside").write_text("x")
    assert_user_error(invoke("export", str(folder), "--run", "run"), "already exists")
    assert invoke("export", str(out), "--run", "run", "--force").exit_code == 0
    assert isinstance(torch.load(out, weights_only=True), dict)
    assert_user_error(invoke("export", str(folder), "--run", "run", "--force"), "not an earlier dit export")
    assert (folder / "inside").read_text() == "x"  # a non-empty folder is never replaced by a file
    folder.joinpath("inside").unlink()
    assert invoke("export", str(folder), "--run", "run", "--force").exit_code == 0  # an empty one may be
    assert folder.is_file()
    assert not [p for p in in_tmp.iterdir() if p.name.startswith(".") and "export" in p.name]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: what must not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("target", ["run", ".", "run/source/x.pt", "run/blocks"])
def test_export_force_never_replaces_the_run_or_a_folder_around_or_inside_it(in_tmp: Path, target: str) -> None:
    split_cli("run")
    (in_tmp / "unrelated.txt").write_text("keep")
    before = tree(in_tmp)
    result = invoke("export", target, "--run", "run", "--force")
    assert_user_error(result, "the run folder")
    assert tree(in_tmp) == before


def test_export_dot_outside_the_run_is_one_line_not_oserror(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split_cli("run")
    (in_tmp / "elsewhere").mkdir()
    (in_tmp / "elsewhere" / "mine.txt").write_text("keep")
    monkeypatch.chdir(in_tmp / "elsewhere")
    assert_user_error(invoke("export", ".", "--run", str(in_tmp / "run"), "--force"), "is the working folder")
    assert (in_tmp / "elsewhere" / "mine.txt").read_text() == "keep"


def test_exported_files_have_normal_permissions_and_pt_exports_are_byte_reproducible(in_tmp: Path) -> None:
    import os

    split_cli("run")
    old = os.umask(0o022)
    try:
        for name in ("a.pt", "b.pt", "c.safetensors"):
            assert invoke("export", name, "--run", "run").exit_code == 0
    finally:
        os.umask(old)
    assert (in_tmp / "a.pt").read_bytes() == (in_tmp / "b.pt").read_bytes()
    for name in ("a.pt", "c.safetensors", "run/source/model.safetensors"):
        assert (in_tmp / name).stat().st_mode & 0o777 == 0o644, name


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export_but_not_a_live_ones(in_tmp: Path) -> None:
    import os
    import socket

    split_cli("run")
    dead = in_tmp / ".out.pt.export-dead1234"
    live = in_tmp / ".out.pt.export-live1234"
    other = in_tmp / ".other.pt.export-dead5678"
    for folder, pid in ((dead, 2**22 + 7), (live, os.getpid()), (other, 2**22 + 7)):
        folder.mkdir()
        (folder / "out.pt").write_bytes(b"partial")
        (folder / ".owner.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": None}))
    result = invoke("export", "out.pt", "--run", "run")
    assert result.exit_code == 0, result.output
    assert not dead.exists() and live.exists() and other.exists()
    assert "removed 1 staging folder" in result.stderr


# --- Llama ----------------------------------------------------------------------------------


def test_llama_source_exports_a_transformers_folder_that_splits_back(in_tmp: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.families.test_llama import CORPUS, tiny_overrides
    from tests.families.test_llama_tokenizer import checkpoint_with_tokenizer

    (in_tmp / "corpus.txt").write_text(CORPUS)
    ids = checkpoint_with_tokenizer(in_tmp / "hf")
    original = LlamaForCausalLM.from_pretrained(in_tmp / "hf").eval()
    overrides = tiny_overrides(in_tmp / "corpus.txt")

    def split_llama(out: str, checkpoint: Path) -> Run:
        result = invoke("split", "llama-tiny-shakespeare", *overrides, f"model.checkpoint={checkpoint}", "--out", out)
        assert result.exit_code == 0, result.output
        return Run.open(out)

    first = split_llama("first", in_tmp / "hf")
    result = invoke("export", "exported", "--run", "first")
    assert result.exit_code == 0, result.output
    exported = LlamaForCausalLM.from_pretrained(in_tmp / "exported").eval()
    tokens = torch.randint(0, 280, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, original(tokens).logits, atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(in_tmp / "exported")
    assert tok("ROMEO: hi").input_ids == first.family().tokenizer().encode("ROMEO: hi")
    assert tok("ROMEO: hi").input_ids[0] == ids["<s>"] and tok.eos_token_id == ids["</s>"]
    assert exported.generation_config.eos_token_id == [ids["</s>"], ids["<|eot_id|>"]]
    again = split_llama("again", in_tmp / "exported")
    assert_same_run_weights(first, again)
    same_weights(first.shared_dir / "targets.safetensors", again.shared_dir / "targets.safetensors")
    assert again.family().tokenizer().settings.stop_ids == first.family().tokenizer().settings.stop_ids
    assert_user_error(
        invoke("export", "blocks", "--block", "0", "--run", "first"), "a Llama blocks network is a denoiser"
    )
    assert_user_error(
        invoke("export", "e2e", "--model", "e2e", "--run", "first"), "export --model source or --model ar"
    )
    assert_user_error(invoke("export", "x.safetensors", "--run", "first"), "a Hugging Face folder")
    assert invoke("export", "exported", "--run", "first", "--force").exit_code == 0  # an earlier export: replaced
    assert_user_error(invoke("export", "hf", "--run", "first", "--force"), "not an earlier llama export")
    assert LlamaForCausalLM.from_pretrained(in_tmp / "hf") is not None  # a folder export did not write: intact


def test_split_of_a_pt_export_says_its_parameterization_is_assumed_and_a_block_export_says_its_range_is_ignored(
    in_tmp: Path,
) -> None:
    split_cli("run")
    assert invoke("export", "src.pt", "--run", "run").exit_code == 0
    result = invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "model.checkpoint=src.pt", "--out", "again")
    assert result.exit_code == 0, result.output
    assert "taken as a DDPM epsilon-predictor" in result.stderr and "model.parameterization=edm" in result.stderr
    explicit = invoke(
        "split",
        "dit-tiny-digits",
        *TINY_OVERRIDES,
        "model.checkpoint=src.pt",
        "model.parameterization=edm",
        "--out",
        "edm",
    )
    assert explicit.exit_code == 0 and "taken as" not in explicit.stderr
    assert invoke("train-block", "1", "--run", "run", "--steps", "1", "-q").exit_code == 0
    assert invoke("export", "block1.safetensors", "--block", "1", "--run", "run").exit_code == 0
    block = invoke(
        "split",
        "dit-tiny-digits",
        *TINY_OVERRIDES,
        "model.checkpoint=block1.safetensors",
        "model.depth=1",
        "-b",
        "1",
        "--out",
        "from-block",
    )
    assert block.exit_code == 0, block.output
    assert "is a block export" in block.stderr and "that range ignored" in block.stderr
