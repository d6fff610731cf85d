"""The ViT family (image classifiers): config, model, convert, objective, data, generate, metrics, family."""
