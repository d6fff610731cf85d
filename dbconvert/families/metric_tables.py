"""Torch-free tables of a family's own metrics (`Family.own_metrics`) that no family package needs to hold.

A family's registry entry names its table by an optional fourth path (`families.FAMILIES`), so `eval --help`
lists every metric without importing the families (issue 33).
"""

from __future__ import annotations

NO_METRICS: dict[str, str | tuple[str, ...]] = {}
"""The table of a family that brings no metric of its own (DiT's FID and the text families' MAUVE are generic)."""

__all__ = ["NO_METRICS"]
