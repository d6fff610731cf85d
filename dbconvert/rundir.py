"""The run directory of DESIGN 6: one self-describing folder that `split` writes and everything reads.

    RUN/
      manifest.yaml                 format version, family, resolved recipe, blocks, ranges, source hash
      source/model.safetensors      the converted source network (the e2e baseline starts from it)
      shared/                       artefacts shared by all blocks (e.g. the text target table)
      blocks/block-00/              model.safetensors, ema.safetensors, state.safetensors, state.json
      e2e/                          the same files for the end-to-end baseline
      metrics/block-00.jsonl        one JSON line per logged training step
      samples/  eval/

The current run is remembered in `.dbconvert/current-run` of the working directory, so after
`split` the other commands need no `--run`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dbconvert.config import Recipe, validate_recipe
from dbconvert.errors import DbconvertError, RunError, first_line
from dbconvert.noise_process import NoiseProcess

if TYPE_CHECKING:
    from dbconvert.families.contract import Family

FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"
POINTER = Path(".dbconvert") / "current-run"
BLOCK_PREFIX = "block-"
"""Blocks live under blocks/ (`block_name`); every other model (e2e, source, the family's `reference_kind`) is one
network in a folder of its own name."""
ORIENTATION = "block 0 = first source layers = highest noise; block B-1 = last layers = lowest noise"


@dataclass(frozen=True)
class BlockInfo:
    index: int
    layers: tuple[int, int]
    owned_range: tuple[float, float]
    """The noise levels the block owns at sampling time (sigma for EDM; the manifest of runs split before
    noise processes were plug-ins calls it `sigma_range`)."""
    train_range: tuple[float, float]
    mass: float
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "layers": list(self.layers),
            "owned_range": list(self.owned_range),
            "train_range": list(self.train_range),
            "mass": self.mass,
            "params": self.params,
        }


@dataclass(frozen=True)
class TrainStatus:
    step: int
    total_steps: int | None

    @property
    def trained(self) -> bool:
        return self.step > 0

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps


MANIFEST_KEYS = ("family", "num_layers", "num_blocks", "partition", "gamma", "boundaries", "blocks", "recipe")
"""What every manifest split writes holds; a manifest without one of them is damaged (e.g. truncated)."""


def folder_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Run:
    """An opened run directory: its manifest, resolved recipe and paths."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.folder_id = folder_identity(root)
        """The folder's identity when opened: `split --force` puts a new folder at the same path (`replaced`)."""
        self._said_no_ema: set[str] = set()
        self.recipe: Recipe = validate_recipe(manifest["recipe"], f"{root / MANIFEST} recipe")
        self.blocks = [
            BlockInfo(
                index=b["index"],
                layers=tuple(b["layers"]),
                owned_range=tuple(b["owned_range"] if "owned_range" in b else b["sigma_range"]),
                train_range=tuple(b["train_range"]),
                mass=b["mass"],
                params=b["params"],
            )
            for b in manifest["blocks"]
        ]

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path) -> "Run":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise RunError(f"{root} is not a dbconvert run (no {MANIFEST}); create one with `dbconvert split RECIPE`")
        try:
            manifest = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            raise RunError(f"{path} is not valid YAML; the run is damaged, split again") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            got = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise RunError(f"{path} has format version {got!r}; this dbconvert reads version {FORMAT_VERSION}")
        missing = [key for key in MANIFEST_KEYS if key not in manifest]
        if missing:
            raise RunError(f"{path} is incomplete (it has no {missing[0]!r}): the run is damaged; split again")
        try:
            return cls(root, manifest)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RunError(f"{path} is damaged ({type(exc).__name__}: {first_line(exc, 80)}); split again") from None

    def replaced(self) -> bool:
        """Whether the folder at `root` is no longer the one this run was opened from (a split replaced it)."""
        return folder_identity(self.root) != self.folder_id

    # -- settings --------------------------------------------------------------------------

    @property
    def family_name(self) -> str:
        return str(self.manifest["family"])

    def family(self) -> "Family":
        """The run's model family, bound to this run (so it can read the run's shared artefacts)."""
        from dbconvert.families import get_family

        return get_family(self.family_name).bind(self)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    def noise(self) -> NoiseProcess:
        """The run's noise process (recorded in its recipe; `edm` for runs split before it was a choice)."""
        return self.recipe.noise.settings()

    @property
    def parameterization(self) -> dict[str, Any]:
        """What the run's networks output (`{"name": "edm"}` for runs split before it was recorded)."""
        return dict(self.manifest.get("parameterization") or {"name": "edm"})

    @property
    def notes(self) -> list[str]:
        """What `split` said about the conversion (e.g. a noise range wider than a checkpoint's schedule)."""
        return [str(n) for n in self.manifest.get("notes") or []]

    def owned_ranges(self) -> list[tuple[float, float]]:
        return [b.owned_range for b in self.blocks]

    def block(self, index: int) -> BlockInfo:
        if not 0 <= index < self.num_blocks:
            raise RunError(f"block index {index} is out of range: this run has blocks 0..{self.num_blocks - 1}")
        return self.blocks[index]

    # -- paths -----------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        """`block-02` -> blocks/block-02; `e2e`, `source`, the family's reference (`ar`, ...) -> a folder of that
        name."""
        return self.root / "blocks" / name if name.startswith(BLOCK_PREFIX) else self.root / name

    def model_targets(self, model: str) -> list[tuple[str, int]]:
        """(name, depth) of every network that makes up `model` (blocks, or one of the family's `model_kinds`)."""
        if model == "blocks":
            return [(self.block_name(b.index), b.layers[1] - b.layers[0]) for b in self.blocks]
        kinds = self.family().model_kinds
        if model not in kinds:
            raise DbconvertError(
                f"--model must be one of {', '.join(kinds)} for a {self.family_name} run, not {model!r}"
            )
        return [(model, self.num_layers)]

    def require_trained(self, model: str) -> None:
        """A one-line RunError naming the command to run when `model` has nothing trained to use."""
        targets = self.model_targets(model)
        if model == "source":
            return
        untrained = [name for name, _ in targets if not self.status(name).trained]
        if not untrained:
            return
        if model == "blocks":
            raise RunError(f"untrained blocks: {', '.join(untrained)}; train them with `dbconvert train-block I` first")
        if model == "e2e":
            raise RunError("the e2e baseline is not trained; run `dbconvert train-e2e` first")
        raise RunError(f"the {model} reference is not trained; run `dbconvert train-e2e --objective {model}` first")

    @staticmethod
    def block_name(index: int) -> str:
        return f"{BLOCK_PREFIX}{index:02d}"

    @property
    def source_weights(self) -> Path:
        return self.root / "source" / "model.safetensors"

    @property
    def shared_dir(self) -> Path:
        return self.root / "shared"

    def metrics_path(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.jsonl"

    def weights_file(self, name: str, weights: str) -> Path:
        """The trained weights of `name`: `ema.safetensors` or `model.safetensors`. A target trained with
        train.ema=off has no EMA: asked for it, the model weights are used, and stderr says so (once per target)."""
        folder = self.model_dir(name)
        if weights == "ema" and not (folder / "ema.safetensors").exists() and self.trained_without_ema(name):
            if name not in self._said_no_ema:
                import sys

                print(
                    f"{name} was trained with train.ema=off: using its model weights (there is no EMA)", file=sys.stderr
                )
                self._said_no_ema.add(name)
            return folder / "model.safetensors"
        return folder / f"{weights}.safetensors"

    def trained_without_ema(self, name: str) -> bool:
        """Did `name`'s training keep no EMA (train.ema=off, recorded in its state.json)?"""
        try:
            data = json.loads((self.model_dir(name) / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and (data.get("memory_options") or {}).get("ema") == "off"

    def status(self, name: str) -> TrainStatus:
        path = self.model_dir(name) / "state.json"
        if not path.is_file():
            return TrainStatus(0, None)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{path} is damaged; rerun training with --restart") from None
        return TrainStatus(int(data.get("step", 0)), data.get("total_steps"))


# --- the current run -----------------------------------------------------------------------


def set_current(root: Path, cwd: Path | None = None) -> None:
    from dbconvert.checkpoint import atomic_write_text  # torch: not imported by the readers (sample --help)

    pointer = (cwd or Path.cwd()) / POINTER
    atomic_write_text(pointer, str(Path(root).resolve()) + "\n")


def run_root(run: str | Path | None, cwd: Path | None = None) -> Path:
    """The folder `--run DIR` names when given, else the last run split in this directory (not opened)."""
    if run is not None:
        return Path(run)
    pointer = (cwd or Path.cwd()) / POINTER
    if not pointer.is_file():
        raise RunError("no current run here: run `dbconvert split RECIPE` first, or pass --run DIR")
    root = Path(pointer.read_text().strip())
    if not (root / MANIFEST).is_file():
        raise RunError(f"the current run {root} no longer exists; split again or pass --run DIR")
    return root


def resolve_run(run: str | Path | None, cwd: Path | None = None) -> Run:
    """`--run DIR` when given, else the last run split in this directory."""
    return Run.open(run_root(run, cwd))


def recorded_family(root: Path) -> str | None:
    """The family a run's manifest names, read without validating the run or importing the family (for
    `sample --help`); None when the manifest cannot be read or names none."""
    try:
        manifest = yaml.safe_load((root / MANIFEST).read_text())
    except (OSError, yaml.YAMLError):
        return None
    family = manifest.get("family") if isinstance(manifest, dict) else None
    return family if isinstance(family, str) else None


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    text = (
        f"# dbconvert run manifest (format {FORMAT_VERSION}); written by `dbconvert split`, read by every other "
        "command\n"
    )
    text += yaml.safe_dump(manifest, sort_keys=False)
    from dbconvert.checkpoint import atomic_write_text

    atomic_write_text(root / MANIFEST, text)
