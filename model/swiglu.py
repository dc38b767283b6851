"""SwiGLU, silu(a) * b (paper 2.1.2: the FFN of every expert and dense layer), as one autograd function that keeps
only its inputs for backward and recomputes silu(a) there: autograd would also keep silu(a), a third tensor of
the FFN's width per token. A routed expert's gate weight g scales the SwiGLU output (g silu(a) b, the input of
W2) rather than the expert's output: W2 is linear, so the result is the same, and the gate weight's gradient then
needs only the recomputed SwiGLU output, not the expert's output (dim wide) kept per routed row.
`swiglu_backward` is the one derivative, shared with the FP8 experts (fp8/linear.py), which keep the inputs in
FP8 instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_backward(a: torch.Tensor, b: torch.Tensor, dh: torch.Tensor, scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For h = scale * silu(a) * b (scale [M] per row, or None for 1): (silu(a) * b, dL/da, dL/db, dL/dscale) from
    the inputs and dL/dh. d silu(a)/da = sig (1 + a (1 - sig)); dL/dscale is summed in fp32."""
    sig = torch.sigmoid(a)
    silu = a * sig
    h = silu * b
    dscale = None
    if scale is not None:
        dscale = (dh.float() * h.float()).sum(-1).to(scale.dtype)
        dh = (dh.float() * scale.unsqueeze(-1)).to(dh.dtype)
    return h, dh * b * sig * (1 + a * (1 - sig)), dh * silu, dscale


def scaled(h: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """h [M, I] times scale [M] (fp32) per row, in fp32, back in h's dtype; h itself for scale None."""
    return h if scale is None else (h.float() * scale.unsqueeze(-1)).to(h.dtype)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(a, b, scale)
        return scaled(F.silu(a) * b, scale)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        a, b, scale = ctx.saved_tensors
        _, da, db, dscale = swiglu_backward(a, b, dh, scale)
        return da, db, dscale


def swiglu(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """scale * silu(a) * b; `scale` [M] (fp32) scales each row, e.g. a routed expert's gate weight."""
    return _SwiGLUFn.apply(a, b, scale)
