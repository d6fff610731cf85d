"""Recurrent-depth transformers (Huginn, Geiping et al. 2025) as diffusion blocks (docs/families/recurrent.md)."""
