"""ViT's own options of `dbconvert sample`, free of torch so that `sample --help` lists them without importing
the family (`families/sample_options.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dbconvert.families.sample_options import sample_flag


@dataclass
class ClassifySampleOptions:
    """A classifier's own sampling option: a folder of images to classify (default: the data set's test split)."""

    images: Path | None = field(
        default=None, metadata=sample_flag("Classify the images in this folder (default: the test split).")
    )
