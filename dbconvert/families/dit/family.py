"""The DiT family: image diffusion transformers cut into diffusion blocks (the contract's DiT side)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dbconvert import noise as nz
from dbconvert.building import meta_specs
from dbconvert.checkpoint import (
    apply_key_map,
    atomic_write,
    check_state,
    open_checkpoint,
    resolve_storage_dtype,
    save_pt,
    save_weights,
)
from dbconvert.data.images import ImageData, load_images
from dbconvert.errors import CheckpointError, DataError, DbconvertError
from dbconvert.families.contract import Architectures, Family, Source
from dbconvert.families.dit.config import DiTConfig
from dbconvert.families.dit.convert import (
    EXPORT_SUFFIXES,
    block_key_map,
    drop_variance,
    export_metadata,
    export_state,
    is_layer_key,
    parameterization_record,
    recorded_parameterization,
    recorded_sigma_range,
    resolve_parameterization,
)
from dbconvert.families.dit.generate import sample_images
from dbconvert.families.dit.sample_options import ImageSampleOptions
from dbconvert.families.dit.model import ARCH_NOTES, DiT, arch_rows
from dbconvert.families.dit.objective import DDPMEpsDenoiser, EDMDenoiser, edm_loss
from dbconvert.sampling import guided

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult


def _cfg(recipe: "Recipe") -> DiTConfig:
    return recipe.model  # type: ignore[return-value]


class DiTFamily(Family):
    name = "dit"
    config_cls = DiTConfig
    metrics = ("fid",)
    sample_options_type = ImageSampleOptions
    depth_key = "depth"

    def source(self, recipe: "Recipe") -> Source:
        """The source network; also resolves `model.parameterization=auto` in the recipe (the manifest records it)."""
        cfg = _cfg(recipe)
        shape = cfg.shape(learn_sigma=False)
        if cfg.checkpoint is None:
            notes = resolve_parameterization(cfg, recipe.noise.settings(), None)
            torch.manual_seed(cfg.init_seed)
            source = Source.of_network(DiT(shape), shape.depth, notes=notes)
            source.state = resolve_storage_dtype(cfg, source.state, fresh=True)
            return source
        what = f"checkpoint {cfg.checkpoint} vs {cfg.arch} (input_size={cfg.input_size}, learn_sigma={cfg.learn_sigma})"
        checkpoint = open_checkpoint([Path(cfg.checkpoint).expanduser()])  # read tensor by tensor (a .pt: mapped)
        reference = meta_specs(lambda: DiT(cfg.shape()))
        final = "final_layer.linear.weight"
        other = meta_specs(lambda: DiT(cfg.shape(learn_sigma=not cfg.learn_sigma)))
        found = checkpoint.specs.get(final)
        if found is not None and found.shape != reference[final].shape and found.shape == other[final].shape:
            says = "predicts" if not cfg.learn_sigma else "does not predict"
            raise CheckpointError(
                f"{what}: its final layer {says} the variance channels ({final} "
                f"{tuple(found.shape)}); set model.learn_sigma={str(not cfg.learn_sigma).lower()}"
            )
        check_state(reference, checkpoint.specs, what)
        notes = resolve_parameterization(cfg, recipe.noise.settings(), recorded_parameterization(cfg.checkpoint))
        owned = recorded_sigma_range(cfg.checkpoint)
        if owned is not None:
            notes.append(
                f"checkpoint {cfg.checkpoint} is a block export, a denoiser for sigma in ({owned[0]:.4g}, "
                f"{owned[1]:.4g}] only (its metadata); split as a source it is used over the whole noise "
                "range, that range ignored"
            )
        state = drop_variance(
            checkpoint, cfg.arch, cfg.in_channels, cfg.learn_sigma, shape.depth, expected=meta_specs(lambda: DiT(shape))
        )
        state = resolve_storage_dtype(cfg, state, checkpoint=checkpoint)
        return Source(
            state, shape.depth, notes=notes, files=[Path(cfg.checkpoint).expanduser()], build=lambda: DiT(shape)
        )

    writes_random_checkpoints = True

    def random_checkpoint(
        self,
        recipe: "Recipe",
        folder: Path,
        dtype: torch.dtype,
        seed: int,
        on_tensor: Callable[[int], None] | None = None,
    ) -> list[str]:
        """A random reference-layout checkpoint of the recipe's DiT (learn_sigma as the recipe says) as safetensors,
        and 64 random images of its input shape to train on."""
        from dbconvert.data.images import write_random_images
        from dbconvert.tensorio import Spec, write_random_safetensors

        cfg = _cfg(recipe)
        specs = {k: Spec(dtype, s.shape) for k, s in meta_specs(lambda: DiT(cfg.shape())).items()}
        folder.mkdir(parents=True, exist_ok=True)
        write_random_safetensors(folder / "dit.safetensors", specs, seed, on_tensor=on_tensor)
        data = write_random_images(
            folder / "images.npz", 64, (cfg.in_channels, cfg.input_size, cfg.input_size), cfg.num_classes, seed
        )
        return [f"model.checkpoint={folder / 'dit.safetensors'}", f"data.source={data}", "data.kind=npz"]

    def resolve(self, recipe: "Recipe") -> None:
        """`model.parameterization=auto` -> edm or ddpm-eps (reading a checkpoint's export metadata, if any)."""
        cfg = _cfg(recipe)
        recorded = recorded_parameterization(cfg.checkpoint) if cfg.checkpoint else None
        resolve_parameterization(cfg, recipe.noise.settings(), recorded)

    def parameterization(self, recipe: "Recipe") -> dict[str, Any]:
        return parameterization_record(_cfg(recipe))

    def block_network(self, recipe: "Recipe", depth: int) -> nn.Module:
        return DiT(_cfg(recipe).shape(learn_sigma=False).with_depth(depth))

    def layers(self, network: nn.Module) -> list[nn.Module]:
        return list(network.blocks)  # type: ignore[union-attr, arg-type]

    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        return apply_key_map(
            source.state,
            block_key_map(start, end),
            ignored=lambda key: is_layer_key(key, source.num_layers),
            what=f"DiT block of layers [{start}, {end})",
        )

    def denoiser(self, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        """The run's parameterisation decides the wrapper; blocks, e2e and source all share it."""
        assert isinstance(network, DiT)
        cfg = _cfg(recipe)
        if cfg.parameterization == "ddpm-eps":
            return DDPMEpsDenoiser(network, noise, cfg.ddpm)
        return EDMDenoiser(network, noise)  # edm, or `auto` in a run split before parameterisations were recorded

    def load_data(self, recipe: "Recipe", split: str | None = None) -> ImageData:
        cfg = _cfg(recipe)
        data = load_images(recipe.data, split)
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if tuple(data.x.shape[1:]) != expected:
            raise DataError(
                f"data set {recipe.data.source!r} has images of shape {tuple(data.x.shape[1:])}, but the model "
                f"expects {expected} (set model.in_channels / model.input_size to match)"
            )
        if cfg.num_classes and data.num_classes > cfg.num_classes:
            raise DataError(
                f"data set {recipe.data.source!r} has {data.num_classes} classes but model.num_classes is "
                f"{cfg.num_classes}"
            )
        return data

    def check_training(self, recipe: "Recipe") -> None:
        if recipe.train.loss_weight not in ("default", "lambda"):
            raise DbconvertError(
                f"train.loss_weight={recipe.train.loss_weight} is a text-family option; DiT trains "
                "with EDM's lambda(sigma) (use default or lambda)"
            )

    def training_loss(
        self,
        denoiser: nn.Module,
        batch: Any,
        sigma_range: tuple[float, float],
        recipe: "Recipe",
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        self.check_training(recipe)
        return edm_loss(denoiser, batch, sigma_range, recipe.train.label_dropout, generator, shard)  # type: ignore[arg-type]

    def check_export(self, model: str, out: Path) -> None:
        if out.suffix not in EXPORT_SUFFIXES:
            raise DbconvertError(
                f"a DiT export is a reference checkpoint file: end the path in {' or '.join(EXPORT_SUFFIXES)}, "
                f"not {out.name!r}"
            )

    def export(self, run: "Run", model: str, name: str, network: nn.Module, out: Path) -> list[str]:
        """A reference DiT checkpoint (learn_sigma=False): `.pt` (plain torch.save state dict) or `.safetensors`."""
        assert isinstance(network, DiT)
        state = export_state(network.state_dict(), network.shape.depth, f"export of {name}")
        record = self.parameterization(run.recipe)
        owned = next((b.owned_range for b in run.blocks if run.block_name(b.index) == name), None)
        if out.suffix == ".safetensors":
            save_weights(out, state, metadata=export_metadata(record, name, owned))
            notes = [
                f"{out.name} records its parameterization ({record['name']}): split it with "
                "model.parameterization=auto (the default)"
            ]
        else:
            atomic_write(out, lambda tmp: save_pt(state, tmp))
            notes = [
                f"{out.name} holds a {record['name']!r} network and a .pt file cannot say so: "
                + (
                    "it is a DDPM epsilon-predictor like the reference DiT's, so split it with the default auto"
                    if record["name"] == "ddpm-eps"
                    else "split it with model.parameterization=edm (a .safetensors export records it)"
                )
            ]
        if owned is not None:
            notes.append(
                f"{name} is a stand-alone denoiser of depth {network.shape.depth} for sigma in "
                f"({owned[0]:.4g}, {owned[1]:.4g}] only"
            )
        return notes

    def generate(self, run: "Run", request: "SampleRequest") -> "SampleResult":
        return sample_images(run, request)

    def sample_shape(self, recipe: "Recipe") -> tuple[int, ...]:
        cfg = _cfg(recipe)
        return (cfg.in_channels, cfg.input_size, cfg.input_size)

    def synthetic_batch(self, recipe: "Recipe", batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        cfg = _cfg(recipe)
        x = torch.rand((batch, *self.sample_shape(recipe)), generator=generator) * 2 - 1
        y = torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=generator)
        return [x, y]

    def sampling_step(
        self, recipe: "Recipe", model: nn.Module, batch: list[torch.Tensor], sigma: float
    ) -> Callable[[], Any]:
        """One guided forward (both CFG halves in one batch when the recipe's guidance is not 1)."""
        classes = _cfg(recipe).num_classes
        scale = recipe.sample.guidance if classes else 1.0
        z = torch.randn_like(batch[0])
        return lambda: guided(model, z, sigma, batch[1], scale, classes)

    def architectures(self) -> Architectures:
        return Architectures("DiT architectures (model.arch)", arch_rows(), ARCH_NOTES)
