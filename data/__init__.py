"""Data: tokenizer, token files (hai-data), packed FIM dataset and deterministic sampler (paper 4.1)."""
