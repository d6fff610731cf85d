"""The Python-API example runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


def test_python_api_example_runs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "2", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "block 1: 2 steps" in out.stdout and (tmp_path / "run" / "samples").is_dir()


def test_conversion_benefit_script_runs(tmp_path: Path) -> None:
    """The measurement behind the README's conversion table, at toy size (2 pretraining steps, 70 samples)."""
    script = EXAMPLE.parent / "conversion_benefit.py"
    out = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "cb"), "--pretrain", "2", "--finetune", "0,1",
         "--num", "70", "--seeds", "0", "model.arch=DiT-Micro/2", "sample.steps=3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "| 1 |" in out.stdout and (tmp_path / "cb" / "conversion-benefit.png").is_file()
    assert (tmp_path / "cb" / "converted" / "manifest.yaml").is_file()
