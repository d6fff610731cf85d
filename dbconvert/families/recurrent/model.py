"""The recurrent-depth network (Huginn's layout and names) and its diffusion-block forward.

Huginn (Geiping et al. 2025, the `raven_modeling_minimal.py` of tomg-group-umd/huginn-0125), written here from its
formulas:

    e   = P(wte(x) * embed_scale)                               prelude, `prelude_layers` sandwich blocks
    s_0 ~ TruncNormal(0, init_std^2, +-3 init_std) * embed_scale  the initial state
    s_i = R(adapter(concat(s_{i-1}, e)))                        the core block, r times (shared weights)
    y   = head(ln_f(C(ln_f(s_r))))                              coda, final norm (used twice), tied head

A sandwich block is x <- norm_2(x + attn(norm_1(x))), x <- norm_4(x + mlp(norm_3(x))); attention has one fused
Wqkv (no bias), a learned qk_bias added to q and k before the (interleaved-pair, "complex-like") rotary embedding,
and proj; the MLP is gated SiLU with one fused `fc` (gate, up) and `proj`.

The diffusion-block forward (DESIGN 5's text objective, as the Llama family has it; docs/families/recurrent.md):
the core's state is the noisy target. Every column i of a row carries the prelude output of the clean context
before it, e_{i-1} (e_{-1} = 0), as its conditioning; a clean column's state is its own (clean) target embedding
T[x_i] * c_in(0), a noisy column's is c_in(sigma) * z, both through `noisy_in`. The core and the coda run over
[clean columns ; noisy columns] with the block-diffusion mask (noisy i sees clean j < i and itself), the noisy
columns modulated by sigma through zero-initialised adaLN (clean columns never), so clean keys and values are
cached once per token. One forward = one application of core + coda + head: one denoising step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dbconvert.families.llama.model import (
    RMSNorm,
    SigmaEmbedder,
    append_to_cache,
    block_diffusion_mask,
    decode_geometry,
)

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class RecurrentShape:
    """Everything needed to build the network (the recipe's sizes, or a Huginn checkpoint's)."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    prelude_layers: int
    core_layers: int
    coda_layers: int
    max_positions: int
    rope_theta: float = 50000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    tie_embeddings: bool = True
    embed_scale: float = 1.0
    init_std: float = 0.02
    mean_recurrence: int = 32
    backprop_depth: int = 8
    sigma_features: int = 256
    target_dim: int | None = None
    noisy_anchor: bool = False
    head: str = "trainable"
    """Always `trainable` (the wte-tied or own lm_head): what the Llama denoiser asks of a network."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def target_size(self) -> int:
        return self.target_dim or self.hidden_size

    @property
    def num_layers(self) -> int:
        """Distinct layers (prelude + core + coda); the unrolled depth is prelude + r * core + coda."""
        return self.prelude_layers + self.core_layers + self.coda_layers

    @property
    def state_std(self) -> float:
        """Std of Huginn's initial state: init_std * embed_scale (before truncation at 3 std)."""
        return self.init_std * self.embed_scale


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Huginn's rotary embedding: coordinates (2i, 2i+1) form a complex number rotated by position * freq_i.

    x (B, S, heads, head_dim); cos, sin (B, S, head_dim / 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    c, s = cos[:, :, None], sin[:, :, None]
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * c - im * s, im * c + re * s], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Fused Wqkv, learned qk bias, pairwise rotary, scaled dot product, proj (Huginn's CausalSelfAttention)."""

    def __init__(self, s: RecurrentShape) -> None:
        super().__init__()
        self.s = s
        self.Wqkv = nn.Linear(s.hidden_size, 3 * s.hidden_size, bias=False)
        if s.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, s.num_heads, s.head_dim))
        self.proj = nn.Linear(s.hidden_size, s.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, past: KV | None
    ) -> tuple[torch.Tensor, KV]:
        """x (B, S, H); mask True = may attend (None: causal over x alone); past = cached keys/values."""
        b, n, _ = x.shape
        s = self.s
        q, k, v = (t.view(b, n, s.num_heads, s.head_dim) for t in self.Wqkv(x).chunk(3, dim=-1))
        if s.qk_bias:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = rotate_pairs(q, *rope), rotate_pairs(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        new = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if mask is None and past is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1)), new


class GatedMLP(nn.Module):
    """proj(silu(a) * b), (a, b) = fc(x) split in two (Huginn's GatedMLP)."""

    def __init__(self, s: RecurrentShape) -> None:
        super().__init__()
        self.fc = nn.Linear(s.hidden_size, 2 * s.intermediate_size, bias=False)
        self.proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class SandwichBlock(nn.Module):
    """Huginn's sandwich layer; `modulated` (core and coda) adds zero-initialised sigma modulation:

        x <- norm_2(x + (1 + g1) * attn(norm_1(x) * (1 + a1) + b1)),  x <- norm_4(x + (1 + g2) * mlp(...)),

    which at zero is exactly the source layer (the prelude reads clean tokens only and has none)."""

    def __init__(self, s: RecurrentShape, modulated: bool) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(s.hidden_size, s.norm_eps)
        self.attn = Attention(s)
        self.norm_2 = RMSNorm(s.hidden_size, s.norm_eps)
        self.mlp = GatedMLP(s)
        self.norm_3 = RMSNorm(s.hidden_size, s.norm_eps)
        self.norm_4 = RMSNorm(s.hidden_size, s.norm_eps)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(s.hidden_size, 6 * s.hidden_size))
            nn.init.zeros_(self.adaLN_modulation[1].weight)
            nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cond: torch.Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """cond (B or 1, N, H): the sigma embedding of the LAST N columns of x; the others get no modulation."""
        if cond is None:
            h, kv = self.attn(self.norm_1(x), rope, mask, past)
            x = self.norm_2(x + h)
            return self.norm_4(x + self.mlp(self.norm_3(x))), kv
        mod = self.adaLN_modulation(cond)
        clean = x.shape[1] - cond.shape[1]
        if clean:
            mod = torch.cat(
                [
                    mod.new_zeros(mod.shape[0], clean, mod.shape[2]).expand(x.shape[0], -1, -1),
                    mod.expand(x.shape[0], -1, -1),
                ],
                dim=1,
            )
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h, kv = self.attn(self.norm_1(x) * (1 + scale1) + shift1, rope, mask, past)
        x = self.norm_2(x + (1 + gate1) * h)
        h = self.mlp(self.norm_3(x) * (1 + scale2) + shift2)
        return self.norm_4(x + (1 + gate2) * h), kv


@dataclass
class BlockCache:
    """A denoiser's cache of the clean prefix: keys/values of every prelude, core and coda layer at the clean
    columns, and the prelude output of the last cached column (the conditioning of the next one)."""

    kv: list[KV]
    last_e: torch.Tensor

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2]


@dataclass
class RecurrentCache:
    """Huginn decoding's cache: keys/values of the prelude layers, of every core layer at every recurrence
    (recurrence i, core layer l), and of the coda layers, at the columns decoded so far."""

    prelude: list[KV]
    core: list[list[KV]] = field(default_factory=list)
    coda: list[KV] = field(default_factory=list)


class RecurrentNet(nn.Module):
    """Huginn's modules under Huginn's key names (`transformer.*`, `lm_head`), plus the diffusion path:
    `noisy_in` (target -> hidden), `sigma_embed` and each core / coda layer's `adaLN_modulation`."""

    def __init__(self, shape: RecurrentShape) -> None:
        super().__init__()
        self.shape = s = shape
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(s.vocab_size, s.hidden_size),
                prelude=nn.ModuleList(SandwichBlock(s, False) for _ in range(s.prelude_layers)),
                adapter=nn.Linear(2 * s.hidden_size, s.hidden_size, bias=False),
                core_block=nn.ModuleList(SandwichBlock(s, True) for _ in range(s.core_layers)),
                coda=nn.ModuleList(SandwichBlock(s, True) for _ in range(s.coda_layers)),
                ln_f=RMSNorm(s.hidden_size, s.norm_eps),
            )
        )
        if not s.tie_embeddings:
            self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        self.noisy_in = nn.Linear(s.target_size, s.hidden_size, bias=s.noisy_anchor)
        self.sigma_embed = SigmaEmbedder(s.hidden_size, s.sigma_features)
        half = torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim
        self.register_buffer("inv_freq", 1.0 / (s.rope_theta**half), persistent=False)
        self.register_buffer("table", None, persistent=False)  # the run's target table (the denoiser attaches it)
        self.clean_gain = 2.0
        """c_in(0) = 1 / sigma_data: the gain of a clean column's target embedding (the denoiser sets it)."""

    # -- pieces ------------------------------------------------------------------------------

    def layers(self) -> list[nn.Module]:
        t = self.transformer
        return [*t.prelude, *t.core_block, *t.coda]  # type: ignore[misc]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return angles.cos(), angles.sin()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(tokens) * self.shape.embed_scale

    def head(self, hn: torch.Tensor) -> torch.Tensor:
        """Logits of normed hidden states: the tied embedding (Huginn's default) or the own lm_head."""
        if self.shape.tie_embeddings:
            return hn @ self.transformer.wte.weight.T.to(hn.dtype)
        return self.lm_head(hn)

    def stack(
        self,
        layers: nn.ModuleList,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cond: torch.Tensor | None = None,
        past: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        new = []
        for i, layer in enumerate(layers):
            x, kv = layer(x, rope, mask, cond, None if past is None else past[i])
            new.append(kv)
        return x, new

    def adapt(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.transformer.adapter(torch.cat([state, e.to(state.dtype)], dim=-1))

    def read_out(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cond: torch.Tensor | None = None,
        past: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """ln_f, the coda, ln_f again (Huginn normalises the last state before the coda and after it)."""
        x, kv = self.stack(self.transformer.coda, self.transformer.ln_f(h), rope, mask, cond, past)
        return self.transformer.ln_f(x), kv

    # -- Huginn: the recurrent forward ---------------------------------------------------------

    def initial_state(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Huginn's s_0: a normal of std init_std truncated at +-3 std (by inverse CDF), times embed_scale."""
        lo = 0.5 * (1 + math.erf(-3 / math.sqrt(2)))
        u = lo + (1 - 2 * lo) * torch.rand(shape, generator=generator, dtype=torch.float64)
        x = torch.special.ndtri(u) * self.shape.init_std * self.shape.embed_scale
        return x.to(torch.float32).to(device)

    def recurrent_logits(
        self, tokens: torch.Tensor, state: torch.Tensor, no_grad_steps: int, grad_steps: int
    ) -> torch.Tensor:
        """Huginn's causal LM forward: logits (B, T, V) after no_grad_steps core applications without gradient
        and grad_steps with it, from `state` (B, T, H) (truncated backpropagation through the recurrence)."""
        b, t = tokens.shape
        rope = self.rope(torch.arange(t, device=tokens.device)[None].expand(b, -1))
        e, _ = self.stack(self.transformer.prelude, self.embed(tokens), rope, None)
        x = state.to(e.dtype)
        with torch.no_grad():
            for _ in range(no_grad_steps):
                x, _ = self.stack(self.transformer.core_block, self.adapt(x, e), rope, None)
        for _ in range(grad_steps):
            x, _ = self.stack(self.transformer.core_block, self.adapt(x, e), rope, None)
        return self.head(self.read_out(x, rope, None)[0])

    def recurrent_extend(
        self,
        cache: RecurrentCache | None,
        tokens: torch.Tensor,
        start: int,
        steps: int,
        state: torch.Tensor,
        pad: torch.Tensor | None = None,
    ) -> tuple[RecurrentCache, torch.Tensor]:
        """Huginn decoding: append tokens (B, m) at columns start.. with `steps` recurrences (each its own
        cache, as Huginn's cache keeps one per recurrence), from `state` (B, m, H); logits of the last one."""
        b, m = tokens.shape
        columns = torch.arange(start, start + m, device=tokens.device)
        positions, mask = decode_geometry(columns, start + m, pad, b)
        rope = self.rope(positions)
        e, kv = self.stack(
            self.transformer.prelude, self.embed(tokens), rope, mask, past=None if cache is None else cache.prelude
        )
        new = RecurrentCache(append_to_cache(None if cache is None else cache.prelude, kv))
        x = state.to(e.dtype)
        for i in range(steps):
            past = None if cache is None else cache.core[i]
            x, kv = self.stack(self.transformer.core_block, self.adapt(x, e), rope, mask, past=past)
            new.core.append(append_to_cache(past, kv))
        h, kv = self.read_out(x, rope, mask, past=None if cache is None else cache.coda)
        new.coda = append_to_cache(None if cache is None else cache.coda, kv)
        return new, self.head(h[:, -1])

    # -- DiffusionBlocks: one core + coda application on the noisy target ---------------------

    def attach_table(self, table: torch.Tensor) -> None:
        """Hold the run's frozen target table (a clean column's state is its target row)."""
        self.table = table

    def clean_state(self, tokens: torch.Tensor) -> torch.Tensor:
        """The state of clean columns: their own target embeddings at sigma = 0, c_in(0) * T[x]."""
        if self.table is None:
            raise RuntimeError("the diffusion forward needs the run's target table: call attach_table first")
        return self.noisy_in(self.clean_gain * self.table[tokens].to(self.noisy_in.weight.dtype))

    def context(
        self,
        tokens: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: BlockCache | None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Prelude outputs of clean tokens (B, m, H) and their keys/values (over the cached prefix)."""
        return self.stack(
            self.transformer.prelude,
            self.embed(tokens),
            rope,
            mask,
            past=None if cache is None else cache.kv[: self.shape.prelude_layers],
        )

    def denoise_layers(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cond: torch.Tensor,
        cache: BlockCache | None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Core once, ln_f, coda, ln_f over core inputs x; the last cond.shape[1] columns are noisy."""
        p, c = self.shape.prelude_layers, self.shape.core_layers
        past = None if cache is None else cache.kv
        core_past = None if past is None else past[p : p + c]
        x, core_kv = self.stack(self.transformer.core_block, x, rope, mask, cond, core_past)
        h, coda_kv = self.read_out(x, rope, mask, cond, None if past is None else past[p + c :])
        return h, core_kv + coda_kv

    def hidden_train(self, tokens: torch.Tensor, noisy: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """Normed final hidden states at the noisy columns (B, T, H): tokens (B, T), noisy = c_in * z (B, T, target),
        c_noise (B, T). The training forward of DESIGN 5 over [clean ; noisy], one denoising step."""
        b, t = tokens.shape
        pos = torch.arange(t, device=tokens.device)
        e, _ = self.context(tokens, self.rope(pos[None].expand(b, -1)), None, None)
        e_prev = torch.cat([e.new_zeros(b, 1, e.shape[2]), e[:, :-1]], dim=1)
        x = torch.cat([self.adapt(self.clean_state(tokens), e_prev), self.adapt(self.noisy_in(noisy), e_prev)], dim=1)
        rope = self.rope(torch.cat([pos, pos])[None].expand(b, -1))
        h, _ = self.denoise_layers(x, rope, block_diffusion_mask(t, tokens.device), self.sigma_embed(c_noise), None)
        return h[:, t:]

    def extend(
        self, cache: BlockCache | None, tokens: torch.Tensor, start: int, pad: torch.Tensor | None = None
    ) -> tuple[BlockCache, None]:
        """Append clean tokens (B, m) at columns start.. to a denoiser's cache (the unfused path of decoding)."""
        b, m = tokens.shape
        columns = torch.arange(start, start + m, device=tokens.device)
        positions, mask = decode_geometry(columns, start + m, pad, b)
        rope = self.rope(positions)
        e, pre_kv = self.context(tokens, rope, mask, cache)
        e_prev = self.previous_context(cache, e, b, start, pad)
        x = self.adapt(self.clean_state(tokens), e_prev[:, :m])
        p = self.shape.prelude_layers
        past = None if cache is None else cache.kv
        x, core_kv = self.stack(self.transformer.core_block, x, rope, mask, None, None if past is None else past[p:])
        _, coda_kv = self.read_out(x, rope, mask, None, None if past is None else past[p + self.shape.core_layers :])
        kv = append_to_cache(None if cache is None else cache.kv, pre_kv + core_kv + coda_kv)
        return BlockCache(kv, e[:, -1]), None

    @staticmethod
    def previous_context(
        cache: BlockCache | None, e: torch.Tensor, batch: int, start: int, pad: torch.Tensor | None
    ) -> torch.Tensor:
        """e_{i-1} for the columns start.. of e and the one after them (B, m + 1, H): the cache's last, then e;
        zero where column i - 1 is left padding (a row's first token has no context, as in training)."""
        first = e.new_zeros(batch, 1, e.shape[2]) if cache is None else cache.last_e[:, None].to(e.dtype)
        out = torch.cat([first, e], dim=1)
        if pad is not None:
            columns = torch.arange(start, start + out.shape[1], device=e.device)
            out = out * (columns[None, :] > pad.to(e.device)[:, None])[..., None].to(out.dtype)
        return out

    def noisy_hidden(
        self,
        cache: BlockCache | None,
        noisy: torch.Tensor,
        c_noise: torch.Tensor,
        position: int,
        pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normed final hidden state (B, H) of one noisy query (B, 1, target) at column `position`, conditioned on
        the cache's last prelude output and attending to the cached clean prefix and itself."""
        b = noisy.shape[0]
        columns = torch.tensor([position], device=noisy.device)
        positions, mask = decode_geometry(columns, position + 1, pad, b)
        if pad is None:  # every cached column and itself
            mask = torch.ones(1, (0 if cache is None else cache.length) + 1, dtype=torch.bool, device=noisy.device)
        e_prev = noisy.new_zeros(b, 1, self.shape.hidden_size) if cache is None else cache.last_e[:, None]
        if pad is not None:  # the previous column is padding: no context
            e_prev = e_prev * (position > pad.to(noisy.device))[:, None, None].to(e_prev.dtype)
        x = self.adapt(self.noisy_in(noisy), e_prev)
        h, _ = self.denoise_layers(x, self.rope(positions), mask, self.sigma_embed(c_noise), cache)
        return h[:, -1]

    def extend_and_query(
        self,
        cache: BlockCache | None,
        clean: torch.Tensor,
        noisy: torch.Tensor,
        c_noise: torch.Tensor,
        pad: torch.Tensor | None = None,
    ) -> tuple[BlockCache, torch.Tensor]:
        """`extend` by the clean tokens (B, m) and `noisy_hidden` of the next column in ONE forward (the same
        function; the layers' weights are read once per token, as Llama's)."""
        b, m = clean.shape
        start = 0 if cache is None else cache.length
        columns = torch.arange(start, start + m + 1, device=clean.device)
        positions, mask = decode_geometry(columns, start + m + 1, pad, b)
        rope_all = self.rope(positions)
        rope_clean = (rope_all[0][:, :m], rope_all[1][:, :m])
        pre_mask = mask[..., :m, : start + m]
        e, pre_kv = self.context(clean, rope_clean, pre_mask, cache)
        e_prev = self.previous_context(cache, e, b, start, pad)  # (B, m + 1, H): columns start .. start + m
        x = torch.cat(
            [self.adapt(self.clean_state(clean), e_prev[:, :m]), self.adapt(self.noisy_in(noisy), e_prev[:, m:])], dim=1
        )
        h, kv = self.denoise_layers(x, rope_all, mask, self.sigma_embed(c_noise), cache)
        clean_kv = [(k[:, :, :m], v[:, :, :m]) for k, v in kv]  # the noisy query's keys are never cached
        new = append_to_cache(None if cache is None else cache.kv, pre_kv + clean_kv)
        return BlockCache(new, e[:, -1]), h[:, -1]
