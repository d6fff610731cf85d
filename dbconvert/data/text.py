"""Text data for the language-model family: read, tokenise, pack into fixed-length contexts.

Sources (`data.source`, `data.kind` = auto | text | hub):
- a built-in name: `tinyshakespeare` (Karpathy's 1.1 MB char-rnn corpus, public domain) ships inside the
  package, as the digits do, so the CPU text recipes run from a clone or a wheel with no path to set.
- local text: one file, a folder (every `*.txt` in it, sorted) or a glob pattern, read with the
  `datasets` "text" builder; `data.text_unit` says whether a document is a line, a paragraph
  or the whole file. A relative path is looked up from the working directory first and then
  from the folder holding the dbconvert source tree.
- a hub name such as `lm1b`: `datasets.load_dataset(name, data.hub_config, split=...)`; offline
  this fails with a one-line message saying what to download and where it must go.

Packing: documents are shuffled by seed, tokenised, joined with EOS after each one, and cut
into rows of exactly `context` tokens (the remainder is dropped). With `data.val_fraction`
> 0, a seeded choice of that fraction of the rows is the `val` split and the rest is `train`.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dbconvert.schema import DataConfig
from dbconvert.errors import DataError, first_line
from dbconvert.tokenizer import Tokenizer

VAL_SPLITS = ("val", "validation")
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_TEXT: dict[str, Path] = {"tinyshakespeare": Path(__file__).resolve().parent / "tinyshakespeare.txt"}


@dataclass
class TextData:
    """Packed token rows (N, context), int64."""

    tokens: torch.Tensor
    name: str

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def batch(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [self.tokens[index]]


def resolve_kind(cfg: DataConfig) -> str:
    if cfg.kind in ("text", "hub"):
        return cfg.kind
    if cfg.kind != "auto":
        raise DataError(f"data.kind {cfg.kind!r} does not hold text; use text (local files) or hub")
    src = cfg.source
    if src in BUILTIN_TEXT:
        return "text"
    if any(ch in src for ch in "*?") or Path(src).suffix or src.startswith((".", "/", "~")) or Path(src).exists():
        return "text"
    return "hub"


def local_files(source: str) -> list[Path]:
    """The text files named by `source` (a built-in name, file, folder or glob), relative paths tried from cwd then
    the repo root."""
    if source in BUILTIN_TEXT:
        return [BUILTIN_TEXT[source]]
    tried = []
    for base in (Path.cwd(), REPO_ROOT):
        pattern = Path(source).expanduser()
        if not pattern.is_absolute():
            pattern = base / pattern
        tried.append(str(pattern))
        if any(ch in source for ch in "*?"):
            files = sorted(Path(p) for p in glob.glob(str(pattern)) if Path(p).is_file())
        elif pattern.is_dir():
            files = sorted(p for p in pattern.glob("*.txt") if p.is_file())
        else:
            files = [pattern] if pattern.is_file() else []
        if files:
            return [f.resolve() for f in files]
        if Path(source).expanduser().is_absolute():
            break
    raise DataError(
        f"no text files at data.source {source!r} (looked at {' and '.join(dict.fromkeys(tried))}); "
        "point data.source at a .txt file, a folder of .txt files or a glob, or use the built-in "
        f"{', '.join(sorted(BUILTIN_TEXT))}"
    )


def read_documents(cfg: DataConfig, split: str = "train") -> list[str]:
    """The raw documents of the source (`train` for local files: they have no other split)."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    kind = resolve_kind(cfg)
    if kind == "text":
        files = local_files(cfg.source)
        try:
            ds = datasets.load_dataset(
                "text", data_files=[str(f) for f in files], sample_by=cfg.text_unit, split="train"
            )
        except Exception as exc:
            raise DataError(
                f"cannot read text data {cfg.source!r} as UTF-8 text ({type(exc).__name__}: "
                f"{first_line(exc, 120)}); check the file(s)"
            ) from None
        key = "text"
    else:
        ds = _load_hub(cfg, split)
        key = cfg.text_key
        if key not in ds.column_names:
            raise DataError(
                f"data set {cfg.source!r} has no column {key!r} (columns: {ds.column_names}); set data.text_key"
            )
    docs = [t for t in ds[key] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"text data {cfg.source!r} is empty; give a file with text in it")
    return docs


def _load_hub(cfg: DataConfig, split: str):  # noqa: ANN202 - datasets.Dataset
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    try:
        return datasets.load_dataset(cfg.source, cfg.hub_config, split=split)
    except (ValueError, KeyError) as exc:
        raise DataError(f"data set {cfg.source!r} has no split {split!r} ({first_line(exc, 120)})") from None
    except Exception as exc:  # offline / unknown name surface under many exception types
        raise DataError(
            f"text data set {cfg.source!r} could not be loaded from the Hugging Face hub (offline or unknown name: "
            f"{type(exc).__name__}); where there is internet run datasets.load_dataset({cfg.source!r}) to fill "
            "~/.cache/huggingface/datasets, copy that folder to this machine (or set HF_DATASETS_CACHE to it), "
            "or point data.source at local .txt files"
        ) from None


def pack(docs: list[str], tokenizer: Tokenizer, context: int, seed: int) -> np.ndarray:
    """Shuffle documents by seed, tokenise, join with EOS after each, cut into rows of `context` tokens."""
    order = np.random.default_rng(seed).permutation(len(docs))
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    parts: list[np.ndarray] = []
    chunk = 4096
    for i in range(0, len(order), chunk):
        batch = [docs[j] for j in order[i : i + chunk]]
        for ids in tokenizer.encode_batch(batch):
            parts.append(np.asarray(ids + eos, dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    rows = len(stream) // context
    if rows == 0:
        raise DataError(
            f"the text has {len(stream)} tokens, fewer than one context of {context}; give more text or lower "
            f"model.context"
        )
    return stream[: rows * context].reshape(rows, context)


def text_split_overlaps_training(cfg: DataConfig, split: str) -> bool:
    """Whether rows of `split` are rows training uses (`data.split`); local text has `train` and `val` only,
    any other name is a DataError (it would otherwise read the training rows)."""
    if resolve_kind(cfg) == "text":
        if split not in ("train", *VAL_SPLITS):
            raise DataError(
                f"local text has the splits train and val (rows held out by data.val_fraction), not {split!r}"
            )
        return split not in VAL_SPLITS
    return split == cfg.split


def load_text(cfg: DataConfig, tokenizer: Tokenizer, context: int, split: str | None = None) -> TextData:
    """Packed rows of the requested split (`train`, `val`; hub data sets also name their own splits)."""
    if split is not None:
        text_split_overlaps_training(cfg, split)  # an unknown split of local text is an error, not the training rows
    split = split or cfg.split
    held_out = split in VAL_SPLITS
    if held_out and cfg.val_fraction == 0.0 and resolve_kind(cfg) == "text":
        raise DataError("local text has no validation split; set data.val_fraction (e.g. 0.1) to hold some rows out")
    source_split = cfg.split if (held_out and cfg.val_fraction > 0.0) or resolve_kind(cfg) == "text" else split
    seed = cfg.split_seed  # a property of the data, never of training: held-out rows stay held out
    rows = pack(read_documents(cfg, source_split), tokenizer, context, seed)
    if cfg.val_fraction > 0.0:
        perm = np.random.default_rng(seed + 1).permutation(len(rows))
        n_val = max(1, int(round(cfg.val_fraction * len(rows))))
        if n_val >= len(rows):
            raise DataError(
                f"data.val_fraction={cfg.val_fraction} leaves no training rows out of {len(rows)}; lower it"
            )
        pick = np.sort(perm[:n_val] if held_out else perm[n_val:])
        rows = rows[pick]
    if int(rows.max()) >= tokenizer.vocab_size:
        raise DataError(f"token id {int(rows.max())} is outside the tokenizer's {tokenizer.vocab_size} tokens")
    return TextData(torch.from_numpy(np.ascontiguousarray(rows)), f"{cfg.source}:{split}")
