"""Data parallelism (torchrun + gloo on CPU), the global-batch split, precision and compile settings."""

from __future__ import annotations

import math

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbconvert import distributed
from dbconvert.checkpoint import load_weights
from dbconvert.errors import DbconvertError
from dbconvert.rundir import Run
from dbconvert.train import train_block


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_no_torchrun_environment_means_one_process() -> None:
    assert distributed.from_env({}) == distributed.SINGLE
    assert not distributed.from_env({"WORLD_SIZE": "1", "RANK": "0"}).enabled
    two = distributed.from_env(
        {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    )
    assert (two.rank, two.world_size, two.is_main, two.shard) == (1, 2, False, (1, 2))
    assert two.slice(16) == slice(8, 16)
    with pytest.raises(DbconvertError, match="does not divide by the world size 2"):
        two.slice(15)
    with pytest.raises(DbconvertError, match="MASTER_ADDR"):
        distributed.from_env({"WORLD_SIZE": "2", "RANK": "0"})


def test_rank_slices_of_the_loss_average_to_the_global_loss(tiny_run: Run) -> None:
    """Each rank draws the randomness of the whole global batch and keeps its slice."""
    recipe = tiny_run.recipe
    family = tiny_run.family()
    net = family.block_network(recipe, 1)
    den = family.denoiser(recipe, net, tiny_run.noise())
    data = family.load_data(recipe)
    x, y = data.batch(torch.arange(16))
    rng = tiny_run.block(0).train_range
    full, _ = family.training_loss(den, (x, y), rng, recipe, torch.Generator().manual_seed(3))
    halves = [
        family.training_loss(
            den,
            (x[r * 8 : (r + 1) * 8], y[r * 8 : (r + 1) * 8]),
            rng,
            recipe,
            torch.Generator().manual_seed(3),
            shard=(r, 2),
        )[0]
        for r in range(2)
    ]
    assert torch.allclose(full, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-6)


def test_torchrun_two_ranks_match_one_process_and_resume_across_world_sizes(tiny_run: Run, tmp_path: Path) -> None:
    """2 gloo ranks (resuming a 1-process checkpoint) end with the weights of one process on the global batch."""
    ddp = Run.open(shutil.copytree(tiny_run.root, tmp_path / "ddp"))
    train_block(tiny_run, 1, steps=6, progress=False)  # reference: one process, 6 steps
    train_block(ddp, 1, steps=2, progress=False)  # one process to step 2, then 2 ranks to step 6
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dbconvert",
        "--",
        "train-block",
        "1",
        "--run",
        str(ddp.root),
        "--steps",
        "6",
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("block-01: step 6/6") == 1  # only rank 0 reports
    for name in ("model", "ema", "state"):
        a = load_weights(tiny_run.model_dir("block-01") / f"{name}.safetensors")
        b = load_weights(ddp.model_dir("block-01") / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert b[k].dtype == a[k].dtype
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), (name, k)
    records = [__import__("json").loads(x) for x in ddp.metrics_path("block-01").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6] and records[-1]["world_size"] == 2
    assert not (ddp.model_dir("block-01") / "train.lock").exists()


def test_torchrun_with_activation_checkpointing_matches_one_process_without(tiny_run: Run, tmp_path: Path) -> None:
    """train.activation_checkpointing=true under DDP (2 gloo ranks): the weights of one plain process."""
    ddp = Run.open(shutil.copytree(tiny_run.root, tmp_path / "ddp"))
    train_block(tiny_run, 2, steps=2, progress=False)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dbconvert",
        "--",
        "train-block",
        "2",
        "--run",
        str(ddp.root),
        "--steps",
        "2",
        "--quiet",
        "train.activation_checkpointing=true",
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a = load_weights(tiny_run.model_dir("block-02") / "model.safetensors")
    b = load_weights(ddp.model_dir("block-02") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_bf16_on_cpu_trains_and_checkpoints_stay_fp32(tiny_run: Run) -> None:
    fp32 = Run.open(shutil.copytree(tiny_run.root, tiny_run.root.parent / "fp32"))
    result = train_block(tiny_run, 2, overrides=["train.precision=bf16"], progress=False)
    reference = train_block(fp32, 2, progress=False)
    assert result.last_loss is not None and math.isfinite(result.last_loss)
    assert result.last_loss == pytest.approx(reference.last_loss, rel=0.05)  # bf16 autocast, the same loss to rounding
    for name in ("model", "ema", "state"):
        weights = load_weights(tiny_run.model_dir("block-02") / f"{name}.safetensors")
        assert {v.dtype for v in weights.values()} <= {torch.float32, torch.int64}, name
    with pytest.raises(DbconvertError, match="fp16 needs a CUDA device"):
        train_block(tiny_run, 3, overrides=["train.precision=fp16"], progress=False)


def test_compile_without_a_compiler_is_one_clear_line(tiny_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DbconvertError, match="needs a C\\+\\+ compiler"):
        train_block(tiny_run, 0, overrides=["train.compile=true"], progress=False)
