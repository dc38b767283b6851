"""FP8 GEMMs for the project's Linear and GroupedLinear (paper 3.3), as a strategy that fp8/recipe.py installs on
those modules (`module.fp8 = FP8Spec(...)`; model/linear.py calls it instead of its plain GEMMs).

A module with an `FP8Spec` runs its three GEMMs with E4M3 operands and fine-grained scales (fp8/quant.py) through
the spec's GEMM backend (fp8/gemm.py):

    Fprop  x 1x128 tiles  x  W 128x128 blocks                    -> the input's dtype
    Dgrad  dy 1x128 tiles x  W's 128x128 blocks, transposed      -> the input's dtype
    Wgrad  dy 128x1 groups x x 128x1 groups (over tokens)        -> fp32, added into the fp32 main gradient

The input is kept for the backward only in FP8 (its 1x128 quantisation, 1 byte per element plus a scale per 128;
or, where the spec asks, E5M6 with power-of-two scales, 1.5 bytes per element) and re-quantised to 128x1 groups
there. For routed experts the 128x1 groups of Wgrad are taken within each expert's rows (a segment's tail padded
with zeros), so no group mixes two experts' tokens, and the SwiGLU FFN is one fused function
(`_FP8SwiGLUExpertsFn`). Every Wgrad goes through `model.linear.return_or_defer`, so it can be deferred into a
pipeline's W like the plain one; a deferred W holds FP8 only: the input's FP8 cache and the 128x1 groups of the
output gradient (made in the B), never a dequantised copy.

Weights are quantised once per optimizer step, not once per micro-batch: `fp8_weights` caches a module's FP8
weight (and, from its first backward, the transposed blocks Dgrad uses) on the module, keyed by the weight's
version counter and storage, so every live micro-batch shares one copy and the first forward after an optimizer
step or a checkpoint load quantises again. Results are bitwise those of quantising on every forward.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp8.e5m6 import dequantize_e5m6_1x128, quantize_e5m6_1x128
from fp8.quant import FP8, dequantize, quantize_1x128, quantize_128x1, quantize_128x128
from model.linear import GroupedLinear, Linear, return_or_defer
from model.norm import recomputable
from model.swiglu import scaled, swiglu_backward


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
                       sizes: list[int] | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        """`packed`: (E4M3 rows, their 1x128 scales) when the rows arrived through the FP8 dispatch payload
        (fp8/recipe.py `FP8Payload`), used as the up-projection's operand as they are; None quantises the rows."""
        return _FP8SwiGLUExpertsFn.apply(rows, index, w1.weight, w3.weight, w2.weight, counts, (w1, w3, w2), packed,
                                         sizes, scale)


FP8Operand = tuple[torch.Tensor, torch.Tensor]  # (E4M3 values, their fp32 scales)


class FP8Weight:
    """One weight matrix in FP8 for one version of the weight: its 128x128 blocks (Fprop) and, made on the first
    backward that needs it, their transpose (Dgrad), both shared by every micro-batch that runs with it."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.blocks: FP8Operand = (q, scale)
        self._transposed: FP8Operand | None = None

    def transposed(self) -> FP8Operand:
        if self._transposed is None:
            q, scale = self.blocks
            self._transposed = (q.t().contiguous(), scale.t().contiguous())
        return self._transposed


CACHE_ATTR = "fp8_weight_cache"  # on the module: (key of the weight's version, its FP8Weights)


def _version_key(weight: torch.Tensor, pow2: bool) -> tuple:
    # every in-place write through the parameter or a view of it (optimizer step, p.copy_ of a checkpoint load or
    # ZeRO's all-gather) bumps _version; a new tensor (p.data = ..., .to()) has a new data_ptr
    return weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape), pow2


def fp8_weights(module: Linear | GroupedLinear, spec: FP8Spec) -> list[FP8Weight]:
    """`module.weight` in FP8 (one FP8Weight, or one per expert of a GroupedLinear), quantised once per version of
    the weight and cached on the module: every micro-batch of an optimizer step shares one copy, and the first
    forward after the weight changed quantises it again. A write that bypasses the version counter (through
    `.data`, or a collective straight into the parameter or its flat buffer) must be followed by
    `torch.autograd.graph.increment_version` of what it wrote (a flat buffer bumps its views) or by
    `clear_fp8_weight_caches`."""
    weight = module.weight
    key = _version_key(weight, spec.pow2)
    cached = getattr(module, CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    del cached
    setattr(module, CACHE_ATTR, None)  # free the stale copy before making the new one
    w = weight.detach()
    mats = [w] if w.dim() == 2 else [w[e] for e in range(w.shape[0])]
    weights = [FP8Weight(*quantize_128x128(m, spec.pow2)) for m in mats]
    setattr(module, CACHE_ATTR, (key, weights))
    return weights


def clear_fp8_weight_caches(model: nn.Module) -> int:
    """Drop every module's FP8 weight cache (the next forward quantises again); returns how many were dropped."""
    dropped = 0
    for m in model.modules():
        if getattr(m, CACHE_ATTR, None) is not None:
            setattr(m, CACHE_ATTR, None)
            dropped += 1
    return dropped


def _token_groups(spec: FP8Spec, t: torch.Tensor) -> FP8Operand:
    """A Wgrad operand t [M, C] quantised in 128x1 groups over its M tokens, transposed to [C, M]: as a @ b.T with
    K = tokens, the transposed 128x1 groups are 1x128 tiles. Made in the backward that may defer the Wgrad, so that
    a deferred W holds this FP8 form rather than t."""
    if t.shape[0] == 0:
        return t.new_empty(t.shape[1], 0, dtype=FP8), t.new_empty(t.shape[1], 0, dtype=torch.float32)
    q, s = quantize_128x1(t, spec.pow2)
    return q.t().contiguous(), s.t().contiguous()


def _wgrad(spec: FP8Spec, dg: FP8Operand, xg: FP8Operand) -> torch.Tensor:
    """dW = dy.T @ x in fp32 from the `_token_groups` of dy [M, N] and of x [M, K] (the dequantised FP8 cache of
    the input, or a recomputed input)."""
    if dg[0].shape[1] == 0:
        return torch.zeros(dg[0].shape[0], xg[0].shape[0], dtype=torch.float32, device=dg[0].device)
    return spec.gemm(*dg, *xg, torch.float32)


def _cached_input(x_q: torch.Tensor, x_s: torch.Tensor, k: int, e5m6: bool) -> torch.Tensor:
    """The input as Wgrad sees it: its FP8 (or E5M6) cache, dequantised."""
    return dequantize_e5m6_1x128(x_q, x_s, k) if e5m6 else dequantize(x_q, x_s, (1, 128))


_last_input: tuple = (None, -1, None, None)  # (weakref to an input, its version, pow2, its 1x128 FP8 form)


def _input_tiles(x: torch.Tensor, pow2: bool) -> FP8Operand:
    """x's 1x128 FP8 tiles, shared by the GEMMs that read one tensor one after the other (W_DQ and W_DKV read the
    attention norm's output, W1 and W3 the FFN norm's): one FP8 copy of it is kept for their backwards, not one
    per GEMM. Keyed by the tensor object (weakly: the cache never keeps it alive) and its version counter."""
    global _last_input
    ref, version, was_pow2, tiles = _last_input
    if ref is not None and ref() is x and version == x._version and was_pow2 == pow2:
        return tiles
    tiles = quantize_1x128(x.reshape(-1, x.shape[-1]), pow2)
    _last_input = (weakref.ref(x), x._version, pow2, tiles)
    return tiles


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, module: Linear) -> torch.Tensor:
        spec: FP8Spec = module.fp8
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_s = _input_tiles(x, spec.pow2)
        (w8,) = fp8_weights(module, spec)
        ctx.requantize = not spec.e5m6_cache and recomputable(x)
        if ctx.requantize:  # a norm output recomputed in backward (model/norm.py): quantised again there
            ctx.save_for_backward(x)
        elif spec.e5m6_cache:  # keep a finer copy of the input for Wgrad instead of the E4M3 operand
            ctx.save_for_backward(*quantize_e5m6_1x128(x2, pow2=True))
        else:
            ctx.save_for_backward(x_q, x_s)
        ctx.module, ctx.w8, ctx.dtype, ctx.shape = module, w8, x.dtype, x.shape
        return spec.gemm(x_q, x_s, *w8.blocks, x.dtype).view(*x.shape[:-1], weight.shape[0])  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        module: Linear = ctx.module
        if ctx.requantize:
            (x,) = ctx.saved_tensors
            x_q, x_s = quantize_1x128(x.reshape(-1, x.shape[-1]), module.fp8.pow2)  # the forward's tiles, bitwise
        else:
            x_q, x_s = ctx.saved_tensors
        spec: FP8Spec = module.fp8
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy @ W, W's blocks transposed
            d_q, d_s = quantize_1x128(dy2, spec.pow2)
            dx = spec.gemm(d_q, d_s, *ctx.w8.transposed(), ctx.dtype).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            dg, k, e5m6 = _token_groups(spec, dy2), ctx.shape[-1], spec.e5m6_cache
            return_or_defer(module, lambda: _wgrad(spec, dg, _token_groups(spec, _cached_input(x_q, x_s, k, e5m6))),
                            through_autograd=False)
        return dx, None, None


def _bounds(counts: torch.Tensor, sizes: list[int] | None) -> list[tuple[int, int]]:
    """Each expert's [start, end) rows: from `sizes` on the host when known, else from the counts on the device
    (a host sync: the per-expert FP8 GEMMs need the sizes on the host)."""
    ends = list(itertools.accumulate(sizes)) if sizes is not None else torch.cumsum(counts, 0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def _grouped_fp8(spec: FP8Spec, q: torch.Tensor, s: torch.Tensor, weights: list[FP8Operand], bounds: list,
                 dtype: torch.dtype) -> torch.Tensor:
    """Rows (FP8 1x128 tiles) of group e times group e's FP8 weight operand (its blocks, or their transpose for
    Dgrad); [M, out]."""
    return torch.cat([spec.gemm(q[a:b], s[a:b], *w, dtype) for (a, b), w in zip(bounds, weights)])


def _segment_groups(spec: FP8Spec, t: torch.Tensor, bounds: list) -> list[FP8Operand]:
    """`_token_groups` of each expert's rows: no 128x1 group mixes two experts' tokens (a tail is padded)."""
    return [_token_groups(spec, t[a:b]) for a, b in bounds]


def _grouped_wgrad(spec: FP8Spec, dgs: list[FP8Operand], xgs: list[FP8Operand]) -> torch.Tensor:
    """[E, out, in] fp32 from each expert's `_token_groups` of dy and x."""
    return torch.stack([_wgrad(spec, dg, xg) for dg, xg in zip(dgs, xgs)])


def _blocks(ws: list[FP8Weight]) -> list[FP8Operand]:
    return [w.blocks for w in ws]


def _transposed(ws: list[FP8Weight]) -> list[FP8Operand]:
    return [w.transposed() for w in ws]


class _FP8GroupedLinearFn(torch.autograd.Function):
    """Per expert: its rows (a contiguous segment) times its FP8 weight; rows are quantised 1x128 once (a row's
    tiles never mix experts), each expert's weight in its own 128x128 blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, module: GroupedLinear,
                sizes: list[int] | None):
        spec: FP8Spec = module.fp8
        x_q, x_s = quantize_1x128(x, spec.pow2)
        w, bounds = fp8_weights(module, spec), _bounds(counts, sizes)
        ctx.save_for_backward(x_q, x_s)
        ctx.w, ctx.bounds, ctx.module, ctx.dtype = w, bounds, module, x.dtype
        return _grouped_fp8(spec, x_q, x_s, _blocks(w), bounds, x.dtype)  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_s = ctx.saved_tensors
        module: GroupedLinear = ctx.module
        spec: FP8Spec = module.fp8
        bounds = ctx.bounds
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad per expert
            d_q, d_s = quantize_1x128(dy, spec.pow2)
            dx = _grouped_fp8(spec, d_q, d_s, _transposed(ctx.w), bounds, ctx.dtype)
        if ctx.needs_input_grad[1]:
            dgs = _segment_groups(spec, dy, bounds)
            return_or_defer(module, lambda: _grouped_wgrad(
                spec, dgs, _segment_groups(spec, dequantize(x_q, x_s, (1, 128)), bounds)), through_autograd=False)
        return dx, None, None, None, None


class _FP8SwiGLUExpertsFn(torch.autograd.Function):
    """y = w2(scale * silu(w1 x) * w3 x) per expert for x = rows[index], in FP8, keeping for backward only the FP8
    input x, the FP8 SwiGLU input (w1 x, w3 x) and the per-row scale (the gate weights, or None); the SwiGLU
    output, which w2's Wgrad and the scale's gradient need, is recomputed from them (paper 3.3). Rows that arrive
    with their E4M3 form (`packed`, from the FP8 dispatch) are used as they are."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                counts: torch.Tensor, modules: tuple, packed: tuple | None, sizes: list[int] | None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        spec: FP8Spec = modules[0].fp8
        bounds = _bounds(counts, sizes)
        ws = [fp8_weights(m, spec) for m in modules]
        if packed is not None:  # the dispatched E4M3 rows: no second quantisation
            x_q, x_s = (t.index_select(0, index) for t in packed)
        else:
            x_q, x_s = quantize_1x128(rows.index_select(0, index), spec.pow2)
        x = rows  # for dtype and device below
        a = _grouped_fp8(spec, x_q, x_s, _blocks(ws[0]), bounds, x.dtype)
        b = _grouped_fp8(spec, x_q, x_s, _blocks(ws[1]), bounds, x.dtype)
        ab_q, ab_s = quantize_1x128(torch.cat([a, b], dim=-1), spec.pow2)  # the FP8 cache of the SwiGLU input
        h_q, h_s = quantize_1x128(scaled(F.silu(a) * b, scale), spec.pow2)
        ctx.save_for_backward(x_q, x_s, ab_q, ab_s, index, scale)
        ctx.ws, ctx.bounds, ctx.modules, ctx.dtype, ctx.inter = ws, bounds, modules, x.dtype, a.shape[-1]
        ctx.n_rows = rows.shape[0]
        return _grouped_fp8(spec, h_q, h_s, _blocks(ws[2]), bounds, x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_s, ab_q, ab_s, index, scale = ctx.saved_tensors
        m1, m3, m2 = ctx.modules
        spec: FP8Spec = m1.fp8
        bounds, (w1, w3, w2), dtype = ctx.bounds, ctx.ws, ctx.dtype
        a, b = dequantize(ab_q, ab_s, (1, 128)).to(dtype).split(ctx.inter, dim=-1)
        dy = dy.contiguous()
        d_q, d_s = quantize_1x128(dy, spec.pow2)
        dh = _grouped_fp8(spec, d_q, d_s, _transposed(w2), bounds, dtype)
        h, da, db, dscale = swiglu_backward(a, b, dh, scale)  # h: the recomputed SwiGLU output, unscaled
        h = scaled(h, scale)  # w2's input
        da_q, da_s = quantize_1x128(da, spec.pow2)
        db_q, db_s = quantize_1x128(db, spec.pow2)
        dx = (_grouped_fp8(spec, da_q, da_s, _transposed(w1), bounds, dtype)
              + _grouped_fp8(spec, db_q, db_s, _transposed(w3), bounds, dtype))
        # a deferred W holds the FP8 forms only: of dy, da, db and h, made now, and x's FP8 cache
        dys, hs, das, dbs = (_segment_groups(spec, t, bounds) for t in (dy, h, da, db))
        x_groups = functools.cache(lambda: _segment_groups(spec, dequantize(x_q, x_s, (1, 128)), bounds))
        return_or_defer(m2, lambda: _grouped_wgrad(spec, dys, hs), through_autograd=False)
        return_or_defer(m1, lambda: _grouped_wgrad(spec, das, x_groups()), through_autograd=False)
        return_or_defer(m3, lambda: _grouped_wgrad(spec, dbs, x_groups()), through_autograd=False)
        d_rows = torch.zeros(ctx.n_rows, dx.shape[1], dtype=dx.dtype, device=dx.device).index_add_(0, index, dx)
        return d_rows, None, None, None, None, None, None, None, None, dscale
