"""The text families' own options of `dbconvert sample` (Llama, masked diffusion, recurrent depth), free of torch
so that `sample --help` lists them without importing a family (`families/sample_options.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dbconvert.families.sample_options import sample_flag


@dataclass
class TextSampleOptions:
    """A language model's own sampling options: prompts (text, a file, or token ids) and AR decoding."""

    prompt: str | None = field(default=None, metadata=sample_flag("Text prompt."))
    prompt_file: Path | None = field(default=None, metadata=sample_flag("File of prompts, one per line."))
    prompt_ids: list[list[int]] | None = None
    """Prompts as token ids (evaluation protocols), instead of --prompt text."""
    max_new_tokens: int = field(default=64, metadata=sample_flag("Tokens to generate (default 64).", min=1))
    temperature: float | None = field(
        default=None,
        metadata=sample_flag(
            "AR decoding (ar, text source): softmax temperature, 0 = greedy (default: recipe, 1).", min=0.0
        ),
    )
    top_p: float | None = field(
        default=None, metadata=sample_flag("AR decoding: nucleus probability (default: recipe, 1).")
    )
    protocol: str | None = field(
        default=None,
        metadata=sample_flag(
            "default (sample.steps steps per token) or few-step (the later paper's: steps = B, greedy final token, AR "
            "top-p 0.95) (default: recipe's sample.protocol)."
        ),
    )
    """default or few-step (`protocol.py`); None = the recipe's sample.protocol."""
    context: str | None = field(
        default=None,
        metadata=sample_flag(
            "The longest text: recipe (model.context, default), checkpoint (--model source of a converted checkpoint: "
            "its own max_position_embeddings) or N tokens."
        ),
    )
    """The longest text: recipe (model.context, default), checkpoint (a converted source's own length) or N
    (`families/llama/context.py`)."""
