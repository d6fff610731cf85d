"""The Llama family: a causal language model cut into diffusion blocks over token embeddings.

Decisions written down (DESIGN 5):

- Target space: ONE frozen table T (vocab x hidden) for the whole run, stored once as
  RUN/shared/targets.safetensors: the source model's input embeddings with every row scaled
  to unit L2 norm. Without a checkpoint it is the fresh source's (seeded, random) embedding.
  With model.target_dim = k < hidden it is (vocab x k): the embedding rows' centred projections
  on their top k principal directions, normalised; the per-step vocabulary work of the
  likelihood and of D then scales with k (docs/results/speed.md, "Sampling speed of language-model blocks").
  The noisy variable of token j is z = T[x_j] + sigma * eps. Unit rows put the noise level
  at which tokens become distinguishable (sigma ~ 0.3 for hundreds of tokens) inside the
  default sigma range, so more than one block has real work; rows of RMS sigma_data would
  make every token readable from z for all but the top block.
- Denoiser: the block's head gives logits for token j; we add the exact Gaussian
  log-likelihood of z under each row, (z . T_v - |T_v|^2 / 2) / sigma^2, the discrete
  counterpart of EDM's c_skip path (it makes D -> z as sigma -> 0, so the network only has
  to learn the context prior). D(z, sigma) = softmax(logits) @ T, the softmax-weighted mean
  of the target table, in training and sampling alike. The network's noisy input is
  c_in(sigma) * z and its noise input is c_noise(sigma), as in EDM; c_skip / c_out are
  replaced by the likelihood term above.
- Loss: cross-entropy of token j at every noisy position, with a per-sigma weight chosen by
  train.loss_weight (default uniform, decided by held-out measurement; docs/results/quality-llama.md, "Loss weight").
- Decoding (sampling): Euler/Heun over the EDM steps ends at t_N = 0 with z = D(z, sigma_min);
  the new token is the table row nearest to that final z (Euclidean).
- Tied input/output embeddings are untied on conversion: every block gets its own head copy.
- model.objective=masked (with noise.process=masking): masked diffusion, MD4-style, on the same stack
  with bidirectional attention (`masked.py`); the target table is still written but not used.
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
from dbconvert.errors import RecipeError, RunError
from dbconvert.families.contract import Family, Source
from dbconvert.families.llama.config import LlamaConfig
from dbconvert.families.llama.function_check import check_llama_function
from dbconvert.families.llama.convert import (
    TARGETS_FILE,
    block_key_map,
    config_from_hf,
    convert_hf_state,
    hf_source_state,
    layer_keys,
    normalised_table,
    open_hf_checkpoint,
    read_hf_config,
    target_table,
    write_hf_folder,
)
from dbconvert.families.llama.calibrate import (
    BATCHES,
    DOCUMENTS,
    ROWS,
    TEMPERATURE_FILE,
    calibrate,
    head_gain_at,
    read_block_temperature,
    read_temperatures,
    scaled_norm_loss,
    write_block_temperature,
)
from dbconvert.families.llama.context import context_note
from dbconvert.families.llama.generate import sample_text
from dbconvert.families.llama.metric_help import METRICS
from dbconvert.families.llama.sample_options import TextSampleOptions
from dbconvert.families.llama.masked import MaskedDenoiser, heldout_masked_metrics, mask_token_id, masked_loss
from dbconvert.families.llama.gguf import checkpoint_folder, is_gguf
from dbconvert.families.llama.model import LlamaBlockNet
from dbconvert.families.llama.objective import (
    CausalLM,
    LlamaDenoiser,
    ar_loss,
    diffusion_loss,
    heldout_ar_metrics,
    heldout_diffusion_metrics,
)
from dbconvert.tokenizer import (
    Tokenizer,
    checkpoint_tokenizer,
    prepare_run_tokenizer,
    run_tokenizer,
    save_pretrained_tokenizer,
)

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult


MASKED_PROTOCOL_SEQUENCES = 1000
"""`bench speed` of a masked-diffusion recipe: the time of 1000 unconditional sequences (MD4's text8 figure is a
bound, bits per character, not a sample protocol; this is a round number of samples to judge by eye or MAUVE)."""

DEFAULT_WEIGHTING = "uniform"
"""train.loss_weight=default for text; chosen by held-out measurement (docs/results/quality-llama.md, "Loss weight")."""


def _cfg(recipe: "Recipe") -> LlamaConfig:
    return recipe.model  # type: ignore[return-value]


def is_masked(recipe: "Recipe") -> bool:
    """model.objective=masked: masked diffusion (`masked.py`) instead of the continuous objective."""
    return _cfg(recipe).objective == "masked"


def check_objective(recipe: "Recipe") -> None:
    """model.objective=masked goes with noise.process=masking, and the continuous objective with the others."""
    masked, masking = is_masked(recipe), recipe.noise.process == "masking"
    if masked and not masking:
        raise RecipeError(
            f"model.objective=masked needs noise.process=masking, not {recipe.noise.process}; set noise.process=masking"
        )
    if masking and not masked:
        raise RecipeError(
            "noise.process=masking is the masked-diffusion objective's; set model.objective=masked "
            "(or drop noise.process)"
        )


def check_mask_room(cfg: LlamaConfig) -> None:
    """Before anything is written: a tokenizer the user names (or the checkpoint's) must leave an id for [MASK]."""
    path = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None
    if path is None and cfg.checkpoint is not None:
        path = checkpoint_tokenizer(Path(cfg.checkpoint).expanduser())
    if path is not None and path.is_file():
        mask_token_id(Tokenizer(path), cfg.vocab_size, vocab_from(cfg))


def needs_checkpoint_tokenizer(cfg: LlamaConfig) -> bool:
    """Whether the run's tokenizer must come from the checkpoint (neither model.tokenizer nor model.train_tokenizer)."""
    return cfg.tokenizer is None and not cfg.train_tokenizer


def vocab_from(cfg: LlamaConfig) -> str | None:
    """What fixed the vocabulary size when it is not the recipe's to change (for the tokenizer check's hint)."""
    return f"the checkpoint's config.json ({cfg.checkpoint})" if cfg.checkpoint else None


class LlamaFamily(Family):
    name = "llama"
    config_cls = LlamaConfig
    metrics = ("mauve", "genppl", "bpc")
    own_metrics = METRICS
    sample_options_type = TextSampleOptions
    model_kinds = ("blocks", "e2e", "ar", "source")
    reference_kind = "ar"
    reference_title = "plain causal LM"
    generated_unit = "token"
    protocol_units = 1000 * 5 * 50  # SEDD's conditional MAUVE protocol, as the paper runs it
    noise_processes = ("edm", "masking")

    def __init__(
        self, shared: Path | None = None, table: torch.Tensor | None = None, mask: tuple[int, int] | None = None
    ) -> None:
        self._shared = shared
        self._table = table
        self._mask = mask

    def for_bench(self, recipe: "Recipe") -> "LlamaFamily":
        """Without a run: a seeded random unit-norm target table of the model's shape (memory and time only)."""
        cfg = _cfg(recipe)
        gen = torch.Generator().manual_seed(cfg.init_seed)
        family = LlamaFamily(
            table=normalised_table(torch.randn(cfg.vocab_size, cfg.shape().target_size, generator=gen)),
            mask=(cfg.vocab_size - 1, cfg.vocab_size - 1),
        )  # masked: the last row is [MASK]
        if is_masked(recipe):  # one sample is a whole sequence, unmasked over sample.steps steps
            family.generated_unit = "sequence"
            family.protocol_units = MASKED_PROTOCOL_SEQUENCES
        return family

    def metrics_for(self, recipe: "Recipe") -> tuple[str, ...]:
        """Masked runs: bits per character first (their exact bound), then MAUVE; continuous runs: MAUVE, Gen-PPL."""
        return ("bpc", "mauve") if is_masked(recipe) else ("mauve", "genppl")

    def parameterization(self, recipe: "Recipe") -> dict[str, Any]:
        """The continuous objective: EDM preconditioning (recorded as before); masked: what the network reads."""
        if is_masked(recipe):
            return {"name": "masked", "attention": "bidirectional", "conditioning": "t (masking time), c_noise = t"}
        return {"name": "edm"}

    def bind(self, run: "Run") -> "LlamaFamily":
        """Training and sampling read the run's shared tokenizer and target table."""
        return LlamaFamily(run.shared_dir)

    def _shared_dir(self) -> Path:
        if self._shared is None:
            raise RunError("the Llama family needs its run (tokenizer and target table); open the run first")
        return self._shared

    # -- split -----------------------------------------------------------------------------

    def source(self, recipe: "Recipe") -> Source:
        source = self._source(recipe)
        if is_masked(recipe):
            check_mask_room(_cfg(recipe))  # after a checkpoint's config.json has set the vocabulary
            source.notes.append(
                "model.objective=masked: the layers attend bidirectionally (the causal mask is "
                "replaced by full attention); with the zero-initialised t modulation each layer "
                "computes what the source layer computes under full attention"
            )
        return source

    def _source(self, recipe: "Recipe") -> Source:
        check_objective(recipe)
        cfg = _cfg(recipe)
        if cfg.checkpoint is None:
            from transformers import LlamaForCausalLM

            shape = cfg.shape()
            torch.manual_seed(cfg.init_seed)
            hf_state = LlamaForCausalLM(shape.hf_config()).state_dict()
            net = convert_hf_state(hf_state, shape, False, cfg.init_seed, sigma_data=recipe.noise.sigma_data)
            source = Source.of_network(net, shape.num_layers, shape=shape)
            source.state = resolve_storage_dtype(cfg, source.state, fresh=True)
            return source
        hf_cfg, hf_state, files = open_hf_checkpoint(checkpoint_folder(cfg.checkpoint, needs_checkpoint_tokenizer(cfg)))
        notes = []
        if is_gguf(cfg.checkpoint):  # the run points at the GGUF file, not the temporary folder
            files = [Path(cfg.checkpoint).expanduser()]
            notes.append(
                "a GGUF file is dequantised whole by transformers (into a temporary folder) before the split streams it"
            )
        cfg = config_from_hf(cfg, hf_cfg, recipe.given)
        recipe.model = cfg  # the manifest records the checkpoint's architecture, so blocks rebuild without it
        shape = cfg.shape()
        state = hf_source_state(
            hf_state, shape, cfg.tie_embeddings, cfg.init_seed, f"checkpoint {cfg.checkpoint}", recipe.noise.sigma_data
        )
        check_llama_function(hf_cfg, hf_state, shape, state, f"checkpoint {cfg.checkpoint}")
        state = resolve_storage_dtype(cfg, state, checkpoint=hf_state)
        return Source(
            state,
            shape.num_layers,
            notes=[context_note(cfg), *notes],
            files=files,
            build=lambda: LlamaBlockNet(shape),
            shape=shape,
        )

    def resolve(self, recipe: "Recipe") -> None:
        """With model.checkpoint: the architecture of its config.json, as `source` records it (weights not read)."""
        cfg = _cfg(recipe)
        if cfg.checkpoint is not None:
            recipe.model = config_from_hf(cfg, read_hf_config(cfg.checkpoint), recipe.given)

    writes_random_checkpoints = True

    def random_checkpoint(
        self,
        recipe: "Recipe",
        folder: Path,
        dtype: torch.dtype,
        seed: int,
        on_tensor: Callable[[int], None] | None = None,
    ) -> list[str]:
        """A random save_pretrained folder of the recipe's shape, a small BPE tokenizer in it, and a text file (the
        built-in text when it is there) to train on. Output calibration is off: it measures nothing of memory."""
        from dbconvert.families.llama.convert import write_random_hf_folder
        from dbconvert.tokenizer import train_bpe

        cfg = _cfg(recipe)
        write_random_hf_folder(cfg.shape(), cfg.tie_embeddings, folder, dtype, seed, on_tensor)
        text = folder / "train.txt"
        words = (
            "the of and to in a is that for it as was with be by on not he I this are or his from at which "
            "but have an had they you were their one all we can her has there been if more when will would "
            "who so no"
        ).split()
        gen = torch.Generator().manual_seed(seed)
        lines = [
            " ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=gen)) for _ in range(400)
        ]
        text.write_text("\n".join(lines) + "\n")
        train_bpe(lines, min(512, cfg.vocab_size), folder / "tokenizer.json")
        return [f"model.checkpoint={folder}", f"data.source={text}", "data.kind=text", "model.calibrate_output=false"]

    def block_network(self, recipe: "Recipe", depth: int) -> nn.Module:
        cfg = _cfg(recipe)
        net = LlamaBlockNet(cfg.shape(depth))
        if cfg.freeze_embedding:
            net.embed_tokens.weight.requires_grad_(False)
        return net

    def layers(self, network: nn.Module) -> list[nn.Module]:
        return list(network.layers)  # type: ignore[union-attr, arg-type]

    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        shape = source.shape
        keys = layer_keys(shape)
        state = apply_key_map(
            source.state,
            block_key_map(shape, start, end),
            ignored=lambda key: key.startswith("layers.") and key.split(".", 2)[2] in keys,
            what=f"Llama block of layers [{start}, {end})",
        )
        return state

    def prepare_run(self, recipe: "Recipe", run_dir: Path, source: Source) -> None:
        """Write the shared target table and the run's tokenizer into RUN/shared/."""
        cfg = _cfg(recipe)
        shared = run_dir / "shared"
        table = target_table(source.state["embed_tokens.weight"].to(torch.float32), cfg.target_dim)
        save_weights(shared / TARGETS_FILE, {"table": table})
        room = 1 if is_masked(recipe) else 0  # a trained BPE leaves one row for [MASK]
        folder = (
            str(checkpoint_folder(cfg.checkpoint, needs_checkpoint_tokenizer(cfg)))  # a GGUF file's dequantised
            if cfg.checkpoint
            else None
        )
        tok = prepare_run_tokenizer(
            shared,
            cfg.tokenizer,
            folder,
            cfg.train_tokenizer,
            lambda: read_documents(recipe.data, recipe.data.split),
            cfg.vocab_size - room,
            cfg.tokenizer_type,
        )
        tok.check_vocab(cfg.vocab_size, vocab_from(cfg))
        if is_masked(recipe):
            mask_token_id(tok, cfg.vocab_size, vocab_from(cfg))
        elif cfg.checkpoint and cfg.calibrate_output:  # the continuous objective's output path (calibrate.py)
            source.notes.append(
                "output calibration (model.calibrate_output): each block measures, at step 0 of its "
                "own training and on its training device, whether its copied head starts worse than "
                "none; if so its head logits start scaled down and the scale rises linearly to 1 over "
                f"the {recipe.train.warmup_steps} warm-up steps (the weights stay the checkpoint's)"
            )

    def calibrates(self, run: "Run", target: str) -> bool:
        """Whether `target` is a block of a run converted from a checkpoint with model.calibrate_output on."""
        cfg = _cfg(run.recipe)
        blocks = {run.block_name(b.index) for b in run.blocks}
        return target in blocks and cfg.checkpoint is not None and cfg.calibrate_output and not is_masked(run.recipe)

    def measure_temperature(
        self, run: "Run", target: str, recipe: "Recipe", network: nn.Module, note: Callable[[str], None]
    ) -> float:
        """The block's starting head scale (calibrate.py), measured on `network` (its split weights, on the training
        device), written into the block's folder, and said in one note."""
        cfg = _cfg(recipe)
        rows = self.calibration_rows(recipe)
        info = next(b for b in run.blocks if run.block_name(b.index) == target)
        weighting = DEFAULT_WEIGHTING if recipe.train.loss_weight == "default" else recipe.train.loss_weight
        denoiser = self.denoiser(recipe, network, run.noise())
        best, losses = calibrate(
            scaled_norm_loss(network, denoiser, rows, tuple(info.train_range), weighting, cfg.loss_chunk)
        )
        write_block_temperature(run.model_dir(target), best, losses)
        note(
            f"{target}: output calibration: head logits start x{best:g} (step-0 loss {losses[1.0]:.2f} -> "
            f"{losses[best]:.2f}; no head {losses[0.0]:.2f})" + (", rising to 1 over the warm-up" if best < 1 else "")
        )
        return best

    def calibration_rows(self, recipe: "Recipe") -> torch.Tensor:
        """The rows the output calibration measures on: packed from the first DOCUMENTS training documents."""
        from dbconvert.data.text import pack, resolve_kind

        split = recipe.data.split  # a hub data set: only its first documents are read (datasets' slice syntax)
        docs = read_documents(recipe.data, f"{split}[:{DOCUMENTS}]" if resolve_kind(recipe.data) == "hub" else split)
        rows = torch.from_numpy(pack(docs[:DOCUMENTS], self.tokenizer(), _cfg(recipe).context, recipe.data.split_seed))
        return rows[: BATCHES * ROWS]

    def training_schedule(
        self, run: "Run", target: str, recipe: "Recipe", note: Callable[[str], None] | None = None
    ) -> Callable[[nn.Module, int], None] | None:
        """A converted block's calibrated head temperature, undone over the warm-up steps (calibrate.py); measured
        at step 0 the first time the block trains (runs split before that keep the scales their split measured)."""
        note = note or (lambda msg: None)
        if (run.shared_dir / TEMPERATURE_FILE).is_file():
            start: float | None = read_temperatures(run.shared_dir).get(target, 1.0)
        else:
            start = read_block_temperature(run.model_dir(target))
            if start is None and not self.calibrates(run, target):
                return None
        if start == 1.0:
            return None
        steps = recipe.train.warmup_steps
        known = {"start": start}

        def set_gain(network: nn.Module, step: int) -> None:
            if known["start"] is None:  # the block's first training: measured on its split weights, at step 0
                known["start"] = (
                    self.measure_temperature(run, target, recipe, network, note) if step == 0 else 1.0
                )  # resumed past step 0 without a scale: a run of an older version
            network.head_gain.fill_(head_gain_at(known["start"], step, steps))  # type: ignore[operator]

        return set_gain

    # -- training --------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        return run_tokenizer(self._shared_dir())

    def table(self) -> torch.Tensor:
        if self._table is not None:
            return self._table
        return load_weights(self._shared_dir() / TARGETS_FILE)["table"]

    def mask(self, recipe: "Recipe") -> tuple[int, int]:
        """([MASK]'s id, how many ids the tokenizer produces) of a masked-diffusion run."""
        if self._mask is not None:
            return self._mask
        tok = self.tokenizer()
        return mask_token_id(tok, _cfg(recipe).vocab_size), tok.vocab_size

    def denoiser(self, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        assert isinstance(network, LlamaBlockNet)
        if is_masked(recipe):
            return MaskedDenoiser(network, noise, *self.mask(recipe))  # type: ignore[arg-type]
        table = self.table()
        if tuple(table.shape) != (network.shape.vocab_size, network.shape.target_size):
            raise RunError(f"the run's target table has shape {tuple(table.shape)}, not the model's; split again")
        return LlamaDenoiser(network, table, noise)

    def load_data(self, recipe: "Recipe", split: str | None = None) -> TextData:
        cfg = _cfg(recipe)
        tok = self.tokenizer()
        tok.check_vocab(cfg.vocab_size, vocab_from(cfg))
        return load_text(recipe.data, tok, cfg.context, split)

    def check_training(self, recipe: "Recipe") -> None:
        """The masked objective's weight is fixed by its bound (MD4's -alpha'(t) / (1 - alpha(t))): no other applies."""
        if is_masked(recipe) and recipe.train.loss_weight != "default":
            raise RecipeError(
                f"train.loss_weight={recipe.train.loss_weight} does not apply to model.objective=masked "
                "(its cross-entropy is weighted by -alpha'(t) / (1 - alpha(t)), MD4's ELBO, so that "
                "eval bpc is a bound); drop it"
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
        if is_masked(recipe):
            self.check_training(recipe)
            return masked_loss(denoiser, batch[0], sigma_range, generator, shard)  # type: ignore[arg-type]
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
        if objective == "ar":
            return heldout_ar_metrics(model, batch[0])
        if is_masked(recipe):
            return heldout_masked_metrics(model, batch[0], sigma_range, generator)  # type: ignore[arg-type]
        return heldout_diffusion_metrics(model, batch[0], sigma_range, generator)  # type: ignore[arg-type]

    def wrap(self, model: str, recipe: "Recipe", network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        """The converted source is a causal LM (its noise modulation is still zero): decode it like `ar`."""
        if model in ("ar", "source"):
            return self.reference_model(recipe, network)
        return self.denoiser(recipe, network, noise)

    def reference_model(self, recipe: "Recipe", network: nn.Module) -> nn.Module:
        assert isinstance(network, LlamaBlockNet)
        if network.shape.head == "tied-table":
            network.attach_table(self.table())
        return CausalLM(network)

    def reference_loss(
        self, model: nn.Module, batch: Any, recipe: "Recipe", shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return ar_loss(model, batch[0])

    # -- export ----------------------------------------------------------------------------

    def check_export(self, model: str, out: Path) -> None:
        """Only causal LMs (source, ar) export: a denoiser's (blocks, e2e) sigma modulation and noisy-input path
        are what it learned, and a LlamaForCausalLM cannot hold them."""
        if model not in ("source", "ar"):
            raise RunError(
                f"a Llama {model} network is a denoiser whose sigma modulation and noisy-input path a "
                "LlamaForCausalLM cannot hold; export --model source or --model ar (causal LMs)"
            )
        if out.suffix in (".safetensors", ".pt", ".bin", ".json"):
            raise RunError(
                f"a Llama export is a Hugging Face folder (save_pretrained), not a {out.suffix} file; "
                "give a folder path"
            )

    def export(self, run: "Run", model: str, name: str, network: nn.Module, out: Path) -> list[str]:
        """A Hugging Face folder (LlamaForCausalLM + the run's tokenizer) of a causal LM: source or ar."""
        assert isinstance(network, LlamaBlockNet)
        tok = self.tokenizer()
        write_hf_folder(network, out, tok.settings.bos_id, tuple(tok.stop_ids), f"export of {name}")
        save_pretrained_tokenizer(self._shared_dir(), out)
        return [
            "the sigma modulation and noisy-input path were left out (clean tokens never use them); load the "
            "folder with transformers' LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained"
        ]

    # -- sampling --------------------------------------------------------------------------

    def generate(self, run: "Run", request: "SampleRequest") -> "SampleResult":
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
        """Tokens/s of the blocks at the few-step protocol vs AR decoding (`decode_bench.py`); None when masked (a
        masked run decodes whole sequences, not token by token)."""
        if is_masked(recipe):
            return None
        from dbconvert.families.llama.decode_bench import decoding_rates

        return decoding_rates(self, recipe, blocks, batch, device, repeats, warmup, new_tokens, on_progress)

    def sampling_step(
        self, recipe: "Recipe", model: nn.Module, batch: list[torch.Tensor], sigma: float
    ) -> Callable[[], Any]:
        """One denoising step of the next token for every row, over a KV cache of the row as prompt.

        The cache is built once here (a sampler extends it by one token per M steps); the closure
        is the per-step cost: one noisy query per row through the model's layers.
        """
        if isinstance(model, MaskedDenoiser):  # one unmasking step of whole sequences, mostly still masked
            x = torch.full_like(batch[0], model.mask_id)
            t = torch.full((x.shape[0],), sigma, device=x.device)
            return lambda: model(x, t)
        tokens = batch[0][:, :-1]
        if isinstance(model, CausalLM):  # the AR reference: one cached next-token forward per token
            cache, _ = model.net.extend(None, tokens[:, :-1], 0)
            return lambda: model.net.extend(cache, tokens[:, -1:], tokens.shape[1] - 1)
        cache, _ = model.net.extend(None, tokens, 0)
        z = torch.randn(tokens.shape[0], model.table.shape[1], device=tokens.device)
        return lambda: model.step(cache, z, sigma, tokens.shape[1])
