"""RMSNorm (paper 2.1), computed in fp32 and cast back before the weight multiply, as DeepSeek does.

With `recompute=True` (paper 3.2.3) the output is not kept for backward: only the input is saved and the
normalisation is run again during back-propagation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, recompute: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.recompute = recompute
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._norm, x, use_reentrant=False)
        return self._norm(x)
