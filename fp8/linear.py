"""FP8 GEMMs for the project's Linear and GroupedLinear (paper 3.3), as a strategy that fp8/recipe.py installs on
those modules (`module.fp8 = FP8Spec(...)`; model/linear.py calls it instead of its plain GEMMs).

A module with an `FP8Spec` runs its three GEMMs with E4M3 operands and fine-grained scales (fp8/quant.py) through
the spec's GEMM backend (fp8/gemm.py):

    Fprop  x 1x128 tiles  x  W 128x128 blocks                    -> the input's dtype
    Dgrad  dy 1x128 tiles x  W's 128x128 blocks, transposed      -> the input's dtype
    Wgrad  dy 128x1 groups x x 128x1 groups (over tokens)        -> fp32, added into the fp32 main gradient

The input is kept for the backward only in FP8 (its 1x128 quantisation, 1 byte per element plus a scale per 128;
or, where the spec asks, E5M6 with power-of-two scales, 1.5 bytes per element) and re-quantised to 128x1 groups
there; the FP8 weight is kept as it was used. For routed experts the 128x1 groups of Wgrad are taken within each
expert's rows (a segment's tail padded with zeros), so no group mixes two experts' tokens, and the SwiGLU FFN is
one fused function (`_FP8SwiGLUExpertsFn`). Every Wgrad goes through `model.linear.return_or_defer`, so it can be
deferred into a pipeline's W like the plain one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8.e5m6 import dequantize_e5m6_1x128, quantize_e5m6_1x128
from fp8.quant import dequantize, quantize_1x128, quantize_128x1, quantize_128x128
from model.linear import GroupedLinear, Linear, return_or_defer


@dataclass(frozen=True)
class FP8Spec:
    """How a Linear runs in FP8: `gemm(a_q, a_scale, b_q, b_scale, out_dtype) -> a @ b.T` (a backend of
    fp8/gemm.py), power-of-two scales or not, and whether the input is cached for backward in E5M6 (fp8/e5m6.py,
    the paper's choice for the Linear after attention) instead of E4M3. Implements model.linear.LinearStrategy."""

    gemm: Callable[..., torch.Tensor]
    pow2: bool = True
    e5m6_cache: bool = False

    def linear(self, x: torch.Tensor, module: Linear) -> torch.Tensor:
        return _FP8LinearFn.apply(x, module.weight, module)

    def grouped(self, x: torch.Tensor, counts: torch.Tensor, module: GroupedLinear,
                sizes: list[int] | None = None) -> torch.Tensor:
        return _FP8GroupedLinearFn.apply(x, module.weight, counts, module, sizes)

    def swiglu_experts(self, w1: GroupedLinear, w3: GroupedLinear, w2: GroupedLinear, rows: torch.Tensor,
                       index: torch.Tensor, counts: torch.Tensor, packed: object = None,
                       sizes: list[int] | None = None) -> torch.Tensor:
        """`packed`: (E4M3 rows, their 1x128 scales) when the rows arrived through the FP8 dispatch payload
        (fp8/recipe.py `FP8Payload`), used as the up-projection's operand as they are; None quantises the rows."""
        return _FP8SwiGLUExpertsFn.apply(rows, index, w1.weight, w3.weight, w2.weight, counts, (w1, w3, w2), packed,
                                         sizes)


def _wgrad(spec: FP8Spec, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dy.T @ x in fp32 from dy [M, N] and x [M, K] (the dequantised FP8 cache, or a recomputed input), both
    quantised in 128x1 groups."""
    if dy.shape[0] == 0:
        return torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
    xg_q, xg_s = quantize_128x1(x, spec.pow2)
    dg_q, dg_s = quantize_128x1(dy, spec.pow2)
    # as a @ b.T with K = tokens: the transposed 128x1 groups are 1x128 tiles of dy.T and x.T
    return spec.gemm(dg_q.t().contiguous(), dg_s.t().contiguous(), xg_q.t().contiguous(), xg_s.t().contiguous(),
                     torch.float32)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, module: Linear) -> torch.Tensor:
        spec: FP8Spec = module.fp8
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_s = quantize_1x128(x2, spec.pow2)
        w_q, w_s = quantize_128x128(weight.detach(), spec.pow2)
        if spec.e5m6_cache:  # keep a finer copy of the input for Wgrad instead of the E4M3 operand
            ctx.save_for_backward(*quantize_e5m6_1x128(x2, pow2=True), w_q, w_s)
        else:
            ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.module, ctx.dtype, ctx.shape = module, x.dtype, x.shape
        return spec.gemm(x_q, x_s, w_q, w_s, x.dtype).view(*x.shape[:-1], weight.shape[0])  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        module: Linear = ctx.module
        spec: FP8Spec = module.fp8
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy @ W, W's blocks transposed
            d_q, d_s = quantize_1x128(dy2, spec.pow2)
            dx = spec.gemm(d_q, d_s, w_q.t().contiguous(), w_s.t().contiguous(), ctx.dtype).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            if spec.e5m6_cache:
                x = dequantize_e5m6_1x128(x_q, x_s, ctx.shape[-1])
            else:
                x = dequantize(x_q, x_s, (1, 128))
            return_or_defer(module, lambda: _wgrad(spec, dy2, x), through_autograd=False)
        return dx, None, None


def _bounds(counts: torch.Tensor, sizes: list[int] | None) -> list[tuple[int, int]]:
    """Each expert's [start, end) rows: from `sizes` on the host when known, else from the counts on the device
    (a host sync: the per-expert FP8 GEMMs need the sizes on the host)."""
    ends = list(itertools.accumulate(sizes)) if sizes is not None else torch.cumsum(counts, 0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def _grouped_fp8(spec: FP8Spec, q: torch.Tensor, s: torch.Tensor, weights: list, bounds: list, dtype: torch.dtype,
                 transposed: bool = False) -> torch.Tensor:
    """Rows (FP8 1x128 tiles) of group e times group e's FP8 weight (or its transpose, for Dgrad); [M, out]."""
    out = [spec.gemm(q[a:b], s[a:b], *((w_q.t().contiguous(), w_s.t().contiguous()) if transposed else (w_q, w_s)),
                     dtype) for (a, b), (w_q, w_s) in zip(bounds, weights)]
    return torch.cat(out)


def _grouped_wgrad(spec: FP8Spec, dy: torch.Tensor, x: torch.Tensor, bounds: list) -> torch.Tensor:
    """[E, out, in] fp32: per group, 128x1 groups inside its own rows (a segment's tail padded with zeros)."""
    return torch.stack([_wgrad(spec, dy[a:b], x[a:b]) for a, b in bounds])


def _fp8_weights(spec: FP8Spec, weight: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [quantize_128x128(weight[e].detach(), spec.pow2) for e in range(weight.shape[0])]


class _FP8GroupedLinearFn(torch.autograd.Function):
    """Per expert: its rows (a contiguous segment) times its FP8 weight; rows are quantised 1x128 once (a row's
    tiles never mix experts), each expert's weight in its own 128x128 blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, module: GroupedLinear,
                sizes: list[int] | None):
        spec: FP8Spec = module.fp8
        x_q, x_s = quantize_1x128(x, spec.pow2)
        w, bounds = _fp8_weights(spec, weight), _bounds(counts, sizes)
        ctx.save_for_backward(x_q, x_s)
        ctx.w, ctx.bounds, ctx.module, ctx.dtype = w, bounds, module, x.dtype
        return _grouped_fp8(spec, x_q, x_s, w, bounds, x.dtype)  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_s = ctx.saved_tensors
        module: GroupedLinear = ctx.module
        spec: FP8Spec = module.fp8
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad per expert
            d_q, d_s = quantize_1x128(dy, spec.pow2)
            dx = _grouped_fp8(spec, d_q, d_s, ctx.w, ctx.bounds, ctx.dtype, transposed=True)
        if ctx.needs_input_grad[1]:
            return_or_defer(module, lambda: _grouped_wgrad(spec, dy, dequantize(x_q, x_s, (1, 128)), ctx.bounds),
                            through_autograd=False)
        return dx, None, None, None, None


class _FP8SwiGLUExpertsFn(torch.autograd.Function):
    """y = w2(silu(w1 x) * w3 x) per expert for x = rows[index], in FP8, keeping for backward only the FP8 input x
    and the FP8 SwiGLU input (w1 x, w3 x); the SwiGLU output, which w2's Wgrad needs, is recomputed from them (paper
    3.3). Rows that arrive with their E4M3 form (`packed`, from the FP8 dispatch) are used as they are."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                counts: torch.Tensor, modules: tuple, packed: tuple | None, sizes: list[int] | None) -> torch.Tensor:
        spec: FP8Spec = modules[0].fp8
        bounds = _bounds(counts, sizes)
        ws = [_fp8_weights(spec, w) for w in (w1, w3, w2)]
        if packed is not None:  # the dispatched E4M3 rows: no second quantisation
            x_q, x_s = (t.index_select(0, index) for t in packed)
        else:
            x_q, x_s = quantize_1x128(rows.index_select(0, index), spec.pow2)
        x = rows  # for dtype and device below
        a = _grouped_fp8(spec, x_q, x_s, ws[0], bounds, x.dtype)
        b = _grouped_fp8(spec, x_q, x_s, ws[1], bounds, x.dtype)
        ab_q, ab_s = quantize_1x128(torch.cat([a, b], dim=-1), spec.pow2)  # the FP8 cache of the SwiGLU input
        h_q, h_s = quantize_1x128(F.silu(a) * b, spec.pow2)
        ctx.save_for_backward(x_q, x_s, ab_q, ab_s, index)
        ctx.ws, ctx.bounds, ctx.modules, ctx.dtype, ctx.inter = ws, bounds, modules, x.dtype, a.shape[-1]
        ctx.n_rows = rows.shape[0]
        return _grouped_fp8(spec, h_q, h_s, ws[2], bounds, x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_s, ab_q, ab_s, index = ctx.saved_tensors
        m1, m3, m2 = ctx.modules
        spec: FP8Spec = m1.fp8
        bounds, (w1, w3, w2), dtype = ctx.bounds, ctx.ws, ctx.dtype
        a, b = dequantize(ab_q, ab_s, (1, 128)).to(dtype).split(ctx.inter, dim=-1)
        sig = torch.sigmoid(a)
        silu = a * sig
        h = silu * b  # recomputed SwiGLU output
        dy = dy.contiguous()
        d_q, d_s = quantize_1x128(dy, spec.pow2)
        dh = _grouped_fp8(spec, d_q, d_s, w2, bounds, dtype, transposed=True)
        da = dh * b * sig * (1 + a * (1 - sig))  # d silu(a) / da = sig (1 + a (1 - sig))
        db = dh * silu
        da_q, da_s = quantize_1x128(da, spec.pow2)
        db_q, db_s = quantize_1x128(db, spec.pow2)
        dx = (_grouped_fp8(spec, da_q, da_s, w1, bounds, dtype, transposed=True)
              + _grouped_fp8(spec, db_q, db_s, w3, bounds, dtype, transposed=True))
        x = dequantize(x_q, x_s, (1, 128))
        return_or_defer(m2, lambda: _grouped_wgrad(spec, dy, h, bounds), through_autograd=False)
        return_or_defer(m1, lambda: _grouped_wgrad(spec, da, x, bounds), through_autograd=False)
        return_or_defer(m3, lambda: _grouped_wgrad(spec, db, x, bounds), through_autograd=False)
        d_rows = torch.zeros(ctx.n_rows, dx.shape[1], dtype=dx.dtype, device=dx.device).index_add_(0, index, dx)
        return d_rows, None, None, None, None, None, None, None, None
