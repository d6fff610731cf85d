"""A tiny Llama setting shared by the hardening tests (a CPU-second split, a few-step training)."""

from __future__ import annotations

from pathlib import Path

CORPUS = "\n\n".join(
    f"{name}:\n{line}"
    for name, line in [
        ("ROMEO", "But soft, what light through yonder window breaks?"),
        ("JULIET", "O Romeo, Romeo, wherefore art thou Romeo?"),
        ("MERCUTIO", "A plague on both your houses!"),
        ("FRIAR", "These violent delights have violent ends."),
    ]
    * 40
)


def write_corpus(folder: Path) -> Path:
    path = folder / "corpus.txt"
    path.write_text(CORPUS)
    return path


def tiny_overrides(text: Path, **extra: object) -> list[str]:
    """llama-tiny-shakespeare shrunk to 4 layers of width 32 (GQA), contexts of 16 tokens, on `text`."""
    base: dict[str, object] = {
        "model.layers": 4,
        "model.hidden": 32,
        "model.heads": 4,
        "model.kv_heads": 2,
        "model.intermediate": 48,
        "model.vocab_size": 300,
        "model.context": 16,
        "data.source": str(text),
        "data.val_fraction": 0.1,
        "train.batch_size": 4,
        "train.steps": 4,
        "train.warmup_steps": 0,
        "train.log_every": 2,
        "train.checkpoint_every": 2,
        "sample.steps": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
