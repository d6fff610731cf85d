"""Whether an evaluation split holds data the run trains on: by the split's name and, for images, pixel for pixel.

A score on training data reads as a generalisation figure unless it says otherwise, so every metric records
`reference_overlaps_training` (and, for images, how many of the scored images are training images) and the
tables and figures flag it. A `data.test_source` that is a copy of the training images under another path is
found by the pixel check, not by the path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NCHW, with the same rounding as the PNGs `dbconvert sample` writes."""
    return np.clip((x.numpy() + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def image_digest(pixels: np.ndarray) -> str:
    """sha1 of one uint8 image (CHW): equal digests are equal images."""
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def image_digests(pixels: np.ndarray) -> set[str]:
    """The digests of every uint8 image of a batch (NCHW)."""
    return {image_digest(p) for p in pixels}


def overlapping_images(train: torch.Tensor, scored: torch.Tensor) -> int:
    """How many of the `scored` images (NCHW in [-1, 1]) equal a training image once written as 8-bit pixels."""
    seen = image_digests(to_uint8(train))
    return sum(image_digest(p) in seen for p in to_uint8(scored))


def split_overlaps_training(data_cfg: Any, split: str) -> bool:
    """Whether the split named `split` is (or holds) the split the run trains on (`data.split`), by name."""
    if split == data_cfg.split or "all" in (split, data_cfg.split):
        return True
    test_source = getattr(data_cfg, "test_source", None)
    if split == "test" and test_source is not None:
        return Path(test_source).expanduser().resolve() == Path(data_cfg.source).expanduser().resolve()
    return False


def split_source(data_cfg: Any, split: str) -> str:
    """Where a split's data comes from: `data.test_source` for the test split when one is set, else `data.source`."""
    test_source = getattr(data_cfg, "test_source", None)
    return str(test_source) if split == "test" and test_source is not None else str(data_cfg.source)
