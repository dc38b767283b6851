"""The optimizer, below both the trainer and the parallel layer: AdamW's arithmetic and the single-process AdamW
(adamw.py), the interface ZeRO-1 shares with it (optimizer.py), the config (config.py) and the paper's schedules
(schedules.py)."""
