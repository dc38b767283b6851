"""The main-gradient protocol (paper 3.3: weight gradients are kept in FP32): where a parameter's gradient lives
and how a gradient computed outside autograd's own accumulation gets there.

A low-precision parameter carries an fp32 `main_grad` (`attach_main_grads`); autograd's `.grad` of it is moved
into `main_grad` after every backward, so micro-batch accumulation never rounds in bf16. Everything that reads a
gradient (the optimizers, the clip, the gradient sums between pipeline ranks) reads `grad_of(p)`; everything
that produces one outside autograd (a deferred weight gradient, an FP8 Wgrad in fp32) adds it with
`accumulate_grad`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def attach_main_grads(params: Iterable[nn.Parameter]) -> None:
    """Give every non-fp32 parameter an fp32 `main_grad` (None until its first gradient) and a hook that, after
    each backward, adds `p.grad` into it and frees `p.grad`."""

    def move(p: nn.Parameter) -> None:
        if p.grad is None:  # autograd also runs the hook when a deferred or FP8 W left no gradient
            return
        if p.main_grad is None:
            p.main_grad = p.grad.float()
        else:
            p.main_grad.add_(p.grad)
        p.grad = None

    for p in params:
        if p.dtype != torch.float32 and not hasattr(p, "main_grad"):
            p.main_grad = None
            p.register_post_accumulate_grad_hook(move)


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient the optimizer uses: the fp32 `main_grad` when the parameter has one, else `p.grad`."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


@torch.no_grad()
def accumulate_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    """Add a weight gradient computed outside autograd's own accumulation where autograd would have put it: the
    fp32 `main_grad` when the parameter has one (whose hook autograd would have run), else `param.grad`."""
    if hasattr(param, "main_grad"):
        if param.main_grad is None:
            param.main_grad = grad.float()
        else:
            param.main_grad.add_(grad)
    elif param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad += grad
