"""The Python-API example runs as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dbconvert.rundir import Run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


def test_python_api_example_runs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "2", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "block 1: 2 steps" in out.stdout and (tmp_path / "run" / "samples").is_dir()


WALKTHROUGH = Path(__file__).resolve().parents[1] / "examples" / "own_data.md"
TINY_WALK = {
    "DATA": "tiny-shapes",
    "SIZE": "8",
    "CHANNELS": "1",
    "CLASSES": "2",
    "ARCH": "DiT-Micro/2",
    "BATCH": "16",
    "STEPS": "2",
    "NUM": "70",
}
"""The walk-through's settings for the tiny copy: 8x8 grey images in 2 classes, 2 training steps, 70 FID samples
(the built-in features are 64-d: FID needs 65 samples and 65 reference images)."""


def tiny_image_folder(root: Path) -> None:
    """train/ and test/ sub-folders of 8x8 PNGs in 2 classes (horizontal vs vertical bars, with noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 40), ("test", 35)):
        for label in (0, 1):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (8, 8))
                bar = rng.integers(1, 7)
                if label == 0:
                    img[bar] = 255
                else:
                    img[:, bar] = 255
                Image.fromarray(img.astype(np.uint8), "L").save(folder / f"{i:03d}.png")


def walkthrough_commands(text: str, settings: dict[str, str]) -> list[tuple[list[str], str | None]]:
    """The `dbconvert` commands of the walk-through's sh blocks, variables filled in: (argv, file for `>`)."""
    import re
    import shlex

    env: dict[str, str] = {}
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for raw in block.splitlines():
            line = raw.split("#")[0].strip()
            if not line:
                continue
            assign = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
            if assign:
                env[assign[1]] = settings.get(assign[1], assign[2])
                continue
            words = shlex.split(re.sub(r"\$([A-Z_]+)", lambda m: env[m[1]], line))
            assert words[0] == "dbconvert", line
            target = None
            if ">" in words:
                target = words[words.index(">") + 1]
                words = words[: words.index(">")]
            commands.append((words[1:], target))
    assert set(settings) <= set(env), "the test sets a variable the walk-through no longer has"
    return commands


def test_own_data_walkthrough_runs_on_a_tiny_synthetic_copy(in_tmp: Path, tmp_path_factory, monkeypatch) -> None:  # noqa: ANN001
    from tests.cli_helpers import invoke

    monkeypatch.setenv("DBCONVERT_CACHE", str(tmp_path_factory.getbasetemp() / "dbconvert-cache"))
    tiny_image_folder(in_tmp / TINY_WALK["DATA"])
    results = []
    for argv, target in walkthrough_commands(WALKTHROUGH.read_text(), TINY_WALK):
        result = invoke(*argv)
        assert result.exit_code == 0, (argv, result.output)
        if target:
            (in_tmp / target).write_text(result.stdout)
        results.append((argv, result))
    assert [argv[:2] for argv, _ in results][-3:] == [["eval", "fid"], ["eval", "fid"], ["eval", "compare"]]
    assert (in_tmp / "runs" / "dit-tiny-digits-tiny-shapes-B4" / "manifest.yaml").is_file()
    rows = [line.split() for line in results[-1][1].stdout.splitlines()]
    scored = {row[0]: row for row in rows if row[:1] in (["blocks"], ["e2e"])}
    assert set(scored) == {"blocks", "e2e"}
    for row in scored.values():
        assert row[1:3] == ["this", "run"] and row[6:9] == ["70", "test", "70"]  # n, reference split and size


def test_conversion_benefit_script_runs(tmp_path: Path) -> None:
    """The measurement behind the conversion table of docs/results/quality-dit.md, at toy size (2 pretraining
    steps, 70 samples)."""
    script = EXAMPLE.parent / "conversion_benefit.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--out",
            str(tmp_path / "cb"),
            "--pretrain",
            "2",
            "--finetune",
            "0,1",
            "--num",
            "70",
            "--seeds",
            "0",
            "model.arch=DiT-Micro/2",
            "sample.steps=3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "| 1 |" in out.stdout and (tmp_path / "cb" / "conversion-benefit.png").is_file()
    assert (tmp_path / "cb" / "converted" / "manifest.yaml").is_file()


def test_lm_conversion_benefit_script_runs(tmp_path: Path) -> None:
    """The measurement behind the LM conversion and text-protocol tables of docs/results/quality-llama.md, at toy
    size."""
    from tests.families.llama_tiny import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    tiny = [
        "model.layers=4",
        "model.hidden=32",
        "model.heads=4",
        "model.kv_heads=2",
        "model.intermediate=48",
        "model.vocab_size=300",
        "model.context=16",
        f"data.source={corpus}",
        "data.val_fraction=0.1",
        "train.batch_size=4",
        "train.warmup_steps=0",
        "train.log_every=1",
    ]
    script = EXAMPLE.parent / "lm_conversion_benefit.py"
    args = [
        sys.executable,
        str(script),
        "--out",
        str(tmp_path / "lm"),
        "--pretrain-steps",
        "2",
        "--pretrain-val-every",
        "1",
        "--steps",
        "2",
        "--val-every",
        "1",
        "--seeds",
        "0",
        "--prompts",
        "4",
        "--samples-per-prompt",
        "2",
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "4",
        "--judge-prompt-tokens",
        "3",
        "--sample-steps",
        "2",
        "--kmeans-seeds",
        "1",
        "--protocol-table",
        "--calibrated",
        *tiny,
    ]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "lm" / "summary.json").read_text())
    seed = summary["seeds"]["0"]
    for kind in ("converted", "calibrated", "scratch"):
        assert [sorted(b) for b in seed[kind]["blocks"]] == [["1", "2", "step0"]] * 4  # step 0 and every val step
        assert 0 <= seed[kind]["mauve_blocks"]["mean"] <= 1
    for model in ("blocks", "e2e", "ar"):
        assert seed["scratch"][f"genppl_{model}_few-step"]["mean"] > 1
    assert "| 0 | 0 |" in out.stdout and "few-step protocol" in out.stdout
    assert (tmp_path / "lm" / "source" / "config.json").is_file()
    again = subprocess.run(
        args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )  # a rerun reads every stage back
    assert again.returncode == 0 and json.loads((tmp_path / "lm" / "summary.json").read_text()) == summary
    i = args.index("--protocol-table")
    ranked = [*args[:2], "--arms", "calibrated", "--rank-arms", "8", *args[2:i], *args[i + 2 :]]  # issue 27 item 6
    out = subprocess.run(
        ranked, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seed = json.loads((tmp_path / "lm" / "summary.json").read_text())["seeds"]["0"]
    assert list(seed) == ["calibrated", "calibrated-r8"]  # calibrated-0 read back, only the rank arm trained
    before = summary["seeds"]["0"]["calibrated"]
    assert {k: seed["calibrated"][k] for k in ("blocks", "mauve_blocks")} == {
        k: before[k] for k in ("blocks", "mauve_blocks")
    }
    assert Run.open(tmp_path / "lm" / "calibrated-r8-0").recipe.model.adaln_rank == 8
    assert "| block | step | calibrated | calibrated-r8 |" in out.stdout  # no gap column without converted, scratch
    refused = subprocess.run([*ranked, "--protocol-table"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert refused.returncode != 0 and "keep scratch in --arms" in refused.stderr
