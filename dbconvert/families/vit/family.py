"""The ViT family: a Vision Transformer classifier (timm or Hugging Face) cut into diffusion blocks that classify.

Decisions written down (DESIGN 5, ViT; docs/families/vit.md, docs/results/quality-vit.md):

- Label table: ONE (num_classes x embed_dim) table, rows of unit L2 norm, fixed at split and stored once as
  RUN/shared/labels.safetensors; every block, the e2e denoiser and the sampler read it. `auto`: the source
  head's rows (a checkpoint) or a seeded random orthonormal table (a fresh network).
- The noisy label (times c_in) enters in the CLS slot by default (`model.label_token`), chosen by measurement.
- Model kinds: blocks, e2e (the same denoiser over all layers and the full sigma range), classifier (the plain
  reference: the same network trained with cross-entropy by backprop, `train-e2e --objective classifier`, into
  RUN/classifier/) and source (the converted source, used as a classifier).
- Only classifiers export (source, classifier): a timm state dict (.pth / .safetensors) or a Hugging Face
  ViTForImageClassification folder (any other path). A denoiser's noise modulation has no place in either.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dbconvert import noise as nz
from dbconvert.checkpoint import apply_key_map, atomic_write, load_weights, resolve_storage_dtype, save_pt, save_weights
from dbconvert.errors import CheckpointError, DbconvertError, RunError
from dbconvert.data.images import class_names
from dbconvert.families.contract import Architectures, Family, Source
from dbconvert.families.vit.config import ARCHS, ViTConfig, arch_sizes
from dbconvert.families.vit.convert import (
    LABELS_FILE,
    TIMM_SUFFIXES,
    ReorderedLogits,
    block_key_map,
    check_against,
    check_function,
    checkpoint_shape,
    converted_forward,
    export_timm_state,
    hf_reference,
    hf_shape_fields,
    hf_to_timm,
    is_layer_key,
    label_order,
    label_table,
    open_source,
    reorder_head,
    source_state,
    timm_kwargs,
    timm_reference,
    write_hf_folder,
)
from dbconvert.families.vit.metric_help import METRICS
from dbconvert.families.vit.sample_options import ClassifySampleOptions
from dbconvert.families.vit.model import ViTNet, parameter_count
from dbconvert.families.vit.objective import (
    DEFAULT_WEIGHTING,
    WEIGHTINGS,
    Classifier,
    ViTDenoiser,
    classifier_loss,
    diffusion_loss,
)

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult

REFERENCE = "classifier"


def _cfg(recipe: "Recipe") -> ViTConfig:
    return recipe.model  # type: ignore[return-value]


class ViTFamily(Family):
    name = "vit"
    config_cls = ViTConfig
    metrics = ("accuracy",)
    own_metrics = METRICS
    sample_options_type = ClassifySampleOptions
    generated_unit = "image"
    protocol_units = 10_000
    """The CIFAR test split: 10,000 images classified."""
    model_kinds = ("blocks", "e2e", REFERENCE, "source")
    reference_kind = REFERENCE
    reference_title = "plain classifier"
    depth_key = "depth"

    def __init__(self, shared: Path | None = None, table: torch.Tensor | None = None) -> None:
        self._shared = shared
        self._table = table

    def bind(self, run: "Run") -> "ViTFamily":
        return ViTFamily(run.shared_dir)

    def for_bench(self, recipe: "Recipe") -> "ViTFamily":
        """Without a run: the seeded orthonormal label table of the model's shape."""
        shape = _cfg(recipe).shape()
        return ViTFamily(
            table=label_table("orthonormal", torch.empty(shape.num_classes, shape.embed_dim), _cfg(recipe).init_seed)
        )

    def table(self) -> torch.Tensor:
        if self._table is not None:
            return self._table
        if self._shared is None:
            raise RunError("the ViT family needs its run's label table; open the run first")
        return load_weights(self._shared / LABELS_FILE)["table"]

    # -- split -----------------------------------------------------------------------------

    def resolve(self, recipe: "Recipe") -> None:
        cfg = _cfg(recipe)
        if cfg.label_table == "auto":
            cfg.label_table = "head" if cfg.checkpoint else "orthonormal"

    writes_random_checkpoints = True

    def random_checkpoint(
        self,
        recipe: "Recipe",
        folder: Path,
        dtype: torch.dtype,
        seed: int,
        on_tensor: Callable[[int], None] | None = None,
    ) -> list[str]:
        """A random timm-named ViT state dict of the recipe's shape as safetensors (LayerNorm weights 1), and 64
        random images of its input shape to train on."""
        from dbconvert.building import meta_specs
        from dbconvert.data.images import write_random_images
        from dbconvert.families.vit.convert import timm_keys
        from dbconvert.tensorio import Spec, write_random_safetensors

        cfg = _cfg(recipe)
        shape = cfg.shape()
        keys = set(timm_keys(shape.depth))
        specs = {k: Spec(dtype, s.shape) for k, s in meta_specs(lambda: ViTNet(shape)).items() if k in keys}
        folder.mkdir(parents=True, exist_ok=True)
        norm = lambda key: key.endswith("norm.weight") or ".norm1.weight" in key or ".norm2.weight" in key  # noqa: E731
        write_random_safetensors(folder / "vit.safetensors", specs, seed, ones=norm, on_tensor=on_tensor)
        data = write_random_images(
            folder / "images.npz", 64, (shape.in_chans, shape.img_size, shape.img_size), shape.num_classes, seed
        )
        return [
            f"model.checkpoint={folder / 'vit.safetensors'}",
            f"data.source={data}",
            "data.kind=npz",
            "model.global_pool=token",
        ]

    def source(self, recipe: "Recipe") -> Source:
        """A fresh network (seeded) or a timm / Hugging Face checkpoint checked against the recipe."""
        self.resolve(recipe)
        cfg = _cfg(recipe)
        if cfg.checkpoint is None:
            cfg.global_pool = cfg.global_pool or "token"  # recorded in the run
            torch.manual_seed(cfg.init_seed)
            shape = cfg.shape()
            source = Source.of_network(ViTNet(shape), shape.depth)
            source.state = resolve_storage_dtype(cfg, source.state, fresh=True)
            return source
        what = f"checkpoint {cfg.checkpoint}"
        raw, hf, files = open_source(cfg.checkpoint)  # read tensor by tensor, as each block asks (split streams)
        state = raw
        notes = []
        if hf is not None:
            fields = hf_shape_fields(hf, what)
            if fields["num_heads"] != cfg.shape().num_heads:
                raise CheckpointError(
                    f"{what} has num_attention_heads={fields['num_heads']} but the recipe has "
                    f"model.num_heads={cfg.shape().num_heads}; set model.num_heads={fields['num_heads']}"
                )
            if cfg.global_pool not in (None, "token"):
                raise CheckpointError(
                    f"{what} is a Hugging Face ViTForImageClassification, which reads the CLS "
                    f"token; drop model.global_pool={cfg.global_pool}"
                )
            cfg.global_pool = "token"
            if abs(fields["mlp_ratio"] - cfg.shape().mlp_ratio) > 1e-9:
                cfg.mlp_ratio = fields["mlp_ratio"]
            cfg.norm_eps = fields["norm_eps"]  # the manifest records the checkpoint's eps
            depth = int(hf.get("num_hidden_layers", 0))
            state = hf_to_timm(state, depth, what)
            order, label_note = label_order(hf.get("id2label") or {}, class_names(recipe.data), what)
            if order is not None:
                state = reorder_head(state, order)
            if label_note:
                notes.append(label_note)
            notes.append(
                f"converted from a Hugging Face ViTForImageClassification folder (layer_norm_eps={cfg.norm_eps:g})"
            )
        elif cfg.global_pool is None:
            raise CheckpointError(
                f"{what} is a timm file, which does not record its pooling (an avg-pooled ViT has "
                "a CLS ViT's keys): set model.global_pool=token (the CLS token, timm's default) or "
                "model.global_pool=avg (the mean of the patch tokens), as it was trained"
            )
        else:
            heads = "model.num_heads" if cfg.num_heads else f"model.arch {cfg.arch}"
            notes.append(
                f"a timm file records neither its head count nor its pooling: converted with num_heads="
                f"{cfg.shape().num_heads} (from {heads}) and global_pool={cfg.global_pool} (model.global_pool)"
                "; if it was trained otherwise, split again with model.num_heads=N / model.global_pool=..."
            )
        check_against(checkpoint_shape(state, what), cfg.shape(), what)
        shape = cfg.shape()
        converted = source_state(state, shape, cfg.init_seed, what)
        ours = converted_forward(converted, shape, what)
        if hf is not None:
            reference = hf_reference(cfg.checkpoint, raw, shape.depth)
            if order is not None:
                reference = ReorderedLogits(reference, order)
            check_function(ours, reference, shape, "transformers", what)
        else:
            check_function(ours, timm_reference(shape, raw, what), shape, "timm", what)
        converted.release()  # a mapped .pth: the pages the check touched leave the resident set
        stored = resolve_storage_dtype(cfg, converted, checkpoint=state)
        return Source(stored, shape.depth, notes=notes, files=files, build=lambda: ViTNet(shape))

    def block_network(self, recipe: "Recipe", depth: int) -> nn.Module:
        return ViTNet(_cfg(recipe).shape(depth))

    def layers(self, network: nn.Module) -> list[nn.Module]:
        return list(network.blocks)  # type: ignore[union-attr, arg-type]

    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        state = source.state
        return apply_key_map(
            state,
            block_key_map(list(state), start, end),
            ignored=is_layer_key,
            what=f"ViT block of layers [{start}, {end})",
        )

    def check_data(self, recipe: "Recipe") -> None:
        """Local images (built-in, folders, .npz) against the model at split: their shape and classes, the test
        split's class folders, the RandAugment string. Hub data sets are checked when training first reads them
        (offline, split still works)."""
        from dbconvert.data.images import resolve_kind, split_folders
        from dbconvert.families.vit.data import load_labelled

        data, cfg = recipe.data, _cfg(recipe)
        kind = resolve_kind(data)
        if kind == "hub":
            return
        load_labelled(data, cfg, data.split, train_split=True)
        local_test = data.test_source is not None or data.test_fraction > 0 or "test" in split_folders(data.source)
        if data.split != "test" and (kind == "builtin" or local_test):
            load_labelled(data, cfg, "test", train_split=False)

    def prepare_run(self, recipe: "Recipe", run_dir: Path, source: Source) -> None:
        """RUN/shared/labels.safetensors: the label table every block shares (fixed here, never trained)."""
        cfg = _cfg(recipe)
        table = label_table(cfg.label_table, source.state["head.weight"].to(torch.float32), cfg.init_seed)
        save_weights(run_dir / "shared" / LABELS_FILE, {"table": table})

    # -- training --------------------------------------------------------------------------

    def denoiser(self, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        assert isinstance(network, ViTNet)
        table = self.table()
        want = (network.shape.num_classes, network.shape.embed_dim)
        if tuple(table.shape) != want:
            raise RunError(f"the run's label table has shape {tuple(table.shape)}, not the model's {want}; split again")
        return ViTDenoiser(network, table, noise)

    def load_data(self, recipe: "Recipe", split: str | None = None) -> Any:
        from dbconvert.families.vit.data import load_labelled

        train_split = split is None or split == recipe.data.split
        return load_labelled(recipe.data, _cfg(recipe), split, train_split)

    def check_training(self, recipe: "Recipe") -> None:
        weighting = recipe.train.loss_weight
        if weighting != "default" and weighting not in WEIGHTINGS:
            raise DbconvertError(
                f"train.loss_weight={weighting} is a text-family option; the ViT family weights its "
                f"cross-entropy by {' or '.join(WEIGHTINGS)} (default: lambda)"
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
        weighting = DEFAULT_WEIGHTING if recipe.train.loss_weight == "default" else recipe.train.loss_weight
        return diffusion_loss(denoiser, batch, sigma_range, generator, shard, weighting)  # type: ignore[arg-type]

    def wrap(self, model: str, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        """The plain classifier and the converted source classify directly; blocks and e2e are denoisers."""
        if model in (REFERENCE, "source"):
            return self.reference_model(recipe, network)
        return self.denoiser(recipe, network, noise)

    def reference_model(self, recipe: "Recipe", network: nn.Module) -> nn.Module:
        """The separately trained reference of this family: the plain classifier."""
        assert isinstance(network, ViTNet)
        return Classifier(network)

    def reference_loss(
        self, model: nn.Module, batch: Any, recipe: "Recipe", shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return classifier_loss(model, batch)  # type: ignore[arg-type]

    # -- export ----------------------------------------------------------------------------

    def check_export(self, model: str, out: Path) -> None:
        if model not in ("source", REFERENCE):
            raise RunError(
                f"a ViT {model} network is a denoiser whose noise modulation timm and Hugging Face cannot "
                f"hold; export --model source or --model {REFERENCE} (plain classifiers)"
            )

    def export(self, run: "Run", model: str, name: str, network: nn.Module, out: Path) -> list[str]:
        """timm state dict (`.pth`/`.pt`: torch.save, `.safetensors`) or a Hugging Face folder (any other path)."""
        assert isinstance(network, ViTNet)
        kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(network.shape).items())
        if out.suffix in TIMM_SUFFIXES:
            state = export_timm_state(network)
            if out.suffix == ".safetensors":
                save_weights(out, state)
            else:
                atomic_write(out, lambda tmp: save_pt(state, tmp))  # byte-reproducible
            notes = [
                f"load it with timm.create_model('vit_tiny_patch16_224', checkpoint_path='{out.name}', {kwargs}) "
                "(the architecture name only picks the class; the keyword arguments set the sizes)"
            ]
            if abs(network.shape.norm_eps - 1e-6) > 1e-12:
                notes.append(
                    f"timm builds LayerNorms with eps 1e-6; this network used {network.shape.norm_eps:g}, so "
                    "timm's outputs differ in the last digits"
                )
            return notes
        write_hf_folder(network, out)
        return [
            "load it with transformers' ViTForImageClassification.from_pretrained (pixel values in the run's "
            "data range, [-1, 1])"
        ]

    # -- generation ------------------------------------------------------------------------

    def generate(self, run: "Run", request: "SampleRequest") -> "SampleResult":
        from dbconvert.families.vit.generate import classify

        return classify(run, request)

    def sample_shape(self, recipe: "Recipe") -> tuple[int, ...]:
        cfg = _cfg(recipe)
        return (cfg.in_chans, cfg.img_size, cfg.img_size)

    def synthetic_batch(self, recipe: "Recipe", batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        cfg = _cfg(recipe)
        x = torch.rand((batch, *self.sample_shape(recipe)), generator=generator) * 2 - 1
        return [x, torch.randint(0, cfg.num_classes, (batch,), generator=generator)]

    def sampling_step(
        self, recipe: "Recipe", model: nn.Module, batch: list[torch.Tensor], sigma: float
    ) -> Callable[[], Any]:
        """One classification step: the denoiser's logits at `sigma` (or the plain classifier's forward)."""
        x = batch[0]
        if isinstance(model, Classifier):
            return lambda: model(x)
        z = sigma * torch.randn(x.shape[0], model.table.shape[1], device=x.device)
        s = torch.full((x.shape[0],), sigma, device=x.device)
        return lambda: model(x, z, s)

    def architectures(self) -> Architectures:
        rows = []
        for name in [*ARCHS, "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]:
            a = arch_sizes(name)
            cfg = ViTConfig(arch=name, img_size=a.img_size, in_chans=3, num_classes=100)
            rows.append(
                {
                    "arch": name,
                    "depth": a.depth,
                    "width": a.embed_dim,
                    "heads": a.num_heads,
                    "patch": a.patch_size,
                    "image": a.img_size,
                    "tokens": (a.img_size // a.patch_size) ** 2 + 1,
                    "params": f"{parameter_count(cfg.shape()) / 1e6:.2f}M",
                }
            )
        return Architectures(
            "ViT architectures (model.arch; any plain timm ViT name works too)",
            rows,
            [
                "params: at the listed image size, RGB, 100 classes, counted from the built network (the noise "
                "modulation included: per layer 6 x width^2).",
                "vit-micro / vit-mini are for 8x8 digits on a CPU (patch 2: 16 patches); vit-cifar is the paper's "
                "CIFAR-100 ViT (12 layers, width 128, 4 heads, patch 4).",
            ],
        )
