"""The Llama family: a causal language model cut into diffusion blocks over token embeddings.

Decisions written down (DESIGN 5):

- Target space: ONE frozen table T (vocab x hidden) for the whole run, stored once as
  RUN/shared/targets.safetensors: the source model's input embeddings with every row scaled
  to unit L2 norm. Without a checkpoint it is the fresh source's (seeded, random) embedding.
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
- Loss: cross-entropy of token j at every noisy position, weighted by lambda(sigma) divided
  by the mean of lambda over the block's training distribution (so the weights average 1).
- Decoding (sampling): Euler/Heun over the EDM steps ends at t_N = 0 with z = D(z, sigma_min);
  the new token is the table row nearest to that final z (Euclidean).
- Tied input/output embeddings are untied on conversion: every block gets its own head copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import nn

from dbconvert import noise as nz
from dbconvert.checkpoint import KeyMap, apply_key_map, file_sha256, load_strict, load_weights, read_checkpoint, save_weights
from dbconvert.config import ModelConfig, Recipe, _one_line
from dbconvert.data.text import TextData, load_text, read_documents
from dbconvert.errors import CheckpointError, DbconvertError, RecipeError, RunError
from dbconvert.families.base import Family, Source, shard_slice
from dbconvert.families.llama_model import KVCache, LlamaBlockNet, LlamaShape
from dbconvert.tokenizer import Tokenizer, checkpoint_tokenizer, install, run_tokenizer, train_bpe

if TYPE_CHECKING:
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest, SampleResult

TARGETS_FILE = "targets.safetensors"

SHARED_KEYS: tuple[str, ...] = (
    "embed_tokens.weight",
    "noisy_in.weight",
    "sigma_embed.mlp.0.weight",
    "sigma_embed.mlp.0.bias",
    "sigma_embed.mlp.2.weight",
    "sigma_embed.mlp.2.bias",
    "norm.weight",
    "lm_head.weight",
)
"""Keys every block copies from the source network: embedding, noise input, final norm, head."""

NEW_KEYS: tuple[str, ...] = SHARED_KEYS[1:6]
"""Keys a Hugging Face checkpoint does not have: the noisy-input path, created at conversion."""

HF_LAYER_KEYS: tuple[str, ...] = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
ATTN_BIAS_KEYS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias")
MLP_BIAS_KEYS = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")
MOD_KEYS = ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias")


class LlamaConfig(ModelConfig):
    """A Llama: either a Hugging Face checkpoint folder (its config.json wins) or these fields."""

    family: Literal["llama"] = "llama"
    layers: int = Field(8, ge=1)
    hidden: int = Field(128, ge=2)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=2)
    intermediate: int | None = Field(None, ge=1)
    vocab_size: int = Field(512, ge=2)
    context: int = Field(128, ge=2)
    max_positions: int | None = Field(None, ge=2)
    rope_theta: float = Field(10000.0, gt=0)
    rope_parameters: dict[str, Any] | None = None
    rms_norm_eps: float = Field(1e-6, gt=0)
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    tokenizer: str | None = None
    init_seed: int = 0

    @model_validator(mode="after")
    def _shapes(self) -> "LlamaConfig":
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"model.hidden {self.hidden} is not divisible by model.heads {self.heads}")
        if self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"model.heads {self.heads} is not a multiple of model.kv_heads {self.kv_heads}")
        if self.max_positions is not None and self.context > self.max_positions:
            raise ValueError(
                f"model.context {self.context} is longer than the model's maximum of {self.max_positions} positions; "
                f"set model.context <= {self.max_positions}"
            )
        return self

    def shape(self, depth: int | None = None) -> LlamaShape:
        head_dim = self.head_dim or self.hidden // self.heads
        intermediate = self.intermediate or 32 * math.ceil(8 * self.hidden / 3 / 32)
        rope = self.rope_parameters or {"rope_type": "default", "rope_theta": self.rope_theta}
        return LlamaShape(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            intermediate_size=intermediate,
            num_layers=depth or self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads or self.heads,
            head_dim=head_dim,
            max_positions=self.max_positions or self.context,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            rope_parameters=dict(rope),
        )


# --- key maps ------------------------------------------------------------------------------


def layer_keys(shape: LlamaShape) -> tuple[str, ...]:
    """Keys of one decoder layer below `layers.{k}.` in the block network."""
    bias = (ATTN_BIAS_KEYS if shape.attention_bias else ()) + (MLP_BIAS_KEYS if shape.mlp_bias else ())
    return HF_LAYER_KEYS + bias + MOD_KEYS


def hf_key_map(shape: LlamaShape, tied: bool) -> KeyMap:
    """Block-network key -> Hugging Face LlamaForCausalLM key, for everything the checkpoint has."""
    hf_layer = HF_LAYER_KEYS + (ATTN_BIAS_KEYS if shape.attention_bias else ()) + (MLP_BIAS_KEYS if shape.mlp_bias else ())
    key_map = {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "model.embed_tokens.weight" if tied else "lm_head.weight",
    }
    for k in range(shape.num_layers):
        for name in hf_layer:
            key_map[f"layers.{k}.{name}"] = f"model.layers.{k}.{name}"
    return key_map


def block_key_map(shape: LlamaShape, start: int, end: int) -> KeyMap:
    """Block key -> source-network key for the block holding source layers [start, end)."""
    key_map = {key: key for key in SHARED_KEYS}
    for local, src in enumerate(range(start, end)):
        for name in layer_keys(shape):
            key_map[f"layers.{local}.{name}"] = f"layers.{src}.{name}"
    return key_map


def normalised_table(embed: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm: the shared target space (see the module docstring)."""
    embed = embed.detach().to(torch.float32)
    return embed / embed.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --- reading Hugging Face checkpoints -------------------------------------------------------


def read_hf_checkpoint(path: str | Path) -> tuple[Any, dict[str, torch.Tensor], str]:
    """(transformers LlamaConfig, state dict in float32, sha256) of a save_pretrained folder."""
    from transformers import LlamaConfig as HFLlamaConfig

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"model.checkpoint {folder} is not a folder; give a Hugging Face LlamaForCausalLM folder "
            "(config.json + model.safetensors, as save_pretrained writes)"
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no config.json; give the folder save_pretrained wrote")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{cfg_file} is not valid JSON; restore the checkpoint's config.json") from None
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise CheckpointError(
            f"checkpoint {folder} is a {raw.get('model_type')!r} model ({', '.join(archs) or 'no architectures'}), "
            "not a Llama; give a LlamaForCausalLM checkpoint"
        )
    hf_cfg = HFLlamaConfig.from_pretrained(str(folder))
    files = _weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_weights(file) if file.suffix == ".safetensors" else read_checkpoint(file)
        state.update({k: v.to(torch.float32) for k, v in part.items()})
    digest = file_sha256(files[0]) if len(files) == 1 else hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
    return hf_cfg, state, digest


def _weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise CheckpointError(f"{folder / index} is not a valid shard index; restore it") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {folder} is missing shard {missing[0]} named in {index}")
            return [folder / n for n in names]
    raise CheckpointError(f"checkpoint folder {folder} has no weights (model.safetensors); save it with save_pretrained")


def config_from_hf(cfg: "LlamaConfig", hf: Any) -> "LlamaConfig":
    """The recipe's model section with the architecture taken from the checkpoint's config."""
    fields = {
        "layers": hf.num_hidden_layers,
        "hidden": hf.hidden_size,
        "heads": hf.num_attention_heads,
        "kv_heads": hf.num_key_value_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        "intermediate": hf.intermediate_size,
        "vocab_size": hf.vocab_size,
        "max_positions": hf.max_position_embeddings,
        "rope_parameters": dict(hf.rope_parameters),
        "rope_theta": float(hf.rope_parameters.get("rope_theta", cfg.rope_theta)),
        "rms_norm_eps": hf.rms_norm_eps,
        "hidden_act": hf.hidden_act,
        "attention_bias": bool(hf.attention_bias),
        "mlp_bias": bool(getattr(hf, "mlp_bias", False)),
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }
    try:
        return LlamaConfig.model_validate({**cfg.model_dump(), **fields})
    except ValidationError as exc:
        raise RecipeError(f"checkpoint {cfg.checkpoint}: {_one_line(exc)}") from None


# --- the denoiser ---------------------------------------------------------------------------


class LlamaDenoiser(nn.Module):
    """Logits for the token under a noisy target embedding, and D(z, sigma) = softmax(logits) @ T."""

    def __init__(self, net: LlamaBlockNet, table: torch.Tensor, noise: nz.NoiseSettings) -> None:
        super().__init__()
        self.net = net
        self.noise = noise
        self.register_buffer("table", table.to(torch.float32), persistent=False)
        self.register_buffer("table_sq", table.to(torch.float32).pow(2).sum(-1), persistent=False)

    def likelihood(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log N(z; T_v, sigma^2 I) up to a constant in v, for every row v (float32)."""
        z = z.to(torch.float32)
        return (z @ self.table.T - 0.5 * self.table_sq) / sigma.to(torch.float32)[..., None] ** 2

    def forward(self, tokens: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Training forward: tokens (B, T), z (B, T, H), sigma (B, T) -> logits (B, T, V) at the noisy positions."""
        s = sigma[..., None]
        head = self.net.forward_train(tokens, nz.c_in(s, self.noise.sigma_data) * z, nz.c_noise(sigma))
        return head.to(torch.float32) + self.likelihood(z, sigma)

    def step(self, cache: KVCache | None, z: torch.Tensor, sigma: float, position: int) -> torch.Tensor:
        """D(z, sigma) of one new token at `position`, attending to the cached clean prefix; z (B, H)."""
        s = torch.full((z.shape[0], 1), sigma, dtype=torch.float32, device=z.device)
        head = self.net.noisy_step(cache, (nz.c_in(s, self.noise.sigma_data) * z)[:, None], nz.c_noise(s), position)
        logits = head.to(torch.float32) + self.likelihood(z, s[:, 0])
        return torch.softmax(logits, dim=-1) @ self.table

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the table row nearest to each z (Euclidean)."""
        return (z.to(torch.float32) @ self.table.T - 0.5 * self.table_sq).argmax(-1)


class CausalLM(nn.Module):
    """The e2e baseline: the unsplit network as an ordinary next-token model."""

    def __init__(self, net: LlamaBlockNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net.forward_causal(tokens)


@functools.lru_cache(maxsize=64)
def mean_loss_weight(lo: float, hi: float, noise: nz.NoiseSettings, points: int = 4096) -> float:
    """E[lambda(sigma)] for sigma from the log-normal restricted to [lo, hi] (midpoint rule in probability)."""
    f_lo, f_hi = noise.cdf(lo), noise.cdf(hi)
    u = f_lo + (f_hi - f_lo) * (torch.arange(points, dtype=torch.float64) + 0.5) / points
    sigma = torch.exp(noise.p_mean + noise.p_std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).clamp(lo, hi)
    return float(nz.loss_weight(sigma, noise.sigma_data).mean())


# --- the family -----------------------------------------------------------------------------


class LlamaFamily(Family):
    name = "llama"
    config_cls = LlamaConfig

    def __init__(self, shared: Path | None = None) -> None:
        self._shared = shared

    def bind(self, run: "Run") -> "LlamaFamily":
        """Training and sampling read the run's shared tokenizer and target table."""
        return LlamaFamily(run.shared_dir)

    def _shared_dir(self) -> Path:
        if self._shared is None:
            raise RunError("the Llama family needs its run (tokenizer and target table); open the run first")
        return self._shared

    # -- split -----------------------------------------------------------------------------

    def source(self, recipe: Recipe) -> Source:
        cfg: LlamaConfig = recipe.model  # type: ignore[assignment]
        if cfg.checkpoint is None:
            from transformers import LlamaForCausalLM

            shape = cfg.shape()
            torch.manual_seed(cfg.init_seed)
            hf_state = LlamaForCausalLM(shape.hf_config()).state_dict()
            return Source(self._convert(hf_state, shape, False, cfg.init_seed, noise=recipe.noise), shape.num_layers)
        hf_cfg, hf_state, digest = read_hf_checkpoint(cfg.checkpoint)
        cfg = config_from_hf(cfg, hf_cfg)
        recipe.model = cfg  # the manifest records the checkpoint's architecture, so blocks rebuild without it
        shape = cfg.shape()
        net = self._convert(hf_state, shape, cfg.tie_embeddings, cfg.init_seed, f"checkpoint {cfg.checkpoint}", recipe.noise)
        return Source(net, shape.num_layers, checkpoint_sha256=digest)

    def _convert(
        self, hf_state: dict[str, torch.Tensor], shape: LlamaShape, tied: bool, seed: int, what: str = "fresh Llama",
        noise: Any = None,
    ) -> LlamaBlockNet:
        """HF LlamaForCausalLM state -> the block network of all L layers, via the explicit key map.

        The new parts (noisy input, sigma embedder, zero modulation) come from a seeded init;
        `noisy_in` starts as a scaled identity that maps c_in * z of a clean (unit-norm) row,
        ~T_v / sigma_data, to the RMS of the source embedding rows.
        """
        ignored = lambda key: key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight")  # noqa: E731
        mapped = apply_key_map(hf_state, hf_key_map(shape, tied), ignored=ignored, what=what)
        torch.manual_seed(seed + 1)
        net = LlamaBlockNet(shape)
        fresh = net.state_dict()
        rms = mapped["embed_tokens.weight"].pow(2).mean(-1).sqrt().mean()
        sigma_data = 0.5 if noise is None else noise.sigma_data
        fresh["noisy_in.weight"] = torch.eye(shape.hidden_size) * rms * sigma_data * math.sqrt(shape.hidden_size)
        state = {**{k: v for k, v in fresh.items() if k in NEW_KEYS or k.endswith(MOD_KEYS)}, **mapped}
        load_strict(net, state, what)
        return net

    def block_network(self, recipe: Recipe, depth: int) -> nn.Module:
        cfg: LlamaConfig = recipe.model  # type: ignore[assignment]
        return LlamaBlockNet(cfg.shape(depth))

    def block_state(self, source: Source, start: int, end: int) -> dict[str, torch.Tensor]:
        shape = source.network.shape  # type: ignore[union-attr]
        keys = layer_keys(shape)
        return apply_key_map(
            source.network.state_dict(),
            block_key_map(shape, start, end),
            ignored=lambda key: key.startswith("layers.") and key.split(".", 2)[2] in keys,
            what=f"Llama block of layers [{start}, {end})",
        )

    def prepare_run(self, recipe: Recipe, run_dir: Path, source: Source) -> None:
        """Write the shared target table and the run's tokenizer into RUN/shared/."""
        cfg: LlamaConfig = recipe.model  # type: ignore[assignment]
        shared = run_dir / "shared"
        table = normalised_table(source.network.embed_tokens.weight)  # type: ignore[union-attr]
        save_weights(shared / TARGETS_FILE, {"table": table})
        if cfg.tokenizer:
            path = Path(cfg.tokenizer).expanduser()
            if not path.is_file():
                raise RecipeError(
                    f"model.tokenizer {cfg.tokenizer} not found; give a SentencePiece .model or tokenizers .json file "
                    "(e.g. Llama-2's tokenizer.model), or unset it to train a BPE on the data"
                )
            install(path, shared)
        elif cfg.checkpoint and (found := checkpoint_tokenizer(Path(cfg.checkpoint))):
            install(found, shared)
        else:
            train_bpe(read_documents(recipe.data, recipe.data.split), cfg.vocab_size, shared / "tokenizer.json")
        run_tokenizer(shared).check_vocab(cfg.vocab_size)

    # -- training --------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        return run_tokenizer(self._shared_dir())

    def table(self) -> torch.Tensor:
        return load_weights(self._shared_dir() / TARGETS_FILE)["table"]

    def denoiser(self, recipe: Recipe, network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        assert isinstance(network, LlamaBlockNet)
        table = self.table()
        if tuple(table.shape) != (network.shape.vocab_size, network.shape.hidden_size):
            raise RunError(f"the run's target table has shape {tuple(table.shape)}, not the model's; split again")
        return LlamaDenoiser(network, table, noise)

    def load_data(self, recipe: Recipe, split: str | None = None) -> TextData:
        cfg: LlamaConfig = recipe.model  # type: ignore[assignment]
        tok = self.tokenizer()
        tok.check_vocab(cfg.vocab_size)
        return load_text(recipe.data, tok, cfg.context, recipe.train.seed, split)

    def training_loss(
        self,
        denoiser: nn.Module,
        batch: Any,
        sigma_range: tuple[float, float],
        recipe: Recipe,
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch[0]
        b, t = tokens.shape
        n, keep = shard_slice(b, shard)  # draws for the global batch, this rank's slice kept
        noise: nz.NoiseSettings = denoiser.noise
        table: torch.Tensor = denoiser.table
        sigma = nz.sample_sigmas(n * t, *sigma_range, noise, generator).view(n, t)[keep].to(tokens.device)
        eps = torch.randn((n, t, table.shape[1]), generator=generator)[keep].to(tokens.device)
        z = table[tokens] + sigma[..., None] * eps
        logits = denoiser(tokens, z, sigma)
        ce = F.cross_entropy(logits.reshape(b * t, -1), tokens.reshape(-1), reduction="none").view(b, t)
        weight = nz.loss_weight(sigma, noise.sigma_data) / mean_loss_weight(*sigma_range, noise)
        loss = (weight * ce).mean()
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens).float().mean().item()
        return loss, {
            "ce": ce.mean().item(),
            "accuracy": acc,
            "sigma_min": sigma.min().item(),
            "sigma_max": sigma.max().item(),
            "log_sigma_mean": sigma.log().mean().item(),
        }

    def e2e_model(self, recipe: Recipe, network: nn.Module, noise: nz.NoiseSettings) -> nn.Module:
        assert isinstance(network, LlamaBlockNet)
        return CausalLM(network)

    def e2e_loss(
        self, model: nn.Module, batch: Any, recipe: Recipe, noise: nz.NoiseSettings, generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Ordinary causal next-token cross-entropy of the unsplit network (no randomness to shard)."""
        tokens = batch[0]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        return loss, {"ppl": math.exp(min(loss.item(), 50.0))}

    # -- sampling --------------------------------------------------------------------------

    def sample(self, run: "Run", request: "SampleRequest") -> "SampleResult":
        return sample_text(run, request)


# --- sampling -------------------------------------------------------------------------------


def read_prompts(request: "SampleRequest") -> list[str]:
    """--prompt, or one prompt per non-empty line of --prompt-file, or one empty prompt."""
    if request.prompt is not None and request.prompt_file is not None:
        raise DbconvertError("give --prompt or --prompt-file, not both")
    if request.prompt_file is not None:
        try:
            lines = Path(request.prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DbconvertError(f"cannot read --prompt-file {request.prompt_file} ({type(exc).__name__}); give a UTF-8 text file") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise DbconvertError(f"--prompt-file {request.prompt_file} has no prompts (one per line)")
        return prompts
    return [request.prompt or ""]


def sample_text(run: "Run", request: "SampleRequest") -> "SampleResult":
    """Generate a completion per prompt with the blocks (diffusion per token) or the e2e model (greedy)."""
    from dbconvert.checkpoint import atomic_write_text
    from dbconvert.devices import resolve_device
    from dbconvert.sampling import SampleResult, load_models

    cfg = run.recipe.sample
    model_cfg: LlamaConfig = run.recipe.model  # type: ignore[assignment]
    steps, solver = request.steps or cfg.steps, request.solver or cfg.solver
    seed = cfg.seed if request.seed is None else request.seed
    if request.guidance not in (None, 1.0):
        raise DbconvertError("guidance applies to class-conditional image models; language models take --guidance 1")
    prompts = read_prompts(request)
    tok = run_tokenizer(run.shared_dir)
    tok.check_vocab(model_cfg.vocab_size)
    encoded = [tok.encode(p) for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if len(ids) >= model_cfg.context:
            raise DbconvertError(
                f"prompt {prompt[:30]!r} has {len(ids)} tokens, not shorter than the context of {model_cfg.context}; shorten it"
            )
    if request.model == "e2e" and any(not ids for ids in encoded) and tok.eos_id is None:
        raise DbconvertError("the e2e model needs a non-empty prompt (this tokenizer has no EOS to start from)")
    device = resolve_device(run.recipe.train.device)
    models = load_models(run, request.model, request.weights or cfg.weights, device)
    noise = run.noise()
    owned = run.owned_ranges() if request.model == "blocks" else [(noise.sigma_min, noise.sigma_max)]
    ts = nz.edm_steps(steps, noise, cfg.rho)
    calls = [0] * len(models)
    records = []
    with torch.no_grad():
        for i, ids in enumerate(encoded * (request.num or 1)):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            if request.model == "e2e":
                new, why = _greedy(models[0].net, ids, tok.eos_id, request.max_new_tokens, model_cfg.context, device)
            else:
                new, why = _diffuse(models, owned, ts, solver, ids, tok.eos_id, request.max_new_tokens,
                                    model_cfg.context, gen, calls, device)
            prompt = prompts[i % len(prompts)]
            records.append({"prompt": prompt, "completion": tok.decode(ids + new)[len(tok.decode(ids)):],
                            "text": tok.decode(ids + new), "new_tokens": len(new), "stopped_by": why})
    tag = f"e2e-greedy-seed{seed}" if request.model == "e2e" else f"blocks-{solver}-{steps}steps-seed{seed}"
    out = Path(request.out) if request.out else run.root / "samples" / tag
    atomic_write_text(out / "samples.txt", "".join(r["text"] + "\n\n" for r in records))
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return SampleResult(out, [out / "samples.txt", out / "samples.jsonl"], text=[r["text"] for r in records], calls=calls)


def _start(ids: list[int], eos: int | None) -> list[int]:
    """An empty prompt starts after an EOS, i.e. at a document boundary as packed in training."""
    return list(ids) if ids or eos is None else [eos]


def _greedy(net: LlamaBlockNet, ids: list[int], eos: int | None, max_new: int, context: int,
            device: torch.device) -> tuple[list[int], str]:
    """Greedy next-token decoding of the e2e network with a KV cache."""
    seq = _start(ids, eos)
    cache, logits = net.extend(None, torch.tensor([seq], device=device), 0)
    new: list[int] = []
    while True:
        if len(new) >= max_new:
            return new, "max_new_tokens"
        if len(seq) >= context:
            return new, "context"
        token = int(logits[0].argmax())
        if token == eos:
            return new, "eos"
        new.append(token)
        cache, logits = net.extend(cache, torch.tensor([[token]], device=device), len(seq))
        seq.append(token)


def _diffuse(models: list[nn.Module], owned: list[tuple[float, float]], ts: list[float], solver: str,
             ids: list[int], eos: int | None, max_new: int, context: int, gen: torch.Generator,
             calls: list[int], device: torch.device) -> tuple[list[int], str]:
    """Each new token: M EDM steps, each by the block owning sigma, over its own KV cache of the clean prefix."""
    from dbconvert.sampling import edm_sample

    seq = _start(ids, eos)
    caches: list[KVCache | None] = [None] * len(models)
    cached = [0] * len(models)
    new: list[int] = []

    def denoise(b: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
        calls[b] += 1
        if cached[b] < len(seq):  # bring this block's cache up to the current prefix (lazily)
            pending = torch.tensor([seq[cached[b]:]], device=device)
            caches[b], _ = models[b].net.extend(caches[b], pending, cached[b])
            cached[b] = len(seq)
        return models[b].step(caches[b], z, sigma, len(seq))

    hidden = models[0].table.shape[1]
    while True:
        if len(new) >= max_new:
            return new, "max_new_tokens"
        if len(seq) >= context:
            return new, "context"
        z = (ts[0] * torch.randn((1, hidden), generator=gen, dtype=torch.float64)).to(torch.float32).to(device)
        z = edm_sample(denoise, owned, ts, z, solver)
        token = int(models[0].nearest(z)[0])
        if token == eos:
            return new, "eos"
        new.append(token)
        seq.append(token)
