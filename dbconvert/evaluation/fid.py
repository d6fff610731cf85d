"""FID and KID through clean-fid (mode "clean").

Pipeline: image files -> `cleanfid.fid.get_files_features` (clean-fid's own reading, resizing and
batching, with our feature extractor as `model`) -> `cleanfid.fid.fid_from_feats` for FID and
`cleanfid.fid.kernel_distance` for KID. Reference images of the recipe's data set are written
once as PNGs (same rounding as `dbconvert sample`) and go through the very same path; their
features are cached per data set / split / features in $DBCONVERT_CACHE/fid-ref/.

Samples: `--num` images with the run's sampling settings (`Family.sample`), generated in chunks of
`CHUNK` images; chunk c of repeat r uses seed `seed + 10000 r + c`, so repeat 0 with at most
`CHUNK` samples is exactly `dbconvert sample --seed SEED --num N`. Files named `grid.png` are
skipped in every folder (the contact sheet `dbconvert sample` writes).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbconvert.devices import resolve_device
from dbconvert.errors import DataError, DbconvertError, RunError
from dbconvert.evaluation.features import (CNN_MAX_IMAGES, FeatureSpec, builtin_features, cache_dir, data_key,
                                           inception_features, to_uint8)
from dbconvert.progress import progress as show_progress
from dbconvert.sampling import check_finite_samples

CHUNK = 1000
PUBLISHED_REFERENCE_SPLITS = {"cifar10": "train", "uoft-cs/cifar10": "train"}
"""Hub data sets whose published FIDs use a known reference split. CIFAR-10: the 50,000 TRAINING images
(EDM and clean-fid, whose precomputed cifar10 statistics are of the train split). Every other data set
defaults to its test split."""
SKIP_NAMES = {"grid.png"}
IMAGE_EXTS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}
FEATURE_CHOICES = ("auto", "inception", "builtin")

Log = Callable[[str], None]


def _nolog(_: str) -> None:
    pass


# --- image folders ---------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Every image file below `folder` (clean-fid's extensions, recursively), sorted, minus grid.png."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
                   and p.name not in SKIP_NAMES)
    if not files:
        raise DataError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTS))}; grid.png is skipped)")
    return files


def check_images(files: list[Path], what: str) -> tuple[int, int]:
    """Every file opens as an image and all have one size; returns (height, width)."""
    from PIL import Image

    sizes: dict[tuple[int, int], Path] = {}
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                w, h = img.size
        except Exception as exc:
            raise DataError(f"{what}: {path} cannot be read as an image ({type(exc).__name__}); remove or replace it") from None
        sizes.setdefault((h, w), path)
        if len(sizes) > 1:
            (h0, w0), p0 = next(iter(sizes.items()))
            raise DataError(f"{what} has images of different sizes: {p0.name} is {w0}x{h0} but {path.name} is {w}x{h}; "
                            "use one size")
    return next(iter(sizes))


def file_features(files: list[Path], spec: FeatureSpec, device: torch.device, batch_size: int = 64,
                  label: str = "FID features", show: bool = False) -> np.ndarray:
    """clean-fid features of image files (mode clean; the spec's resize replaces the 299 resize if set).

    Read in slices of 8 batches, so progress can be shown; the batches are the ones a single call makes.
    """
    from cleanfid.fid import get_files_features

    step = 8 * batch_size
    parts = []
    with show_progress(label, len(files), unit="images", enabled=show) as update:
        for lo in range(0, len(files), step):
            parts.append(get_files_features([str(f) for f in files[lo : lo + step]], model=spec.extractor, num_workers=0,
                                            batch_size=batch_size, device=device, mode="clean",
                                            custom_fn_resize=spec.resize, verbose=False))
            update(min(lo + step, len(files)))
    return np.concatenate(parts)


def folder_features(folder: Path, spec: FeatureSpec, device: torch.device, what: str, batch_size: int = 64,
                    show: bool = False) -> np.ndarray:
    files = list_images(folder)
    h, w = check_images(files, what)
    if spec.native_size is not None and (h, w) != spec.native_size:
        raise DataError(f"{what} holds {w}x{h} images but the features {spec.name} take "
                        f"{spec.native_size[1]}x{spec.native_size[0]}; use images of the data set's size")
    return file_features(files, spec, device, batch_size, f"FID features of {what}", show)


def check_count(n: int, spec: FeatureSpec, what: str) -> None:
    if n < spec.min_samples():
        raise DbconvertError(f"{what} has {n} images, too few for {spec.dim}-d features ({spec.name}): FID needs at "
                             f"least {spec.min_samples()} (a full-rank covariance); use --num {spec.min_samples()} or more")


# --- FID / KID -------------------------------------------------------------------------------


def fid_kid(gen: np.ndarray, ref: np.ndarray, kid_seed: int = 0) -> tuple[float, float]:
    """clean-fid's FID (fid_from_feats) and KID (kernel_distance, seeded: it draws random subsets)."""
    from cleanfid.fid import fid_from_feats, kernel_distance

    fid = float(fid_from_feats(gen, ref))
    state = np.random.get_state()
    np.random.seed(kid_seed)
    try:
        kid = float(kernel_distance(ref, gen))
    finally:
        np.random.set_state(state)
    return fid, kid


def write_pngs(x: torch.Tensor, folder: Path) -> list[Path]:
    """[-1, 1] NCHW (1 or 3 channels) -> one PNG each, rounded like `dbconvert sample`."""
    from PIL import Image

    pixels = to_uint8(x).transpose(0, 2, 3, 1)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, p in enumerate(pixels):
        path = folder / f"{i:06d}.png"
        Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p, "L" if p.shape[-1] == 1 else "RGB").save(path)
        files.append(path)
    return files


def default_split(data_cfg: Any) -> str:
    """The reference split `eval fid` uses unless --split says otherwise (see PUBLISHED_REFERENCE_SPLITS)."""
    from dbconvert.data.images import resolve_kind

    if resolve_kind(data_cfg) == "hub":
        return PUBLISHED_REFERENCE_SPLITS.get(str(data_cfg.source).lower(), "test")
    return "test"


def split_overlaps_training(data_cfg: Any, split: str) -> bool:
    """Whether the reference `split` holds images the run trains on (`data.split`)."""
    if split == data_cfg.split or "all" in (split, data_cfg.split):
        return True
    test_source = getattr(data_cfg, "test_source", None)
    if split == "test" and test_source is not None:
        return Path(test_source).expanduser().resolve() == Path(data_cfg.source).expanduser().resolve()
    return False


def image_digests(pixels: np.ndarray) -> set[str]:
    """sha1 of every uint8 image (NCHW): equal digests are equal images."""
    import hashlib

    return {hashlib.sha1(np.ascontiguousarray(p).tobytes()).hexdigest() for p in pixels}


def folder_overlap(files: list[Path], data_cfg: Any) -> int:
    """How many images of a reference folder are, pixel for pixel, images of the run's training split."""
    from PIL import Image

    from dbconvert.data.images import load_images

    pixels = to_uint8(load_images(data_cfg, data_cfg.split).x)
    if pixels.shape[1] not in (1, 3):
        return 0  # latents: a folder of images cannot hold them
    train = image_digests(pixels)
    mode = "L" if pixels.shape[1] == 1 else "RGB"
    count = 0
    for path in files:
        with Image.open(path) as img:
            arr = np.asarray(img.convert(mode))
        chw = arr[None] if mode == "L" else arr.transpose(2, 0, 1)
        count += bool(image_digests(chw[None]) & train)
    return count


def reference_key(data_cfg: Any, split: str) -> str:
    """Cache id of a reference set: the data set, the split and every setting that decides what the split holds."""
    import hashlib
    import json

    fields = {k: getattr(data_cfg, k, None) for k in ("test_source", "test_fraction", "split_seed", "image_key", "label_key")}
    digest = hashlib.sha256(json.dumps([str(data_cfg.source), split, fields], default=str).encode()).hexdigest()[:8]
    return f"{data_key(data_cfg.source)}-{split}-{digest}"


def reference_features(data_cfg: Any, split: str, spec: FeatureSpec, device: torch.device, log: Log = _nolog,
                       show: bool = False) -> tuple[np.ndarray, str]:
    """Features of the data set's `split`, cached in $DBCONVERT_CACHE/fid-ref/ per data set / split / features."""
    from dbconvert.data.images import load_images

    path = cache_dir() / "fid-ref" / f"{reference_key(data_cfg, split)}-{spec.key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as arr:
                feats, desc = arr["feats"], str(arr["desc"])
            log(f"reference statistics: cached {path}")
            return feats, desc
        except Exception:
            log(f"reference statistics: {path} is damaged; recomputing")
    data = load_images(data_cfg, split)
    if data.x.shape[1] not in (1, 3):
        raise DataError(f"FID needs pixel images; {data.name} has {data.x.shape[1]} channels (latents): decode "
                        "samples and references with the VAE and pass --samples and --reference folders")
    check_count(len(data), spec, f"the reference set {data.name}:{split}")
    log(f"reference statistics: {len(data)} images of {data.name}:{split} with {spec.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ref-", dir=path.parent))
    try:
        feats = file_features(write_pngs(data.x, tmp), spec, device, label=f"FID features of {data.name}:{split}",
                              show=show)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    desc = f"{data_cfg.source}:{split} ({len(data)} images)"
    part = path.with_name(path.name + ".part.npz")
    np.savez(part, feats=feats, desc=np.array(desc))
    part.replace(path)
    return feats, desc


# --- the command ---------------------------------------------------------------------------


def resolve_features(features: str, run: Any, inception_weights: Path | None, channels: int | None,
                     device: torch.device, log: Log, feature_images: int = CNN_MAX_IMAGES,
                     progress: bool = False) -> FeatureSpec:
    """auto = Inception for 3-channel images, the built-in CNN for 1-channel ones; builtin[:SOURCE].

    `builtin:SOURCE` trains the built-in CNN on SOURCE's train split (any `data.source`: digits, a hub name,
    an image folder, a .npz) instead of the run's data; `feature_images` caps its training images.
    """
    from dbconvert.schema import DataConfig

    kind, _, source = features.partition(":")
    if kind not in FEATURE_CHOICES or (source and kind != "builtin"):
        raise DbconvertError(f"--features must be auto, inception, builtin or builtin:SOURCE, not {features!r}")
    if kind == "auto":
        kind = "builtin" if channels == 1 else "inception"
    if kind == "inception":
        return inception_features(inception_weights, device, log)
    if source:
        data_cfg = DataConfig(source=source) if run is None else run.recipe.data.model_copy(update={"source": source, "kind": "auto"})
    elif run is not None:
        data_cfg = run.recipe.data
    else:
        raise DbconvertError("--features builtin trains on a run's data set: pass --run DIR or name one, e.g. --features builtin:digits")
    return builtin_features(data_cfg, device, log, max_images=feature_images, progress=progress)


def evaluate_fid(
    run: Any | None,
    *,
    model: str = "blocks",
    num: int | None = None,
    repeats: int = 1,
    samples: Path | None = None,
    reference: Path | None = None,
    split: str | None = None,
    features: str = "auto",
    inception_weights: Path | None = None,
    steps: int | None = None,
    solver: str | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    weights: str | None = None,
    log: Log = _nolog,
    feature_images: int = CNN_MAX_IMAGES,
    progress: bool = False,
) -> dict[str, Any]:
    """FID (and KID) of the run's samples (or a sample folder) against the data set's split (or a folder).

    `split` defaults to `default_split` (cifar10: train, as published FIDs; otherwise test). Every result
    names its reference (data set, split, size) and says whether it overlaps the run's training images.
    """
    import dbconvert

    start = time.time()
    if repeats < 1:
        raise DbconvertError(f"--repeats must be at least 1, got {repeats}")
    if samples is not None and repeats > 1:
        raise DbconvertError("--repeats needs freshly generated samples; a --samples folder is one fixed set (drop --repeats)")
    if samples is not None:
        check_finite_samples(Path(samples))  # NaN samples' PNGs look like pictures: refuse them
    if run is None and (samples is None or reference is None):
        raise RunError("no run: pass --run DIR (or split one), or give both --samples and --reference folders")
    if run is not None and samples is None:
        run.model_targets(model)  # one line naming the models this run has
    device = resolve_device(run.recipe.train.device if run is not None else "auto")

    sampler: dict[str, Any] | None = None
    if run is not None and (samples is None or reference is None) and run.family().default_metric != "fid":
        raise DbconvertError(f"eval fid is for image runs; this run is a {run.family_name} model "
                             f"(use eval {run.family().default_metric})")
    if run is not None:
        cfg = run.recipe.sample
        sampler = {"solver": solver or cfg.solver, "steps": steps or cfg.steps,
                   "guidance": cfg.guidance if guidance is None else guidance, "weights": weights or cfg.weights,
                   "seed": cfg.seed if seed is None else seed}
    if samples is None:
        assert run is not None and sampler is not None
        run.require_trained(model)
        num = num or 10_000

    channels = None
    if run is not None and run.family().default_metric == "fid":
        channels = run.family().sample_shape(run.recipe)[0]
    spec = resolve_features(features, run, inception_weights, channels, device, log, feature_images, progress)
    if num is not None:
        check_count(num, spec, "--num")

    # reference
    overlap_images: int | None = None
    if reference is not None:
        ref_feats = folder_features(Path(reference), spec, device, f"reference folder {reference}", show=progress)
        ref_desc = f"folder {Path(reference).resolve()} ({len(ref_feats)} images)"
        split_used = None
        if run is not None and run.family().default_metric == "fid":
            try:
                overlap_images = folder_overlap(list_images(Path(reference)), run.recipe.data)
            except DbconvertError as exc:  # e.g. a hub data set offline: the overlap stays unknown, the FID does not
                log(f"note: cannot compare the reference folder with the training data ({exc}); overlap unknown")
        overlaps: bool | None = None if overlap_images is None else overlap_images > 0
    else:
        assert run is not None
        split_used = split or default_split(run.recipe.data)
        ref_feats, ref_desc = reference_features(run.recipe.data, split_used, spec, device, log, show=progress)
        overlaps = split_overlaps_training(run.recipe.data, split_used)
    check_count(len(ref_feats), spec, f"the reference {ref_desc}")
    if overlaps:
        what = f"{overlap_images} of its images are" if overlap_images else "it is"
        log(f"note: the reference {ref_desc} overlaps the training data ({what} training images); the result says so")

    fids, kids, dirs, counts = [], [], [], []
    if samples is not None:
        feats = folder_features(Path(samples), spec, device, f"sample folder {samples}", show=progress)
        check_count(len(feats), spec, f"sample folder {samples}")
        fid, kid = fid_kid(feats, ref_feats)
        fids.append(fid), kids.append(kid), dirs.append(str(samples)), counts.append(len(feats))
    else:
        assert run is not None and sampler is not None and num is not None
        family = run.family()
        from dbconvert.sampling import SampleRequest

        for r in range(repeats):
            base = sampler["seed"] + 10_000 * r
            tag = f"fid-{model}-{sampler['solver']}-{sampler['steps']}steps-g{sampler['guidance']:g}-seed{base}-n{num}"
            out = run.root / "eval" / "samples" / tag
            if out.exists():
                shutil.rmtree(out)
            t0 = time.time()
            label = f"FID samples ({model}" + (f", repeat {r + 1}/{repeats})" if repeats > 1 else ")")
            with show_progress(label, num, unit="images", enabled=progress) as update:
                for c, lo in enumerate(range(0, num, CHUNK)):
                    n = min(CHUNK, num - lo)

                    def chunk_done(done: int, total: int, lo: int = lo, n: int = n) -> None:
                        update(lo + n * done / max(total, 1))

                    family.generate(run, SampleRequest(model=model, steps=sampler["steps"], solver=sampler["solver"],
                                                     guidance=sampler["guidance"], num=n, seed=base + c,
                                                     weights=sampler["weights"], out=out / f"chunk-{c:03d}",
                                                     on_progress=chunk_done))
            log(f"repeat {r + 1}/{repeats}: {num} samples ({model}, seed {base}) in {time.time() - t0:.1f}s -> {out}")
            files = list_images(out)
            feats = file_features(files, spec, device, label=f"FID features of the samples ({model})", show=progress)
            fid, kid = fid_kid(feats, ref_feats, kid_seed=r)
            log(f"repeat {r + 1}/{repeats}: FID {fid:.4f}, KID {kid:.5f}")
            fids.append(fid), kids.append(kid), dirs.append(str(out)), counts.append(len(feats))

    return {
        "metric": "fid",
        "value": min(fids),
        "values": fids,
        "min": min(fids),
        "mean": float(np.mean(fids)),
        "kid": {"values": kids, "min": min(kids), "mean": float(np.mean(kids))},
        "model": model if samples is None else f"folder:{Path(samples).name}",
        "source": ({"kind": "folder", "path": str(Path(samples).resolve())} if samples is not None
                   else {"kind": "run", "path": str(Path(run.root).resolve())}),
        "features": spec.name,
        "features_info": spec.info,
        "num_samples": counts[0],
        "repeats": len(fids),
        "reference": ref_desc,
        "reference_size": int(len(ref_feats)),
        "reference_overlaps_training": overlaps,
        **({"reference_overlap_images": overlap_images} if overlap_images is not None else {}),
        "split": split_used,
        "sampler": sampler if samples is None else None,
        "seed": sampler["seed"] if sampler and samples is None else None,
        "samples": dirs,
        "mode": "clean",
        "seconds": round(time.time() - start, 2),
        "dbconvert_version": dbconvert.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
