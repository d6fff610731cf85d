"""dbconvert: turn residual networks into independently trained diffusion blocks."""

__version__ = "0.1.0"
