"""DiT generation: class-conditional images with the owning block per step, CFG, and the files written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dbconvert import noise as nz
from dbconvert.checkpoint import atomic_write
from dbconvert.devices import resolve_device
from dbconvert.errors import DbconvertError
from dbconvert.families.dit.sample_options import ImageSampleOptions
from dbconvert.progress import progress
from dbconvert.rundir import Run
from dbconvert.sampling import ResidentModels, SampleRequest, SampleResult, edm_sample, guided


def sample_images(run: Run, request: SampleRequest) -> SampleResult:
    """Generate images with the run's blocks (or e2e) and write them into the run."""
    opts: ImageSampleOptions = run.family().options_of(request)
    s = request.settings(run.recipe.sample, guidance=opts.guidance)
    steps, solver, guidance, num, seed, weights = s.steps, s.solver, s.guidance, s.num, s.seed, s.weights
    model_cfg = run.recipe.model
    num_classes: int = getattr(model_cfg, "num_classes", 0)
    if opts.class_label is not None and not 0 <= opts.class_label < max(num_classes, 1):
        raise DbconvertError(f"--class {opts.class_label} is out of range: the model has classes 0..{num_classes - 1}")
    if num_classes == 0 and guidance != 1.0:
        raise DbconvertError(
            "guidance needs a class-conditional model; this one has model.num_classes=0 (use --guidance 1)"
        )

    device = resolve_device(run.recipe.train.device)
    models = ResidentModels(run, request.model, weights, device)  # one block at a time, high noise to low
    noise = run.noise()
    owned = run.owned_ranges() if request.model == "blocks" else [(noise.sigma_min, noise.sigma_max)]
    ts = nz.edm_steps(steps, noise, run.recipe.sample.rho)
    gen = torch.Generator().manual_seed(seed)
    shape = (num, model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)  # type: ignore[attr-defined]
    z = (ts[0] * torch.randn(shape, generator=gen, dtype=torch.float64)).to(torch.float32).to(device)
    if opts.class_label is not None:
        y = torch.full((num,), opts.class_label, dtype=torch.long)
    else:
        y = torch.arange(num) % max(num_classes, 1)
    y = y.to(device)
    calls = [0] * len(models)
    total = steps if solver == "euler" else 2 * steps - 1  # Heun: no correction on the last step (to sigma 0)

    with progress(f"sample {request.model} ({num} images)", total, unit="steps", enabled=request.progress) as update:

        def denoise(i: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
            calls[i] += 1
            out = guided(models[i], z, sigma, y, guidance, num_classes)
            done = sum(calls)
            update(done)
            if request.on_progress:
                request.on_progress(done, total)
            return out

        with torch.no_grad():
            x = edm_sample(denoise, owned, ts, z, solver)
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        if bad:
            raise DbconvertError(
                f"{bad} of {num} samples are not finite (NaN or inf) with guidance {guidance:g}, "
                f"{solver}, {steps} steps; nothing was written (lower --guidance, or retrain)"
            )
        x = x.clamp(-1, 1).cpu()

    tag = f"{request.model}-{solver}-{steps}steps-g{guidance:g}-seed{seed}"
    out = Path(request.out) if request.out else run.root / "samples" / tag
    files = write_images(out, x, y.cpu())
    return SampleResult(out, files, calls=calls)


def write_images(out: Path, x: torch.Tensor, y: torch.Tensor) -> list[Path]:
    """samples.npz always; grid.png and one PNG per image when the data are 1 or 3 channel pixels.

    Returns every file written, the grid first when there is one.
    """
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "samples.npz"]
    arr = x.numpy()

    def save_npz(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=arr, y=y.numpy())

    atomic_write(files[0], save_npz)
    if arr.shape[1] not in (1, 3):
        return files  # latents: decode with the VAE before viewing
    pixels = np.clip((arr + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    images = [Image.fromarray(p[..., 0] if mode == "L" else p, mode) for p in pixels]
    for i, img in enumerate(images):
        path = out / f"{i:05d}.png"
        img.save(path)
        files.append(path)
    h, w = pixels.shape[1:3]
    scale = max(1, 32 // max(h, w))
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    grid = Image.new(mode, (cols * w * scale + (cols + 1) * 2, rows * h * scale + (rows + 1) * 2))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(
            img.resize((w * scale, h * scale), Image.NEAREST), (2 + c * (w * scale + 2), 2 + r * (h * scale + 2))
        )
    grid.save(out / "grid.png")
    files.insert(0, out / "grid.png")
    return files
