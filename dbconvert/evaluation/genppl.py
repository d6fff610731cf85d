"""Generative perplexity (Gen-PPL): how likely a judge language model finds the run's continuations.

Protocol (the later DiffusionBlocks paper scores its text this way, with GPT-2 XL and Llama-2-7B as judges;
MDLM and SEDD before it): the prompts are MAUVE's (`mauve.py`: held-out packed rows, 50-token prompts and
50-token continuations, or half the context each when it is shorter than 100), each prompt gets
`samples_per_prompt` continuations from the run's `model`, decoded once per sampling seed (`--seeds`
seeds from --seed on). The judge is any Hugging Face causal LM: a folder (e.g. an exported source,
`dbconvert export --model source`) or a hub name (offline: only what is already in the local cache).

The judge reads prompt and continuation as text, re-tokenised with its own tokenizer (prompt with the
judge's special tokens, continuation appended without them); the perplexity counts the continuation's
tokens only: Gen-PPL = exp(sum of the continuation tokens' negative log-likelihoods / their number),
pooled over every continuation of one seed. Empty continuations (EOS at once) are counted and left out.
The result is the mean over seeds, with the standard deviation and every seed's value. Beside it the
mean unigram entropy of the continuations (in the judge's tokens) is recorded: a low Gen-PPL with low
entropy is repetition, not quality (MDLM reports both for this reason).

A judge whose tokenizer cannot read the text (its unknown token in the encoding of text that does not
contain it) or whose context is too short for prompt + continuation is a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbconvert.devices import resolve_device
from dbconvert.errors import DataError, DbconvertError, first_line
from dbconvert.evaluation.mauve import checked_split, protocol_lengths
from dbconvert.evaluation.metric import Log, Metric, folder_label, nolog
from dbconvert.evaluation.metric_help import GENPPL


@dataclass
class Judge:
    name: str
    model: Any
    tokenizer: Any
    device: torch.device
    max_positions: int | None
    info: dict[str, Any]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_judge(judge: str, device: torch.device) -> Judge:
    """A causal LM and its tokenizer from a local folder or a hub name (offline: the local cache only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = Path(judge).expanduser()
    local = path.is_dir()
    where = str(path) if local else judge
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local or offline())
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=local or offline())
    except Exception as exc:
        if local:
            raise DbconvertError(
                f"--judge {judge}: cannot load a Hugging Face causal LM with its tokenizer from this "
                f"folder ({type(exc).__name__}: {first_line(exc, 100)}); give a save_pretrained folder "
                "(e.g. dbconvert export --model source)"
            ) from None
        raise DbconvertError(
            f"--judge {judge} could not be loaded ({type(exc).__name__}) and is not a local folder"
            + (
                "; offline (HF_HUB_OFFLINE=1) a hub name loads only from the local cache: give a "
                "local folder, e.g. an exported source (dbconvert export --model source --out DIR)"
                if offline()
                else f": {first_line(exc, 100)}"
            )
        ) from None
    model = model.to(device).eval()
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    info = {
        "judge": str(path.resolve()) if local else judge,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_positions": positions,
    }
    return Judge(folder_label(path) if local else judge, model, tokenizer, device, positions, info)


def judge_ids(judge: Judge, prompt: str, continuation: str) -> tuple[list[int], int]:
    """(ids of prompt + continuation in the judge's tokens, index of the continuation's first id)."""
    tok = judge.tokenizer
    head = tok(prompt)["input_ids"] if prompt else tok("")["input_ids"]
    tail = tok(continuation, add_special_tokens=False)["input_ids"]
    unk = tok.unk_token_id
    if unk is not None and unk in tail and tok.unk_token not in continuation:
        lost = sum(1 for i in tail if i == unk)
        raise DataError(
            f"--judge {judge.name}: its tokenizer cannot read this text ({lost} token(s) of the continuation "
            f"{continuation[:30]!r} become its unknown token {tok.unk_token!r}); give a judge whose "
            "tokenizer covers the run's text (byte-level BPE, e.g. GPT-2, or the run's own exported source)"
        )
    if continuation and not tail:
        raise DataError(
            f"--judge {judge.name}: its tokenizer encodes the continuation {continuation[:30]!r} as no "
            "tokens at all; give a judge whose tokenizer covers the run's text"
        )
    if not head:  # a tokenizer that adds nothing: score the first token from the second on
        head = tail[:1]
        tail = tail[1:]
    return head + tail, len(head)


@torch.no_grad()
def continuation_nll(judge: Judge, rows: list[tuple[list[int], int]], batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of negative log-likelihoods, token count) of each row's continuation under the judge."""
    pad = judge.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    out: list[tuple[float, int]] = []
    for lo in range(0, len(rows), batch_size):
        part = rows[lo : lo + batch_size]
        width = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, (row, _) in enumerate(part):  # right padding: positions are those of the row alone
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        logits = judge.model(input_ids=ids.to(judge.device), attention_mask=mask.to(judge.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(judge.device))[..., 0].cpu()
        for r, (row, start) in enumerate(part):
            nll = -logp[r, start - 1 : len(row) - 1]
            out.append((float(nll.sum()), int(nll.numel())))
    return out


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the token frequencies of one text (MDLM's repetition check)."""
    if not ids:
        return 0.0
    counts = np.unique(np.asarray(ids), return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def evaluate_genppl(
    run: Any,
    *,
    judge: str | None = None,
    model: str = "blocks",
    num_prompts: int | None = None,
    samples_per_prompt: int = 1,
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    split: str | None = None,
    seeds: int = 2,
    batch_size: int = 8,
    protocol: str | None = None,
    steps: int | None = None,
    solver: str | None = None,
    seed: int | None = None,
    weights: str | None = None,
    log: Log = nolog,
    progress: bool = False,
) -> dict[str, Any]:
    """Gen-PPL of the run's continuations (blocks, e2e, ar or source) under `judge` (see the module docstring)."""
    import dbconvert
    from dbconvert.checkpoint import atomic_write_text
    from dbconvert.sampling import SampleRequest, resolve_sampler
    from dbconvert.tokenizer import run_tokenizer

    start = time.time()
    GenPPLMetric().require(run)
    if not judge:
        raise DbconvertError(
            "eval genppl needs --judge MODEL: a Hugging Face causal LM folder (e.g. dbconvert export "
            "--model source --out DIR) or a hub name such as gpt2-xl"
        )
    run.model_targets(model)
    split, overlaps = checked_split(run, split)  # local text has train and val only: never training rows as "test"
    for flag, value in (("--samples-per-prompt", samples_per_prompt), ("--seeds", seeds), ("--batch-size", batch_size)):
        if value < 1:
            raise DbconvertError(f"{flag} must be at least 1, got {value}")
    if num_prompts is not None and num_prompts < 1:
        raise DbconvertError(f"--num-prompts must be at least 1, got {num_prompts}")
    context = run.family().sample_shape(run.recipe)[0]
    prompt_tokens, new_tokens = protocol_lengths(context, prompt_tokens, new_tokens, log)
    run.require_trained(model)
    device = resolve_device(run.recipe.train.device)
    scorer = load_judge(judge, device)  # before generating: a judge that cannot load costs nothing
    s = resolve_sampler(run.recipe.sample, steps=steps, solver=solver, seed=seed, weights=weights)
    family = run.family()
    rows = family.load_data(run.recipe, split).tokens
    if len(rows) < 1:
        raise DataError(
            f"text too short for the protocol: the {split} split has no sequence of "
            f"{prompt_tokens + new_tokens}+ tokens (give more text or raise data.val_fraction)"
        )
    n = min(num_prompts or 1000, len(rows))
    tok = run_tokenizer(run.shared_dir)
    prompts = [rows[i, :prompt_tokens].tolist() for i in range(n)]
    prompt_texts = [tok.decode(p) for p in prompts]
    options: dict[str, Any] = {"prompt_ids": prompts, "max_new_tokens": new_tokens}
    if protocol is not None:
        options["protocol"] = protocol
    values, entropies, per_seed, sampler, empty, folders = [], [], [], {}, 0, []
    for k in range(seeds):
        out = run.root / "eval" / "samples" / f"genppl-{model}-seed{s.seed + k}-p{n}x{samples_per_prompt}"
        result = family.generate(
            run,
            SampleRequest(
                model=model,
                steps=steps,
                solver=solver,
                seed=s.seed + k,
                weights=weights,
                num=samples_per_prompt,
                options=family.sample_options(**options),
                out=out,
                progress=progress,
            ),
        )
        sampler = {**result.sampler, "seed": s.seed}
        texts = [(prompt_texts[r["prompt_index"]], r["completion"]) for r in result.records]
        scored = [judge_ids(scorer, p, c) for p, c in texts if c]
        empty_k = len(texts) - len(scored)
        if not scored:
            raise DataError(f"every continuation of seed {s.seed + k} is empty (EOS at once); nothing to score")
        if scorer.max_positions and max(len(ids) for ids, _ in scored) > scorer.max_positions:
            raise DataError(
                f"--judge {scorer.name} reads at most {scorer.max_positions} tokens, and prompt + "
                f"continuation take up to {max(len(ids) for ids, _ in scored)} of its tokens; lower "
                "--prompt-tokens/--new-tokens or give a judge with a longer context"
            )
        nll = continuation_nll(scorer, scored, batch_size)
        total, count = sum(x for x, _ in nll), sum(c for _, c in nll)
        value = math.exp(total / count)
        ent = float(np.mean([unigram_entropy(ids[start:]) for ids, start in scored]))
        values.append(value)
        entropies.append(ent)
        empty += empty_k
        folders.append(str(out))
        per_seed.append({"seed": s.seed + k, "value": value, "tokens": count, "empty": empty_k, "entropy": ent})
        atomic_write_text(
            out / "genppl.jsonl",
            "".join(
                json.dumps({"prompt": p, "generation": c, "judge_tokens": len(ids) - start, "nll": x}) + "\n"
                for (p, c), (ids, start), (x, _) in zip([t for t in texts if t[1]], scored, nll)
            ),
        )
        log(
            f"Gen-PPL (seed {s.seed + k}): {value:.3f} over {count} judge tokens, unigram entropy {ent:.3f}"
            + (f", {empty_k} empty continuation(s) left out" if empty_k else "")
        )
    return {
        "metric": "genppl",
        "value": float(np.mean(values)),
        "values": values,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "per_seed": per_seed,
        "entropy": float(np.mean(entropies)),
        "model": model,
        "source": {"kind": "run", "path": str(Path(run.root).resolve())},
        "features": f"judge:{scorer.name}",
        "judge": scorer.info,
        "num_samples": n * samples_per_prompt * seeds,
        "num_prompts": n,
        "samples_per_prompt": samples_per_prompt,
        "empty_continuations": empty,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "scoring": "continuation tokens only, conditioned on the prompt text, pooled per seed",
        "split": split,
        "reference_overlaps_training": overlaps,
        "sampler": sampler,
        "seed": s.seed,
        "seeds": [s.seed + k for k in range(seeds)],
        "samples": folders,
        "seconds": round(time.time() - start, 2),
        "dbconvert_version": dbconvert.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


class GenPPLMetric(Metric):
    """Generative perplexity under a judge causal LM (lower is better; read it beside the entropy)."""

    name = "genppl"
    settings_keys = ("judge", "prompt_tokens", "new_tokens", "samples_per_prompt", "seeds")
    title = GENPPL.title
    lower_is_better = True
    num_option = "num_prompts"
    spread_label = "± std over seeds"
    help = GENPPL.help
    options = GENPPL.options

    def check(self, recipe: Any, family: Any, num: int) -> None:
        if num < 1:
            raise DbconvertError(f"--num (num_prompts for {self.title}) must be at least 1, got {num}")

    def evaluate(
        self, run: Any, *, model: str = "blocks", log: Log = nolog, progress: bool = False, **options: Any
    ) -> dict[str, Any]:
        return evaluate_genppl(run, model=model, log=log, progress=progress, **options)

    def detail_rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        return [
            ("Gen-PPL (mean ± std)", f"{r['mean']:.3f} ± {r['std']:.3f}"),
            ("per seed", ", ".join(f"{v:.3f}" for v in r["values"])),
            ("judge", f"{r['judge']['judge']} ({r['judge']['parameters']:,} parameters)"),
            ("unigram entropy", f"{r['entropy']:.3f} nats"),
            ("prompts x samples x seeds", f"{r['num_prompts']} x {r['samples_per_prompt']} x {len(r['values'])}"),
        ]

    def compare_columns(self) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
        return [*super().compare_columns(), ("entropy", lambda r: f"{r.get('entropy', float('nan')):.3f}")]
