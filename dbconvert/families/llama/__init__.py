"""The Llama family (causal language models): config, model, convert, objective, generate, family."""
