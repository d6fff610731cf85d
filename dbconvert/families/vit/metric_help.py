"""What `dbconvert eval accuracy --help` shows, and the ViT family's table of its own metrics, kept free of torch
so that `eval --help` lists them without importing the family (issue 33)."""

from __future__ import annotations

from dbconvert.evaluation.metric import MetricHelp, MetricOption

NAME = "accuracy"

ACCURACY = MetricHelp(
    title="top-1 accuracy",
    help="Classifier runs (ViT): top-1, top-5, NLL, ECE on the test split and the top-1 after every denoising step.",
    options=(
        MetricOption("split", str, "test", "The labelled split to classify."),
        MetricOption("num", int, None, "Classify only the first N images of the split (default: all).", min=1),
    ),
)

METRICS = {NAME: ("dbconvert.families.vit.metrics:AccuracyMetric", "dbconvert.families.vit.metric_help:ACCURACY")}
"""`ViTFamily.own_metrics`, named by the family's registry entry (`families.FAMILIES`)."""

__all__ = ["ACCURACY", "METRICS", "NAME"]
