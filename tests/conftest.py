"""Shared fixtures: tiny recipes and runs that keep the suite fast on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait for the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

TINY_OVERRIDES = [
    "model.arch=DiT-Micro/2",
    "train.steps=4",
    "train.batch_size=16",
    "train.warmup_steps=0",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "sample.steps=4",
    "sample.num=4",
]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_recipe():
    from dbconvert.config import load_recipe

    return load_recipe("dit-tiny-digits", TINY_OVERRIDES)


@pytest.fixture
def tiny_run(in_tmp: Path, tiny_recipe):
    """A freshly split 4-block run of a 4-layer DiT on digits, in the temp working directory."""
    from dbconvert.split import split

    return split(tiny_recipe, out=in_tmp / "run")
