"""GGUF checkpoints in: `model.checkpoint=model.gguf` (optional extra `gguf`: pip install 'dbconvert[gguf]').

A GGUF file (llama.cpp's format, often quantised) is dequantised by transformers
(`LlamaForCausalLM.from_pretrained(folder, gguf_file=name)`, which also undoes llama.cpp's q/k row
permutation) and its tokenizer rebuilt by `AutoTokenizer.from_pretrained(folder, gguf_file=name)`. Both
are written with save_pretrained into a temporary folder for the life of the process, and the split then
reads that folder exactly as it reads any Hugging Face checkpoint folder (same key maps, same tokenizer
rules). The run records the GGUF file's path and its sha256, not the temporary folder.

Quantised weights come back as float32 approximations of the originals: the converted source is the same
function as the dequantised model, which is what llama.cpp computes only up to its quantised kernels.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import importlib.util
import shutil
import tempfile
from pathlib import Path

from dbconvert.errors import CheckpointError, DbconvertError, first_line

EXTRA = "pip install 'dbconvert[gguf]' (the packages gguf and accelerate)"

_folders: dict[str, Path] = {}
_tokenizer_errors: dict[str, str] = {}
"""Why a GGUF file's tokenizer could not be rebuilt (by file), said when the run needs that tokenizer."""


def is_gguf(checkpoint: str | Path | None) -> bool:
    return checkpoint is not None and str(checkpoint).lower().endswith(".gguf")


def extra_installed() -> bool:
    """Whether the gguf package (transformers' GGUF reader) is importable."""
    return importlib.util.find_spec("gguf") is not None


def require_extra(path: Path) -> None:
    """A one-line error naming the extra when the gguf package is missing."""
    if not extra_installed():
        raise DbconvertError(
            f"model.checkpoint {path} is a GGUF file; reading it needs the optional extra gguf: {EXTRA}"
        )


def hf_folder(checkpoint: str | Path, need_tokenizer: bool = True) -> Path:
    """A save_pretrained folder (config.json, model.safetensors, tokenizer) of the GGUF file's model, dequantised.

    Made once per process and file; removed when the process ends. A tokenizer that cannot be rebuilt from the file
    is an error only when `need_tokenizer` (no model.tokenizer given, no model.train_tokenizer): the folder then
    has none, and the run takes the user's.
    """
    path = Path(checkpoint).expanduser()
    key = str(path.resolve())
    if key in _folders and _folders[key].is_dir():
        if need_tokenizer and key in _tokenizer_errors:
            raise CheckpointError(_tokenizer_errors[key])
        return _folders[key]
    if not path.is_file():
        raise CheckpointError(
            f"model.checkpoint {path} is not a file; give a GGUF file (model.gguf) or a Hugging Face "
            "LlamaForCausalLM folder"
        )
    require_extra(path)
    out = Path(tempfile.mkdtemp(prefix="dbconvert-gguf-"))
    atexit.register(shutil.rmtree, out, True)
    try:
        problem = _dequantise(path, out)
    except DbconvertError:
        raise
    except ImportError as exc:
        raise DbconvertError(
            f"model.checkpoint {path}: transformers cannot read GGUF here ({first_line(exc, 100)}); {EXTRA}"
        ) from None
    except Exception as exc:  # a damaged file or an architecture transformers cannot dequantise
        raise CheckpointError(
            f"model.checkpoint {path} could not be read as a GGUF Llama ({type(exc).__name__}: "
            f"{first_line(exc, 120)}); give a llama-architecture GGUF file or a Hugging Face "
            "folder"
        ) from None
    _folders[key] = out
    if problem is not None:
        _tokenizer_errors[key] = problem
        if need_tokenizer:
            raise CheckpointError(problem)
    return out


def _dequantise(path: Path, out: Path) -> str | None:
    """Write the file's model (and its tokenizer, when it can be rebuilt) into `out`; returns why the tokenizer
    could not be rebuilt, or None."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if getattr(config, "model_type", None) != "llama":
        raise CheckpointError(
            f"model.checkpoint {path} holds a {getattr(config, 'model_type', None)!r} model, not a "
            "Llama; give a llama-architecture GGUF file"
        )
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' own tqdm bar, which its logging does not silence
        model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name)
    model.config.quantization_config = None  # the saved folder holds plain float weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(str(out))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # no tokenizer in the file, or one transformers cannot rebuild
        return (
            f"model.checkpoint {path}: its tokenizer could not be rebuilt ({type(exc).__name__}: "
            f"{first_line(exc, 100)}); set model.tokenizer=PATH to the model's tokenizer.json"
        )
    tokenizer.save_pretrained(str(out))
    return None


def checkpoint_folder(checkpoint: str, need_tokenizer: bool = True) -> Path:
    """The folder the split reads for `model.checkpoint`: itself, or a GGUF file's dequantised folder (whose
    tokenizer must be rebuilt from the file when `need_tokenizer`; see `hf_folder`)."""
    return hf_folder(checkpoint, need_tokenizer) if is_gguf(checkpoint) else Path(checkpoint).expanduser()
