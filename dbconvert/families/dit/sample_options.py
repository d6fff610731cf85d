"""DiT's own options of `dbconvert sample`, free of torch so that `sample --help` lists them without importing
the family (`families/sample_options.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dbconvert.families.sample_options import sample_flag


@dataclass
class ImageSampleOptions:
    """DiT's own sampling options: classifier-free guidance w (None = the recipe's) and one class to draw."""

    guidance: float | None = field(
        default=None, metadata=sample_flag("Classifier-free guidance scale w (1 = none; default: recipe).", min=0.0)
    )
    class_label: int | None = field(default=None, metadata=sample_flag("Generate this class only.", flag="--class"))
