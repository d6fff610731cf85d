"""`bench split` at toy size: a random bf16 checkpoint written, split and one block trained in fresh processes, the
figures reported, and the scratch folder removed (the real-size runs are measurements in docs/results/conversion.md,
never tests)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from tests.cli_helpers import assert_user_error, invoke

TOY = [
    "model.layers=4",
    "model.hidden=64",
    "model.heads=4",
    "model.kv_heads=2",
    "model.head_dim=16",
    "model.intermediate=96",
    "model.vocab_size=600",
    "model.context=16",
]


def test_bench_split_reports_the_split_and_a_training_step(in_tmp: Path) -> None:
    result = invoke("bench", "split", "tinyllama-1.1b-shape", *TOY, "--blocks", "2", "--json", "--keep")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["dtype"] == "bfloat16" and r["blocks"] == 2
    assert r["checkpoint_bytes"] > 0 and r["split"]["seconds"] > 0 and r["split"]["peak_rss_bytes"] > 0
    assert r["train"]["measured"] and r["train"]["peak_rss_bytes"] > 0 and r["train"]["static_bytes"] > 0
    scratch = Path(r["folder"])
    with safe_open(str(scratch / "run" / "blocks" / "block-00" / "init.safetensors"), "pt") as fh:  # as split wrote it
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}  # the checkpoint's dtype kept
    assert r["largest_block_file_bytes"] == max(
        p.stat().st_size for p in (scratch / "run" / "blocks").glob("*/init.safetensors")
    )
    assert json.loads((scratch / "run" / "blocks" / "block-00" / "state.json").read_text())["step"] == 1
    table = invoke("bench", "split", "tinyllama-1.1b-shape", *TOY, "--blocks", "2", "--no-train")
    assert table.exit_code == 0, table.output
    assert "split peak RSS GiB" in table.stdout and "block 0 was not trained: --no-train" in table.stdout
    assert [p.name for p in in_tmp.iterdir() if p.name.startswith(".dbconvert-bench-split-")] == [scratch.name]


def test_bench_split_bad_inputs_are_one_line(in_tmp: Path) -> None:
    assert_user_error(invoke("bench", "split", "tinyllama-1.1b-shape", "--blocks", "5"), "do not divide the 22 layers")
    assert_user_error(invoke("bench", "split", "tinyllama-1.1b-shape", "--dtype", "int8"), "--dtype must be one of")
    from dbconvert.families import register, unregister
    from tests.families.test_contract import RECIPE

    (in_tmp / "toy.yaml").write_text(RECIPE)
    register("toy", "tests.families.toy_family:ToyFamily", "tests.families.toy_family:ToyConfig")
    try:  # a family without a random checkpoint of its own: refused before any scratch folder is made
        assert_user_error(invoke("bench", "split", "toy.yaml"), "cannot write a random checkpoint")
    finally:
        unregister("toy")
    assert not any(p.name.startswith(".dbconvert-bench-split-") for p in in_tmp.iterdir())


def test_bench_split_of_the_image_families(in_tmp: Path) -> None:
    """DiT (reference layout, learn_sigma) and ViT (timm names) random checkpoints split and train a step."""
    for recipe, extra in (
        ("dit-xl2-shape", ["model.arch=DiT-Micro/2", "model.input_size=8", "model.num_classes=4"]),
        (
            "vit-b16-shape",
            [
                "model.arch=vit-micro",
                "model.img_size=8",
                "model.in_chans=1",
                "model.num_classes=4",
                "train.batch_size=8",
            ],
        ),
    ):
        result = invoke("bench", "split", recipe, *extra, "--blocks", "2", "--json")
        assert result.exit_code == 0, result.output
        r = json.loads(result.stdout)
        assert r["train"]["measured"] and r["split"]["run_bytes"] > 0, recipe
