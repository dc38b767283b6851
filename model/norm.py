"""RMSNorm (paper 2.1), computed in fp32 and cast back before the weight multiply, as DeepSeek does, and the
recomputation of its output in backward (paper 3.2.3).

The normalisation is one autograd function that keeps only its input and the fp32 reciprocal RMS per token for
backward, not the fp32 intermediates autograd would keep for the elementwise ops (x.float(), its square, the
normalised fp32 copy and its BF16 cast: 12 bytes per element).

With `recompute=True` the norm's output is not kept for backward at all, by anyone: the GEMMs that read it (the
attention's down-projections, the router, the shared experts, W1/W3) would each keep it as their saved input, so
inside `recomputed_norm_outputs()` (model/block.py) a saved tensor that is such an output, or a view of one, is
replaced by a note of the norm and its input (kept anyway: the block's residual stream), and the output is
computed again, once, when backward first needs it. A GEMM with an FP8 strategy keeps the BF16 output in that
case (fp8/linear.py) and quantises the recomputed one in backward, rather than keeping an FP8 copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_NOTE = "_recompute_from"  # attribute of a recomputable norm output: its _Recompute


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.float() * rstd
        dw = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(dy.dtype, torch.float32)
            dw = (dy * xhat.to(x.dtype)).flatten(0, -2).sum(0, dtype=acc).to(weight.dtype)
        g = (dy * weight).float()  # the gradient of the fp32 normalised input (the cast back is the identity)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


class _Recompute:
    """A norm output's stand-in among saved tensors: the norm and its input; the output, made on first use."""

    __slots__ = ("norm", "x", "out")

    def __init__(self, norm: RMSNorm, x: torch.Tensor) -> None:
        self.norm, self.x, self.out = norm, x, None

    def output(self) -> torch.Tensor:
        if self.out is None:
            with torch.no_grad():
                self.out = self.norm._norm(self.x)
        return self.out


def recomputable(t: torch.Tensor) -> bool:
    """True for a norm output (or a view of one) that `recomputed_norm_outputs` does not keep."""
    base = t if t._base is None else t._base
    return getattr(base, _NOTE, None) is not None


class _Hooks:
    """The pack/unpack pair of `recomputed_norm_outputs`: a norm output becomes a view of its `_Recompute`; any
    other tensor goes to the hooks that were active outside (a measurement, an offload), or is kept as it is."""

    def __init__(self) -> None:
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # no public accessor
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)

    def pack(self, t: torch.Tensor):
        base = t if t._base is None else t._base
        note = getattr(base, _NOTE, None)
        if note is not None:
            return note, t.shape, t.stride(), t.storage_offset() - base.storage_offset()
        return t if self.outer_pack is None else (self.outer_pack(t),)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if len(packed) == 1:
            return self.outer_unpack(packed[0])
        note, shape, stride, offset = packed
        out = note.output()
        return out.as_strided(shape, stride, out.storage_offset() + offset)


@contextlib.contextmanager
def recomputed_norm_outputs() -> Iterator[None]:
    """Inside, every saved tensor that is the output of a norm with `recompute=True` is recomputed in backward
    instead of kept. Must not span a `yield` of a generator (saved-tensor hooks are a thread-wide stack)."""
    hooks = _Hooks()
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, recompute: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.recompute = recompute
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.recompute and torch.is_grad_enabled()):
            return self._norm(x)
        out = self._norm(x)
        setattr(out, _NOTE, _Recompute(self, x))
        return out
