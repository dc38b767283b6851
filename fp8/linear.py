"""The one Linear class of the project (DESIGN.md principle 2), and its grouped form for routed experts.

Every projection of the model goes through `Linear` or `GroupedLinear`. Both are written as explicit
autograd functions with the three GEMMs of a linear layer named as in the paper's section 3.3:

    Fprop  y  = x  @ W.T
    Dgrad  dx = dy @ W
    Wgrad  dW = dy.T @ x

so that the FP8 recipe (fp8/, paper 3.3) can later replace each GEMM in one place, and so that the Wgrad
GEMM can be deferred into a `WeightGradStore` owned by a pipeline instance (zero-bubble "W" of ZB1P and
DualPipe, paper 3.2.1). A module whose `wgrad_store` is None computes its weight gradient immediately.
"""

from __future__ import annotations

from collections.abc import Callable

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
    """Add a deferred weight gradient into `param.grad`, as autograd would have."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


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
        nn.init.normal_(self.weight, std=DEFAULT_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        nn.init.normal_(self.weight, std=DEFAULT_INIT_STD)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, in] sorted by group, counts [E] (sum M) -> [M, out]."""
        return _GroupedLinearFn.apply(x, self.weight, counts, self)

    def extra_repr(self) -> str:
        return f"groups={self.n_groups}, in_features={self.in_features}, out_features={self.out_features}"
