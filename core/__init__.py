"""The neutral layer below every package: typed-config helpers (config.py)."""
