"""Device selection: `auto` picks CUDA, then Apple MPS, then CPU, so recipes never name hardware."""

from __future__ import annotations

import torch

from dbconvert.errors import DbconvertError


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a recipe's `train.device` (auto | cpu | cuda | cuda:N | mps)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DbconvertError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DbconvertError(f"device {name!r} was asked for but CUDA is not available here; use device=auto")
    return device
