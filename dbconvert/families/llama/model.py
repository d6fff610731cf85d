"""The Llama block network: HF Llama layers (same names, same maths) plus zero-initialised sigma modulation.

One network class serves the source model (all L layers), every block (a slice of them) and
the e2e baseline. Parameter names below `layers.{k}.` are exactly those of Hugging Face's
`LlamaDecoderLayer`, so conversion is a prefix rename (see `llama.py`).

Sigma conditioning (DESIGN 5): `sigma_embed` turns c_noise into a vector; every layer's
`adaLN_modulation.1` maps it to (shift, scale, gate) for the attention and the MLP input,

    h = RMSNorm(x) * (1 + scale) + shift,   x <- x + (1 + gate) * sublayer(h),

zero-initialised, so a freshly split layer computes exactly what the source layer did.
Clean (context) positions get no modulation at all, which makes their keys and values
independent of sigma: a block can cache them once per token and reuse them at every
diffusion step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer: (keys, values) of the clean prefix, shape (batch, kv_heads, length, head_dim), rotary applied."""


@dataclass(frozen=True)
class LlamaShape:
    """Everything needed to build the network; mirrors the fields of a HF LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    sigma_features: int = 256
    head: str = "trainable"
    """trainable: an lm_head Linear; tied-table: the run's target table times a learned scale."""
    noisy_anchor: bool = False
    """noisy_in gets a bias (a fixed 'query' vector every noisy position shares) and a 10x smaller weight."""
    adaln_rank: int | None = None
    """None: adaLN_modulation = SiLU, Linear(H, 6H); r: SiLU, Linear(H, r, no bias), Linear(r, 6H)."""
    target_dim: int | None = None
    """Width of the target table (the diffusion variable); None = hidden_size."""
    head_rank: int | None = None
    """head=trainable only: None = lm_head Linear(H, V); r = Sequential(Linear(H, r), Linear(r, V)), no biases."""

    @property
    def target_size(self) -> int:
        return self.target_dim or self.hidden_size

    @property
    def projected_targets(self) -> bool:
        """True when the target space is narrower than the hidden state (model.target_dim < hidden)."""
        return self.target_size != self.hidden_size

    def with_depth(self, depth: int) -> "LlamaShape":
        from dataclasses import replace

        return replace(self, num_layers=depth)

    def hf_config(self):  # noqa: ANN201 - transformers.LlamaConfig
        """The equivalent transformers config (used for rotary embeddings and fresh source models)."""
        from transformers import LlamaConfig as HFLlamaConfig

        return HFLlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            rope_parameters=dict(self.rope_parameters),
            tie_word_embeddings=False,
        )


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 exactly as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=s.attention_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.attention_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.attention_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, S, H); mask (S, P+S) boolean, True = may attend; past = cached clean keys/values."""
        b, n, _ = x.shape
        s = self.s
        q = self.q_proj(x).view(b, n, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rope)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        rep = s.num_heads // s.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), new_kv


class MLP(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=s.mlp_bias)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=s.mlp_bias)
        self.act_fn = ACT2FN[s.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """HF LlamaDecoderLayer + `adaLN_modulation` (SiLU, Linear to 6 * hidden), zero-initialised."""

    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        if s.adaln_rank is None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(s.hidden_size, 6 * s.hidden_size))
        else:
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(),
                nn.Linear(s.hidden_size, s.adaln_rank, bias=False),
                nn.Linear(s.adaln_rank, 6 * s.hidden_size),
            )
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # zero modulation: the layer computes what the source did
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cond: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """cond (B, N, H): the sigma embedding of the LAST N positions of x (the noisy ones), or None. A leading 1
        instead of B broadcasts one sigma's modulation over the batch (decoding: one sigma per step).

        The other positions (clean context) get no modulation at all, not even the Linear's bias:
        their keys and values must not depend on sigma, or the sampler's clean-prefix cache would
        compute a different function from the training forward (DESIGN 5).
        """
        if cond is None:
            h, kv = self.self_attn(self.input_layernorm(x), rope, mask, past)
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x)), kv
        mod = self.adaLN_modulation(cond)
        clean = x.shape[1] - cond.shape[1]
        if clean:
            mod = torch.cat([mod.new_zeros(mod.shape[0], clean, mod.shape[2]), mod], dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h, kv = self.self_attn(self.input_layernorm(x) * (1 + scale1) + shift1, rope, mask, past)
        x = x + (1 + gate1) * h
        h = self.mlp(self.post_attention_layernorm(x) * (1 + scale2) + shift2)
        return x + (1 + gate2) * h, kv


class SigmaEmbedder(nn.Module):
    """c_noise -> vector: sinusoidal features of 1000 * c_noise (as DiT's timestep embedder), then an MLP."""

    def __init__(self, hidden: int, features: int) -> None:
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
        args = (1000.0 * c_noise.to(torch.float32))[..., None] * freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def block_diffusion_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """The (2T, 2T) training mask over [clean 0..T-1 ; noisy 0..T-1]; True = may attend.

    Clean i sees clean j <= i. Noisy i (the noisy embedding of token i) sees clean j < i and
    itself, nothing else: block diffusion with block size 1.
    """
    idx = torch.arange(length, device=device)
    causal = idx[None, :] <= idx[:, None]
    strict = idx[None, :] < idx[:, None]
    eye = torch.eye(length, dtype=torch.bool, device=device)
    top = torch.cat([causal, torch.zeros_like(causal)], dim=1)
    bottom = torch.cat([strict, eye], dim=1)
    return torch.cat([top, bottom], dim=0)


class LlamaBlockNet(nn.Module):
    """Embedding, `num_layers` decoder layers, final norm and head, plus the noisy-input path.

    `noisy_in` maps the preconditioned noisy target embedding c_in * z into the residual stream;
    `sigma_embed` + each layer's modulation carry sigma. Both are new (not in the source).
    """

    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.shape = shape
        s = shape
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.noisy_in = nn.Linear(s.target_size, s.hidden_size, bias=s.noisy_anchor)
        self.sigma_embed = SigmaEmbedder(s.hidden_size, s.sigma_features)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.register_buffer("table", None, persistent=False)  # the run's target table, attached by the family
        if s.head == "tied-table" and s.projected_targets:
            self.head_proj = nn.Linear(s.hidden_size, s.target_size, bias=False)
        elif s.head == "tied-table":
            self.head_scale = nn.Parameter(torch.ones(()))
        elif s.head_rank is not None:
            self.lm_head = nn.Sequential(
                nn.Linear(s.hidden_size, s.head_rank, bias=False), nn.Linear(s.head_rank, s.vocab_size, bias=False)
            )
        else:
            self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(s.hf_config())  # HF's own rotary: rope_theta and scaling as in the source
        # A temperature on the head's logits (not the likelihood term) while a converted block's calibrated start is
        # undone during training (`calibrate.py`); 1 otherwise, always at inference. A buffer, changed in place, so a
        # compiled forward is not recompiled as it changes; not persistent, so never saved. The head has no bias, so
        # scaling its input scales its logits.
        self.register_buffer("head_gain", torch.ones(()), persistent=False)

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(like, positions)

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cond: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run every layer; returns the final hidden states (before the norm) and each layer's new keys/values."""
        rope = self.rope(positions, x)
        new: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, rope, mask, cond, None if cache is None else cache[i])
            new.append(kv)
        return x, new

    def attach_table(self, table: torch.Tensor) -> None:
        """Hold the run's frozen target table (one buffer, not saved with the weights): the denoiser's target
        space, and the head itself when head=tied-table."""
        self.table = table

    def table_query(self, hn: torch.Tensor) -> torch.Tensor:
        """head=tied-table: the vector whose products with the table rows are the head logits (in target space)."""
        if self.shape.projected_targets:
            return self.head_proj(self.head_gain * hn)
        return (self.head_gain * self.head_scale) * hn

    def head(self, hn: torch.Tensor) -> torch.Tensor:
        """Head logits of normed final hidden states."""
        if self.shape.head == "tied-table":
            if self.table is None:
                raise RuntimeError("head=tied-table needs the run's target table: call attach_table first")
            return self.table_query(hn) @ self.table.to(hn.dtype).T  # type: ignore[union-attr]
        return self.lm_head(self.head_gain * hn)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    # -- training --------------------------------------------------------------------------

    def hidden_train(self, tokens: torch.Tensor, noisy: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """One forward over [clean tokens ; noisy inputs]; returns the normed final hidden states at the noisy
        positions.

        tokens (B, T); noisy (B, T, target width) = c_in * z; c_noise (B, T). Noisy j shares token j's rotary position.
        """
        b, t = tokens.shape
        x = torch.cat([self.embed_tokens(tokens), self.noisy_in(noisy)], dim=1)
        cond = self.sigma_embed(c_noise)  # the noisy half only: clean positions are not modulated
        pos = torch.arange(t, device=tokens.device)
        positions = torch.cat([pos, pos])[None].expand(b, -1)
        h, _ = self.run_layers(x, positions, block_diffusion_mask(t, tokens.device), cond)
        return self.norm(h[:, t:])

    def forward_causal(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain causal language modelling on clean tokens (the e2e baseline): logits (B, T, V)."""
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device)[None].expand(b, -1)
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        h, _ = self.run_layers(self.embed_tokens(tokens), positions, mask)
        return self.logits(h)

    def hidden_masked(self, tokens: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """Masked diffusion (model.objective=masked): normed final hidden states (B, T, H) of tokens (B, T), some of
        them [MASK], under BIDIRECTIONAL attention, every position modulated by the masking time's embedding.

        c_noise (B,): one level per sequence. With the zero-initialised modulation of a converted checkpoint
        each layer computes what the source layer computes, with its causal mask replaced by full attention.
        """
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device)[None].expand(b, -1)
        cond = self.sigma_embed(c_noise)[:, None].expand(-1, t, -1)
        h, _ = self.run_layers(self.embed_tokens(tokens), positions, None, cond)
        return self.norm(h)

    # -- incremental decoding --------------------------------------------------------------

    def extend(
        self, cache: KVCache | None, tokens: torch.Tensor, start: int, pad: torch.Tensor | None = None
    ) -> tuple[KVCache, torch.Tensor]:
        """Append clean tokens (B, m) at columns start.. to the cache; returns (cache, logits of the last one).

        `pad` (B,): left-padding columns of each row (prompts of different lengths in one batch).
        Row r's token at column c has rotary position c - pad[r] and never attends to its pad columns.
        """
        b, m = tokens.shape
        columns = torch.arange(start, start + m, device=tokens.device)
        positions, mask = decode_geometry(columns, start + m, pad, b)
        h, new = self.run_layers(self.embed_tokens(tokens), positions, mask, cache=cache)
        return append_to_cache(cache, new), self.logits(h[:, -1])

    def noisy_hidden(
        self,
        cache: KVCache | None,
        noisy: torch.Tensor,
        c_noise: torch.Tensor,
        position: int,
        pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normed final hidden state (B, H) of one noisy query (B, 1, target width) at column `position`, attending
        to the cached clean prefix and itself."""
        b = noisy.shape[0]
        columns = torch.tensor([position], device=noisy.device)
        positions, mask = decode_geometry(columns, position + 1, pad, b)
        if pad is None:
            mask = None  # the query sees every cached column and itself
        h, _ = self.run_layers(self.noisy_in(noisy), positions, mask, self.sigma_embed(c_noise), cache)
        return self.norm(h[:, -1])

    def extend_and_query(
        self,
        cache: KVCache | None,
        clean: torch.Tensor,
        noisy: torch.Tensor,
        c_noise: torch.Tensor,
        pad: torch.Tensor | None = None,
    ) -> tuple[KVCache, torch.Tensor]:
        """`extend` by the clean tokens (B, m) and `noisy_hidden` of the next column, in ONE forward.

        The m clean tokens take the columns after the cache, the noisy query (B, 1, target width) the one after
        them; the clean ones attend causally (and are not modulated), the query sees them all and itself: the
        same function as `extend` then `noisy_hidden` (the rows of a matmul do not see each other), but the
        layers' weights are read once. Block Diffusion feeds the last clean block with the next noisy one
        the same way. Returns (the cache with the clean tokens appended, the query's normed hidden state).
        """
        b, m = clean.shape
        start = 0 if cache is None else cache[0][0].shape[2]
        columns = torch.arange(start, start + m + 1, device=clean.device)
        positions, mask = decode_geometry(columns, start + m + 1, pad, b)
        x = torch.cat([self.embed_tokens(clean), self.noisy_in(noisy)], dim=1)
        h, new = self.run_layers(x, positions, mask, self.sigma_embed(c_noise), cache)
        clean_kv = [(k[:, :, :m], v[:, :, :m]) for k, v in new]  # the noisy query's keys are never cached
        return append_to_cache(cache, clean_kv), self.norm(h[:, -1])


def append_to_cache(cache: KVCache | None, new: KVCache) -> KVCache:
    """Each layer's cached keys and values followed by the new ones (along the sequence)."""
    if cache is None:
        return new
    return [(torch.cat([pk, nk], 2), torch.cat([pv, nv], 2)) for (pk, pv), (nk, nv) in zip(cache, new)]


def decode_geometry(
    columns: torch.Tensor, keys: int, pad: torch.Tensor | None, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions (B, m) and the attention mask of queries at `columns` over `keys` cached columns.

    Without padding the mask is (m, keys), causal. With `pad` it is (B, 1, m, keys): causal, no pad
    columns, and every query may see itself, so a pad query has one key and stays finite.
    """
    device = columns.device
    keycols = torch.arange(keys, device=device)
    causal = keycols[None, :] <= columns[:, None]
    if pad is None:
        return columns[None].expand(batch, -1), causal
    pad = pad.to(device)
    positions = (columns[None, :] - pad[:, None]).clamp_min(0)
    visible = causal[None] & (keycols[None, None, :] >= pad[:, None, None])
    visible = visible | (keycols[None, None, :] == columns[None, :, None])
    return positions, visible[:, None]
