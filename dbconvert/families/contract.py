"""The contract a model family fulfils for the generic split / train / sample / eval / bench machinery.

Nothing outside `families/<name>/` looks at a family's name or its config's attributes: it
calls these methods. A new family is one package under `families/` with a `Family`
subclass and one line in the registry (`families/__init__.py`); `tests/families/test_contract.py`
registers a toy family that way and runs split, train-block and sample through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dbconvert.errors import DbconvertError
from dbconvert.families.sample_options import NoSampleOptions, sample_flags

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.noise_process import NoiseProcess
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult
    from dbconvert.schema import ModelConfig


@dataclass
class Source:
    """The source network ready to be cut: its layer count and its state dict (the L-layer network's key names).

    `state` is read lazily where the source is a checkpoint (`tensorio.LazyState`): a block's tensors are read
    from the checkpoint when the block is made, so the whole network never exists in memory (`split` streams).
    A fresh source is built in memory and its state is the network's own state dict.
    """

    state: Mapping[str, torch.Tensor]
    num_layers: int
    checkpoint_sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    """Things the user should know about the conversion (recorded in the manifest, printed by split and info)."""
    files: list[Path] = field(default_factory=list)
    """The checkpoint files `state` reads (none for a fresh network): what a run records to read its source by
    reference instead of a copy (`source_ref.py`)."""
    shape: Any = None
    """The family's own description of the architecture (e.g. its shape dataclass), for its `block_state`."""
    build: Callable[[], nn.Module] | None = None
    """An empty network of all L layers (the family's `block_network` at full depth), for `network`."""
    _network: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def of_network(cls, network: nn.Module, num_layers: int, **kw: Any) -> "Source":
        """A source built in memory (a fresh network)."""
        source = cls(network.state_dict(), num_layers, **kw)
        source.build = source.build or (lambda: network)
        source._network = network
        return source

    @property
    def network(self) -> nn.Module:
        """The whole source network in memory (built from `state` on first use: for small models and tests only;
        `split` never asks for it)."""
        if self._network is None:
            if self.build is None:
                raise DbconvertError("this source has no network builder")
            network = self.build()
            network.load_state_dict(
                {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in self.state.items()}, strict=True
            )
            self._network = network
        return self._network


@dataclass
class Architectures:
    """The named architectures a family offers, for `dbconvert recipes --archs`.

    `rows` are dicts (column name -> value), one per architecture, in the order to show; `notes`
    are lines of advice printed under the table (e.g. how size and patch trade quality for time).
    """

    title: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def shard_slice(local: int, shard: tuple[int, int]) -> tuple[int, slice]:
    """(global batch, this rank's slice of it) for a local batch of `local` examples."""
    rank, world = shard
    return local * world, slice(rank * local, (rank + 1) * local)


class Family(ABC):
    """One model family (DiT, Llama, ...). Stateless apart from `bind`: every method takes the recipe."""

    name: ClassVar[str]
    config_cls: ClassVar[type["ModelConfig"]]
    metrics: ClassVar[tuple[str, ...]]
    """The registered metrics (`evaluation/metric.py`) this family's runs can have, its default first
    (`metrics_for` says which apply to one recipe)."""
    own_metrics: ClassVar[Mapping[str, str | tuple[str, ...]]] = {}
    """The metrics this family brings, name -> metric registry entry ("module:Class" of a `Metric`, and optionally
    "module:attr" of its torch-free `MetricHelp`; ViT's accuracy): registering the family registers them
    (`evaluation.metric.family_metrics`); generic code never names a family's module. A family whose registry entry
    names this table in a torch-free module (its fourth path) has `eval --help` list them without importing it."""
    generated_unit: ClassVar[str] = "image"
    """What one sample is, for rates in `bench speed`: `image`, or `token` for text (one token = M steps)."""
    protocol_units: ClassVar[int] = 50_000
    """How many units the paper's evaluation protocol generates (FID-50k: 50,000 images; text: 1000 prompts x
    5 samples x 50 tokens = 250,000 tokens): `bench speed` turns its measured rate into the protocol's time."""
    model_kinds: ClassVar[tuple[str, ...]] = ("blocks", "e2e", "source")
    """What `sample --model` / `eval --model` accept: the blocks, the e2e baseline, the unsplit source,
    and, for families that have one, their plain reference (`reference_kind`)."""
    noise_processes: ClassVar[tuple[str, ...]] = ("edm",)
    """The noise processes (`recipe.noise.process`, see `noise_process.py`) this family's objectives take."""
    sample_options_type: ClassVar[type] = NoSampleOptions
    """A dataclass of the family's own sampling options (`SampleRequest.options`), e.g. guidance or prompts; its
    fields with `sample_flag` metadata are `dbconvert sample`'s flags (generated: nothing generic lists them)."""
    reference_kind: ClassVar[str | None] = None
    """The model kind of the family's separately trained plain reference (`train-e2e --objective KIND`, RUN/KIND/,
    one of `model_kinds`), built by `reference_model` and trained with `reference_loss`: `ar` (an autoregressive LM)
    for text, `classifier` (a plain classifier) for vision classifiers; None (the default): the family has none."""
    reference_title: ClassVar[str] = "plain reference"
    """How the reference is called in messages and reports (`AR reference`, `plain classifier`)."""
    depth_key: ClassVar[str | None] = None
    """The `model` field that sets a fresh source network's layer count (`ablate blocks` deepens the network
    through it so that every B divides it), or None when the family has no such field."""

    def metrics_for(self, recipe: "Recipe") -> tuple[str, ...]:
        """The metrics that apply to runs of `recipe`, default first (the one `ablate` scores with). Default:
        `metrics`; a family whose objectives differ in what can be measured narrows it (masked text: bpc first)."""
        return self.metrics

    def default_metric(self, recipe: "Recipe") -> str:
        return self.metrics_for(recipe)[0]

    def architectures(self) -> Architectures:
        """The named architectures a recipe's model section can pick, with sizes computed from the models.

        Default: none (a family whose size is set field by field in the recipe).
        """
        return Architectures()

    # -- split -----------------------------------------------------------------------------

    @abstractmethod
    def source(self, recipe: "Recipe") -> Source:
        """Build the source network from the recipe's config, or load it from its checkpoint."""

    @abstractmethod
    def block_network(self, recipe: "Recipe", depth: int) -> nn.Module:
        """An empty stand-alone network of `depth` layers, the skeleton a block's weights load into."""

    def layers(self, network: nn.Module) -> list[nn.Module]:
        """The residual layers of a `block_network` (the L/B layers a block holds, or all L), in order.

        `train.activation_checkpointing` recomputes each of them in backward and `bench` attributes
        per-layer parameters and activations to them. Every family lists its layers here.
        """
        raise DbconvertError(
            f"the {self.name} family does not list its layers, so train.activation_checkpointing "
            "cannot be used with it; set train.activation_checkpointing=false"
        )

    @abstractmethod
    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        """State dict of the block holding source layers [start, end), through an explicit key map."""

    def check_data(self, recipe: "Recipe") -> None:
        """One-line refusals, before `split` reads the source, of data settings the run fixes that only the data
        itself can check (its image shape and classes against the model, its augmentation). Default: none."""

    def prepare_run(self, recipe: "Recipe", run_dir: Path, source: Source) -> None:
        """Write shared artefacts into a new run (e.g. a text target table). Default: nothing."""

    def resolve(self, recipe: "Recipe") -> None:
        """Settle the recipe's `auto` choices in place, as `split` will record them (default: none to settle).

        `source` does it too; this is for comparing a fresh recipe with an existing run's (ablate's resume).
        """

    def parameterization(self, recipe: "Recipe") -> dict[str, Any]:
        """What the network's output means, as recorded in the manifest: `{"name": ...}` plus its settings.

        Called by `split` after `source` (which resolves any `auto` choice). Default: EDM preconditioning.
        """
        return {"name": "edm"}

    def bind(self, run: "Run") -> "Family":
        """This family for one run, for families that read its shared artefacts (tokenizer, target table).

        Returns a new object rather than mutating the registry's shared instance. Default: itself.
        """
        return self

    def for_bench(self, recipe: "Recipe") -> "Family":
        """This family without a run, for `bench` (synthetic stand-ins for run artefacts). Default: itself."""
        return self

    writes_random_checkpoints: ClassVar[bool] = False
    """Whether `random_checkpoint` is implemented (`bench split` refuses a family without, before any work)."""

    def random_checkpoint(
        self,
        recipe: "Recipe",
        folder: Path,
        dtype: torch.dtype,
        seed: int,
        on_tensor: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Write a checkpoint of the recipe's architecture with random weights in `dtype` into `folder` (tensor by
        tensor: any size), with what a split and a training step of it need beside it (a tokenizer, a little data
        of the model's shape); return the recipe overrides that split it (`bench split`)."""
        raise DbconvertError(
            f"the {self.name} family cannot write a random checkpoint, so `bench split` does not apply to it"
        )

    # -- training --------------------------------------------------------------------------

    def check_training(self, recipe: "Recipe") -> None:
        """A one-line error when the recipe's training options include one this family's objective for it would
        ignore (e.g. a loss weight the masked objective has no use for). Called at split, before any training
        (`train.training_recipe`) and by bench, so an option is refused before work rather than dropped silently.
        Default: every shared training option applies."""

    @abstractmethod
    def denoiser(self, recipe: "Recipe", network: nn.Module, noise: "NoiseProcess") -> nn.Module:
        """Wrap a network into the family's denoiser (preconditioning + noise conditioning)."""

    @abstractmethod
    def load_data(self, recipe: "Recipe", split: str | None = None) -> Any:
        """The training data (`.batch(indices)` -> list of tensors, `len()`), validated against the model."""

    @abstractmethod
    def training_loss(
        self,
        denoiser: nn.Module,
        batch: Any,
        sigma_range: tuple[float, float],
        recipe: "Recipe",
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch with noise levels drawn inside `sigma_range` (`noise.draw`); returns (loss, logged stats).

        `sigma_range` is a range of the run's noise process's levels (sigma for EDM, t for masking).
        The e2e baseline uses the same loss over the process's full range.
        `shard` = (rank, world size) under data parallelism: `batch` is slice `rank` of a global
        batch `world` times larger. Draw the randomness for the global batch and keep that slice
        (`shard_slice`), so every example gets the same noise as in a single-process run.
        """

    def wrap(self, model: str, recipe: "Recipe", network: nn.Module, noise: "NoiseProcess") -> nn.Module:
        """The network of `model` (one of `model_kinds`) wrapped for generation. Default: the plain reference
        for `reference_kind`, the denoiser otherwise (a family whose source is not a denoiser overrides this)."""
        if model == self.reference_kind:
            return self.reference_model(recipe, network)
        return self.denoiser(recipe, network, noise)

    def reference_model(self, recipe: "Recipe", network: nn.Module) -> nn.Module:
        """The plain reference around the full network (an AR LM, a classifier; families with a `reference_kind`)."""
        raise DbconvertError(f"the {self.name} family has no plain reference; use --model blocks or e2e")

    def reference_loss(
        self, model: nn.Module, batch: Any, recipe: "Recipe", shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The plain reference's own loss of one batch (next-token cross-entropy, classification cross-entropy)."""
        raise DbconvertError(f"the {self.name} family has no plain reference; use --model blocks or e2e")

    def heldout_metrics(
        self,
        model: nn.Module,
        batch: list[torch.Tensor],
        sigma_range: tuple[float, float],
        recipe: "Recipe",
        generator: torch.Generator,
        objective: str = "denoiser",
    ) -> dict[str, float]:
        """Metrics of a fixed held-out batch, logged every `train.val_every` steps (`val_*` keys). Default: none."""
        return {}

    # -- export ----------------------------------------------------------------------------

    def check_export(self, model: str, out: Path) -> None:
        """A one-line error, before any work, when `model` (one of `model_kinds`) cannot be exported to `out`."""
        raise DbconvertError(f"the {self.name} family has no reference format to export to")

    def export(self, run: "Run", model: str, name: str, network: nn.Module, out: Path) -> list[str]:
        """Write `network` (the run's `name`: source, e2e, the reference or block-XX, of kind `model`) at `out` in the
        family's reference format; returns notes for the user.

        `out` is a fresh path inside a staging folder (`export.export_model` moves it into place), so
        an implementation may write a file or a folder there and need not be atomic itself.
        """
        raise DbconvertError(f"the {self.name} family has no reference format to export to")

    # -- generation ------------------------------------------------------------------------

    def sample_options(self, flags: dict[str, str] | None = None, **given: Any) -> Any:
        """The family's sampling options from keywords; a one-line error naming an option that does not apply.

        `flags` maps an option to how the user wrote it (`class_label` -> `--class`; the CLI passes every family's);
        default: this family's `sample_flag` metadata, else `--name-with-dashes`.
        """
        if flags is None:
            flags = {f.name: f.flag for f in sample_flags(self.sample_options_type)}
        names = {f.name for f in fields(self.sample_options_type)}
        unknown = [k for k in given if k not in names]
        if unknown:
            flag = (flags or {}).get(unknown[0], "--" + unknown[0].replace("_", "-"))
            known = ", ".join(sorted((flags or {}).get(n, "--" + n.replace("_", "-")) for n in names)) or "none"
            raise DbconvertError(f"{flag} does not apply to a {self.name} run (its sampling options: {known}); drop it")
        return self.sample_options_type(**given)

    def options_of(self, request: "SampleRequest") -> Any:
        """The request's family options, or the family's defaults when it has none."""
        return request.options if request.options is not None else self.sample_options_type()

    @abstractmethod
    def generate(self, run: "Run", request: "SampleRequest") -> "SampleResult":
        """Generate with the run's blocks (or another of `model_kinds`) and write the output into the run."""

    @abstractmethod
    def sample_shape(self, recipe: "Recipe") -> tuple[int, ...]:
        """The shape of one generated sample: (channels, height, width) for images, (context,) for text."""

    # -- benchmarks ------------------------------------------------------------------------

    @abstractmethod
    def synthetic_batch(self, recipe: "Recipe", batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Random training data of the model's shape, for `bench` (no data set needed)."""

    @abstractmethod
    def sampling_step(
        self, recipe: "Recipe", model: nn.Module, batch: list[torch.Tensor], sigma: float
    ) -> Callable[[], Any]:
        """A closure running ONE sampling step's network evaluation of `model` on `batch` (for `bench speed`).

        Set-up that a real sampler does once (e.g. a KV cache of the prompt) happens here, outside the closure.
        """

    def training_schedule(
        self, run: "Run", target: str, recipe: "Recipe", note: Callable[[str], None] | None = None
    ) -> Callable[[nn.Module, int], None] | None:
        """What the trainer calls with (network, step index) before every training step of `target` (a block's
        name, `e2e`, ...) under `recipe` (the run's, with the training's overrides), for settings that change over
        training but are not weights (it may measure them on the network at step 0 and tell the user through
        `note`); None (the default): none."""
        return None

    def decoding_rates(
        self,
        recipe: "Recipe",
        blocks: int,
        batch: int,
        device: torch.device,
        repeats: int,
        warmup: int,
        new_tokens: int | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any] | None:
        """For families that decode unit by unit (text): the blocks' decoding rate against the same network's
        autoregressive decoding, for `bench speed`: `tokens_per_s` by decoder, `reference` naming the decoder the
        others are compared with. None (the default): nothing of the kind to compare."""
        return None
