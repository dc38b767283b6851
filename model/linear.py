"""The one Linear class of the project (DESIGN.md principle 2), its grouped form for routed experts, and the
store that defers weight gradients (paper 3.2.1's zero-bubble "W").

Every projection of the model goes through `Linear` or `GroupedLinear`. Both are explicit autograd functions with
the three GEMMs of a linear layer named as in the paper's section 3.3:

    Fprop  y  = x  @ W.T
    Dgrad  dx = dy @ W
    Wgrad  dW = dy.T @ x

A module whose `wgrad_store` is a `WeightGradStore` (set by a pipeline executor around a backward-for-input "B")
queues its Wgrad there instead of computing it; the matching "W" flushes the store. `return_or_defer` is that one
rule, for every weight gradient of the project (these GEMMs, the fused head in model/loss.py, fp8/linear.py).

A module whose `fp8` is set (a `LinearStrategy`, installed from outside by fp8/recipe.py `apply_fp8`) runs its
GEMMs through that strategy instead; the model never imports the FP8 package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.grads import accumulate_grad
from model.swiglu import swiglu

DEFAULT_INIT_STD = 0.02  # for modules built on their own; Transformer re-initialises with model.init_std


class WeightGradStore:
    """A queue of deferred weight-gradient GEMMs.

    A pipeline executor owns one store per (stage, micro-batch), points its Linears' `wgrad_store` at it before a
    backward-for-input ("B") and calls `flush()` when it schedules the matching "W".
    """

    def __init__(self) -> None:
        self._queue: list[Callable[[], None]] = []

    def put(self, fn: Callable[[], None]) -> None:
        self._queue.append(fn)

    def __len__(self) -> int:
        return len(self._queue)

    def flush(self) -> None:
        """Run every deferred Wgrad in the order it was queued, accumulating into the parameters' gradients."""
        queue, self._queue = self._queue, []
        for fn in queue:
            fn()


def return_or_defer(module: nn.Module, wgrad: Callable[[], torch.Tensor],
                    through_autograd: bool = True) -> torch.Tensor | None:
    """The weight gradient of `module.weight` in a backward: queued in the module's `wgrad_store` when it has one
    (deferred W: None goes to autograd and the store accumulates it later), else returned for autograd to
    accumulate, or, with `through_autograd=False` (an fp32 FP8 Wgrad that must not pass through a bf16 `.grad`),
    accumulated into the main gradient now."""
    weight = module.weight
    if module.wgrad_store is not None:
        module.wgrad_store.put(lambda: accumulate_grad(weight, wgrad()))
        return None
    if through_autograd:
        return wgrad()
    accumulate_grad(weight, wgrad())
    return None


class LinearStrategy(Protocol):
    """How a Linear or GroupedLinear computes instead of its plain GEMMs (fp8/linear.py's `FP8Spec`)."""

    def linear(self, x: torch.Tensor, module: Linear) -> torch.Tensor: ...

    def grouped(self, x: torch.Tensor, counts: torch.Tensor, module: GroupedLinear,
                sizes: list[int] | None) -> torch.Tensor: ...

    def swiglu_experts(self, w1: GroupedLinear, w3: GroupedLinear, w2: GroupedLinear, rows: torch.Tensor,
                       index: torch.Tensor, counts: torch.Tensor, packed: Any, sizes: list[int] | None,
                       scale: torch.Tensor | None = None) -> torch.Tensor: ...


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, module: Linear) -> torch.Tensor:
        dtype = module.compute_dtype or x.dtype
        w = weight.to(dtype)
        ctx.save_for_backward(x, w)  # x as it came: a wider compute dtype is recomputed from it in backward
        ctx.module = module
        return x.to(dtype) @ w.t()  # Fprop

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        module: Linear = ctx.module
        dx = (dy @ w).to(x.dtype) if ctx.needs_input_grad[0] else None  # Dgrad
        if not ctx.needs_input_grad[1]:
            return dx, None, None
        x2, dy2 = x.to(w.dtype).reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dtype = module.weight.dtype
        return dx, return_or_defer(module, lambda: (dy2.t() @ x2).to(dtype)), None  # Wgrad


class Linear(nn.Module):
    """y = x @ W.T without bias (DeepSeek-V3 has none); computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.wgrad_store: WeightGradStore | None = None
        self.fp8: LinearStrategy | None = None  # set by fp8.recipe.apply_fp8
        self.compute_dtype: torch.dtype | None = None  # None: the input's; e.g. fp32 for the router (model/moe.py)
        if not self.weight.is_meta:  # a meta build is initialised when materialised (model/init.py)
            nn.init.normal_(self.weight, std=DEFAULT_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            return self.fp8.linear(x, self)
        return _LinearFn.apply(x, self.weight, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ----------------------------------------------------------------------------------------------------
# Grouped GEMM for routed experts (paper 2.1.2): rows are sorted by expert, `counts[e]` rows per expert.


def _aligned(*tensors: torch.Tensor) -> bool:
    # torch._grouped_mm requires every stride (except the unit one) to be a multiple of 16 bytes.
    return all(
        all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride()) and t.data_ptr() % 16 == 0
        for t in tensors
    )


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, expert_gemm: str,
               sizes: list[int] | None = None) -> torch.Tensor:
    """Segment-wise matmul; `counts` [E] are the segments' sizes on the device, `sizes` the same on the host when
    known (the loop needs them there: without them it reads `counts`, a host sync). Two shapes are supported, as
    in `torch._grouped_mm`:

    - a [M, K], b [E, K, N]            -> [M, N]     rows of segment e times b[e]   (Fprop, Dgrad)
    - a [K, M], b [M, N] (2-D x 2-D)   -> [E, K, N]  segment e of the shared M axis   (Wgrad)

    `expert_gemm` "grouped_mm" calls PyTorch's grouped GEMM (one kernel on GPU); "loop" loops over experts
    (never over tokens), the reference and the fallback for shapes whose strides are not 16-byte aligned,
    which the grouped kernel rejects. On CPU both run at the same speed (bench/model_step.py).
    """
    if expert_gemm == "grouped_mm" and hasattr(F, "grouped_mm") and _aligned(a, b):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return F.grouped_mm(a, b, offs=offs)
    sizes = counts.tolist() if sizes is None else sizes
    if b.dim() == 3:
        chunks = torch.split(a, sizes, dim=0)
        return torch.cat([c @ b[e] for e, c in enumerate(chunks)], dim=0)
    a_chunks, b_chunks = torch.split(a, sizes, dim=1), torch.split(b, sizes, dim=0)
    return torch.stack([ac @ bc for ac, bc in zip(a_chunks, b_chunks)], dim=0)


class _GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, module: GroupedLinear,
                sizes: list[int] | None):
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w, counts)
        ctx.module, ctx.sizes = module, sizes
        return grouped_mm(x, w.transpose(1, 2), counts, module.expert_gemm, sizes)  # Fprop  [M, out]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, counts = ctx.saved_tensors
        module: GroupedLinear = ctx.module
        gemm, sizes = module.expert_gemm, ctx.sizes
        dy = dy.contiguous()
        dx = grouped_mm(dy, w, counts, gemm, sizes) if ctx.needs_input_grad[0] else None  # Dgrad
        if not ctx.needs_input_grad[1]:
            return dx, None, None, None, None
        dtype = module.weight.dtype
        wgrad = return_or_defer(module, lambda: grouped_mm(dy.t(), x, counts, gemm, sizes).to(dtype))
        return dx, wgrad, None, None, None  # Wgrad [E, out, in]


class GroupedLinear(nn.Module):
    """E independent Linears (weight [E, out, in]) applied to rows grouped by expert."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, expert_gemm: str = "grouped_mm",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if expert_gemm not in ("grouped_mm", "loop"):
            raise ValueError(f"expert_gemm={expert_gemm!r}: must be grouped_mm or loop (model.expert_gemm)")
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.first_expert = 0  # global index of weight[0] (expert parallelism keeps a block of the experts)
        self.expert_gemm = str(expert_gemm)
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features, dtype=dtype))
        self.wgrad_store: WeightGradStore | None = None
        self.fp8: LinearStrategy | None = None  # set by fp8.recipe.apply_fp8
        if not self.weight.is_meta:  # a meta build is initialised when materialised (model/init.py)
            nn.init.normal_(self.weight, std=DEFAULT_INIT_STD)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """x [M, in] sorted by expert, counts [E] (sum M) on the device, `sizes` the same on the host if known
        -> [M, out]."""
        if self.fp8 is not None:
            return self.fp8.grouped(x, counts, self, sizes)
        return _GroupedLinearFn.apply(x, self.weight, counts, self, sizes)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}"


def swiglu_experts(w1: GroupedLinear, w3: GroupedLinear, w2: GroupedLinear, rows: torch.Tensor, index: torch.Tensor,
                   counts: torch.Tensor, packed: Any = None, sizes: list[int] | None = None,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """w2(scale * silu(w1 x) * w3 x) for x = rows[index], sorted by expert (counts [E] rows each); `scale` [M] fp32
    (the gate weights, model/swiglu.py says why they scale the SwiGLU output) or None. With an FP8 strategy on w1
    the strategy runs the whole FFN (fp8/linear.py: FP8 caches, SwiGLU recomputed in backward); `packed` is the
    form in which the dispatch delivered the rows (its payload's, e.g. their exact E4M3 bytes), which such a
    strategy may use as its operand instead of quantising the rows again; None when they arrived as they are.
    `sizes`: `counts` on the host when known (Dispatched.expert_counts)."""
    if w1.fp8 is not None:
        return w1.fp8.swiglu_experts(w1, w3, w2, rows, index, counts, packed, sizes, scale)
    x = rows.index_select(0, index)  # backward: an index_add
    return w2(swiglu(w1(x, counts, sizes), w3(x, counts, sizes), scale), counts, sizes)
