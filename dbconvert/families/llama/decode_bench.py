"""Decoding speed for `bench speed`: tokens per second of the blocks at the few-step protocol vs AR decoding.

Both decode the same random prompts of `prompt_tokens` (left unpadded), `new_tokens` new tokens per row for
every row of the batch, with a KV cache, greedily (so the time is the network's, not a sampler's), prefill
included. The AR network is the unsplit L-layer causal LM; the blocks are the B slices of a network of the
same shape, each run once per token (few-step: steps = B, one per block, the last one's argmax is the token).

Per token, AR runs every layer once on one query. A block's step runs its L/B layers on the noisy query, and
the new clean token must also enter that block's cache: as a separate `extend` forward (`fuse=False`) each
block runs twice per token, 2L layer passes in all; fused (`LlamaDenoiser.query_logits`, the default) the
clean token rides in the same forward as the next noisy query, L layer passes of two queries, which on a
weight-bound decode costs about what one query costs. What is left over AR: B head evaluations per token
instead of one (each block's D needs its logits over the whole vocabulary) and the noisy-input and sigma paths.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dbconvert.families.llama.generate import Decoding, ancestral, diffuse

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.families.contract import Family


def default_lengths(context: int) -> tuple[int, int]:
    """(prompt tokens, new tokens) when not given: a quarter of the context as prompt, then up to 64 new tokens."""
    prompt = max(1, min(32, context // 4))
    return prompt, max(1, min(64, context - prompt))


def decoding_rates(
    family: "Family",
    recipe: "Recipe",
    blocks: int,
    batch: int,
    device: torch.device,
    repeats: int,
    warmup: int,
    new_tokens: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median tokens/s of AR decoding, of the blocks fused (the default sampler) and with a separate extend."""
    from dbconvert.bench import timed, with_blocks
    from dbconvert.errors import DbconvertError
    from dbconvert.split import plan_blocks, source_depth

    recipe = with_blocks(recipe, blocks)
    context = int(recipe.model.context)  # type: ignore[attr-defined]
    prompt, new = default_lengths(context)
    if new_tokens is not None:
        if not 1 <= new_tokens <= context - prompt:
            raise DbconvertError(
                f"--decode-tokens must be between 1 and {context - prompt} (the context of {context} "
                f"less the {prompt}-token prompt), got {new_tokens}"
            )
        new = new_tokens
    total = source_depth(recipe)
    _, plans = plan_blocks(recipe, total)
    noise = recipe.noise.settings()
    torch.manual_seed(recipe.train.seed)
    ar = family.wrap("ar", recipe, family.block_network(recipe, total), noise).to(device).eval()
    models = [
        family.wrap("blocks", recipe, family.block_network(recipe, p["layers"][1] - p["layers"][0]), noise)
        .to(device)
        .eval()
        for p in plans
    ]
    owned = [tuple(p["owned_range"]) for p in plans]
    gen = torch.Generator().manual_seed(recipe.train.seed)
    vocab = int(recipe.model.vocab_size)  # type: ignore[attr-defined]
    rows = torch.randint(0, vocab, (batch, prompt), generator=gen).tolist()
    seeds = list(range(batch))
    greedy_ar = Decoding(max_new_tokens=new, context=context, eos=(), seed=0, temperature=0.0)
    few = Decoding(max_new_tokens=new, context=context, eos=(), seed=0, steps=blocks, protocol="few-step")
    runs: dict[str, Callable[[], Any]] = {
        "ar": lambda: ancestral(ar.net, rows, greedy_ar, seeds, device),
        "blocks": lambda: diffuse(models, owned, rows, few, seeds, device),
        "blocks (separate extend)": lambda: diffuse(models, owned, rows, few, seeds, device, fuse=False),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(warmup + repeats):
        for name, fn in runs.items():  # round-robin: a change in machine load hits all of them alike
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
        "steps": blocks,
        "protocol": "few-step",
        "layers": total,
        "tokens_per_s": rate,
        "reference": "ar",
        "blocks_over_ar": rate["blocks"] / rate["ar"],
        "unfused_over_ar": rate["blocks (separate extend)"] / rate["ar"],
        "raw_seconds": seconds,
    }
