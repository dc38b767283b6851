"""The one Linear class of the project (DESIGN.md principle 2), and its grouped form for routed experts.

Every projection of the model goes through `Linear` or `GroupedLinear`. Both are written as explicit
autograd functions with the three GEMMs of a linear layer named as in the paper's section 3.3:

    Fprop  y  = x  @ W.T
    Dgrad  dx = dy @ W
    Wgrad  dW = dy.T @ x

and so that the Wgrad GEMM can be deferred into a `WeightGradStore` owned by a pipeline instance
(zero-bubble "W" of ZB1P and DualPipe, paper 3.2.1). A module whose `wgrad_store` is None computes its weight
gradient immediately.

FP8 (paper 3.3). A module whose `fp8` is an `FP8Spec` (set from outside by `fp8.recipe.apply_recipe`) runs the
three GEMMs with E4M3 operands and fine-grained scales (fp8/quant.py) through the spec's GEMM backend
(fp8/gemm.py):

    Fprop  x 1x128 tiles  x  W 128x128 blocks                    -> the input's dtype
    Dgrad  dy 1x128 tiles x  W's 128x128 blocks, transposed      -> the input's dtype
    Wgrad  dy 128x1 groups x x 128x1 groups (over tokens)        -> fp32, added into the fp32 main gradient

The input is kept for the backward only in FP8 (its 1x128 quantisation, 1 byte per element plus a scale per 128;
or, where the spec asks, E5M6 with power-of-two scales, 1.5 bytes per element) and re-quantised to 128x1 groups
there; the FP8 weight is kept as it was used. For routed experts the 128x1
groups of Wgrad are taken within each expert's rows (a segment's tail padded with zeros), so no group mixes two
experts' tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_INIT_STD = 0.02  # for modules built on their own; Transformer re-initialises with model.init_std


class WeightGradStore:
    """A queue of deferred weight-gradient GEMMs.

    A pipeline executor owns one store per stage, points its Linears' `wgrad_store` at it before a
    backward-for-input ("B") and calls `flush()` when it schedules the matching "W".
    """

    def __init__(self) -> None:
        self._queue: list[Callable[[], None]] = []

    def put(self, fn: Callable[[], None]) -> None:
        self._queue.append(fn)

    def __len__(self) -> int:
        return len(self._queue)

    def flush(self) -> None:
        """Run every deferred Wgrad in the order it was queued, accumulating into `param.grad`."""
        queue, self._queue = self._queue, []
        for fn in queue:
            fn()


def accumulate_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    """Add a weight gradient computed outside autograd's own accumulation (deferred, or FP8) where autograd would
    have put it: the parameter's fp32 `main_grad` when it has one (trainer.optim.attach_main_grads, whose hook
    autograd would have run), else `param.grad`."""
    if hasattr(param, "main_grad"):
        if param.main_grad is None:
            param.main_grad = grad.float()
        else:
            param.main_grad.add_(grad)
    elif param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad += grad


@dataclass(frozen=True)
class FP8Spec:
    """How a Linear runs in FP8: `gemm(a_q, a_scale, b_q, b_scale, out_dtype) -> a @ b.T` (a backend of
    fp8/gemm.py), power-of-two scales or not, and whether the input is cached for backward in E5M6 (fp8/e5m6.py,
    the paper's choice for the Linear after attention) instead of E4M3."""

    gemm: Callable[..., torch.Tensor]
    pow2: bool = True
    e5m6_cache: bool = False


def _wgrad(spec: FP8Spec, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dy.T @ x in fp32 from dy [M, N] and x [M, K] (the dequantised FP8 cache, or a recomputed input), both
    quantised in 128x1 groups."""
    from fp8.quant import quantize_128x1

    if dy.shape[0] == 0:
        return torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
    xg_q, xg_s = quantize_128x1(x, spec.pow2)
    dg_q, dg_s = quantize_128x1(dy, spec.pow2)
    # as a @ b.T with K = tokens: the transposed 128x1 groups are 1x128 tiles of dy.T and x.T
    return spec.gemm(dg_q.t().contiguous(), dg_s.t().contiguous(), xg_q.t().contiguous(), xg_s.t().contiguous(),
                     torch.float32)


def _deposit(module: nn.Module, wgrad: Callable[[], torch.Tensor]):
    """An FP8 weight gradient: queued in the module's store (deferred W) or accumulated now; returns None for
    autograd (the gradient does not pass through autograd's bf16 `.grad`)."""
    weight = module.weight
    if module.wgrad_store is None:
        accumulate_grad(weight, wgrad())
    else:
        module.wgrad_store.put(lambda: accumulate_grad(weight, wgrad()))


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, module: Linear) -> torch.Tensor:
        from fp8.quant import quantize_1x128, quantize_128x128

        spec: FP8Spec = module.fp8
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_s = quantize_1x128(x2, spec.pow2)
        w_q, w_s = quantize_128x128(weight.detach(), spec.pow2)
        if spec.e5m6_cache:  # keep a finer copy of the input for Wgrad instead of the E4M3 operand
            from fp8.e5m6 import quantize_e5m6_1x128

            ctx.save_for_backward(*quantize_e5m6_1x128(x2, pow2=True), w_q, w_s)
        else:
            ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.module, ctx.dtype, ctx.shape = module, x.dtype, x.shape
        return spec.gemm(x_q, x_s, w_q, w_s, x.dtype).view(*x.shape[:-1], weight.shape[0])  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from fp8.quant import dequantize, quantize_1x128

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
                from fp8.e5m6 import dequantize_e5m6_1x128

                x = dequantize_e5m6_1x128(x_q, x_s, ctx.shape[-1])
            else:
                x = dequantize(x_q, x_s, (1, 128))
            _deposit(module, lambda: _wgrad(spec, dy2, x))
        return dx, None, None


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, module: Linear) -> torch.Tensor:
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.module = module
        return x @ w.t()  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        module: Linear = ctx.module
        dx = dy @ w if ctx.needs_input_grad[0] else None  # Dgrad
        if not ctx.needs_input_grad[1]:
            return dx, None, None
        weight = module.weight
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])

        def wgrad() -> torch.Tensor:
            return (dy2.t() @ x2).to(weight.dtype)  # Wgrad

        if module.wgrad_store is None:
            return dx, wgrad(), None
        module.wgrad_store.put(lambda: accumulate_grad(weight, wgrad()))
        return dx, None, None


class Linear(nn.Module):
    """y = x @ W.T without bias (DeepSeek-V3 has none); computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.wgrad_store: WeightGradStore | None = None
        self.fp8: FP8Spec | None = None  # set by fp8.recipe.apply_recipe
        nn.init.normal_(self.weight, std=DEFAULT_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            return _FP8LinearFn.apply(x, self.weight, self)
        return _LinearFn.apply(x, self.weight, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ----------------------------------------------------------------------------------------------------
# Grouped GEMM for routed experts (paper 2.1.2): rows are sorted by expert, `counts[e]` rows per expert.

GEMM_BACKENDS = ("grouped_mm", "loop")


def _aligned(*tensors: torch.Tensor) -> bool:
    # torch._grouped_mm requires every stride (except the unit one) to be a multiple of 16 bytes.
    return all(
        all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride()) and t.data_ptr() % 16 == 0
        for t in tensors
    )


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, backend: str) -> torch.Tensor:
    """Segment-wise matmul. Two shapes are supported, as in `torch._grouped_mm`:

    - a [M, K], b [E, K, N]            -> [M, N]     rows of segment e times b[e]   (Fprop, Dgrad)
    - a [K, M], b [M, N] (2-D x 2-D)   -> [E, K, N]  segment e of the shared M axis   (Wgrad)

    `backend` "grouped_mm" calls PyTorch's grouped GEMM (one kernel on GPU); "loop" loops over experts
    (never over tokens), the reference and the fallback for shapes whose strides are not 16-byte aligned,
    which the grouped kernel rejects. On CPU both run at the same speed (bench/model_step.py).
    """
    if backend == "grouped_mm" and hasattr(F, "grouped_mm") and _aligned(a, b):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return F.grouped_mm(a, b, offs=offs)
    sizes = counts.tolist()
    if b.dim() == 3:
        chunks = torch.split(a, sizes, dim=0)
        return torch.cat([c @ b[e] for e, c in enumerate(chunks)], dim=0)
    a_chunks, b_chunks = torch.split(a, sizes, dim=1), torch.split(b, sizes, dim=0)
    return torch.stack([ac @ bc for ac, bc in zip(a_chunks, b_chunks)], dim=0)


class _GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, module: GroupedLinear):
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w, counts)
        ctx.module = module
        return grouped_mm(x, w.transpose(1, 2), counts, module.backend)  # Fprop  [M, out]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, counts = ctx.saved_tensors
        module: GroupedLinear = ctx.module
        dy = dy.contiguous()
        dx = grouped_mm(dy, w, counts, module.backend) if ctx.needs_input_grad[0] else None  # Dgrad
        if not ctx.needs_input_grad[1]:
            return dx, None, None, None
        weight = module.weight

        def wgrad() -> torch.Tensor:
            return grouped_mm(dy.t(), x, counts, module.backend).to(weight.dtype)  # Wgrad [E, out, in]

        if module.wgrad_store is None:
            return dx, wgrad(), None, None
        module.wgrad_store.put(lambda: accumulate_grad(weight, wgrad()))
        return dx, None, None, None


def _bounds(counts: torch.Tensor) -> list[tuple[int, int]]:
    """Each group's [start, end) rows from the per-group row counts."""
    ends = torch.cumsum(counts, 0).tolist()
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
    from fp8.quant import quantize_128x128

    return [quantize_128x128(weight[e].detach(), spec.pow2) for e in range(weight.shape[0])]


class _FP8GroupedLinearFn(torch.autograd.Function):
    """Per expert: its rows (a contiguous segment) times its FP8 weight; rows are quantised 1x128 once (a row's
    tiles never mix experts), each expert's weight in its own 128x128 blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, module: GroupedLinear):
        from fp8.quant import quantize_1x128

        spec: FP8Spec = module.fp8
        x_q, x_s = quantize_1x128(x, spec.pow2)
        w, bounds = _fp8_weights(spec, weight), _bounds(counts)
        ctx.save_for_backward(x_q, x_s)
        ctx.w, ctx.bounds, ctx.module, ctx.dtype = w, bounds, module, x.dtype
        return _grouped_fp8(spec, x_q, x_s, w, bounds, x.dtype)  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from fp8.quant import dequantize, quantize_1x128

        x_q, x_s = ctx.saved_tensors
        module: GroupedLinear = ctx.module
        spec: FP8Spec = module.fp8
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad per expert
            d_q, d_s = quantize_1x128(dy, spec.pow2)
            dx = _grouped_fp8(spec, d_q, d_s, ctx.w, ctx.bounds, ctx.dtype, transposed=True)
        if ctx.needs_input_grad[1]:
            _deposit(module, lambda: _grouped_wgrad(spec, dy, dequantize(x_q, x_s, (1, 128)), ctx.bounds))
        return dx, None, None, None


class _FP8SwiGLUExpertsFn(torch.autograd.Function):
    """y = w2(silu(w1 x) * w3 x) per expert for x = rows[index], in FP8, keeping for backward only the FP8 input x
    and the FP8 SwiGLU input (w1 x, w3 x); the SwiGLU output, which w2's Wgrad needs, is recomputed from them (paper
    3.3). Rows that arrive with their E4M3 form (`fp8_rows`, from the FP8 dispatch) are used as they are."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                counts: torch.Tensor, modules: tuple, fp8_rows: tuple | None) -> torch.Tensor:
        from fp8.quant import quantize_1x128

        spec: FP8Spec = modules[0].fp8
        bounds = _bounds(counts)
        ws = [_fp8_weights(spec, w) for w in (w1, w3, w2)]
        if fp8_rows is not None:  # the dispatched E4M3 rows: no second quantisation
            x_q, x_s = (t.index_select(0, index) for t in fp8_rows)
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
        from fp8.quant import dequantize, quantize_1x128

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
        _deposit(m2, lambda: _grouped_wgrad(spec, dy, h, bounds))
        _deposit(m1, lambda: _grouped_wgrad(spec, da, x, bounds))
        _deposit(m3, lambda: _grouped_wgrad(spec, db, x, bounds))
        d_rows = torch.zeros(ctx.n_rows, dx.shape[1], dtype=dx.dtype, device=dx.device).index_add_(0, index, dx)
        return d_rows, None, None, None, None, None, None, None


def swiglu_experts(w1: GroupedLinear, w3: GroupedLinear, w2: GroupedLinear, rows: torch.Tensor, index: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for x = rows[index], sorted by expert (counts [E] rows each); in FP8 when the recipe
    set `w1.fp8`, with the SwiGLU input cached in FP8 and its output recomputed in backward. Rows carrying an `fp8`
    attribute (their exact E4M3 1x128 form, attached by the FP8 dispatch payload) feed the up-projection as they
    are, without being quantised again."""
    if w1.fp8 is not None:
        return _FP8SwiGLUExpertsFn.apply(rows, index, w1.weight, w3.weight, w2.weight, counts, (w1, w3, w2),
                                         getattr(rows, "fp8", None))
    x = rows.index_select(0, index)  # backward: an index_add
    return w2(F.silu(w1(x, counts)) * w3(x, counts), counts)


class GroupedLinear(nn.Module):
    """E independent Linears (weight [E, out, in]) applied to rows grouped by expert."""

    def __init__(self, n_groups: int, in_features: int, out_features: int, backend: str = "grouped_mm",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if backend not in GEMM_BACKENDS:
            raise ValueError(f"expert_gemm={backend!r}: must be one of {GEMM_BACKENDS}")
        self.n_groups, self.in_features, self.out_features = n_groups, in_features, out_features
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(n_groups, out_features, in_features, dtype=dtype))
        self.wgrad_store: WeightGradStore | None = None
        self.fp8: FP8Spec | None = None  # set by fp8.recipe.apply_recipe
        nn.init.normal_(self.weight, std=DEFAULT_INIT_STD)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, in] sorted by group, counts [E] (sum M) -> [M, out]."""
        if self.fp8 is not None:
            return _FP8GroupedLinearFn.apply(x, self.weight, counts, self)
        return _GroupedLinearFn.apply(x, self.weight, counts, self)

    def extra_repr(self) -> str:
        return f"groups={self.n_groups}, in_features={self.in_features}, out_features={self.out_features}"
