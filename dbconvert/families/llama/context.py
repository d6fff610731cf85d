"""A converted checkpoint's context: what a run trains and samples at, and why (docs/checkpoints.md, "In: Llama
checkpoints, GGUF files and their context").

`model.context` (the recipe's, e.g. 64 in the tiny recipe) is the length of every training row and the
longest text `sample` writes, also when `model.checkpoint` was pretrained at thousands of positions
(`max_position_embeddings`, recorded as `model.max_positions`): training cost grows with the context, and
a run is trained for what its recipe says. `split` says which in the run's notes. The blocks, e2e and ar
are trained at `model.context` and never decode further; the unsplit converted source is the
checkpoint's own network, so `sample --model source --context checkpoint` decodes it at the checkpoint's
length (or `--context N` up to it).
"""

from __future__ import annotations

from typing import Any

from dbconvert.errors import DbconvertError


def context_note(cfg: Any) -> str:
    """The split note of a run converted from a checkpoint (cfg: the recipe's model section, architecture filled in)."""
    longest = cfg.max_positions or cfg.context
    if cfg.context == longest:
        return (
            f"context: training and sampling use model.context = {cfg.context} tokens, the checkpoint's own length "
            "(its max_position_embeddings)"
        )
    return (
        f"context: training and sampling use model.context = {cfg.context} tokens (the recipe's), not the "
        f"checkpoint's {longest} (its max_position_embeddings): rows of {cfg.context} tokens keep training cheap; "
        f"set model.context=N (N <= {longest}) at split to train longer; `sample --model source --context "
        f"checkpoint` decodes the unsplit source at {longest}"
    )


def sample_context(recipe: Any, checkpoint: str | None, model: str, value: str | int | None) -> int:
    """The longest text (prompt + new tokens) `sample --context VALUE` writes with `model` of the run.

    None / `recipe`: model.context. `checkpoint` or N > model.context: only for `--model source` of a run
    converted from a checkpoint, up to the checkpoint's max_position_embeddings.
    """
    cfg = recipe.model
    if value is None or value == "recipe":
        return int(cfg.context)
    longest = int(cfg.max_positions or cfg.context)
    if value == "checkpoint":
        if checkpoint is None:
            raise DbconvertError(
                "--context checkpoint: this run has no model.checkpoint (a fresh network); its length "
                f"is model.context = {cfg.context}"
            )
        length = longest
    else:
        try:
            length = int(value)
        except (TypeError, ValueError):
            raise DbconvertError(f"--context must be recipe, checkpoint or a number of tokens, not {value!r}") from None
        if length < 2:
            raise DbconvertError(f"--context must be at least 2 tokens, got {length}")
    if length <= cfg.context:
        return length
    if checkpoint is None:
        raise DbconvertError(
            f"--context {value}: this run has no model.checkpoint, so its length is model.context = "
            f"{cfg.context}; use --context {cfg.context} or less"
        )
    if model != "source":
        raise DbconvertError(
            f"--context {value}: the {model} model was trained at model.context = {cfg.context} "
            f"tokens; only --model source (the checkpoint's own network) decodes longer"
        )
    if length > longest:
        raise DbconvertError(
            f"--context {length} is longer than the checkpoint's {longest} positions "
            "(its max_position_embeddings); use --context checkpoint"
        )
    return length
