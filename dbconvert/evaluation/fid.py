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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbconvert.devices import resolve_device
from dbconvert.errors import DataError, DbconvertError, RunError
from dbconvert.evaluation.features import (
    CNN_MAX_IMAGES,
    FeatureSpec,
    builtin_features,
    cache_dir,
    data_key,
    inception_features,
)
from dbconvert.data.overlap import image_digest, image_digests, split_overlaps_training, to_uint8
from dbconvert.evaluation.metric import Log, Metric, nolog
from dbconvert.evaluation.metric_help import FID
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


# --- image folders ---------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Every image file below `folder` (clean-fid's extensions, recursively), sorted, minus grid.png."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.name not in SKIP_NAMES
    )
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
            raise DataError(
                f"{what}: {path} cannot be read as an image ({type(exc).__name__}); remove or replace it"
            ) from None
        sizes.setdefault((h, w), path)
        if len(sizes) > 1:
            (h0, w0), p0 = next(iter(sizes.items()))
            raise DataError(
                f"{what} has images of different sizes: {p0.name} is {w0}x{h0} but {path.name} is {w}x{h}; use one size"
            )
    return next(iter(sizes))


def file_features(
    files: list[Path],
    spec: FeatureSpec,
    device: torch.device,
    batch_size: int = 64,
    label: str = "FID features",
    show: bool = False,
) -> np.ndarray:
    """clean-fid features of image files (mode clean; the spec's resize replaces the 299 resize if set).

    Read in slices of 8 batches, so progress can be shown; the batches are the ones a single call makes.
    """
    from cleanfid.fid import get_files_features

    step = 8 * batch_size
    parts = []
    with show_progress(label, len(files), unit="images", enabled=show) as update:
        for lo in range(0, len(files), step):
            parts.append(
                get_files_features(
                    [str(f) for f in files[lo : lo + step]],
                    model=spec.extractor,
                    num_workers=0,
                    batch_size=batch_size,
                    device=device,
                    mode="clean",
                    custom_fn_resize=spec.resize,
                    verbose=False,
                )
            )
            update(min(lo + step, len(files)))
    return np.concatenate(parts)


def folder_features(
    folder: Path, spec: FeatureSpec, device: torch.device, what: str, batch_size: int = 64, show: bool = False
) -> np.ndarray:
    files = list_images(folder)
    h, w = check_images(files, what)
    if spec.native_size is not None and (h, w) != spec.native_size:
        raise DataError(
            f"{what} holds {w}x{h} images but the features {spec.name} take "
            f"{spec.native_size[1]}x{spec.native_size[0]}; use images of the data set's size"
        )
    return file_features(files, spec, device, batch_size, f"FID features of {what}", show)


def check_count(n: int, spec: FeatureSpec, what: str) -> None:
    if n < spec.min_samples():
        raise DbconvertError(
            f"{what} has {n} images, too few for {spec.dim}-d features ({spec.name}): FID needs at "
            f"least {spec.min_samples()} (a full-rank covariance); use --num {spec.min_samples()} or more"
        )


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
        count += image_digest(chw) in train
    return count


def reference_key(data_cfg: Any, split: str) -> str:
    """Cache id of a reference set: the data set, the split and every setting that decides what the split holds."""
    import hashlib
    import json

    fields = {
        k: getattr(data_cfg, k, None) for k in ("test_source", "test_fraction", "split_seed", "image_key", "label_key")
    }
    digest = hashlib.sha256(json.dumps([str(data_cfg.source), split, fields], default=str).encode()).hexdigest()[:8]
    return f"{data_key(data_cfg.source)}-{split}-{digest}"


def reference_features(
    data_cfg: Any, split: str, spec: FeatureSpec, device: torch.device, log: Log = nolog, show: bool = False
) -> tuple[np.ndarray, str]:
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
        raise DataError(
            f"FID needs pixel images; {data.name} has {data.x.shape[1]} channels (latents): decode "
            "samples and references with the VAE and pass --samples and --reference folders"
        )
    check_count(len(data), spec, f"the reference set {data.name}:{split}")
    log(f"reference statistics: {len(data)} images of {data.name}:{split} with {spec.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ref-", dir=path.parent))
    try:
        feats = file_features(
            write_pngs(data.x, tmp), spec, device, label=f"FID features of {data.name}:{split}", show=show
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    desc = f"{data_cfg.source}:{split} ({len(data)} images)"
    part = path.with_name(path.name + ".part.npz")
    np.savez(part, feats=feats, desc=np.array(desc))
    part.replace(path)
    return feats, desc


# --- the command ---------------------------------------------------------------------------


def resolve_features(
    features: str,
    run: Any,
    inception_weights: Path | None,
    channels: int | None,
    device: torch.device,
    log: Log,
    feature_images: int = CNN_MAX_IMAGES,
    progress: bool = False,
) -> FeatureSpec:
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
        data_cfg = (
            DataConfig(source=source)
            if run is None
            else run.recipe.data.model_copy(update={"source": source, "kind": "auto"})
        )
    elif run is not None:
        data_cfg = run.recipe.data
    else:
        raise DbconvertError(
            "--features builtin trains on a run's data set: pass --run DIR or name one, e.g. --features builtin:digits"
        )
    return builtin_features(data_cfg, device, log, max_images=feature_images, progress=progress)


@dataclass
class Reference:
    """The reference side of an FID: its features, how it is described, and whether it holds training images."""

    feats: np.ndarray
    desc: str
    split: str | None
    overlaps: bool | None
    overlap_images: int | None = None


def image_channels(run: Any) -> int | None:
    """The channels of the run's samples when FID applies to its family (its `sample_shape` is C, H, W)."""
    return (
        run.family().sample_shape(run.recipe)[0]
        if run is not None and "fid" in run.family().metrics_for(run.recipe)
        else None
    )


def sampler_settings(
    run: Any, steps: int | None, solver: str | None, guidance: float | None, seed: int | None, weights: str | None
) -> dict[str, Any]:
    """The sampler an FID's samples are drawn with: each setting given, else the recipe's."""
    from dbconvert.sampling import resolve_sampler

    s = resolve_sampler(run.recipe.sample, steps=steps, solver=solver, guidance=guidance, seed=seed, weights=weights)
    return {"solver": s.solver, "steps": s.steps, "guidance": s.guidance, "weights": s.weights, "seed": s.seed}


def resolve_reference(
    run: Any | None,
    reference: Path | None,
    split: str | None,
    spec: FeatureSpec,
    device: torch.device,
    log: Log,
    progress: bool,
) -> Reference:
    """A reference folder, or the run's data set split (default: `default_split`), with its training overlap."""
    if reference is not None:
        feats = folder_features(Path(reference), spec, device, f"reference folder {reference}", show=progress)
        ref = Reference(feats, f"folder {Path(reference).resolve()} ({len(feats)} images)", None, None)
        if image_channels(run) is not None:
            try:
                ref.overlap_images = folder_overlap(list_images(Path(reference)), run.recipe.data)
                ref.overlaps = ref.overlap_images > 0
            except DbconvertError as exc:  # e.g. a hub data set offline: the overlap stays unknown, the FID does not
                log(f"note: cannot compare the reference folder with the training data ({exc}); overlap unknown")
    else:
        split_used = split or default_split(run.recipe.data)
        feats, desc = reference_features(run.recipe.data, split_used, spec, device, log, show=progress)
        ref = Reference(feats, desc, split_used, split_overlaps_training(run.recipe.data, split_used))
    check_count(len(ref.feats), spec, f"the reference {ref.desc}")
    if ref.overlaps:
        what = f"{ref.overlap_images} of its images are" if ref.overlap_images else "it is"
        log(f"note: the reference {ref.desc} overlaps the training data ({what} training images); the result says so")
    return ref


def fid_record(
    spec: FeatureSpec,
    ref: Reference,
    fids: list[float],
    kids: list[float],
    dirs: list[str],
    count: int,
    model: str,
    source: dict[str, str],
    sampler: dict[str, Any] | None,
    start: float,
) -> dict[str, Any]:
    """The result record of one FID evaluation (every mode)."""
    import dbconvert

    return {
        "metric": "fid",
        "value": min(fids),
        "values": fids,
        "min": min(fids),
        "mean": float(np.mean(fids)),
        "kid": {"values": kids, "min": min(kids), "mean": float(np.mean(kids))},
        "model": model,
        "source": source,
        "features": spec.name,
        "features_info": spec.info,
        "num_samples": count,
        "repeats": len(fids),
        "reference": ref.desc,
        "reference_size": int(len(ref.feats)),
        "reference_overlaps_training": ref.overlaps,
        **({"reference_overlap_images": ref.overlap_images} if ref.overlap_images is not None else {}),
        "split": ref.split,
        "sampler": sampler,
        "seed": sampler["seed"] if sampler else None,
        "samples": dirs,
        "mode": "clean",
        "seconds": round(time.time() - start, 2),
        "dbconvert_version": dbconvert.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def fid_of_folder(
    run: Any | None,
    samples: Path,
    *,
    reference: Path | None = None,
    split: str | None = None,
    features: str = "auto",
    inception_weights: Path | None = None,
    log: Log = nolog,
    feature_images: int = CNN_MAX_IMAGES,
    progress: bool = False,
) -> dict[str, Any]:
    """FID of a folder of sample images against a reference folder or (with a run) the run's data set split."""
    start = time.time()
    check_finite_samples(Path(samples))  # NaN samples' PNGs look like pictures: refuse them
    if run is None and reference is None:
        raise RunError("no run: pass --run DIR (or split one), or give both --samples and --reference folders")
    if reference is None and image_channels(run) is None:
        raise DbconvertError(
            f"eval fid is for image runs; this run is a {run.family_name} model "
            f"(use eval {run.family().default_metric(run.recipe)}, or give --reference FOLDER)"
        )
    device = resolve_device(run.recipe.train.device if run is not None else "auto")
    spec = resolve_features(
        features, run, inception_weights, image_channels(run), device, log, feature_images, progress
    )
    ref = resolve_reference(run, reference, split, spec, device, log, progress)
    feats = folder_features(Path(samples), spec, device, f"sample folder {samples}", show=progress)
    check_count(len(feats), spec, f"sample folder {samples}")
    fid, kid = fid_kid(feats, ref.feats)
    return fid_record(
        spec,
        ref,
        [fid],
        [kid],
        [str(samples)],
        len(feats),
        f"folder:{Path(samples).name}",
        {"kind": "folder", "path": str(Path(samples).resolve())},
        None,
        start,
    )


def fid_of_model(
    run: Any,
    *,
    model: str = "blocks",
    num: int | None = None,
    repeats: int = 1,
    reference: Path | None = None,
    split: str | None = None,
    features: str = "auto",
    inception_weights: Path | None = None,
    steps: int | None = None,
    solver: str | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    weights: str | None = None,
    log: Log = nolog,
    feature_images: int = CNN_MAX_IMAGES,
    progress: bool = False,
) -> dict[str, Any]:
    """FID of `num` fresh samples of the run's `model` (per repeat) against the data set split or a folder."""
    start = time.time()
    if repeats < 1:
        raise DbconvertError(f"--repeats must be at least 1, got {repeats}")
    run.model_targets(model)  # one line naming the models this run has
    if image_channels(run) is None:
        raise DbconvertError(
            f"eval fid is for image runs; this run is a {run.family_name} model "
            f"(use eval {run.family().default_metric(run.recipe)})"
        )
    sampler = sampler_settings(run, steps, solver, guidance, seed, weights)
    run.require_trained(model)
    num = num or 10_000
    device = resolve_device(run.recipe.train.device)
    spec = resolve_features(
        features, run, inception_weights, image_channels(run), device, log, feature_images, progress
    )
    check_count(num, spec, "--num")
    ref = resolve_reference(run, reference, split, spec, device, log, progress)
    fids, kids, dirs, counts = [], [], [], []
    for r in range(repeats):
        base = sampler["seed"] + 10_000 * r
        label = f"FID samples ({model}" + (f", repeat {r + 1}/{repeats})" if repeats > 1 else ")")
        t0 = time.time()
        out = generate_images(run, model, sampler, base, num, label, progress)
        log(f"repeat {r + 1}/{repeats}: {num} samples ({model}, seed {base}) in {time.time() - t0:.1f}s -> {out}")
        feats = file_features(
            list_images(out), spec, device, label=f"FID features of the samples ({model})", show=progress
        )
        fid, kid = fid_kid(feats, ref.feats, kid_seed=r)
        log(f"repeat {r + 1}/{repeats}: FID {fid:.4f}, KID {kid:.5f}")
        fids.append(fid), kids.append(kid), dirs.append(str(out)), counts.append(len(feats))
    return fid_record(
        spec,
        ref,
        fids,
        kids,
        dirs,
        counts[0],
        model,
        {"kind": "run", "path": str(Path(run.root).resolve())},
        sampler,
        start,
    )


def generate_images(
    run: Any, model: str, sampler: dict[str, Any], base: int, num: int, label: str, progress: bool
) -> Path:
    """`num` samples of `model` in chunks of CHUNK (chunk c with seed base + c) under RUN/eval/samples/."""
    from dbconvert.sampling import SampleRequest

    family = run.family()
    tag = f"fid-{model}-{sampler['solver']}-{sampler['steps']}steps-g{sampler['guidance']:g}-seed{base}-n{num}"
    out = run.root / "eval" / "samples" / tag
    if out.exists():
        shutil.rmtree(out)
    with show_progress(label, num, unit="images", enabled=progress) as update:
        for c, lo in enumerate(range(0, num, CHUNK)):
            n = min(CHUNK, num - lo)

            def chunk_done(done: int, total: int, lo: int = lo, n: int = n) -> None:
                update(lo + n * done / max(total, 1))

            family.generate(
                run,
                SampleRequest(
                    model=model,
                    steps=sampler["steps"],
                    solver=sampler["solver"],
                    options=family.sample_options(guidance=sampler["guidance"]),
                    num=n,
                    seed=base + c,
                    weights=sampler["weights"],
                    out=out / f"chunk-{c:03d}",
                    on_progress=chunk_done,
                ),
            )
    return out


def evaluate_fid(run: Any | None, *, samples: Path | None = None, repeats: int = 1, **options: Any) -> dict[str, Any]:
    """FID (and KID) of the run's samples (`fid_of_model`) or of a sample folder (`fid_of_folder`).

    `split` defaults to `default_split` (cifar10: train, as published FIDs; otherwise test). Every result
    names its reference (data set, split, size) and says whether it overlaps the run's training images.
    """
    if samples is None:
        if run is None:
            raise RunError("no run: pass --run DIR (or split one), or give both --samples and --reference folders")
        return fid_of_model(run, repeats=repeats, **options)
    if repeats > 1:
        raise DbconvertError(
            "--repeats needs freshly generated samples; a --samples folder is one fixed set (drop --repeats)"
        )
    unused = [
        k
        for k in ("model", "num", "steps", "solver", "guidance", "seed", "weights")
        if options.pop(k, None) not in (None, "blocks")
    ]
    if unused:
        raise DbconvertError(f"--samples scores a fixed folder: drop {', '.join('--' + k for k in unused)}")
    return fid_of_folder(run, samples, **options)


class FIDMetric(Metric):
    """FID and KID through clean-fid (DESIGN 7): the image families' metric."""

    name = "fid"
    depends_on_count = True
    settings_keys = ("repeats",)
    title = FID.title
    lower_is_better = True
    alone_options = ("samples", "reference")
    alone_hint = (
        "--samples needs a reference: give --reference DIR, or --run an image run whose data set is the reference"
    )
    spread_label = "KID"
    help = FID.help
    options = FID.options

    def check(self, recipe: Any, family: Any, num: int) -> None:
        channels = family.sample_shape(recipe)[0]
        if channels not in (1, 3):
            raise DbconvertError(
                f"FID scores pixels; {recipe.name} models {channels}-channel latents "
                "(use a pixel-space recipe such as dit-tiny-digits)"
            )
        if num < 65:
            raise DbconvertError(
                f"--num must be at least 65 (FID on the built-in 64-d features needs d + 1), got {num}"
            )

    def evaluate(
        self, run: Any | None, *, model: str = "blocks", log: Log = nolog, progress: bool = False, **options: Any
    ) -> dict[str, Any]:
        return evaluate_fid(run, model=model, log=log, progress=progress, **options)

    def spread(self, r: dict[str, Any]) -> float:
        return float(r["kid"]["min"])

    def summary_note(self, r: dict[str, Any]) -> str | None:
        values = self.values(r)
        return f"min {min(values):.4g}" if len(values) > 1 else None  # the paper's convention over repeats

    def detail_rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        repeated = r.get("repeats", 1) > 1
        rows = [("FID (min over repeats)" if repeated else "FID", f"{r['value']:.4f}")]
        if repeated:
            rows += [("FID mean", f"{r['mean']:.4f}"), ("FID per repeat", ", ".join(f"{v:.4f}" for v in r["values"]))]
        kid = r["kid"]
        return rows + [("KID" + (" (min)" if len(kid["values"]) > 1 else ""), f"{kid['min']:.5f}")]

    def compare_columns(self) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
        def mean(r: dict[str, Any]) -> str:
            reps = len(r["values"])
            return f"{r['mean']:.2f}" + (f" x{reps}" if reps > 1 else "")

        return [("FID", lambda r: f"{r['value']:.2f}"), ("FID mean", mean), ("KID", lambda r: f"{r['kid']['min']:.4g}")]

    def reference_column(self) -> tuple[str, Callable[[dict[str, Any]], str]]:
        from dbconvert.evaluation.results import reference_text

        return "reference", reference_text
