"""The recurrent family: a Huginn-style recurrent-depth LM trained as ONE denoiser over all noise levels.

Mapping (docs/families/recurrent.md has the why):

- Huginn's state s, started from noise and refined by r applications of the core R on adapter(concat(s, e)), is
  DiffusionBlocks' noisy target z: the core's state is c_in(sigma) * z through `noisy_in`, e (the prelude output
  of the clean context) is the conditioning x, sigma enters the core and the coda through zero-initialised
  modulation, and D(z, sigma) is read through coda + head as the Llama family's text denoiser reads it.
- Huginn's K-iteration inference becomes K denoising steps (sample.steps, default 32 = Huginn's mean recurrence),
  each one application of core + coda + head; its training (r random, backprop through the last k) becomes one
  forward per step at a sigma from the EDM log-normal.
- B = 1 (the paper's): the shared core is the block. The source's depth is counted in recurrences
  (model.mean_recurrence): B > 1 splits the noise range into B parts, each with its own whole copy of the
  network, trained alone (ours, not the paper's).
- The reference (`train-e2e --objective recurrent`) is Huginn's own training; `source` is the converted network
  decoded as Huginn decodes it (r = mean recurrence).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dbconvert import noise as nz
from dbconvert.checkpoint import apply_key_map, load_weights, resolve_storage_dtype, save_weights
from dbconvert.data.text import TextData, load_text, read_documents
from dbconvert.errors import RunError
from dbconvert.families.contract import Architectures, Family, Source
from dbconvert.families.llama.convert import TARGETS_FILE, normalised_table, target_table
from dbconvert.families.llama.family import DEFAULT_WEIGHTING
from dbconvert.families.llama.generate import sample_text
from dbconvert.families.llama.sample_options import TextSampleOptions
from dbconvert.families.llama.objective import diffusion_loss, heldout_ar_metrics, heldout_diffusion_metrics
from dbconvert.families.recurrent.config import RecurrentConfig
from dbconvert.families.recurrent.convert import network_key_map, read_huginn, source_state, write_huginn_folder
from dbconvert.families.recurrent.model import RecurrentNet
from dbconvert.families.recurrent.objective import HuginnLM, RecurrentDenoiser, recurrent_loss
from dbconvert.tokenizer import Tokenizer, prepare_run_tokenizer, run_tokenizer, save_pretrained_tokenizer

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult

REFERENCE = "recurrent"


def _cfg(recipe: "Recipe") -> RecurrentConfig:
    return recipe.model  # type: ignore[return-value]


class RecurrentFamily(Family):
    name = "recurrent"
    config_cls = RecurrentConfig
    metrics = ("mauve", "genppl")
    sample_options_type = TextSampleOptions
    model_kinds = ("blocks", "e2e", REFERENCE, "source")
    reference_kind = REFERENCE
    reference_title = "Huginn-trained recurrent LM"
    generated_unit = "token"
    protocol_units = 1000 * 5 * 50

    def __init__(self, shared: Path | None = None, table: torch.Tensor | None = None) -> None:
        self._shared = shared
        self._table = table

    def bind(self, run: "Run") -> "RecurrentFamily":
        return RecurrentFamily(run.shared_dir)

    def for_bench(self, recipe: "Recipe") -> "RecurrentFamily":
        """Without a run: a seeded random unit-norm target table of the model's shape (memory and time only)."""
        s = _cfg(recipe).shape()
        gen = torch.Generator().manual_seed(_cfg(recipe).init_seed)
        return RecurrentFamily(table=normalised_table(torch.randn(s.vocab_size, s.target_size, generator=gen)))

    def _shared_dir(self) -> Path:
        if self._shared is None:
            raise RunError("the recurrent family needs its run (tokenizer and target table); open the run first")
        return self._shared

    def architectures(self) -> Architectures:
        return Architectures(
            "recurrent-depth (Huginn) language models",
            [
                {"name": "huginn-tiny-shakespeare", "prelude/core/coda": "1/2/1", "hidden": 128, "heads": 4},
                {"name": "huginn-lm1b (the paper's)", "prelude/core/coda": "2/4/2", "hidden": 512, "heads": 8},
                {"name": "huginn-0125", "prelude/core/coda": "2/4/2", "hidden": 5280, "heads": 55},
            ],
            ["the source's depth is model.mean_recurrence recurrences; B = 1 (the default) trains the one shared core"],
        )

    # -- split -----------------------------------------------------------------------------

    def source(self, recipe: "Recipe") -> Source:
        cfg = _cfg(recipe)
        shape = cfg.shape()
        notes = [
            f"the source's depth is its mean recurrence, {shape.mean_recurrence} applications of the "
            f"{shape.core_layers}-layer core; every block holds a whole copy of the network "
            f"({shape.prelude_layers}/{shape.core_layers}/{shape.coda_layers} prelude/core/coda layers)"
        ]
        if cfg.checkpoint is None:
            state = resolve_storage_dtype(cfg, source_state(shape, cfg.init_seed), fresh=True)
            return Source(state, shape.mean_recurrence, notes=notes, shape=shape, build=lambda: RecurrentNet(shape))
        huginn, files = read_huginn(cfg.checkpoint, shape)
        state = resolve_storage_dtype(cfg, source_state(shape, cfg.init_seed, huginn), checkpoint=huginn)
        return Source(
            state, shape.mean_recurrence, notes=notes, files=files, shape=shape, build=lambda: RecurrentNet(shape)
        )

    def block_network(self, recipe: "Recipe", depth: int) -> nn.Module:
        """The whole network whatever `depth` (the recurrences a block owns): the core is the block."""
        return RecurrentNet(_cfg(recipe).shape())

    def layers(self, network: nn.Module) -> list[nn.Module]:
        assert isinstance(network, RecurrentNet)
        return network.layers()

    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        return apply_key_map(source.state, network_key_map(source.shape), what=f"recurrent block [{start}, {end})")

    def prepare_run(self, recipe: "Recipe", run_dir: Path, source: Source) -> None:
        """The shared target table (the normalised wte rows, as Llama's) and the run's tokenizer."""
        cfg = _cfg(recipe)
        shared = run_dir / "shared"
        table = target_table(source.state["transformer.wte.weight"].to(torch.float32), cfg.target_dim)
        save_weights(shared / TARGETS_FILE, {"table": table})
        tok = prepare_run_tokenizer(
            shared,
            cfg.tokenizer,
            cfg.checkpoint if cfg.checkpoint and Path(cfg.checkpoint).expanduser().is_dir() else None,
            cfg.train_tokenizer,
            lambda: read_documents(recipe.data, recipe.data.split),
            cfg.vocab_size,
            cfg.tokenizer_type,
        )
        tok.check_vocab(cfg.vocab_size)

    # -- training --------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        return run_tokenizer(self._shared_dir())

    def table(self) -> torch.Tensor:
        if self._table is not None:
            return self._table
        return load_weights(self._shared_dir() / TARGETS_FILE)["table"]

    def denoiser(self, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        assert isinstance(network, RecurrentNet)
        table = self.table()
        if tuple(table.shape) != (network.shape.vocab_size, network.shape.target_size):
            raise RunError(f"the run's target table has shape {tuple(table.shape)}, not the model's; split again")
        return RecurrentDenoiser(network, table, noise)

    def load_data(self, recipe: "Recipe", split: str | None = None) -> TextData:
        cfg = _cfg(recipe)
        tok = self.tokenizer()
        tok.check_vocab(cfg.vocab_size)
        return load_text(recipe.data, tok, cfg.context, split)

    def training_loss(
        self,
        denoiser: nn.Module,
        batch: Any,
        sigma_range: tuple[float, float],
        recipe: "Recipe",
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The Llama family's text objective, one forward per step (sigma from the EDM log-normal)."""
        weighting = DEFAULT_WEIGHTING if recipe.train.loss_weight == "default" else recipe.train.loss_weight
        return diffusion_loss(
            denoiser,
            batch[0],
            sigma_range,
            generator,
            shard,
            weighting,  # type: ignore[arg-type]
            _cfg(recipe).loss_chunk,
        )

    def heldout_metrics(
        self,
        model: nn.Module,
        batch: list[torch.Tensor],
        sigma_range: tuple[float, float],
        recipe: "Recipe",
        generator: torch.Generator,
        objective: str = "denoiser",
    ) -> dict[str, float]:
        if objective == REFERENCE:  # eval mode: r = mean recurrence, a fixed initial state
            return heldout_ar_metrics(model, batch[0])
        return heldout_diffusion_metrics(model, batch[0], sigma_range, generator)  # type: ignore[arg-type]

    def wrap(self, model: str, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        """`recurrent` and `source` decode as Huginn (r = mean recurrence); blocks and e2e are denoisers."""
        if model in (REFERENCE, "source"):
            return self.reference_model(recipe, network)
        return self.denoiser(recipe, network, noise)

    def reference_model(self, recipe: "Recipe", network: nn.Module) -> nn.Module:
        assert isinstance(network, RecurrentNet)
        return HuginnLM(network, recipe.sample.seed)

    def reference_loss(
        self, model: nn.Module, batch: Any, recipe: "Recipe", shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return recurrent_loss(model, batch[0], shard)

    def training_schedule(
        self, run: "Run", target: str, recipe: "Recipe", note: Callable[[str], None] | None = None
    ) -> Callable[[nn.Module, int], None] | None:
        """Huginn's training draws r and s_0 per step: the step index and seed it draws them from (resume-exact)."""
        if target != REFERENCE:
            return None
        seed = recipe.train.seed

        def set_step(network: nn.Module, step: int) -> None:
            network.train_step = step  # type: ignore[assignment]
            network.train_seed = seed  # type: ignore[assignment]

        return set_step

    # -- export ----------------------------------------------------------------------------

    def check_export(self, model: str, out: Path) -> None:
        if model not in ("source", REFERENCE):
            raise RunError(
                f"a recurrent {model} network is a denoiser whose sigma modulation and noisy-input path a "
                "Huginn checkpoint cannot hold; export --model source or --model recurrent"
            )
        if out.suffix in (".safetensors", ".pt", ".bin", ".json"):
            raise RunError(f"a recurrent export is a folder (Huginn's layout), not a {out.suffix} file; give a folder")

    def export(self, run: "Run", model: str, name: str, network: nn.Module, out: Path) -> list[str]:
        write_huginn_folder(network, out, int(_cfg(run.recipe).context))
        save_pretrained_tokenizer(self._shared_dir(), out)
        return [
            "Huginn's key layout (transformer.*, lm_head) and a config.json in its names; the diffusion path "
            "(noisy_in, sigma_embed, adaLN_modulation) was left out"
        ]

    # -- sampling --------------------------------------------------------------------------

    def generate(self, run: "Run", request: "SampleRequest") -> "SampleResult":
        """The Llama family's text sampler: K Euler/Heun steps per token for blocks / e2e (each one core + coda +
        head application over the KV cache), Huginn decoding (r = mean recurrence) for recurrent / source."""
        return sample_text(run, request)

    def sample_shape(self, recipe: "Recipe") -> tuple[int, ...]:
        return (_cfg(recipe).context,)

    def synthetic_batch(self, recipe: "Recipe", batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        cfg = _cfg(recipe)
        return [torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=generator)]

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
        """Whole decodes, tokens/s: the blocks at sample.steps Euler steps per token (each one core + coda + head)
        against Huginn decoding at r = mean recurrence (r core applications + coda + head per token), both with
        their KV caches, on the same random prompts, prefill included (`llama.decode_bench`'s lengths)."""
        import statistics

        from dbconvert.bench import timed, with_blocks
        from dbconvert.errors import DbconvertError
        from dbconvert.families.llama.decode_bench import default_lengths
        from dbconvert.families.llama.generate import Decoding, ancestral, diffuse
        from dbconvert.split import plan_blocks, source_depth

        recipe = with_blocks(recipe, blocks)
        cfg = _cfg(recipe)
        prompt, new = default_lengths(cfg.context)
        if new_tokens is not None:
            if not 1 <= new_tokens <= cfg.context - prompt:
                raise DbconvertError(f"--decode-tokens must be between 1 and {cfg.context - prompt}, got {new_tokens}")
            new = new_tokens
        _, plans = plan_blocks(recipe, source_depth(recipe))
        noise = recipe.noise.settings()
        torch.manual_seed(recipe.train.seed)
        huginn = self.wrap(REFERENCE, recipe, RecurrentNet(cfg.shape()), noise).to(device).eval()
        models = [self.wrap("blocks", recipe, RecurrentNet(cfg.shape()), noise).to(device).eval() for _ in plans]
        owned = [tuple(p["owned_range"]) for p in plans]
        rows = torch.randint(
            0, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(recipe.train.seed)
        ).tolist()
        seeds = list(range(batch))
        steps = recipe.sample.steps
        runs: dict[str, Callable[[], Any]] = {
            REFERENCE: lambda: ancestral(
                huginn.net, rows, Decoding(new, cfg.context, (), 0, temperature=0.0), seeds, device
            ),
            "blocks": lambda: diffuse(
                models, owned, rows, Decoding(new, cfg.context, (), 0, steps=steps), seeds, device
            ),
            "blocks (separate extend)": lambda: diffuse(
                models, owned, rows, Decoding(new, cfg.context, (), 0, steps=steps), seeds, device, fuse=False
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(warmup + repeats):
            for name, fn in runs.items():
                if on_progress:
                    on_progress(f"decoding, {'warm-up' if rep < warmup else 'repetition'} {rep + 1}, {name}")
                took = timed(fn, device)
                if rep >= warmup:
                    seconds[name].append(took)
        rate = {name: batch * new / statistics.median(s) for name, s in seconds.items()}
        return {
            "batch": batch,
            "prompt_tokens": prompt,
            "new_tokens": new,
            "steps": steps,
            "protocol": f"default ({steps} Euler steps per token vs r = {cfg.mean_recurrence})",
            "layers": source_depth(recipe),
            "tokens_per_s": rate,
            "reference": REFERENCE,
            "blocks_over_ar": rate["blocks"] / rate[REFERENCE],
            "unfused_over_ar": rate["blocks (separate extend)"] / rate[REFERENCE],
            "raw_seconds": seconds,
        }

    def sampling_step(
        self, recipe: "Recipe", model: nn.Module, batch: list[torch.Tensor], sigma: float
    ) -> Callable[[], Any]:
        """Denoiser: one denoising step of the next token over a KV cache of the row; Huginn: one token (r
        recurrences) over its cache."""
        tokens = batch[0][:, :-1]
        if isinstance(model, HuginnLM):
            cache, _ = model.extend(None, tokens[:, :-1], 0)
            return lambda: model.extend(cache, tokens[:, -1:], tokens.shape[1] - 1)
        assert isinstance(model, RecurrentDenoiser)
        cache, _ = model.net.extend(None, tokens, 0)
        z = torch.randn(tokens.shape[0], model.table.shape[1], device=tokens.device)
        return lambda: model.step(cache, z, sigma, tokens.shape[1])
