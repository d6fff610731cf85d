"""The source by reference: the same `sample --model source`, `export` and `train-e2e` as a copy in the run, and a
moved or changed checkpoint (or another key map) is one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from dbconvert.rundir import Run
from dbconvert.source_ref import KEY_MAP_FILE, source_state
from tests.cli_helpers import assert_user_error, invoke
from tests.families.llama_tiny import tiny_overrides, write_corpus
from tests.test_split_streaming import llama_checkpoint


def split_two(in_tmp: Path) -> tuple[Run, Run]:
    folder = llama_checkpoint(in_tmp / "hf", torch.bfloat16)
    overrides = tiny_overrides(write_corpus(in_tmp), **{"model.checkpoint": str(folder), "blocks.num": 2})
    for name, extra in (("ref", []), ("copy", ["--copy-source"])):
        result = invoke("split", "llama-tiny-shakespeare", *overrides, "--out", name, *extra)
        assert result.exit_code == 0, result.output
    return Run.open(in_tmp / "ref"), Run.open(in_tmp / "copy")


def test_by_reference_and_a_copy_sample_export_and_train_alike(in_tmp: Path) -> None:
    ref, copy = split_two(in_tmp)
    assert not (ref.root / "source").exists() and ref.manifest["source"]["by_reference"]
    assert (copy.root / "source" / "model.safetensors").is_file() and "by_reference" not in copy.manifest["source"]
    assert [f["path"] for f in ref.manifest["source"]["files"]] == [
        str((in_tmp / "hf" / "model.safetensors").resolve())
    ]
    info = invoke("info", "--run", ref.root)
    assert (
        info.exit_code == 0
        and f"source: by reference to {(in_tmp / 'hf' / 'model.safetensors').resolve()}" in info.stdout
    )
    assert "blocks stored as bfloat16" in info.stdout
    assert "source: a copy inside the run" in invoke("info", "--run", copy.root).stdout
    a, b = dict(source_state(ref)), dict(source_state(copy))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.bfloat16 for k in a)
    texts = []
    for run in (ref, copy):
        result = invoke(
            "sample",
            "--model",
            "source",
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "6",
            "--num",
            "2",
            "--run",
            run.root,
        )
        assert result.exit_code == 0, result.output
        texts.append((run.root / "samples" / "source-t1-p1-seed0" / "samples.jsonl").read_text())
        assert invoke("export", f"{run.root.name}-hf", "--run", run.root).exit_code == 0
    assert texts[0] == texts[1]
    assert (in_tmp / "ref-hf" / "model.safetensors").read_bytes() == (
        in_tmp / "copy-hf" / "model.safetensors"
    ).read_bytes()
    for run in (ref, copy):
        result = invoke("train-e2e", "--steps", "1", "--run", run.root)
        assert result.exit_code == 0, result.output
    left, right = (
        load_file(str(ref.root / "e2e" / "model.safetensors")),
        load_file(str(copy.root / "e2e" / "model.safetensors")),
    )
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_a_moved_or_changed_checkpoint_is_one_line(in_tmp: Path) -> None:
    ref, _ = split_two(in_tmp)
    sha = ref.manifest["source"]["sha256"]
    weights = in_tmp / "hf" / "model.safetensors"
    shutil.move(weights, in_tmp / "elsewhere.safetensors")
    for args in (["sample", "--model", "source", "--prompt", "R"], ["export", "out-hf"], ["train-e2e", "--steps", "1"]):
        result = invoke(*args, "--run", ref.root)
        assert_user_error(result, f"{weights.resolve()} (recorded sha256 {sha}) does not exist")
    shutil.move(in_tmp / "elsewhere.safetensors", weights)
    assert invoke("export", "back-hf", "--run", ref.root).exit_code == 0  # put back: it reads again
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the same size, another tensor value
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert_user_error(invoke("export", "changed-hf", "--run", ref.root), f"no longer has the recorded sha256 {sha}")
    assert not (in_tmp / "changed-hf").exists()


def test_a_different_key_map_is_one_line(in_tmp: Path) -> None:
    ref, _ = split_two(in_tmp)
    path = ref.shared_dir / KEY_MAP_FILE
    recorded = json.loads(path.read_text())
    assert recorded["embed_tokens.weight"] == "model.embed_tokens.weight" and recorded["noisy_in.weight"] == "new"
    assert recorded["layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.up_proj.weight"
    recorded["layers.0.mlp.up_proj.weight"] = "model.layers.0.mlp.gate_proj.weight"
    path.write_text(json.dumps(recorded))
    assert_user_error(invoke("export", "x-hf", "--run", ref.root), "with another key map than the one")


def test_a_vit_run_split_before_the_split_streamed_still_reads_its_source(in_tmp: Path) -> None:
    """ViT runs split by reference before the ViT split streamed recorded every key as "new" (the source was built
    in memory): the same keys read the checkpoint again; a record with other keys is still one line."""
    from tests.families.test_vit import TINY, tiny_timm

    torch.save(tiny_timm().state_dict(), in_tmp / "vit.pth")
    result = invoke("split", "vit-tiny-digits", *TINY, f"model.checkpoint={in_tmp / 'vit.pth'}", "--out", "v")
    assert result.exit_code == 0, result.output
    run = Run.open(in_tmp / "v")
    path = run.shared_dir / KEY_MAP_FILE
    recorded = json.loads(path.read_text())
    assert recorded["blocks.2.mlp.fc1.weight"] == "blocks.2.mlp.fc1.weight"
    assert recorded["t_embedder.mlp.0.bias"] == "new"
    path.write_text(json.dumps(dict.fromkeys(recorded, "new")))
    assert torch.equal(source_state(run)["head.weight"], tiny_timm().state_dict()["head.weight"])
    path.write_text(json.dumps(dict.fromkeys([*recorded, "extra.weight"], "new")))
    assert_user_error(invoke("export", "x.pth", "--model", "source", "--run", run.root), "with another key map than")
