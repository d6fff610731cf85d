"""Masked diffusion (MD4-style) on the Llama stack: model.objective=masked with noise.process=masking.

DESIGN 5 "Masked diffusion", written as functions:

- Network (`MaskedDenoiser`): the block's Llama layers with bidirectional attention over the whole
  sequence, every position modulated by the masking time t through the same zero-initialised adaLN
  path as the continuous objective (the sigma embedder is fed c_noise = t, so it sees 1000 t: DiT's
  timestep range). Input: the tokens with [MASK] at the masked positions; output: logits of the clean
  token at every position, with [MASK] and every id the tokenizer never produces excluded (-inf).
- [MASK] (`mask_token_id`): the tokenizer's own `[MASK]`/`<mask>` token when it has one, else the first
  embedding row the tokenizer does not use (model.vocab_size must leave one; split trains its BPE one
  token short for that).
- Loss of a block (`masked_loss`): t ~ U(block's training range) per sequence, each token masked with
  probability 1 - alpha(t), cross-entropy on the masked positions weighted by -alpha'(t) / (1 - alpha(t)),
  summed over the sequence and divided by its length (nats per token).
- The bound (`sequence_bound`): -log p(x) <= sum over blocks of |owned range| * E_{t ~ U(owned)}[w(t) sum
  of masked CE] + the reconstruction term at t_min (E[masked CE at t_min], the last block's), the MD4
  continuous-time ELBO from t_min on: blocks tile [t_min, 1], so a block model's bound is exact to compute.
- Sampler (`unmask`): all-[MASK] (a prompt's tokens kept) at t = 1; for each step t > s of the process's
  schedule the block owning t predicts every position, and each still-masked token is unmasked with
  probability (alpha(s) - alpha(t)) / (1 - alpha(t)) to a draw from that prediction; the last step (s = 0)
  unmasks the rest. One generator per row (seed, row index): a row does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dbconvert.errors import DbconvertError
from dbconvert.families.contract import shard_slice
from dbconvert.families.llama.model import LlamaBlockNet
from dbconvert.masking import MaskingProcess
from dbconvert.noise_process import owner_of
from dbconvert.tokenizer import Tokenizer

MASK_NAMES = ("[MASK]", "<mask>", "<|mask|>")


class MaskTokenError(DbconvertError):
    """A tokenizer that leaves no id for [MASK]."""


def mask_token_id(tok: Tokenizer, vocab_size: int, fixed_by: str | None = None) -> int:
    """[MASK]'s id: the tokenizer's own mask token, else the first embedding row it does not use.

    `fixed_by` names what fixed the vocabulary size (a checkpoint's config.json), for the error's hint."""
    for name in MASK_NAMES:
        if (i := tok.token_id(name)) is not None and i < vocab_size:
            return i
    if tok.vocab_size < vocab_size:
        return tok.vocab_size
    fix = (
        f"the vocabulary size comes from {fixed_by}, so use a tokenizer with a [MASK] token"
        if fixed_by
        else f"set model.vocab_size={tok.vocab_size + 1} (one free row) or use a tokenizer with a [MASK] token"
    )
    raise MaskTokenError(
        f"model.objective=masked needs an id for [MASK], and tokenizer {tok.path.name} has no "
        f"[MASK] token and uses all {vocab_size} rows of the vocabulary; {fix}"
    )


class MaskedDenoiser(nn.Module):
    """Logits of the clean tokens from partly masked tokens and the masking time (see the module docstring)."""

    def __init__(self, net: LlamaBlockNet, noise: MaskingProcess, mask_id: int, num_tokens: int) -> None:
        super().__init__()
        self.net = net
        self.noise = noise
        self.mask_id = mask_id
        invalid = torch.arange(net.shape.vocab_size) >= num_tokens
        invalid[mask_id] = True
        self.register_buffer("invalid", invalid, persistent=False)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) with [MASK] at masked positions, t (B,) -> logits (B, T, V), float32."""
        logits = self.net.head(self.net.hidden_masked(tokens, t.to(torch.float32))).to(torch.float32)
        return logits.masked_fill(self.invalid, float("-inf"))


def corrupt(
    tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor, noise: MaskingProcess, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with [MASK] where u < 1 - alpha(t), the boolean mask); t (B,), u (B, T) uniforms."""
    masked = u < (1.0 - noise.alpha(t.to(torch.float64)))[:, None].to(u.dtype)
    return torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked


def masked_ce(
    model: MaskedDenoiser, tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy per position (B, T), masked (B, T), argmax hit (B, T)) at masking times t (B,)."""
    noisy, masked = corrupt(tokens, t, u, model.noise, model.mask_id)
    logits = model(noisy, t)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none").view(tokens.shape)
    hit = logits.detach().argmax(-1) == tokens
    return ce * masked, masked, hit


def masked_loss(
    model: MaskedDenoiser,
    tokens: torch.Tensor,
    t_range: tuple[float, float],
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The block's loss (nats per token): w(t) * sum of masked CE / T, t drawn inside `t_range` per sequence."""
    b, length = tokens.shape
    n, keep = shard_slice(b, shard)  # draws for the global batch, this rank's slice kept
    t = model.noise.draw(n, *t_range, generator)[keep].to(tokens.device)
    u = torch.rand((n, length), generator=generator)[keep].to(tokens.device)
    ce, masked, hit = masked_ce(model, tokens, t, u)
    per_seq = model.noise.weight(t) * ce.sum(-1) / length
    with torch.no_grad():
        count = masked.sum().clamp_min(1)
        stats = {
            "ce": (ce.sum() / count).item(),
            "accuracy": ((hit & masked).sum() / count).item(),
            "masked_fraction": masked.float().mean().item(),
            "t_min": t.min().item(),
            "t_max": t.max().item(),
        }
    return per_seq.mean(), stats


@torch.no_grad()
def heldout_masked_metrics(
    model: MaskedDenoiser,
    tokens: torch.Tensor,
    t_range: tuple[float, float],
    generator: torch.Generator,
    buckets: int = 4,
) -> dict[str, float]:
    """Held-out CE on masked positions at the middle of each quarter of the range (`val_ce_q0` lowest t),
    and `val_bound`: the block's weighted loss averaged over those four times (nats per token)."""
    b, length = tokens.shape
    u = torch.rand((b, length), generator=generator).to(tokens.device)
    lo, hi = t_range
    out: dict[str, float] = {}
    bound = 0.0
    for k in range(buckets):
        t = torch.full((b,), lo + (k + 0.5) / buckets * (hi - lo), device=tokens.device)
        ce, masked, _ = masked_ce(model, tokens, t, u)
        out[f"val_ce_q{k}"] = (ce.sum() / masked.sum().clamp_min(1)).item()
        bound += (model.noise.weight(t) * ce.sum(-1) / length).mean().item() / buckets
    out["val_ce"] = sum(out[f"val_ce_q{k}"] for k in range(buckets)) / buckets
    out["val_bound"] = bound
    return out


# --- the bound ------------------------------------------------------------------------------


@torch.no_grad()
def piece(
    model: MaskedDenoiser, tokens: torch.Tensor, lo: float, hi: float, draws: int, offset: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """(hi - lo) * E_{t ~ U(lo, hi)}[w(t) * sum of masked CE] per sequence (B,), in nats.

    Stratified in t: t_k = lo + (k + offset) / draws * (hi - lo), k < draws, one offset in [0, 1) per
    sequence (B,), with the same mask uniforms `u` (B, T) at every t: unbiased for any offset.
    """
    total = torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    for k in range(draws):
        t = (lo + (k + offset) / draws * (hi - lo)).to(torch.float32).to(tokens.device)
        ce, _, _ = masked_ce(model, tokens, t, u)
        total += (model.noise.weight(t) * ce.sum(-1)).double()
    return total * (hi - lo) / draws


@torch.no_grad()
def reconstruction(model: MaskedDenoiser, tokens: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """-log p(x | z_{t_min}) per sequence (B,): the CE of the tokens masked at t_min (the [0, t_min] piece)."""
    t = torch.full((tokens.shape[0],), model.noise.t_min, device=tokens.device)
    ce, _, _ = masked_ce(model, tokens, t, u)
    return ce.sum(-1).double()


@torch.no_grad()
def sequence_bound(
    models: Sequence[MaskedDenoiser],
    owned: Sequence[tuple[float, float]],
    tokens: torch.Tensor,
    draws: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(negative ELBO per sequence (B,) in nats, the pieces: one per model, then the reconstruction term).

    Model i covers `owned[i]` with `draws` stratified times (the e2e network: one range, [t_min, 1]). The
    same offsets and mask uniforms serve every piece, so for one network the pieces of any partition add up
    to the single-range bound with the same total number of times (`test_masked`).
    """
    offset = torch.rand(tokens.shape[0], generator=generator, dtype=torch.float64)
    u = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    pieces = [piece(m, tokens, lo, hi, draws, offset, u) for m, (lo, hi) in zip(models, owned)]
    last = models[owner_of(models[0].noise.t_min, list(owned))]
    pieces.append(reconstruction(last, tokens, u))
    return torch.stack(pieces).sum(0), pieces


# --- sampling --------------------------------------------------------------------------------


Progress = Callable[[int, int], None]


@torch.no_grad()
def unmask(
    models: Sequence[MaskedDenoiser],
    owned: Sequence[tuple[float, float]],
    rows: list[list[int]],
    context: int,
    steps: int,
    row_seeds: list[int],
    device: torch.device,
    calls: list[int] | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Ancestral unmasking of `context`-long rows whose first tokens are `rows` (kept): (N, context) ids."""
    noise = models[0].noise
    mask_id = models[0].mask_id
    n = len(rows)
    x = torch.full((n, context), mask_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        x[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    x = x.to(device)
    gens = [torch.Generator().manual_seed(s) for s in row_seeds]
    calls = calls if calls is not None else [0] * len(models)
    ts = noise.schedule(steps)
    total = sum(context - len(ids) for ids in rows)
    for j, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        b = owner_of(t, list(owned))
        calls[b] += 1
        probs = models[b](x, torch.full((n,), t, device=device)).softmax(-1).cpu()
        p = noise.unmask_probability(t, s)
        draw = torch.stack([torch.multinomial(probs[r], 1, generator=g)[:, 0] for r, g in enumerate(gens)])
        reveal = torch.stack([torch.rand(context, generator=g) for g in gens]) < p
        still = x.cpu() == mask_id
        x = torch.where(still & reveal, draw, x.cpu()).to(device)
        if progress:
            progress(total * (j + 1) // (len(ts) - 1), total)
    return x.cpu()
