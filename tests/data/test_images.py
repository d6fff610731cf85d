"""Image data: built-in digits, .npz arrays, image folders, and the hub path offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dbconvert.config import DataConfig
from dbconvert.data.images import load_images
from dbconvert.errors import DataError


def test_digits_are_offline_grey_8x8_in_minus_one_to_one() -> None:
    train, test = load_images(DataConfig(source="digits")), load_images(DataConfig(source="digits"), "test")
    assert train.x.shape[1:] == (1, 8, 8) and train.x.min() == -1.0 and train.x.max() == 1.0
    assert len(train) + len(test) == 1797 and train.num_classes == 10
    assert set(train.y.unique().tolist()) == set(range(10))
    assert torch.equal(load_images(DataConfig(source="digits")).x, train.x)  # fixed split


def test_npz_file_and_shard_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)  # NHWC uint8
    np.savez(tmp_path / "a.npz", images=imgs, labels=np.arange(6))
    data = load_images(DataConfig(source=str(tmp_path / "a.npz")))
    assert data.x.shape == (6, 3, 4, 4) and data.x.min() >= -1 and data.x.max() <= 1
    assert data.x[0, 0, 0, 0].item() == pytest.approx(imgs[0, 0, 0, 0] / 127.5 - 1)
    shards = tmp_path / "latents"
    shards.mkdir()
    for i in range(2):
        np.savez(shards / f"{i}.npz", latents=np.full((3, 4, 2, 2), i, dtype=np.float32), labels=np.full(3, i))
    lat = load_images(DataConfig(source=str(shards)))
    assert lat.x.shape == (6, 4, 2, 2) and lat.x.max() == 1.0 and lat.y.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_through_datasets(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), "L").save(tmp_path / label / f"{i}.png")
    data = load_images(DataConfig(source=str(tmp_path)))
    assert data.x.shape == (6, 1, 8, 8) and sorted(data.y.tolist()) == [0, 0, 0, 1, 1, 1]


def test_bad_npz_is_a_clear_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", other=np.zeros(3))
    with pytest.raises(DataError, match="no array named x"):
        load_images(DataConfig(source=str(tmp_path / "b.npz")))
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_images(DataConfig(source=str(tmp_path / "c.npz")))


def test_hub_data_set_offline_fails_with_instructions() -> None:
    with pytest.raises(DataError, match="could not be loaded from the Hugging Face hub.*point data.source"):
        load_images(DataConfig(source="cifar10"))


def test_unknown_split_of_digits() -> None:
    with pytest.raises(DataError, match="splits train, test"):
        load_images(DataConfig(source="digits"), "validation")


def test_sixteen_bit_images_keep_their_range_in_folders_and_sample_images(tmp_path: Path) -> None:
    """A 16-bit PNG is scaled by 65535, not clipped at 255 (issue 34: a 6 was read as a 1), in an image folder
    data set and in `sample --images`; a float image, whose range is unknown, is one line."""
    from PIL import Image

    from dbconvert.families.vit.generate import read_image_folder

    wide = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # up to 63000: all but 1 above 255
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray(wide).save(tmp_path / "data" / label / "a.png")
    want = torch.from_numpy(wide.astype(np.float32) / 32767.5 - 1.0)
    data = load_images(DataConfig(source=str(tmp_path / "data")))
    assert data.x.shape == (2, 1, 8, 8) and torch.allclose(data.x[0, 0], want, atol=1e-6)
    grey, _ = read_image_folder(tmp_path / "data", 1, 8)
    rgb, _ = read_image_folder(tmp_path / "data", 3, 8)
    assert torch.allclose(grey[0, 0], want, atol=1e-6) and torch.allclose(rgb[0], want.expand(3, 8, 8), atol=1e-6)
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(tmp_path / "float.tiff")
    (tmp_path / "f").mkdir()
    (tmp_path / "float.tiff").rename(tmp_path / "f" / "float.tiff")
    with pytest.raises(DataError, match="floating-point image"):
        read_image_folder(tmp_path / "f", 1, 8)
