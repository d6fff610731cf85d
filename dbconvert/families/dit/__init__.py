"""The DiT family (image diffusion transformers): config, model, convert, objective, generate, family."""
