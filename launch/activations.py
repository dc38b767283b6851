"""What a block's forward really keeps for its backward, measured: the bytes the planner's activation formula
(launch/cost.py: `layer_activation_bytes`) must agree with (tests/unit/test_activations.py, bench/scale.py).

A block of a model built as the trainer builds it (compute-dtype weights, fp32 router, the FP8 recipe when asked)
runs one forward of `tokens` tokens under `torch.autograd.graph.saved_tensors_hooks`; every storage the graph
saves is counted once, parameters and buffers (weights, RoPE tables) excluded.
"""

from __future__ import annotations

import torch

from fp8.config import FP8Config
from fp8.recipe import apply_fp8
from model import Transformer
from model.config import ModelConfig
from trainer.train import cast_for_compute


def cpu_attention(cfg: ModelConfig) -> str:
    """The attention kernel CPU SDPA runs for this config, as `layer_activation_bytes` names it: its flash kernel
    needs one head width for q, k and v; otherwise the math kernel."""
    return "fused" if cfg.qk_head_dim == cfg.v_head_dim else "math"


def saved_bytes_per_token(cfg: ModelConfig, layer: int, fp8: bool, tokens: int = 256,
                          dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes per token that block `layer`'s forward saves for its backward."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    cast_for_compute(model, dtype)
    if fp8:
        apply_fp8(model, FP8Config(recipe="emulate"))
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    cos, sin = model.rope(tokens)
    x = torch.randn(1, tokens, cfg.dim, dtype=dtype, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model.layers[str(layer)](x, cos, sin)
    del y
    return sum(saved.values()) / tokens
