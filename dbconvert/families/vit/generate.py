"""Classification with a ViT run: the logits after every denoising step, and `sample` (predictions written).

`sample` on a ViT run classifies images: `--images DIR` (image files, or class sub-folders of them) or,
without it, the first `--num` (default: sample.num) images of the data set's test split. It writes predictions.csv
(file or index, predicted class, its probability, and the true label where known) and probs.npz (the
probabilities of every class, after every step).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from dbconvert.checkpoint import atomic_write, atomic_write_text
from dbconvert.data.images import SIXTEEN_BIT_MODES, pil_pixels, unit_pixels
from dbconvert.devices import resolve_device
from dbconvert.errors import DataError, DbconvertError
from dbconvert.families.vit.objective import Classifier, ViTDenoiser, cdf_levels, classify_steps
from dbconvert.rundir import Run
from dbconvert.sampling import SampleRequest, SampleResult, load_models
from dbconvert.solvers import get_solver

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
EVAL_BATCH = 256


def default_steps(run: Run, model: str) -> int:
    """One step per block by default (the e2e denoiser gets as many, for a like-for-like comparison)."""
    return run.num_blocks


def denoiser_settings(run: Run, model: str, steps: int | None, solver: str | None) -> tuple[int | None, str | None]:
    """(steps, solver) of classifying with `model`: the denoisers' (blocks, e2e) defaults are one step per block and
    the recipe's sample.solver; a plain classifier takes neither, so giving one is a one-line error."""
    if model not in ("blocks", "e2e"):
        for flag, value in (("--steps", steps), ("--solver", solver)):
            if value is not None:
                raise DbconvertError(
                    f"{flag} applies to the denoisers (blocks, e2e), not to --model {model} (a plain "
                    "classifier: one forward pass); drop it"
                )
        return None, None
    return steps or default_steps(run, model), solver or run.recipe.sample.solver


def solver_tag(solver: str | None) -> str:
    """`-heun` in file and folder names for a solver other than the default Euler (Euler's names are unchanged)."""
    return f"-{solver}" if solver not in (None, "euler") else ""


@torch.no_grad()
def step_logits(
    run: Run,
    model: str,
    x: torch.Tensor,
    steps: int | None = None,
    weights: str = "ema",
    seed: int = 0,
    device: torch.device | None = None,
    batch: int = EVAL_BATCH,
    solver: str = "euler",
) -> list[torch.Tensor]:
    """Logits (CPU, float32) of `model` on images `x` after each denoising step; one entry for a plain classifier.

    `solver` (`solvers.py`) moves the noisy label between levels (`classify_steps`)."""
    step = get_solver(solver)
    device = device or resolve_device(run.recipe.train.device)
    models = load_models(run, model, weights, device)
    if isinstance(models[0], Classifier):
        return [torch.cat([models[0](x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])]
    noise = run.noise()
    owned = run.owned_ranges() if model == "blocks" else [(noise.sigma_min, noise.sigma_max)]
    levels = cdf_levels(steps or default_steps(run, model), noise)
    first: ViTDenoiser = models[0]  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(seed)
    z_all = noise.sigma_max * torch.randn((len(x), first.table.shape[1]), generator=gen)
    per_step: list[list[torch.Tensor]] = [[] for _ in levels]
    for i in range(0, len(x), batch):
        xb, zb = x[i : i + batch].to(device), z_all[i : i + batch].to(device)

        def logits_of(k: int, z: torch.Tensor, s: float) -> torch.Tensor:
            return models[k](xb, z, torch.full((z.shape[0],), s, device=device))

        for j, logits in enumerate(classify_steps(logits_of, first.denoised, owned, levels, zb, step)):
            per_step[j].append(logits.cpu())
    return [torch.cat(chunks) for chunks in per_step]


def read_image_folder(folder: Path, in_chans: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Image files under `folder` (recursively, sorted) as a batch in [-1, 1]; one-line errors for bad images."""
    from PIL import Image

    if not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--images {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for path in files:
        try:
            img = Image.open(path)
            sixteen = img.mode in SIXTEEN_BIT_MODES  # 16-bit grey stays 16-bit: L or RGB would clip it at 255
            if not sixteen and img.mode != "F":  # F (floating point): refused below, its range unknown
                img = img.convert("L" if in_chans == 1 else "RGB")
        except Exception as exc:
            raise DataError(f"cannot read image {path} ({type(exc).__name__})") from None
        if img.size != (size, size):
            raise DataError(
                f"image {path} is {img.size[0]}x{img.size[1]} but the model takes {size}x{size}; "
                "resize the images first"
            )
        arr = unit_pixels(pil_pixels(img, f"image {path}"))
        if sixteen and in_chans == 3:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays))
    return x, [str(p.relative_to(folder)) for p in files]


def what_tag(images: Path | str | None, names: list[str], count: int) -> str:
    """What was classified, for the sampler folder's name: `test{count}` for the test split, else the folder's
    name and a digest of its path and file list, so a user's images never replace the test-split predictions (or
    another folder's) of the same sampler (issue 33)."""
    if images is None:
        return f"test{count}"
    folder = Path(images).resolve()
    digest = hashlib.sha256("\n".join([str(folder), *names]).encode()).hexdigest()[:8]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in folder.name)[:40] or "images"
    return f"images-{stem}-{digest}"


def classify(run: Run, request: SampleRequest) -> SampleResult:
    """`sample` of a ViT run: classify --images DIR or the test split; write predictions.csv and probs.npz."""
    from dbconvert.families.vit.data import load_labelled

    cfg = run.recipe.model
    images = run.family().options_of(request).images
    s = request.settings(run.recipe.sample)
    seed, weights = s.seed, s.weights
    labels = None
    if images is not None:
        x, names = read_image_folder(Path(images), cfg.in_chans, cfg.img_size)  # type: ignore[attr-defined]
    else:
        data = load_labelled(run.recipe.data, cfg, "test", train_split=False)  # type: ignore[arg-type]
        num = min(request.num or run.recipe.sample.num, len(data))
        x, labels = data.x[:num], data.y[:num]
        names = [str(i) for i in range(num)]
    steps, solver = denoiser_settings(run, request.model, request.steps, request.solver)
    logits = step_logits(run, request.model, x, steps, weights, seed, solver=solver or "euler")
    probs = torch.stack([torch.softmax(lg, dim=-1) for lg in logits])
    final = probs[-1]
    conf, pred = final.max(dim=-1)
    is_denoiser = request.model in ("blocks", "e2e")
    tag = (
        f"{request.model}-classify-{what_tag(images, names, len(x))}-{steps if is_denoiser else 1}steps"
        f"{solver_tag(solver)}-seed{seed}"
    )
    tag += "" if weights == "ema" or not is_denoiser else f"-{weights}"
    out = Path(request.out) if request.out else run.root / "samples" / tag
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "prediction", "probability", *(["label"] if labels is not None else [])])
    for i, name in enumerate(names):
        writer.writerow(
            [name, int(pred[i]), f"{float(conf[i]):.6f}", *([int(labels[i])] if labels is not None else [])]
        )
    files = [out / "predictions.csv", out / "probs.npz"]
    atomic_write_text(files[0], buf.getvalue())

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                probs=probs.numpy(),
                prediction=pred.numpy(),
                **({"label": labels.numpy()} if labels is not None else {}),
            )

    atomic_write(files[1], save)
    text = []
    if labels is not None:
        text.append(f"top-1 accuracy on these {len(names)} test images: {(pred == labels).float().mean().item():.4f}")
    return SampleResult(
        out,
        files,
        text=text,
        sampler={"steps": steps, "seed": seed, "weights": weights, **({"solver": solver} if solver else {})},
    )
