"""Labelled images for the ViT family: the generic image loaders, checked against the model, plus augmentation.

Augmentation (training split only, `model.augment`): random crop of the image padded with black
(-1) pixels, horizontal flip, and timm's RandAugment on the uint8 image. Its randomness is a pure
function of the batch's example indices (a generator seeded from them), so training stays
deterministic by seed and a resumed run draws the same augmented batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dbconvert.data.images import ImageData, load_images
from dbconvert.errors import DataError
from dbconvert.families.vit.config import Augment, ViTConfig
from dbconvert.schema import DataConfig


@dataclass
class AugmentedImages:
    """An ImageData whose `batch` returns augmented copies (see the module docstring)."""

    data: ImageData
    augment: Augment

    def __len__(self) -> int:
        return len(self.data)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.batch(index)
        seed = int((index.long() * torch.arange(1, len(index) + 1) * 1_000_003).sum().item()) % (2**62)
        return augment_images(x, self.augment, torch.Generator().manual_seed(seed)), y


def augment_images(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Crop with padding, flip and RandAugment of a batch in [-1, 1] (N, C, H, W), drawn from `gen`."""
    n, _, h, w = x.shape
    if aug.randaugment:
        x = rand_augment(x, aug.randaugment, int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    if aug.crop_padding:
        p = aug.crop_padding
        padded = F.pad(x, (p, p, p, p), value=-1.0)
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
        x = torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(offsets.tolist())])
    if aug.flip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def rand_augment(x: torch.Tensor, config: str, seed: int) -> torch.Tensor:
    """timm's RandAugment (`rand_augment_transform(config)`) on each image, seeded (timm draws from `random`)."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    transform = rand_augment_transform(config, {"img_mean": (128, 128, 128)})
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        out = []
        for img in pixels:
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            out.append(np.asarray(transform(pil)).reshape(img.shape))
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def check_randaugment(config: str) -> None:
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(config, {"img_mean": (128, 128, 128)})
    except Exception as exc:  # timm asserts on a malformed string
        raise DataError(
            f"model.augment.randaugment {config!r} is not a timm RandAugment string such as "
            f"rand-m9-n2-mstd0.5 ({type(exc).__name__})"
        ) from None


def load_labelled(
    data_cfg: DataConfig, cfg: ViTConfig, split: str | None, train_split: bool
) -> ImageData | AugmentedImages:
    """The split's images and labels, checked against the model (shape, class count); augmented for training."""
    data = load_images(data_cfg, split)
    want = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if tuple(data.x.shape[1:]) != want:
        raise DataError(
            f"data set {data_cfg.source!r} has images of shape {tuple(data.x.shape[1:])} but the model "
            f"takes {want}; set model.img_size / model.in_chans to match (or resize the images)"
        )
    if data.num_classes > cfg.num_classes or (train_split and data.num_classes != cfg.num_classes):
        raise DataError(
            f"data set {data_cfg.source!r} has {data.num_classes} classes but model.num_classes is "
            f"{cfg.num_classes}; set model.num_classes={data.num_classes}"
        )
    aug = cfg.augment
    if train_split and (aug.crop_padding or aug.flip or aug.randaugment):
        if aug.randaugment:
            check_randaugment(aug.randaugment)
        return AugmentedImages(data, aug)
    return data
