"""What `dbconvert eval fid | mauve | genppl --help` shows (`metric.MetricHelp`), kept free of torch so that
`eval --help` lists the generic metrics without importing them (issue 33: --help took 6-8 s importing torch).

Each metric's class (`fid.FIDMetric`, `mauve.MauveMetric`, `genppl.GenPPLMetric`) takes its title, help and
options from here; its registry entry (`metric.METRICS`) names the object as its second path.
"""

from __future__ import annotations

from pathlib import Path

from dbconvert.evaluation.metric import MetricHelp, MetricOption

CNN_MAX_IMAGES = 5000
"""FID's built-in features train on at most this many images (a seeded subset): enough for a feature space, minutes
on a CPU (`features.CNN_MAX_IMAGES`, the default of `eval fid --feature-images`)."""

FID = MetricHelp(
    title="FID",
    help="FID and KID (clean-fid, mode clean) of the run's samples against the data set's reference images.",
    options=(
        MetricOption("num", int, None, "Samples to generate per repeat (default 10000; the paper: 50000).", min=1),
        MetricOption(
            "repeats", int, 1, "Independent sample sets; reports each, the minimum (paper) and the mean.", min=1
        ),
        MetricOption("samples", Path, None, "Evaluate this image folder instead of generating."),
        MetricOption("reference", Path, None, "Reference image folder instead of the data set."),
        MetricOption(
            "split",
            str,
            None,
            "Reference split of the recipe's data set (default: train for cifar10, as "
            "published FIDs use; test otherwise).",
        ),
        MetricOption(
            "features",
            str,
            "auto",
            "auto (Inception for RGB, built-in CNN for grey), inception, builtin or builtin:SOURCE.",
        ),
        MetricOption("inception_weights", Path, None, "clean-fid's inception-2015-12-05.pt, if not in /tmp."),
        MetricOption(
            "feature_images",
            int,
            CNN_MAX_IMAGES,
            "Built-in features: train the CNN on at most this many images of the train split (0 = all of them).",
            min=0,
        ),
        MetricOption("guidance", float, None, "Classifier-free guidance w (default: recipe).", min=0.0),
    ),
)

MAUVE = MetricHelp(
    title="MAUVE",
    help="MAUVE (mauve-text) on SEDD's conditional protocol: 50-token prompts, 50-token continuations.",
    options=(
        MetricOption("num_prompts", int, None, "Prompts (default: up to 1000, the paper)."),
        MetricOption("samples_per_prompt", int, 5, "Continuations per prompt.", min=1),
        MetricOption(
            "prompt_tokens",
            int,
            None,
            "Prompt length in tokens (default: SEDD's 50, or half the run's context when it is shorter than 100).",
            min=1,
        ),
        MetricOption(
            "new_tokens",
            int,
            None,
            "Continuation length in tokens (default: SEDD's 50, or what the context leaves).",
            min=1,
        ),
        MetricOption("split", str, None, "Held-out split (default: val for local text, test for hub data)."),
        MetricOption("featurizer", str, "auto", "auto, minilm, gpt2-large or a local Hugging Face encoder folder."),
        MetricOption("seeds", int, 3, "MAUVE k-means seeds to average over.", min=1),
        MetricOption(
            "protocol",
            str,
            None,
            "Text decoding protocol: default or few-step (default: the recipe's sample.protocol).",
        ),
    ),
)

GENPPL = MetricHelp(
    title="Gen-PPL",
    help=(
        "Generative perplexity: the perplexity of the run's continuations (MAUVE's prompts) under a judge causal "
        "LM (--judge: a Hugging Face folder or hub name); spread over sampling seeds."
    ),
    options=(
        MetricOption(
            "judge",
            str,
            None,
            "The judge: a Hugging Face causal LM folder (e.g. an exported source) or hub "
            "name (gpt2-xl; offline only from the local cache).",
        ),
        MetricOption("num_prompts", int, None, "Prompts (default: up to 1000).", min=1),
        MetricOption("samples_per_prompt", int, 1, "Continuations per prompt and seed.", min=1),
        MetricOption("prompt_tokens", int, None, "Prompt length in tokens (default as eval mauve).", min=1),
        MetricOption("new_tokens", int, None, "Continuation length in tokens (default as eval mauve).", min=1),
        MetricOption("split", str, None, "Held-out split (default: val for local text, test for hub data)."),
        MetricOption("seeds", int, 2, "Sampling seeds (from --seed on); the spread is over them.", min=1),
        MetricOption("batch_size", int, 8, "Texts per judge forward.", min=1),
        MetricOption(
            "protocol",
            str,
            None,
            "Text decoding protocol: default or few-step (default: the recipe's sample.protocol).",
        ),
    ),
)

__all__ = ["CNN_MAX_IMAGES", "FID", "GENPPL", "MAUVE"]
