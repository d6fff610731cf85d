"""Image data sets, all read through the Hugging Face `datasets` library, as tensors in [-1, 1].

Sources (`data.source`, with `data.kind` = auto to guess):
- `digits`: scikit-learn's bundled 8x8 handwritten digits (offline; 1 channel, 10 classes).
  It has no official split, so a fixed permutation (seed 0) keeps 20% as `test`.
- a hub name such as `cifar10`: `datasets.load_dataset(name, split=...)`; offline this fails
  with a message saying what to download and where to point `data.source`.
- a local image folder: the `imagefolder` builder (class sub-folders become labels).
- a `.npz` file, or a folder of `.npz` shards: arrays `x` (or `images`, `latents`); uint8 pixels
  in NHWC (or unambiguous NCHW), float arrays in NCHW and optional `y` (or `labels`). uint8 arrays are scaled to
  [-1, 1]; float arrays (e.g. precomputed VAE latents) are used as they are.

Splits of local data (so that FID and the feature network's accuracy never silently use training
images): `train/` and `test/` sub-folders of the source (image folders or `.npz` shards) are its
splits; otherwise `data.test_source` names the test data, or `data.test_fraction` holds out a share
chosen by `data.split_seed`. Without any of these, a local source is all `train` and asking for
`test` is an error that says how to name one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dbconvert.schema import DataConfig
from dbconvert.errors import DataError, first_line

IMAGE_KEYS = ("image", "img", "pixel_values", "x", "images", "latents")
LABEL_KEYS = ("label", "labels", "fine_label", "y")


@dataclass
class ImageData:
    """Images (N, C, H, W) float32 in the model's data range, and integer class labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


SPLIT_FOLDERS = ("train", "test", "validation")
"""Sub-folders of a local source that are its splits (the names the `imagefolder` builder knows)."""
LOCAL_KINDS = ("imagefolder", "npz")


def _is_npz(path: Path) -> bool:
    return path.suffix == ".npz" or (
        path.is_dir()
        and (
            any(path.glob("*.npz"))
            or any((path / name).is_dir() and any((path / name).glob("*.npz")) for name in SPLIT_FOLDERS)
        )
    )


def local_kind(source: str, what: str = "data.source") -> str:
    """npz or imagefolder for a local path; a one-line error for anything else."""
    path = Path(source).expanduser()
    if _is_npz(path):
        return "npz"
    if path.is_dir():
        return "imagefolder"
    raise DataError(f"{what} {source!r} is neither an image folder nor a .npz file")


def resolve_kind(cfg: DataConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.source == "digits":
        return "builtin"
    path = Path(cfg.source).expanduser()
    if path.suffix == ".npz":
        return "npz"  # a missing file is reported by the reader, naming the path
    if path.exists() or cfg.source.startswith((".", "/", "~")):
        return local_kind(cfg.source)
    return "hub"


def split_folders(source: str) -> list[str]:
    """The split sub-folders (`train/`, `test/`, ...) a local source folder has, if it has a `train/` one."""
    path = Path(source).expanduser()
    if not path.is_dir() or not (path / "train").is_dir():
        return []
    return [name for name in SPLIT_FOLDERS if (path / name).is_dir()]


def class_names(cfg: DataConfig) -> list[str] | None:
    """The names of the data's classes in label order, where the data names them without being read: the
    digits (0-9) and image folders (their sorted class folders, as the imagefolder builder numbers them);
    None for .npz arrays and hub data sets."""
    kind = resolve_kind(cfg)
    if kind == "builtin":
        return [str(i) for i in range(10)]
    if kind != "imagefolder":
        return None
    folder = Path(cfg.source).expanduser()
    folder = folder / "train" if split_folders(cfg.source) else folder
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def load_images(cfg: DataConfig, split: str | None = None) -> ImageData:
    """Load the recipe's image data set (split defaults to `data.split`)."""
    split = split or cfg.split
    kind = resolve_kind(cfg)
    if kind == "builtin":
        return _digits(split)
    if kind in LOCAL_KINDS:
        return _local(cfg, kind, split)
    if kind == "hub":
        return _from_hf(_load_hf(cfg.source, split), cfg, cfg.source)
    raise DataError(f"data.kind {kind!r} does not hold images; use builtin, hub, imagefolder or npz")


def _read(cfg: DataConfig, kind: str, source: str, split: str = "train") -> ImageData:
    """One local source (or one of its split sub-folders) as it is."""
    if kind == "npz":
        folders = split_folders(source)
        return _npz(Path(source).expanduser() / split if folders else Path(source).expanduser())
    return _from_hf(_load_hf("imagefolder", split, data_dir=source), cfg, source)


def _local(cfg: DataConfig, kind: str, split: str) -> ImageData:
    """A split of local data: split sub-folders, data.test_source, data.test_fraction, or all of it as train."""
    folders = split_folders(cfg.source)
    if cfg.test_source is not None and cfg.test_fraction > 0:
        raise DataError("set data.test_source or data.test_fraction, not both")
    if folders and (cfg.test_source is not None or cfg.test_fraction > 0):
        raise DataError(
            f"data.source {cfg.source!r} has split sub-folders ({', '.join(folders)}); they are its splits, "
            "so drop data.test_source / data.test_fraction"
        )
    if folders:
        if split not in folders:
            raise DataError(
                f"data.source {cfg.source!r} has no {split!r} split (its sub-folders: {', '.join(folders)})"
            )
        return _read(cfg, kind, cfg.source, split)
    if split == "test" and cfg.test_source is not None:
        test_kind = local_kind(cfg.test_source, "data.test_source")
        if test_kind == "imagefolder" and kind == "imagefolder":
            _same_classes(cfg.source, cfg.test_source)
        return _read(cfg, test_kind, cfg.test_source)
    if split not in ("train", "test", "all"):
        raise DataError(f"local data {cfg.source!r} has the splits train and test, not {split!r}")
    data = _read(cfg, kind, cfg.source)
    if cfg.test_fraction > 0 and split != "all":
        return hold_out(data, cfg.test_fraction, cfg.split_seed, split)
    if split == "test":
        raise DataError(
            f"local data {cfg.source!r} has no test split, and the training images must not serve as one: name it "
            "with data.test_source=PATH, hold out a share with data.test_fraction=0.1, or use train/ and test/ "
            "sub-folders"
        )
    return data


def hold_out(data: ImageData, fraction: float, seed: int, split: str) -> ImageData:
    """The `test` share (a seeded choice of `fraction` of the images) or the `train` rest, in the original order."""
    n = len(data)
    n_test = max(1, int(round(fraction * n)))
    if n_test >= n:
        raise DataError(f"data.test_fraction={fraction} leaves no training images out of {n}; lower it")
    chosen = np.random.default_rng(seed).permutation(n)[:n_test]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    index = torch.from_numpy(np.flatnonzero(mask if split == "test" else ~mask))
    return ImageData(data.x[index], data.y[index], data.num_classes, data.name)


def _same_classes(source: str, test_source: str) -> None:
    """Labels of an image folder come from its sorted class sub-folders: both folders need the same ones."""

    def classes(folder: str) -> list[str]:
        return sorted(p.name for p in Path(folder).expanduser().iterdir() if p.is_dir())

    train, test = classes(source), classes(test_source)
    if train != test:
        raise DataError(
            f"data.test_source {test_source!r} has the class folders {test} but data.source has {train}; "
            "labels come from the sorted folder names, so use the same class folders in both"
        )


def _digits(split: str) -> ImageData:
    from datasets import Dataset
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise DataError(f"digits has splits train, test and all, not {split!r}")
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    n_test = len(order) // 5
    index = {"test": order[:n_test], "train": order[n_test:], "all": np.arange(len(order))}[split]
    ds = Dataset.from_dict({"image": bunch.images[index].astype(np.float32), "label": bunch.target[index]})
    ds = ds.with_format("numpy")
    x = torch.from_numpy(np.asarray(ds["image"], dtype=np.float32)) / 16.0 * 2.0 - 1.0
    return ImageData(x[:, None], torch.from_numpy(np.asarray(ds["label"])).long(), 10, "digits")


def _load_hf(name: str, split: str, **kwargs: str):  # noqa: ANN202 - datasets.Dataset
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # the hub's retry chatter would bury our one-line error
    datasets.utils.logging.set_verbosity_error()
    local = name == "imagefolder"
    bars = datasets.is_progress_bar_enabled()
    if local:  # "Resolving data files" / "Generating train split" bars say nothing about a local folder
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except (ValueError, KeyError) as exc:
        raise DataError(f"data set {name!r} has no split {split!r} ({first_line(exc, 120)})") from None
    except Exception as exc:  # connection errors surface under many types
        if "imagefolder" in name:
            raise DataError(f"cannot read image folder {kwargs.get('data_dir')!r}: {first_line(exc, 160)}") from None
        raise DataError(
            f"data set {name!r} could not be loaded from the Hugging Face hub (offline or unknown name: "
            f"{type(exc).__name__}); download it where there is internet (datasets.load_dataset({name!r}) fills "
            "~/.cache/huggingface/datasets, then copy that folder here), or point data.source at a local "
            "image folder or .npz file"
        ) from None
    finally:
        if local and bars:
            datasets.enable_progress_bars()


def _from_hf(ds, cfg: DataConfig, name: str) -> ImageData:  # noqa: ANN001
    columns = list(ds.column_names)
    image_key = cfg.image_key or next((k for k in IMAGE_KEYS if k in columns), None)
    label_key = cfg.label_key or next((k for k in LABEL_KEYS if k in columns), None)
    if image_key is None or image_key not in columns:
        raise DataError(f"data set {name!r} has no image column (columns: {columns}); set data.image_key")
    if len(ds) == 0:
        raise DataError(f"data set {name!r} is empty")
    try:
        arrays = [
            pil_pixels(img, f"an image of data set {name!r}") if hasattr(img, "mode") else np.asarray(img)
            for img in ds[image_key]
        ]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data set {name!r}: an image cannot be read ({first_line(exc, 120)})") from None
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"data set {name!r} has images of different sizes; resize them to one size first")
    if len({a.dtype for a in arrays}) != 1:
        raise DataError(f"data set {name!r} mixes 8-bit and 16-bit images; save them at one bit depth")
    x = np.stack(arrays)
    labels = np.asarray(ds[label_key]) if label_key in columns else np.zeros(len(x), dtype=np.int64)
    return _to_tensors(x, labels, name)


def _npz(path: Path) -> ImageData:
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise DataError(f"no .npz data at {path}")
    xs, ys = [], []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as arr:
                xkey = next((k for k in ("x", "images", "latents", "arr_0") if k in arr.files), None)
                if xkey is None:
                    raise DataError(f"{file} has no array named x, images or latents (it has {arr.files})")
                xs.append(arr[xkey])
                ykey = next((k for k in ("y", "labels") if k in arr.files), None)
                ys.append(arr[ykey] if ykey else np.zeros(len(arr[xkey]), dtype=np.int64))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read {file}: {first_line(exc, 120)}") from None
    return _to_tensors(np.concatenate(xs), np.concatenate(ys), str(path))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes of 16-bit grey images (a 16-bit PNG opens as I;16; older Pillows give I): converting one to L clips
every value above 255 to white, so they are read as they are and scaled by 65535."""


def pil_pixels(img, what: str) -> np.ndarray:  # noqa: ANN001 - PIL.Image.Image
    """An image's pixels as uint8 (HW or HWC), or uint16 (HW) for a 16-bit grey image; one line for a depth the
    tool cannot scale (floating-point or 32-bit images)."""
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(
                f"{what} is a 32-bit integer image (values {arr.min()}..{arr.max()}); save it as an 8- or 16-bit PNG"
            )
        return arr.astype(np.uint16)
    if img.mode == "F":
        raise DataError(
            f"{what} is a floating-point image, whose pixel range is unknown; save it as an 8- or 16-bit "
            "PNG, or the array as a .npz in the model's range"
        )
    return np.asarray(img)


def unit_pixels(arr: np.ndarray) -> np.ndarray:
    """uint8 or uint16 pixels as float32 in [-1, 1] (each by its own full scale)."""
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return arr.astype(np.float32) / (scale / 2.0) - 1.0


def _to_tensors(x: np.ndarray, labels: np.ndarray, name: str) -> ImageData:
    if x.ndim == 3:  # grey images without a channel axis
        x = x[..., None] if x.dtype in (np.uint8, np.uint16) else x[:, None]
    if x.ndim != 4:
        raise DataError(f"data set {name!r}: expected images of rank 3 or 4, got shape {x.shape}")
    if x.dtype in (np.uint8, np.uint16):
        # integer pixels are conventionally NHWC (PIL, numpy); NCHW only when unambiguous
        channels_first = x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4)
        if not channels_first:
            x = x.transpose(0, 3, 1, 2)
        tensor = torch.from_numpy(unit_pixels(np.ascontiguousarray(x)))
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(x)).float()
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
    num_classes = int(y.max().item()) + 1 if len(y) else 0
    return ImageData(tensor, y, num_classes, name)


def write_random_images(path: Path, num: int, shape: tuple[int, int, int], classes: int, seed: int) -> Path:
    """`num` random float images of `shape` (C, H, W) in [-1, 1] with labels below `classes`, as a `.npz` that
    `data.kind=npz` reads (for benchmarks of a model's size: `bench split`)."""
    gen = np.random.default_rng(seed)
    x = gen.uniform(-1.0, 1.0, size=(num, *shape)).astype(np.float32)
    y = gen.integers(0, max(classes, 1), size=num).astype(np.int64)
    y[-1] = max(classes, 1) - 1  # the data's class count (its largest label + 1) is the model's
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return path
