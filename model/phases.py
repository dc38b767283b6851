"""Run a model phase on its own: forward on detached inputs, backward later (DESIGN.md principle 3).

A scheduler that interleaves the phases of two micro-batches (DualPipe, paper 3.2.1) needs to call each
phase's forward and backward separately. `Phase` cuts the autograd graph at the phase's inputs: its
forward runs `fn` on detached copies, its backward takes the gradients of the outputs and returns those of
the inputs, which the scheduler hands to the previous phase.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def _detach(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.detach().requires_grad_(a.requires_grad or a.grad_fn is not None) if a.is_floating_point() else a
    return a


class Phase:
    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.inputs = tuple(_detach(a) for a in args)
        with torch.enable_grad():
            out = fn(*self.inputs)
        self.outputs: tuple[Any, ...] = out if isinstance(out, tuple) else (out,)

    def detached_outputs(self) -> tuple[Any, ...]:
        """The outputs as the next phase's inputs (graph cut here)."""
        return tuple(_detach(o) for o in self.outputs)

    def backward(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        """grads: one per output (None for outputs without gradient) -> one gradient per input."""
        pairs = [(o, g) for o, g in zip(self.outputs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return tuple(a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in self.inputs)
