"""What `dbconvert eval bpc --help` shows, and the Llama family's table of its own metrics, kept free of torch so
that `eval --help` lists them without importing the family (issue 33)."""

from __future__ import annotations

from dbconvert.evaluation.metric import MetricHelp, MetricOption

BPC = MetricHelp(
    title="bits per character",
    help=(
        "Masked-diffusion runs: the ELBO bound in bits per character (per token, with perplexity, where the "
        "tokenizer is not character-level) on the held-out rows, blocks or e2e, with its Monte-Carlo spread."
    ),
    options=(
        MetricOption("split", str, None, "Held-out split (default: val when the run holds rows out, else test)."),
        MetricOption(
            "draws", int, 4, "Monte-Carlo times per block range (e2e: B times as many over [t_min, 1]).", min=1
        ),
        MetricOption("repeats", int, 3, "Independent estimates (their spread is reported).", min=1),
        MetricOption("max_rows", int, None, "Score only the first N held-out rows (default: all).", min=1),
        MetricOption("batch_size", int, 32, "Rows per forward.", min=1),
    ),
)

METRICS = {"bpc": ("dbconvert.families.llama.bpc:BPCMetric", "dbconvert.families.llama.metric_help:BPC")}
"""`LlamaFamily.own_metrics`, named by the family's registry entry (`families.FAMILIES`)."""

__all__ = ["BPC", "METRICS"]
