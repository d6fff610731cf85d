"""Every bad input a hostile new user tried (issue 20), as a table: each one is exit 2, exactly one `error:` line on
stderr, no traceback, and nothing on disk changed (every file's bytes and mtime, every folder, before and after).

To cover a new option, add a `Bad(...)` row: the command line (run from a folder holding the DiT run `run` and the
Llama run `lm`, `lm` being the current run), a piece of the expected error line, and, if the input needs a file
made first, a `setup` that makes it (it runs before the snapshot).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dbconvert.rundir import set_current
from tests.cli_helpers import assert_user_error, invoke
from tests.conftest import TINY_OVERRIDES

DIT = ("dit-tiny-digits", *TINY_OVERRIDES)


def llama_recipe(root: Path) -> tuple[str, ...]:
    from tests.families.test_llama import tiny_overrides

    return ("llama-tiny-shakespeare", *tiny_overrides(root / "corpus.txt"))


@dataclass
class Bad:
    id: str
    args: tuple[str, ...] | Callable[[Path], tuple[str, ...]]
    match: str
    setup: Callable[[Path], None] | None = None
    skip: str | None = None
    marks: list = field(default_factory=list)


def truncated_manifest(root: Path) -> None:
    (root / "broken").mkdir()
    text = (root / "run" / "manifest.yaml").read_text()
    (root / "broken" / "manifest.yaml").write_text(text[: text.index("recipe:")])


def non_empty_folder(root: Path) -> None:
    (root / "mine.pt").mkdir()
    (root / "mine.pt" / "notes.txt").write_text("mine")


def existing_file(root: Path) -> None:
    (root / "old.pt").write_text("keep")


def _half_trained(root: Path) -> None:
    """Block 2 of `run` trained 2 of its 4 steps with the default options (a state to resume)."""
    from dbconvert.rundir import Run
    from dbconvert.train import train_block

    if not (root / "run" / "blocks" / "block-02" / "state.safetensors").exists():
        train_block(Run.open(root / "run"), 2, steps=2, progress=False)


def damaged_temperatures(root: Path) -> None:
    (root / "lm" / "shared" / "output_temperature.json").write_text('{"block-00": 0.3')


def huginn_2_4_2(root: Path) -> None:
    from tests.families.test_recurrent import huginn_checkpoint

    huginn_checkpoint(root / "huginn", counts=(2, 4, 2))


HUGINN = ("huginn-tiny-shakespeare", "data.source=corpus.txt")
VIT = ("vit-tiny-digits", "model.embed_dim=32", "model.depth=3", "model.num_heads=2")


def big_images(root: Path) -> None:
    from dbconvert.data.images import write_random_images

    write_random_images(root / "big.npz", 20, (1, 16, 16), 10, seed=0)


def upper_gguf(root: Path) -> None:
    (root / "UPPER.GGUF").write_bytes(b"GGUF" + bytes(20))


def class_folders(root: Path) -> None:
    """imgs/train/{a,b}/*.png (two classes) and flat/*.png (no class folders: every label would be 0)."""
    import numpy as np
    from PIL import Image

    for folder in (root / "imgs" / "train" / "a", root / "imgs" / "train" / "b", root / "flat"):
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8), "L").save(folder / f"{i}.png")


TENSORBOARD = importlib.util.find_spec("tensorboard") is not None

MAX_SEED = "9223372036854775807"
TOO_BIG = "99999999999999999999"
VIT_SPLIT: list[Path] = []
"""A tiny ViT run split once (the workspace has none), copied in by the rows that need one."""


def a_file(root: Path) -> None:
    (root / "afile").write_text("mine")


def vit_run(root: Path) -> None:
    """`vit`: a tiny ViT run (sample --images, eval accuracy), split once per session and copied."""
    import tempfile

    from dbconvert.config import load_recipe
    from dbconvert.split import split
    from tests.families.test_vit import TINY

    if not VIT_SPLIT:
        folder = Path(tempfile.mkdtemp(prefix="bad-inputs-vit-")) / "vit"
        split(load_recipe("vit-tiny-digits", TINY), out=folder, make_current=False)
        VIT_SPLIT.append(folder)
    shutil.copytree(VIT_SPLIT[0], root / "vit")


def vit_images(root: Path) -> None:
    """`vit`, a folder of one image, and `existing.png`, a file where sample's --out folder would go."""
    from PIL import Image

    vit_run(root)
    (root / "imgs").mkdir()
    Image.new("L", (8, 8)).save(root / "imgs" / "a.png")
    (root / "existing.png").write_text("mine")


def file_in_the_run(name: str, vit: bool = False) -> Callable[[Path], None]:
    """A file where the run's `name` folder (eval, plots, samples) goes."""

    def make(root: Path) -> None:
        if vit:
            vit_run(root)
        (root / ("vit" if vit else "run") / name).write_text("mine")

    return make


ROWS = [
    # --- the file system and numbers (issue 32)
    Bad(
        "split-out-a-file",
        ("split", *DIT, "--out", "afile", "-q"),
        "afile is a file where a folder is expected",
        setup=a_file,
    ),
    Bad(
        "split-force-out-a-file",
        ("split", *DIT, "--force", "--out", "afile", "-q"),
        "afile is a file where a folder is expected; move it away or choose another path",
        setup=a_file,
    ),
    Bad(
        "split-out-under-a-file",
        ("split", *DIT, "--out", "afile/run", "-q"),
        "afile is a file where a folder",
        setup=a_file,
    ),
    Bad(
        "export-under-a-file",
        ("export", "afile/x.pt", "--run", "run"),
        "afile is a file where a folder is expected",
        setup=a_file,
    ),
    Bad(
        "sample-images-out-an-existing-file",
        ("sample", "--run", "vit", "--model", "source", "--images", "imgs", "--out", "existing.png", "-q"),
        "existing.png is a file where a folder is expected",
        setup=vit_images,
    ),
    Bad(
        "run-eval-is-a-file",
        ("eval", "accuracy", "--run", "vit", "--model", "source", "-q"),
        "vit/eval is a file where a folder is expected",
        setup=file_in_the_run("eval", vit=True),
    ),
    Bad(
        "run-plots-is-a-file",
        ("plot", "--run", "run"),
        "run/plots is a file where a folder is expected",
        setup=file_in_the_run("plots"),
    ),
    Bad(
        "run-samples-is-a-file",
        ("sample", "--run", "run", "--model", "source", "-q"),
        "run/samples is a file where a folder is expected (to reach run/samples/",
        setup=file_in_the_run("samples"),
    ),
    Bad(
        "eval-accuracy-seed-too-big",
        ("eval", "accuracy", "--seed", TOO_BIG),
        f"'--seed': must be from 0 to {MAX_SEED} (2^63 - 1, the seeds torch takes), not {TOO_BIG}",
    ),
    Bad("eval-bpc-seed-too-big", ("eval", "bpc", "--seed", TOO_BIG), f"'--seed': must be from 0 to {MAX_SEED}"),
    Bad("sample-seed-negative", ("sample", "--run", "run", "--seed", "-1"), f"must be from 0 to {MAX_SEED}"),
    Bad(
        "recipe-seed-too-big",
        ("train-block", "0", f"train.seed={TOO_BIG}", "--run", "run", "-q"),
        f"key 'train.seed': must be from 0 to {MAX_SEED} (2^63 - 1, the seeds torch takes) (got {TOO_BIG})",
    ),
    Bad(
        "init-seed-negative",
        ("split", *DIT, "model.init_seed=-1", "--out", "new"),
        f"key 'model.init_seed': must be from 0 to {MAX_SEED}",
    ),
    Bad("split-seed-too-big", ("split", *DIT, f"data.split_seed={TOO_BIG}", "--out", "new"), "key 'data.split_seed'"),
    Bad(
        "sample-seed-in-the-recipe-too-big",
        ("split", *DIT, f"sample.seed={TOO_BIG}", "--out", "new"),
        "key 'sample.seed'",
    ),
    Bad(
        "epochs-inf",
        ("train-block", "0", "--epochs", "inf", "--run", "run", "-q"),
        "'--epochs': must be above 0 and at most 1000000 (a finite number), not inf",
    ),
    Bad("epochs-nan", ("train-e2e", "--epochs", "nan", "--run", "run", "-q"), "not nan"),
    Bad("epochs-negative", ("train-all", "--epochs", "-2", "--run", "run", "-q"), "'--epochs': must be above 0"),
    Bad(
        "train-steps-absurd",
        ("train-block", "0", "--steps", "10000000000", "--run", "run", "-q"),
        "'--steps': must be from 1 to 1000000000, not 10000000000",
    ),
    Bad(
        "demo-steps-absurd",
        ("demo", "--steps", "10000000000", "--out", "d", "-q"),
        "'--steps': must be from 1 to 1000000000",
    ),
    Bad(
        "ablate-steps-absurd",
        ("ablate", "blocks", *DIT, "--steps", "10000000000", "--out", "ab", "-q"),
        "'--steps': must be from 1 to 1000000000",
    ),
    Bad(
        "sample-steps-absurd",
        ("sample", "--run", "run", "--steps", "10000000000"),
        "'--steps': must be from 1 to 100000",
    ),
    Bad(
        "recipe-epochs-inf",
        ("train-block", "0", "train.steps=null", "train.epochs=inf", "--run", "run", "-q"),
        "key 'train.epochs': Input should be a finite number (got 'inf')",
    ),  # no recipe number is inf or nan
    Bad(
        "epochs-beyond-the-step-limit",
        ("train-block", "0", "train.steps=null", "train.epochs=1000000", "train.batch_size=1", "--run", "run", "-q"),
        "train.epochs=1000000 is 1,438,000,000 steps (1,438 an epoch), more than the 1,000,000,000 allowed",
    ),
    Bad(
        "recipe-steps-absurd",
        ("train-block", "0", "train.steps=10000000000", "--run", "run", "-q"),
        "key 'train.steps': must be from 1 to 1000000000",
    ),
    Bad(
        "recipe-sample-steps-absurd",
        ("split", *DIT, "sample.steps=10000000000", "--out", "new"),
        "key 'sample.steps': must be from 1 to 100000",
    ),
    Bad(
        "bench-skips-everything",
        (
            "bench",
            "memory",
            "vit-tiny-digits",
            "--blocks",
            "3",
            "--skip",
            "e2e",
            "--skip",
            "block-0",
            "--skip",
            "block-1",
            "--skip",
            "block-2",
            "--no-checkpointing",
        ),
        "--skip leaves nothing to measure: every network here is skipped (block-0, block-1, block-2, e2e)",
    ),
    Bad(
        "bench-speed-skips-everything",
        (
            "bench",
            "speed",
            "vit-tiny-digits",
            "--blocks",
            "3",
            "--skip",
            "e2e",
            "--skip",
            "block-0",
            "--skip",
            "block-1",
            "--skip",
            "block-2",
            "--no-checkpointing",
        ),
        "--skip leaves nothing to measure",
    ),
    # --- data loss: export never replaces the run, a folder around or inside it, or a folder that is not an export
    Bad("export-into-the-run", ("export", "run", "--run", "run", "--force"), "is the run folder"),
    Bad("export-dot-holding-the-run", ("export", ".", "--run", "run", "--force"), "contains the run folder"),
    Bad("export-inside-the-run", ("export", "run/source/x.pt", "--run", "run", "--force"), "is inside the run folder"),
    Bad(
        "export-over-a-non-empty-folder",
        ("export", "mine.pt", "--run", "run", "--force"),
        "not an earlier dit export",
        setup=non_empty_folder,
    ),
    Bad(
        "export-over-a-file-without-force",
        ("export", "old.pt", "--run", "run"),
        "already exists; pass --force",
        setup=existing_file,
    ),
    # --- silent wrong answers
    # settings split fixes, checked at split against the data (issue 34)
    Bad(
        "vit-images-of-another-size",
        ("split", *VIT, "data.source=big.npz", "data.kind=npz", "--out", "new"),
        "has images of shape (1, 16, 16) but the model takes (1, 8, 8)",
        setup=big_images,
    ),
    Bad(
        "vit-more-classes-than-the-data",
        ("split", *VIT, "model.num_classes=11", "--out", "new"),
        "set model.num_classes=10",
    ),
    Bad(
        "vit-bogus-randaugment",
        ("split", *VIT, "model.augment.randaugment=bogus", "--out", "new"),
        "is not a timm RandAugment string",
    ),
    Bad(
        "vit-test-source-without-class-folders",
        ("split", *VIT, "data.source=imgs/train", "data.test_source=flat", "model.num_classes=2", "--out", "new"),
        "has the class folders [] but data.source has ['a', 'b']",
        setup=class_folders,
    ),
    Bad(
        "gguf-given-to-vit",
        ("split", *VIT, "model.checkpoint=UPPER.GGUF", "model.global_pool=token", "--out", "new"),
        "is a GGUF file (llama.cpp's format), which only the Llama recipes read",
        setup=upper_gguf,
    ),
    Bad("noise-sigma-max-inf", ("split", *VIT, "noise.sigma_max=inf", "--out", "new"), "finite number"),
    Bad(
        "train-with-data-test-fraction",
        ("train-block", "0", "data.test_fraction=0", "--run", "run", "-q"),
        "the 'data' section is fixed when the run is split",
    ),
    Bad(
        "train-with-another-data-source",
        ("train-block", "1", "data.source=digits", "--run", "run", "-q"),
        "the 'data' section is fixed when the run is split",
    ),
    Bad("mauve-unknown-split", ("eval", "mauve", "--run", "lm", "--split", "nope"), "local text has the splits"),
    Bad("mauve-test-split-of-local-text", ("eval", "mauve", "--run", "lm", "--split", "test"), "not 'test'"),
    Bad("p-std-without-mass", ("split", *DIT, "noise.p_std=1e-30", "--out", "new"), "would own the noise levels"),
    Bad("p-mean-far-above", ("split", *DIT, "noise.p_mean=50", "--out", "new"), "puts (almost) no mass"),
    # --- the plug-in points: noise processes, metrics, family sampling options
    Bad("unknown-noise-process", ("split", *DIT, "noise.process=nope", "--out", "new"), "unknown noise process 'nope'"),
    Bad(
        "noise-process-of-another-family",
        ("split", *DIT, "noise.process=masking", "--out", "new"),
        "does not apply to the dit family",
    ),
    Bad(
        "metric-of-another-family",
        ("eval", "accuracy", "--run", "run", "-q"),
        "eval accuracy does not apply to this dit run; use eval fid",
    ),
    Bad(
        "images-on-a-text-run",
        ("sample", "--run", "lm", "--model", "source", "--images", "imgs"),
        "--images does not apply to a llama run",
    ),
    Bad("p-mean-far-below", ("split", *DIT, "noise.p_mean=-50", "--out", "new"), "puts (almost) no mass"),
    Bad("inverted-ddpm-schedule", ("split", *DIT, "model.ddpm.beta_start=0.03", "--out", "new"), "betas increase"),
    Bad("bool-as-a-number", ("split", *DIT, "train.lr=true", "--out", "new"), "expected float, not true"),
    Bad(
        "text-data-option-on-an-image-run",
        ("split", *DIT, "data.text_unit=document", "--out", "new"),
        "data.text_unit=document is an option of text data",
    ),
    Bad("image-data-kind-on-an-image-run", ("split", *DIT, "data.kind=text", "--out", "new"), "data.kind=text"),
    Bad(
        "head-rank-true",
        lambda root: ("split", *llama_recipe(root), "model.head_rank=true", "--out", "new"),
        "expected int or null, not true",
    ),
    Bad(
        "absurd-adaln-rank",
        lambda root: ("split", *llama_recipe(root), "model.adaln_rank=100000", "--out", "new"),
        "model.adaln_rank 100000 is not below model.hidden",
    ),
    Bad(
        "image-data-option-on-a-text-run",
        lambda root: ("split", *llama_recipe(root), "data.test_fraction=0.1", "--out", "new"),
        "is an option of image data",
    ),
    Bad("prompt-on-an-image-run", ("sample", "--run", "run", "--prompt", "hi"), "--prompt does not apply to a dit run"),
    Bad(
        "temperature-on-an-image-run",
        ("sample", "--run", "run", "--temperature", "0.5"),
        "--temperature does not apply to a dit run",
    ),
    Bad(
        "class-on-a-text-run",
        ("sample", "--run", "lm", "--model", "source", "--class", "3"),
        "--class does not apply to a llama run",
    ),
    # --- tracebacks and unclear errors
    Bad("brackets-in-a-path-print-literally", ("split", "[/INST] [/b].yaml"), "'[/INST] [/b].yaml' not found"),
    Bad(
        "tensorboard-install-hint",
        ("train-block", "0", "train.tensorboard=true", "--run", "run", "-q"),
        'pip install "dbconvert[tensorboard]"',
        skip="tensorboard is installed" if TENSORBOARD else None,
    ),
    # --- the recurrent (Huginn) family
    Bad(
        "huginn-checkpoint-layer-counts-disagree",
        ("split", *HUGINN, "model.checkpoint=huginn", "--out", "new"),
        "has 2/4/2 prelude/core/coda layers, the recipe 1/2/1",
        setup=huginn_2_4_2,
    ),
    Bad(
        "backprop-depth-above-mean-recurrence",
        ("split", *HUGINN, "model.backprop_depth=40", "--out", "new"),
        "model.backprop_depth 40 must be in [1, model.mean_recurrence 32]",
    ),
    Bad(
        "backprop-depth-zero",
        ("split", *HUGINN, "model.backprop_depth=0", "--out", "new"),
        "model.backprop_depth 0 must be in [1",
    ),
    Bad("sample-steps-zero", ("sample", "--steps", "0"), "Invalid value for '--steps'"),
    Bad(
        "recurrent-option-on-a-llama-run",
        lambda root: ("split", *llama_recipe(root), "model.mean_recurrence=8", "--out", "new"),
        "unknown key 'model.mean_recurrence'",
    ),
    Bad("recurrent-model-of-a-llama-run", ("sample", "--model", "recurrent"), "recurrent"),
    Bad(
        "truncated-manifest",
        ("info", "--run", "broken"),
        "is incomplete (it has no 'recipe')",
        setup=truncated_manifest,
    ),
    Bad("objective-ar-on-an-image-run", ("train-e2e", "--objective", "ar", "--run", "run", "-q"), "--objective ar"),
    Bad("bad-option-value", ("split", "dit-tiny-digits", "--blocks", "x"), "Invalid value for '--blocks'"),
    Bad("unknown-option", ("export", "x.pt", "--nope"), "No such option: --nope"),
    Bad("missing-argument", ("train-block",), "Missing argument 'index'"),
    Bad("out-of-range-option", ("sample", "--run", "run", "--steps", "0"), "'--steps'"),
    Bad(
        "decode-tokens-beyond-the-context",
        lambda root: (
            "bench",
            "speed",
            *llama_recipe(root),
            "--blocks",
            "2",
            "--batch",
            "1",
            "--sampling-only",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode-tokens",
            "1000",
        ),
        "--decode-tokens must be between 1 and",
    ),
    Bad(
        "decode-tokens-zero",
        lambda root: (
            "bench",
            "speed",
            *llama_recipe(root),
            "--blocks",
            "2",
            "--batch",
            "1",
            "--sampling-only",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode-tokens",
            "0",
        ),
        "--decode-tokens must be between 1 and",
    ),
    # --- memory options (issue 29)
    Bad(
        "optimizer-in-backward-with-clipping",
        ("train-block", "0", "train.optimizer_in_backward=true", "train.grad_clip=1.0", "--run", "run", "-q"),
        "cannot clip",
    ),
    Bad(
        "optimizer-in-backward-with-accumulation",
        ("train-block", "0", "train.optimizer_in_backward=true", "train.grad_accumulation=2", "--run", "run", "-q"),
        "cannot accumulate",
    ),
    Bad(
        "optimizer-in-backward-with-fp16",
        ("train-block", "0", "train.optimizer_in_backward=true", "train.precision=fp16", "--run", "run", "-q"),
        "loss scaler",
    ),
    Bad("unknown-ema-value", ("train-block", "0", "train.ema=gpu", "--run", "run", "-q"), "train.ema"),
    Bad(
        "unknown-optimizer", ("train-block", "0", "train.optimizer=adamw4bit", "--run", "run", "-q"), "train.optimizer"
    ),
    Bad(
        "accumulation-not-dividing-the-batch",
        ("train-block", "0", "train.grad_accumulation=3", "--run", "run", "-q"),
        "does not divide",
    ),
    Bad("fp16-on-the-cpu", ("train-block", "0", "train.precision=fp16", "--run", "run", "-q"), "needs a CUDA device"),
    Bad(
        "resume-with-other-memory-options",
        ("train-block", "2", "train.precision=bf16-true", "--run", "run", "-q"),
        "resume with the same",
        setup=lambda root: _half_trained(root),
    ),
    Bad("fit-size-unreadable", ("bench", "memory", *DIT, "--fit", "lots"), "give a memory size"),
    Bad("fit-with-static", ("bench", "memory", *DIT, "--fit", "24GiB", "--static"), "drop --static"),
    Bad("options-without-static", ("bench", "memory", *DIT, "--options"), "add --static"),
    Bad(
        "fit-context-on-images",
        ("bench", "memory", *DIT, "--fit", "24GiB", "--context", "64"),
        "--context does not apply",
    ),
    Bad(
        "damaged-output-temperature-file",
        ("train-block", "0", "--run", "lm", "-q"),
        "output_temperature.json is not a JSON object of block names and numbers",
        setup=damaged_temperatures,
    ),
    # --- options that do not apply, overrides a checkpoint contradicts (issue 34)
    Bad(
        "loss-weight-on-a-masked-split",
        lambda root: ("split", *md4_recipe(root), "train.loss_weight=lambda", "--out", "new"),
        "train.loss_weight=lambda does not apply to model.objective=masked",
    ),
    Bad(
        "loss-weight-on-a-masked-run",
        ("train-block", "0", "train.loss_weight=uniform", "--run", "md4", "-q"),
        "train.loss_weight=uniform does not apply to model.objective=masked",
        setup=lambda root: md4_run(root),
    ),
    Bad(
        "temperature-on-masked-blocks",
        ("sample", "--run", "md4", "--temperature", "0.5"),
        "--temperature does not apply to the blocks of a masked-diffusion run",
        setup=lambda root: md4_run(root),
    ),
    Bad(
        "top-p-on-masked-e2e",
        ("sample", "--run", "md4", "--model", "e2e", "--top-p", "0.9"),
        "--top-p does not apply to the e2e of a masked-diffusion run",
        setup=lambda root: md4_run(root),
    ),
    Bad(
        "decode-tokens-on-a-masked-recipe",
        lambda root: (
            "bench",
            "speed",
            *md4_recipe(root),
            "--blocks",
            "3",
            "--batch",
            "1",
            "--sampling-only",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode-tokens",
            "0",
        ),
        "--decode-tokens does not apply to md4-tiny-shakespeare",
    ),
    Bad(
        "decode-tokens-on-an-image-recipe",
        (
            "bench",
            "speed",
            *DIT,
            "--blocks",
            "2",
            "--batch",
            "1",
            "--sampling-only",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode-tokens",
            "100000",
        ),
        "--decode-tokens does not apply to dit-tiny-digits",
    ),
    Bad(
        "decode-tokens-on-a-classifier-recipe",
        lambda root: (
            "bench",
            "speed",
            *vit_recipe(),
            "--blocks",
            "3",
            "--batch",
            "1",
            "--sampling-only",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode-tokens",
            "-3",
        ),
        "--decode-tokens does not apply to vit-tiny-digits",
    ),
    Bad(
        "decode-tokens-with-no-decoding",
        lambda root: (
            "bench",
            "speed",
            *llama_recipe(root),
            "--blocks",
            "2",
            "--batch",
            "1",
            "--sampling-only",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-decoding",
            "--decode-tokens",
            "4",
        ),
        "which --no-decoding leaves out",
    ),
    Bad(
        "batch-with-static-memory",
        ("bench", "memory", *DIT, "--static", "--batch", "4"),
        "--batch does not apply to --static",
    ),
    Bad("skip-with-static-options", ("bench", "memory", *DIT, "--static", "--options", "--skip", "e2e"), "drop --skip"),
    Bad(
        "solver-on-the-plain-classifier",
        ("eval", "accuracy", "--run", "vit", "--model", "classifier", "--solver", "heun"),
        "--solver applies to the denoisers (blocks, e2e), not to --model classifier",
        setup=lambda root: vit_run(root),
    ),
    Bad(
        "solver-on-the-converted-classifier",
        ("sample", "--run", "vit", "--model", "source", "--solver", "heun"),
        "--solver applies to the denoisers",
        setup=lambda root: vit_run(root),
    ),
    Bad(
        "llama-sizes-the-checkpoint-contradicts",
        lambda root: (
            "split",
            *llama_recipe(root),
            "model.checkpoint=hf",
            "model.layers=2",
            "model.hidden=64",
            "--out",
            "new",
        ),
        "model.layers=2 (the checkpoint has 4), model.hidden=64 (the checkpoint has 32)",
        setup=lambda root: hf_checkpoint(root),
    ),
    Bad(
        "split-force-while-a-block-trains",
        ("split", *DIT, "--out", "run", "--force"),
        "run cannot be replaced: block-02 is being trained by pid",
        setup=lambda root: training_block_2(root),
    ),
    Bad(
        "split-to-a-folder-another-split-writes",
        ("split", *DIT, "--out", "new"),
        "run folder new is already being written by pid",
        setup=lambda root: splitting_into_new(root),
    ),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DiT run `run` and a Llama run `lm` (the current run), split once for the whole table."""
    import os

    from tests.families.test_llama import CORPUS

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "corpus.txt").write_text(CORPUS)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for args in (("split", *DIT, "--out", "run"), ("split", *llama_recipe(root), "-b", "2", "--out", "lm")):
            result = invoke(*args)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: folders by name, files by size, mtime and sha256."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            out[str(path.relative_to(root))] = ("dir",)
        else:
            stat = path.stat()
            out[str(path.relative_to(root))] = (
                stat.st_size,
                stat.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return out


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    row: Bad, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if row.skip:
        pytest.skip(row.skip)
    root = tmp_path / "ws"
    shutil.copytree(workspace, root, symlinks=True)  # each row gets its own copy: a failure cannot spill over
    monkeypatch.chdir(root)
    set_current(root / "lm")  # the copy's own current run, not the original's
    if row.setup:
        row.setup(root)
    args = row.args(root) if callable(row.args) else row.args
    before = snapshot(root)
    assert_user_error(invoke(*args), row.match)
    assert snapshot(root) == before


# --- setups of the issue 34 rows (defined here, after the table, so the rows above call them lazily) ----------


def md4_recipe(root: Path) -> tuple[str, ...]:
    from tests.families.test_llama_masked import masked_overrides

    return ("md4-tiny-shakespeare", *masked_overrides(root / "corpus.txt"))


def md4_run(root: Path) -> None:
    """A masked-diffusion run `md4` (split, untrained: the refusals come before any model is read)."""
    from dbconvert.config import load_recipe
    from dbconvert.split import split

    split(load_recipe(md4_recipe(root)[0], list(md4_recipe(root)[1:])), out=root / "md4", make_current=False)


def vit_recipe() -> tuple[str, ...]:
    from tests.families.test_vit import TINY

    return ("vit-tiny-digits", *TINY)


def hf_checkpoint(root: Path) -> None:
    """A 4-layer, 32-wide transformers Llama in `hf` (the tiny recipe's sizes: a contradiction must be asked for)."""
    from tests.families.test_llama import hf_llama

    hf_llama(root / "hf")


def training_block_2(root: Path) -> None:
    """Block 2 of `run` held by a live training (this process's pid in its lock)."""
    from dbconvert import locks

    locks.acquire(root / "run" / "blocks" / "block-02" / locks.LOCK_NAME, "block-02")


def splitting_into_new(root: Path) -> None:
    """A live split writing the folder `new` (its lock beside it)."""
    from dbconvert import locks
    from dbconvert.split import split_lock

    locks.acquire(split_lock(root / "new"), "run folder new", doing="written")
