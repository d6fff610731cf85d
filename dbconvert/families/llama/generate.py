"""Llama generation, batched: diffusion per token (blocks, e2e) and ancestral decoding (ar, source).

All prompts x samples are decoded together in batches. Prompts of different lengths are
left-padded; row r's token at column c has rotary position c - pad[r] and never attends to
its pad columns (`model.decode_geometry`), so a row computes what it would compute alone.

Diffusion (DESIGN 5): for each new token, M Euler/Heun steps over the EDM schedule from
z = sigma_max * eps, each by the block owning sigma, whose KV cache of the clean prefix is
brought up to date lazily, in the same forward as its first noisy query of the token (a block that
owns no step of a token never runs for it). The token
is the table row nearest to the final z. Ancestral decoding samples the causal LM's softmax
with temperature and nucleus (top-p) filtering; never greedy unless temperature is 0.

Masked diffusion (model.objective=masked): every row is `context` tokens long, its prompt kept and the rest
[MASK] at t = 1, unmasked ancestrally over `steps` steps, each by the block owning t (`masked.unmask`);
an empty prompt is an unconditional sample. The new tokens are cut at EOS and max_new_tokens as above.

Randomness is one generator per output row, seeded by (seed, row index), so a row's text
does not depend on the batch it was decoded in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dbconvert.checkpoint import atomic_write_text
from dbconvert.devices import resolve_device
from dbconvert.errors import DbconvertError
from dbconvert.families.llama.sample_options import TextSampleOptions
from dbconvert.families.llama.context import sample_context
from dbconvert.families.llama.model import KVCache
from dbconvert.families.llama.protocol import get_protocol, steps_of
from dbconvert.noise_process import owner_of
from dbconvert.sampling import SampleResult, edm_sample, load_models, resolve_sampler
from dbconvert.schema import fold_seed
from dbconvert.tokenizer import Tokenizer, run_tokenizer

if TYPE_CHECKING:
    from dbconvert.rundir import Run
    from dbconvert.sampling import SampleRequest

DIFFUSION_MODELS = ("blocks", "e2e")
UNMASK = "unmask"
"""The solver a masked-diffusion run's blocks and e2e sample with (ancestral unmasking)."""
"""Models decoded by diffusion; the others (`ar`, `source`) are causal LMs decoded ancestrally."""


@dataclass(frozen=True)
class Decoding:
    """Everything that decides the text besides the weights: written next to the samples."""

    max_new_tokens: int
    context: int
    eos: tuple[int, ...]
    """Stop tokens: a row ends at the first of any of them (a checkpoint's config may name several)."""
    seed: int
    steps: int = 50
    solver: str = "euler"
    temperature: float = 1.0
    top_p: float = 1.0
    rho: float = 7.0
    protocol: str = "default"
    """The decoding protocol (`protocol.py`): its step schedule and whether the final token is greedy."""


Progress = Callable[[int, int], None]
"""(tokens generated so far, tokens at most) -> None."""


def read_prompts(opts: "TextSampleOptions") -> list[str]:
    """--prompt, or one prompt per non-empty line of --prompt-file, or one empty prompt."""
    if opts.prompt is not None and opts.prompt_file is not None:
        raise DbconvertError("give --prompt or --prompt-file, not both")
    if opts.prompt_file is not None:
        try:
            lines = Path(opts.prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DbconvertError(
                f"cannot read --prompt-file {opts.prompt_file} ({type(exc).__name__}); give a UTF-8 text file"
            ) from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise DbconvertError(f"--prompt-file {opts.prompt_file} has no prompts (one per line)")
        return prompts
    return [opts.prompt or ""]


def start_ids(ids: list[int], tok: Tokenizer) -> list[int]:
    """The ids a prompt is decoded from: an empty prompt starts after an EOS (a document boundary, as packed).

    With a tokenizer that adds BOS, `ids` already start with it (an empty prompt is [BOS])."""
    if ids:
        return list(ids)
    if tok.eos_id is None:
        raise DbconvertError(
            "an empty prompt needs an EOS token to start from, and this tokenizer has none; give --prompt"
        )
    return [tok.eos_id]


def left_pad(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N, Lmax) left-padded with `fill`, pad (N,) columns of padding per row)."""
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    tokens = torch.tensor([[fill] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    return tokens, pad


def row_budget(length: int, dec: Decoding) -> int:
    """How many new tokens a row of `length` tokens may get: max_new_tokens, or what the context leaves."""
    return min(dec.max_new_tokens, dec.context - length)


def _finish(new: torch.Tensor, length: torch.Tensor, dec: Decoding) -> tuple[list[list[int]], list[str]]:
    """Cut each row's new tokens at EOS / max_new_tokens / the context; say why each stopped."""
    out, why = [], []
    for r in range(new.shape[0]):
        tokens = new[r].tolist()
        room = dec.context - int(length[r])
        limit = row_budget(int(length[r]), dec)
        cut, reason = limit, "max_new_tokens" if dec.max_new_tokens <= room else "context"
        stop = next((j for j, t in enumerate(tokens[:limit]) if t in dec.eos), None)
        if stop is not None:
            cut, reason = stop, "eos"
        out.append(tokens[:cut])
        why.append(reason)
    return out, why


@torch.no_grad()
def diffuse(
    models: list[nn.Module],
    owned: list[tuple[float, float]],
    rows: list[list[int]],
    dec: Decoding,
    row_seeds: list[int],
    device: torch.device,
    calls: list[int] | None = None,
    progress: Progress | None = None,
    fuse: bool = True,
) -> tuple[list[list[int]], list[str]]:
    """Continue every row by diffusion, one token at a time for all rows together (see module docstring).

    `fuse` (default): a block's first step of a token also enters the clean tokens its cache lacks, in the same
    forward (`LlamaDenoiser.query_logits`); False: a separate `extend` forward first. The same function (tested);
    fused, one step per block runs each block once per token, as AR decoding runs each layer once.
    """
    tokens, pad, length = _batch(rows, device)
    budget = row_budget(int(length.min()), dec)
    n, hidden = tokens.shape[0], models[0].table.shape[1]
    protocol = get_protocol(dec.protocol)
    ts = steps_of(protocol, models[0].noise, dec.steps, dec.rho)
    gens = [torch.Generator().manual_seed(s) for s in row_seeds]
    caches: list[KVCache | None] = [None] * len(models)
    cached = [0] * len(models)
    calls = calls if calls is not None else [0] * len(models)
    new = torch.zeros(n, 0, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool)
    for k in range(budget):
        seq = torch.cat([tokens, new], dim=1)
        column = seq.shape[1]

        def logits_of(b: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
            calls[b] += 1
            clean = seq[:, cached[b] :] if cached[b] < column else None  # what this block's cache lacks (lazily)
            if clean is not None and not fuse:
                caches[b], _ = models[b].net.extend(caches[b], clean, cached[b], pad)
                clean = None
            caches[b], logits = models[b].query_logits(caches[b], z, sigma, column, pad, clean)
            cached[b] = column
            return logits

        def denoise(b: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
            return models[b].expected(logits_of(b, z, sigma))

        eps = torch.stack([torch.randn(hidden, generator=g, dtype=torch.float64) for g in gens])
        if protocol.greedy:  # Euler down to the last level, then the owning block's most likely token there
            z = edm_sample(denoise, owned, ts[:-1], (ts[0] * eps).to(torch.float32).to(device), dec.solver)
            token = logits_of(owner_of(ts[-2], list(owned)), z, ts[-2]).argmax(-1)
        else:
            z = edm_sample(denoise, owned, ts, (ts[0] * eps).to(torch.float32).to(device), dec.solver)
            token = models[0].nearest(z)
        new = torch.cat([new, token[:, None]], dim=1)
        done |= _stopped(new[:, -1].cpu(), length + k + 1, dec)
        if progress:
            progress(n * (k + 1), n * budget)
        if bool(done.all()):
            break
    return _finish(new.cpu(), length, dec)


def _stopped(last: torch.Tensor, length: torch.Tensor, dec: Decoding) -> torch.Tensor:
    hit_eos = torch.isin(last, torch.tensor(dec.eos, dtype=last.dtype))
    return hit_eos | (length >= dec.context)


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature, then nucleus filtering: keep the smallest set of tokens whose probability reaches top_p."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the first token is always kept
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def ancestral(
    net: nn.Module,
    rows: list[list[int]],
    dec: Decoding,
    row_seeds: list[int],
    device: torch.device,
    progress: Progress | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Continue every row by sampling the causal LM (`LlamaBlockNet.extend`) with temperature / top-p."""
    tokens, pad, length = _batch(rows, device)
    budget = row_budget(int(length.min()), dec)
    gens = [torch.Generator().manual_seed(s) for s in row_seeds]
    cache, logits = net.extend(None, tokens, 0, pad)
    new = torch.zeros(len(rows), 0, dtype=torch.long)
    done = torch.zeros(len(rows), dtype=torch.bool)
    for k in range(budget):
        if dec.temperature == 0:
            nxt = logits.float().argmax(-1).cpu()
        else:
            probs = filter_logits(logits, dec.temperature, dec.top_p).softmax(-1).cpu()
            nxt = torch.stack([torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(gens)])
        new = torch.cat([new, nxt[:, None]], dim=1)
        done |= _stopped(nxt, length + k + 1, dec)
        if progress:
            progress(len(rows) * (k + 1), len(rows) * budget)
        if bool(done.all()) or k + 1 == budget:
            break
        cache, logits = net.extend(cache, nxt[:, None].to(device), tokens.shape[1] + k, pad)
    return _finish(new, length, dec)


def continue_rows(
    run: "Run",
    model: str,
    rows: list[list[int]],
    dec: Decoding,
    row_seeds: list[int],
    weights: str,
    batch_size: int = 64,
    progress: Progress | None = None,
    calls: list[int] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """New tokens for every row of ids, with `model` of the run, `batch_size` rows at a time."""
    device = resolve_device(run.recipe.train.device)
    models = load_models(run, model, weights, device)
    noise = run.noise()
    owned = run.owned_ranges() if model == "blocks" else [noise.full_range()]
    masked = model in DIFFUSION_MODELS and masked_run(run)
    calls = calls if calls is not None else []
    calls[:] = [0] * len(models)  # block forwards, per model: filled in for the caller
    out: list[list[int]] = []
    why: list[str] = []
    total = sum(row_budget(len(r), dec) for r in rows)
    done_before = 0
    for lo in range(0, len(rows), batch_size):
        part, seeds = rows[lo : lo + batch_size], row_seeds[lo : lo + batch_size]
        base = done_before
        report = (lambda k, _n, b=base: progress(b + k, total)) if progress else None
        if masked:
            new, reasons = unmask_rows(models, owned, part, dec, seeds, device, calls, report)
        elif model in DIFFUSION_MODELS:
            new, reasons = diffuse(models, owned, part, dec, seeds, device, calls, report)
        else:
            new, reasons = ancestral(models[0].net, part, dec, seeds, device, report)
        out += new
        why += reasons
        done_before += sum(row_budget(len(r), dec) for r in part)
    return out, why


def masked_run(run: "Run") -> bool:
    return getattr(run.recipe.model, "objective", "continuous") == "masked"


def unmask_rows(
    models: list[nn.Module],
    owned: list[tuple[float, float]],
    rows: list[list[int]],
    dec: Decoding,
    row_seeds: list[int],
    device: torch.device,
    calls: list[int] | None = None,
    progress: Progress | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Masked diffusion: whole rows by ancestral unmasking (`masked.unmask`), the tokens after each prompt."""
    from dbconvert.families.llama.masked import unmask

    x = unmask(models, owned, rows, dec.context, dec.steps, row_seeds, device, calls, progress)  # type: ignore[arg-type]
    length = torch.tensor([len(r) for r in rows])
    width = dec.context - int(length.min())
    new = torch.zeros(len(rows), width, dtype=torch.long)
    for r, n in enumerate(length.tolist()):
        new[r, : dec.context - n] = x[r, n:]
    return _finish(new, length, dec)


def _batch(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, pad = left_pad(rows, rows[0][0])
    return tokens.to(device), pad.to(device), torch.tensor([len(r) for r in rows])


def sample_text(run: "Run", request: "SampleRequest") -> SampleResult:
    """`dbconvert sample` for a Llama run: N continuations of every prompt, written as .txt and .jsonl.

    Prompts are --prompt / --prompt-file text, or token ids (`TextSampleOptions.prompt_ids`, for evaluation).
    """
    cfg = run.recipe.sample
    opts: TextSampleOptions = run.family().options_of(request)
    run.model_targets(request.model)  # one line naming the models this run has
    context = sample_context(
        run.recipe, (run.manifest.get("source") or {}).get("checkpoint"), request.model, opts.context
    )
    tok = run_tokenizer(run.shared_dir)
    tok.check_vocab(int(run.recipe.model.vocab_size))  # type: ignore[attr-defined]
    if opts.prompt_ids is not None:
        encoded = [list(ids) for ids in opts.prompt_ids]
        prompts = [tok.decode(ids) for ids in encoded]
    else:
        prompts = read_prompts(opts)
        encoded = [tok.encode(p) for p in prompts]
        for prompt, ids in zip(prompts, encoded):
            lost = tok.lost_characters(prompt, ids)
            if lost:
                raise DbconvertError(
                    f"prompt {prompt[:30]!r} has characters the run's tokenizer cannot write "
                    f"({' '.join(lost)}); they would be dropped or replaced silently, so remove "
                    "them (a character-level vocabulary holds only its training text's characters)"
                )
    for prompt, ids in zip(prompts, encoded):
        if len(ids) >= context:
            raise DbconvertError(
                f"prompt {prompt[:30]!r} has {len(ids)} tokens, not shorter than the context of {context}; shorten it"
            )
    dec = decoding(run, request, opts, tok, context)
    weights = request.settings(cfg).weights
    num = request.num or 1
    masked = request.model in DIFFUSION_MODELS and masked_run(run)  # an empty prompt is unconditional: no start id
    rows = [list(ids) if masked else start_ids(ids, tok) for ids in encoded for _ in range(num)]
    seeds = [fold_seed(dec.seed * 1_000_003 + i) for i in range(len(rows))]
    calls: list[int] = []
    start = time.perf_counter()
    with progress_bar(request.progress, f"sample {request.model}") as bar:

        def report(done: int, total: int) -> None:
            for fn in (bar, request.on_progress):
                if fn:
                    fn(done, total)

        new, why = continue_rows(run, request.model, rows, dec, seeds, weights, progress=report, calls=calls)
    seconds = time.perf_counter() - start
    records = []
    for i, (toks, reason) in enumerate(zip(new, why)):
        prompt_ids = encoded[i // num]
        text = tok.decode(prompt_ids + toks)
        records.append(
            {
                "prompt": prompts[i // num],
                "prompt_index": i // num,
                "sample": i % num,
                "completion": tok.decode_continuation(prompt_ids, toks),
                "text": text,
                "new_tokens": len(toks),
                "stopped_by": reason,
                "model": request.model,
            }
        )
    out = Path(request.out) if request.out else run.root / "samples" / sample_tag(request.model, dec)
    atomic_write_text(out / "samples.txt", "".join(r["text"] + "\n\n" for r in records))
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    tokens = sum(r["new_tokens"] for r in records)
    return SampleResult(
        out,
        [out / "samples.txt", out / "samples.jsonl"],
        text=[r["text"] for r in records],
        calls=calls,
        records=records,
        tokens_per_second=tokens / max(seconds, 1e-9),
        sampler=sampler_info(request.model, dec, weights),
    )


def sampler_info(model: str, dec: Decoding, weights: str) -> dict[str, Any]:
    """The sampler as evaluation results record it."""
    if model in DIFFUSION_MODELS and dec.solver == UNMASK:
        return {
            "solver": dec.solver,
            "steps": dec.steps,
            "guidance": None,
            "weights": weights,
            "seed": dec.seed,
            "name": f"ancestral unmasking, {dec.steps} steps per sequence",
        }
    if model in DIFFUSION_MODELS:
        return {
            "solver": dec.solver,
            "steps": dec.steps,
            "guidance": None,
            "weights": weights,
            "seed": dec.seed,
            "protocol": dec.protocol,
            "name": get_protocol(dec.protocol).describe(dec.steps, dec.solver),
        }
    return {
        "solver": "ancestral",
        "steps": None,
        "guidance": None,
        "weights": weights if model == "ar" else "model",
        "seed": dec.seed,
        "temperature": dec.temperature,
        "top_p": dec.top_p,
        "protocol": dec.protocol,
        "name": f"ancestral (temperature {dec.temperature:g}, top-p {dec.top_p:g})",
    }


def decoding(
    run: "Run", request: "SampleRequest", opts: TextSampleOptions, tok: Tokenizer, context: int | None = None
) -> Decoding:
    """The request's decoding settings, the recipe's where the request leaves them unset (context: model.context)."""
    protocol = get_protocol(opts.protocol or getattr(run.recipe.sample, "protocol", None))
    top_p = opts.top_p if opts.top_p is not None else protocol.ar_top_p
    steps = request.steps or (run.num_blocks if protocol.steps_per_block else None)
    s = resolve_sampler(
        run.recipe.sample,
        steps=steps,
        solver=request.solver,
        num=request.num,
        seed=request.seed,
        weights=request.weights,
        temperature=opts.temperature,
        top_p=top_p,
    )
    if s.temperature < 0 or not 0 < s.top_p <= 1:
        raise DbconvertError(f"--temperature must be >= 0 and --top-p in (0, 1], got {s.temperature} and {s.top_p}")
    solver = s.solver
    if request.model in DIFFUSION_MODELS and masked_run(run):
        given = [
            flag
            for flag, value in (
                ("--solver", request.solver),
                ("--temperature", opts.temperature),
                ("--top-p", opts.top_p),
            )
            if value is not None
        ]
        if given:  # the unmasking sampler draws each token from the model's distribution as it is
            raise DbconvertError(
                f"{given[0]} does not apply to the {request.model} of a masked-diffusion run (it "
                "samples by ancestral unmasking from the model's own distribution); drop it"
            )
        solver = UNMASK
    context = context or int(run.recipe.model.context)  # type: ignore[attr-defined]
    return Decoding(
        max_new_tokens=opts.max_new_tokens,
        context=context,
        eos=tuple(tok.stop_ids),
        seed=s.seed,
        steps=s.steps,
        solver=solver,
        temperature=s.temperature,
        top_p=s.top_p,
        rho=s.rho,
        protocol=protocol.name,
    )


def sample_tag(model: str, dec: Decoding) -> str:
    """The samples folder name: what was decoded and how."""
    if model in DIFFUSION_MODELS:
        few = "" if dec.protocol == "default" else f"{dec.protocol}-"
        return f"{model}-{few}{dec.solver}-{dec.steps}steps-seed{dec.seed}"
    return f"{model}-t{dec.temperature:g}-p{dec.top_p:g}-seed{dec.seed}"


def progress_bar(enabled: bool, label: str) -> Any:
    """Progress of generated tokens with tokens/s (`dbconvert.progress`: a bar, or plain lines when not a terminal)."""
    from contextlib import contextmanager

    from dbconvert.progress import progress

    @contextmanager
    def bar() -> Any:
        if not enabled:
            yield None
            return
        with progress(label, None, unit="tokens") as update:
            yield lambda done, total: update(done, total=total)

    return bar()
