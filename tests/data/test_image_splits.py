"""Honest splits of local image data: no test split is ever the training images in disguise (issue 14.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbconvert.data.images import load_images
from dbconvert.errors import DataError
from dbconvert.schema import DataConfig


def npz(path: Path, n: int, start: int = 0) -> Path:
    """n distinct 4x4 grey images (image i is filled with the value start + i), labels i % 2."""
    values = np.arange(start, start + n, dtype=np.uint8)
    np.savez(path, x=np.broadcast_to(values[:, None, None], (n, 4, 4)).copy(), y=values % 2)
    return path


def pixel_values(data) -> list[int]:  # noqa: ANN001
    return [int(round((v + 1) * 127.5)) for v in data.x[:, 0, 0, 0].tolist()]


def folder(root: Path, classes: dict[str, int], start: int = 0) -> Path:
    value = start
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((4, 4), value, np.uint8), "L").save(root / name / f"{i}.png")
            value += 1
    return root


def test_npz_without_a_test_split_refuses_test_and_trains_on_all(tmp_path: Path) -> None:
    cfg = DataConfig(source=str(npz(tmp_path / "a.npz", 10)))
    assert len(load_images(cfg)) == 10
    with pytest.raises(DataError, match="has no test split.*data.test_source=PATH.*data.test_fraction"):
        load_images(cfg, "test")


def test_test_fraction_holds_out_a_seeded_disjoint_share(tmp_path: Path) -> None:
    cfg = DataConfig(source=str(npz(tmp_path / "a.npz", 20)), test_fraction=0.25)
    train, test = load_images(cfg, "train"), load_images(cfg, "test")
    assert len(test) == 5 and len(train) == 15
    assert sorted(pixel_values(train) + pixel_values(test)) == list(range(20))
    assert pixel_values(load_images(cfg, "test")) == pixel_values(test)  # fixed by data.split_seed
    other = load_images(cfg.model_copy(update={"split_seed": 1}), "test")
    assert pixel_values(other) != pixel_values(test)
    assert len(load_images(cfg, "all")) == 20


def test_test_source_names_the_test_data(tmp_path: Path) -> None:
    cfg = DataConfig(source=str(npz(tmp_path / "train.npz", 10)), test_source=str(npz(tmp_path / "test.npz", 4, 100)))
    assert pixel_values(load_images(cfg, "test")) == [100, 101, 102, 103]
    assert len(load_images(cfg, "train")) == 10
    with pytest.raises(DataError, match="not both"):
        load_images(cfg.model_copy(update={"test_fraction": 0.1}), "test")


def test_split_sub_folders_are_the_splits(tmp_path: Path) -> None:
    images = tmp_path / "images"
    folder(images / "train", {"cat": 3, "dog": 2})
    folder(images / "test", {"cat": 1, "dog": 2}, start=100)
    cfg = DataConfig(source=str(images))
    train, test = load_images(cfg, "train"), load_images(cfg, "test")
    assert sorted(pixel_values(train)) == [0, 1, 2, 3, 4] and sorted(pixel_values(test)) == [100, 101, 102]
    assert test.y.tolist() == [0, 1, 1]  # class folders name the same labels in both splits
    with pytest.raises(DataError, match="split sub-folders"):
        load_images(cfg.model_copy(update={"test_fraction": 0.2}), "test")

    shards = tmp_path / "shards"
    for split, start in (("train", 0), ("test", 50)):
        (shards / split).mkdir(parents=True)
        npz(shards / split / "0.npz", 3, start)
    cfg = DataConfig(source=str(shards))
    assert pixel_values(load_images(cfg, "test")) == [50, 51, 52] and len(load_images(cfg)) == 3
    with pytest.raises(DataError, match="no 'validation' split"):
        load_images(cfg, "validation")


def test_image_folder_test_source_needs_the_same_classes(tmp_path: Path) -> None:
    train = folder(tmp_path / "train", {"cat": 2, "dog": 2})
    test = folder(tmp_path / "test", {"cat": 1, "dog": 1}, start=100)
    cfg = DataConfig(source=str(train), test_source=str(test))
    held = load_images(cfg, "test")
    assert pixel_values(held) == [100, 101] and torch.equal(held.y, torch.tensor([0, 1]))
    odd = folder(tmp_path / "odd", {"dog": 2}, start=200)
    with pytest.raises(DataError, match="same class folders"):
        load_images(cfg.model_copy(update={"test_source": str(odd)}), "test")
