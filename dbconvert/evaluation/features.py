"""Image features for FID/KID: clean-fid's Inception, or a small built-in CNN.

How clean-fid feeds a feature extractor (clean-fid 0.1.35, `cleanfid.utils.ResizeDataset`):
every file is opened with PIL and converted to RGB uint8 (H, W, 3); `custom_image_tranform`
(identity) and then the resize function are applied; a float32 result is turned into a CHW
tensor without rescaling, so the extractor receives float tensors (N, 3, H, W) with values in
[0, 255]. Mode "clean" resizes with PIL bicubic to 299 x 299 (what Inception needs).

- **Inception** (default for 3-channel images): the torchscript Inception-V3 clean-fid uses,
  `inception-2015-12-05.pt`. clean-fid looks for it in /tmp (the current folder on Windows)
  and downloads it from NVIDIA's CDN on first use. We do the same, atomically; offline the
  error names the file, the URL and the folder, and `--inception-weights PATH` uses a file the
  user brings. The forward pass is clean-fid's `InceptionV3W` (x - 128) / 128 -> pool3, 2048-d.
- **Built-in CNN** (default for 1-channel images such as digits): a 3-conv classifier trained
  once on the data set's TRAIN split, cached as safetensors in $DBCONVERT_CACHE (default
  ~/.cache/dbconvert)/features/, with its accuracies stored in the file's metadata. Its cost is
  bounded: a seeded share of the train split (10%, at most 1000 images) is held out, at most `CNN_MAX_IMAGES` of the
  rest are trained on, and training stops when the held-out accuracy has not improved for `CNN_PATIENCE` epochs (at most
  `CNN_EPOCHS`); the best epoch's weights are kept. Its features are the 64-d penultimate layer before the ReLU. It runs
  at the images' native size: we pass clean-fid a `custom_fn_resize` that only converts to float32 (no 299 x 299 resize,
  which would be meaningless for 8 x 8 digits), and the extractor takes channel 0 of the RGB copy (exactly the grey
  value) and scales it to [-1, 1] as in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dbconvert.errors import CheckpointError, DataError, DbconvertError, first_line
from dbconvert.data.overlap import to_uint8
from dbconvert.evaluation.metric_help import CNN_MAX_IMAGES

CNN_VERSION = "cnn-v2"
CNN_DIM = 64
CNN_EPOCHS = 30
"""At most this many epochs; the stopping rule usually ends training sooner."""
CNN_PATIENCE = 3
"""Stop after this many epochs without a better held-out accuracy."""
CNN_HELD_OUT = 0.1
CNN_MAX_HELD_OUT = 1000
CNN_BATCH = 64
CNN_LR = 5e-3
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_DIM = 2048


def cache_dir() -> Path:
    """User cache for feature networks and reference statistics: $DBCONVERT_CACHE or ~/.cache/dbconvert."""
    root = os.environ.get("DBCONVERT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dbconvert"


@dataclass
class FeatureSpec:
    """A feature extractor as clean-fid takes it, plus what a result must say about it."""

    name: str  # the column label: results with different names are never compared
    dim: int
    extractor: Callable[[torch.Tensor], torch.Tensor]
    resize: Callable[[np.ndarray], np.ndarray] | None  # None: clean-fid's "clean" resize (299 x 299)
    key: str  # short id for cache file names
    native_size: tuple[int, int] | None = None  # (H, W) the extractor needs, if any
    info: dict[str, Any] = field(default_factory=dict)

    def min_samples(self) -> int:
        """A full-rank covariance of d-dimensional features needs at least d + 1 samples."""
        return self.dim + 1


def native_resize(img: np.ndarray) -> np.ndarray:
    """clean-fid `custom_fn_resize` for the built-in features: keep the native size, float32 in [0, 255]."""
    return np.asarray(img, dtype=np.float32)


# --- built-in CNN ---------------------------------------------------------------------------


class FeatureCNN(nn.Module):
    """conv16 - conv32 - maxpool - conv64 - global average - linear 64 (features) - ReLU - linear (classes)."""

    def __init__(self, in_channels: int, num_classes: int, dim: int = CNN_DIM) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class BuiltinExtractor:
    """clean-fid feature extractor: (N, 3, H, W) floats in [0, 255] -> (N, 64) features."""

    def __init__(self, net: FeatureCNN, in_channels: int, size: tuple[int, int]) -> None:
        self.net = net.eval()
        self.in_channels = in_channels
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            raise DataError(
                f"the built-in features take {self.size[0]}x{self.size[1]} images, got {x.shape[-2]}x{x.shape[-1]}"
            )
        x = x[:, :1] if self.in_channels == 1 else x[:, : self.in_channels]
        device = next(self.net.parameters()).device
        with torch.no_grad():
            return self.net.features(x.to(device, torch.float32) / 127.5 - 1.0)


def data_key(source: str) -> str:
    """A file-name-safe id of a data source."""
    slug = "".join(c if c.isalnum() else "-" for c in Path(str(source)).name or str(source))[:32].strip("-") or "data"
    return slug if source == "digits" else f"{slug}-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"


def builtin_features(
    data_cfg: Any,
    device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
    max_images: int = CNN_MAX_IMAGES,
    progress: bool = False,
) -> FeatureSpec:
    """The built-in CNN for `data_cfg`'s data set: loaded from the cache, else trained once and cached.

    `max_images` caps the training images (0: the whole train split minus the held-out share).
    """
    from dbconvert.checkpoint import save_weights
    from dbconvert.data.images import load_images

    device = device or torch.device("cpu")
    train = load_images(data_cfg, "train")
    if train.x.shape[1] not in (1, 3):
        raise DataError(
            f"the built-in features need 1- or 3-channel pixel images; {train.name} has "
            f"{train.x.shape[1]} channels (latents: decode them and pass --samples/--reference folders)"
        )
    if train.num_classes < 2:
        raise DataError(f"the built-in features are a classifier and need labelled data; {train.name} has no classes")
    if len(train) < 2:
        raise DataError(f"the built-in features need at least 2 training images; {train.name} has {len(train)}")
    pixels = to_uint8(train.x)
    c, h, w = pixels.shape[1:]
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [
                CNN_VERSION,
                CNN_DIM,
                CNN_EPOCHS,
                CNN_PATIENCE,
                max_images,
                CNN_HELD_OUT,
                CNN_MAX_HELD_OUT,
                CNN_BATCH,
                CNN_LR,
                list(pixels.shape),
            ]
        ).encode()
    )
    digest.update(pixels.tobytes())
    digest.update(train.y.numpy().astype(np.int64).tobytes())
    key = f"{data_key(data_cfg.source)}-{digest.hexdigest()[:10]}"
    path = cache_dir() / "features" / f"{key}.safetensors"
    net = FeatureCNN(c, train.num_classes)
    meta: dict[str, Any]
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["dbconvert"])
                net.load_state_dict({k: fh.get_tensor(k) for k in fh.keys()}, strict=True)
        except Exception as exc:
            raise CheckpointError(
                f"cached feature network {path} is damaged ({type(exc).__name__}); delete it and rerun"
            ) from None
        if log:
            log(
                f"built-in features: cached {path.name} (held-out accuracy {meta['val_accuracy']}, "
                f"test accuracy {meta['test_accuracy']})"
            )
    else:
        fit, held = split_for_cnn(len(train), max_images)
        if log:
            log(
                f"built-in features: training a small CNN on {len(fit)} of the {len(train)} {train.name} train images "
                f"(at most {CNN_EPOCHS} epochs, stopping when the accuracy on {len(held)} held-out train images stops "
                "improving; seed 0)"
            )
        t0 = time.perf_counter()
        x = torch.from_numpy(pixels)
        val_accuracy, epochs = _train_cnn(net, x[fit], train.y[fit], x[held], train.y[held], progress)
        accuracy, test_n = _test_accuracy(net, data_cfg)
        meta = {
            "version": CNN_VERSION,
            "data": str(data_cfg.source),
            "train_images": len(fit),
            "train_split_images": len(train),
            "epochs": epochs,
            "seed": 0,
            "dim": CNN_DIM,
            "size": [h, w],
            "channels": c,
            "val_accuracy": val_accuracy,
            "val_images": len(held),
            "test_accuracy": accuracy,
            "test_images": test_n,
            "train_seconds": round(time.perf_counter() - t0, 1),
        }
        save_weights(path, net.state_dict(), metadata={"dbconvert": json.dumps(meta)})
        if log:
            test = f"test accuracy {accuracy} on {test_n} images" if test_n else "no test split to measure it on"
            log(
                f"built-in features: {epochs} epochs in {meta['train_seconds']}s, held-out accuracy {val_accuracy} "
                f"on {len(held)} images, {test}; cached at {path}"
            )
    net = net.to(device).eval()
    name = f"builtin-cnn:{data_key(data_cfg.source)}@{digest.hexdigest()[:8]}"
    info = {
        "kind": "builtin-cnn",
        "weights": str(path),
        "val_accuracy": meta.get("val_accuracy"),
        "val_images": meta.get("val_images"),
        "test_accuracy": meta["test_accuracy"],
        "test_images": meta["test_images"],
        "train_images": meta.get("train_images"),
        "epochs": meta.get("epochs"),
        "trained_on": f"{data_cfg.source}:train",
        "dim": CNN_DIM,
        "input": f"native {h}x{w}, no resize",
    }
    return FeatureSpec(name, CNN_DIM, BuiltinExtractor(net, c, (h, w)), native_resize, key, (h, w), info)


def split_for_cnn(n: int, max_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices) of n train-split images: a seeded held-out share, then the cap."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_held = min(CNN_MAX_HELD_OUT, max(1, int(round(CNN_HELD_OUT * n))))
    fit = order[n_held:]
    if max_images > 0:
        fit = fit[:max_images]
    return fit, order[:n_held]


def _train_cnn(
    net: FeatureCNN,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    val_pixels: torch.Tensor,
    val_labels: torch.Tensor,
    progress: bool,
) -> tuple[float, int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small only loses to thread synchronisation (10x on a busy 2-core CPU)
    try:
        return _train_loop(net, pixels, labels, val_pixels, val_labels, progress)
    finally:
        torch.set_num_threads(threads)


def _accuracy(net: FeatureCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([net(x[i : i + 512]).argmax(-1) for i in range(0, len(x), 512)])
    return round(float((pred == y).float().mean()), 4)


def _train_loop(
    net: FeatureCNN,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    val_pixels: torch.Tensor,
    val_labels: torch.Tensor,
    progress: bool,
) -> tuple[float, int]:
    """Adam with a cosine schedule over CNN_EPOCHS; stops early on the held-out accuracy; keeps the best epoch."""
    from dbconvert.progress import progress as show

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for p in net.parameters():  # deterministic init independent of the global RNG's history
        if p.dim() > 1:
            nn.init.kaiming_uniform_(p, a=5**0.5, generator=gen)
        else:
            nn.init.zeros_(p)
    x = pixels.float() / 127.5 - 1.0
    val_x = val_pixels.float() / 127.5 - 1.0
    batch = min(CNN_BATCH, len(x))
    per_epoch = max(1, len(x) // batch)
    opt = torch.optim.Adam(net.parameters(), lr=CNN_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, CNN_EPOCHS * per_epoch)
    best, best_state, best_epoch = -1.0, None, 0
    label = f"feature network (at most {CNN_EPOCHS} epochs)"
    with show(label, CNN_EPOCHS * per_epoch, unit="steps", enabled=progress) as update:
        for epoch in range(1, CNN_EPOCHS + 1):
            net.train()
            order = torch.randperm(len(x), generator=gen)
            for i in range(per_epoch):
                idx = order[i * batch : (i + 1) * batch]
                xb = x[idx]
                shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # +-1 pixel shifts: robust to sample jitter
                xb = torch.roll(xb, shifts=shift, dims=(2, 3))
                loss = nn.functional.cross_entropy(net(xb), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                update((epoch - 1) * per_epoch + i + 1)
            net.eval()
            accuracy = _accuracy(net, val_x, val_labels)
            if accuracy > best:
                best, best_epoch = accuracy, epoch
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            elif epoch - best_epoch >= CNN_PATIENCE:
                break
    assert best_state is not None
    net.load_state_dict(best_state)
    net.eval()
    return best, epoch


def _test_accuracy(net: FeatureCNN, data_cfg: Any) -> tuple[float | None, int]:
    from dbconvert.data.images import load_images

    try:
        test = load_images(data_cfg, "test")
    except DbconvertError:
        return None, 0
    x = torch.from_numpy(to_uint8(test.x)).float() / 127.5 - 1.0
    return _accuracy(net, x, test.y), len(test)


# --- Inception -------------------------------------------------------------------------------


def inception_default_path() -> Path:
    """Where clean-fid looks for (and downloads) its Inception weights (cleanfid.features.feature_extractor)."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def inception_url() -> str:
    from cleanfid.downloads_helper import inception_url as url

    return str(url)


class InceptionExtractor:
    """clean-fid's InceptionV3W forward pass (mode "clean": input already resized to 299 x 299)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.device = device
        import warnings

        try:
            with warnings.catch_warnings():  # torch's deprecation notice of jit.load: clean-fid ships torchscript
                warnings.simplefilter("ignore", FutureWarning)
                self.base = torch.jit.load(str(path), map_location=device).eval()
            self.layers = self.base.layers
        except Exception as exc:
            raise CheckpointError(
                f"cannot load Inception weights {path} ({type(exc).__name__}); it must be clean-fid's torchscript "
                f"{INCEPTION_FILE} from {inception_url()} (delete a partial download and retry)"
            ) from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (299, 299):
            raise DataError(f"Inception takes 299x299 inputs, got {tuple(x.shape[-2:])}")
        with torch.no_grad():
            return self.layers.forward((x.to(self.device) - 128) / 128).reshape(x.shape[0], -1)


def inception_features(
    weights: Path | None,
    device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
    download_timeout: float = 60.0,
) -> FeatureSpec:
    """Inception-V3 (clean-fid's weights): a user file, else clean-fid's cached file, else downloaded like clean-fid."""
    device = device or torch.device("cpu")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"--inception-weights {path} does not exist; give clean-fid's {INCEPTION_FILE}")
        source = "user file"
    else:
        path = inception_default_path()
        source = "clean-fid cache"
        if not path.is_file():
            if log:
                log(f"downloading clean-fid's Inception weights to {path} (first use)")
            _download(inception_url(), path, download_timeout)
            source = "downloaded by clean-fid's rule"
    spec = FeatureSpec(
        "inception-v3 (clean-fid)",
        INCEPTION_DIM,
        InceptionExtractor(path, device),
        None,
        "inception",
        None,
        {
            "kind": "inception",
            "weights": str(path),
            "source": source,
            "input": "clean-fid mode clean: PIL bicubic resize to 299x299",
            "dim": INCEPTION_DIM,
        },
    )
    return spec


def _download(url: str, path: Path, timeout: float) -> None:
    tmp = path.with_name(path.name + f".part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh)
        os.replace(tmp, path)
    except (OSError, socket.timeout, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"Inception weights missing: clean-fid looks for {path} and downloads it from {url} on first use, "
            f"but the download failed ({type(exc).__name__}: {first_line(reason, 80)}); "
            f"fetch that file where there is internet and copy it to {path}, or pass --inception-weights PATH "
            "(or use --features builtin offline)"
        ) from None
