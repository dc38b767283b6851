"""Timing mode for CPU runs of the pipeline: every chunk's computation is replaced by a sleep of its modelled
duration (paper 3.2.1's F, B, W costs), so that eight processes sharing two cores behave like dedicated
accelerators. With real compute they fill each other's bubbles and hide them from the wall clock; sleeping
ranks use no CPU, so a rank that waits shows its bubble. Everything else is real: the processes, the
executor, the schedule's actions and the point-to-point transfers of hidden-state-sized tensors.

`sleep_runners` builds the executor's stage runners for one rank: a forward sleeps F and passes its input on (a
first stage starts from a leaf tensor), a backward sleeps B, or B - W when the executor defers the weight
gradients, queueing a W that sleeps W into the executor's store.
"""

from __future__ import annotations

import time

import torch

from parallel.pipeline.executor import StageRunner
from parallel.pipeline.simulate import Costs
from parallel.pipeline.stage import StageSpec


class _WeightGradSlot:
    """Stands in for a stage's Linears: the executor points its `wgrad_store` at a store to defer W."""

    wgrad_store = None


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, costs: Costs, slot: _WeightGradSlot) -> torch.Tensor:
        time.sleep(costs.F)
        ctx.costs, ctx.slot = costs, slot
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        costs, store = ctx.costs, ctx.slot.wgrad_store
        if store is None:
            time.sleep(costs.B)
        else:
            time.sleep(costs.B - costs.W)
            store.put(lambda: time.sleep(costs.W))
        return grad.clone(), None, None


def sleep_runners(specs: list[StageSpec], costs: Costs, shape: tuple[int, ...]) -> list[StageRunner]:
    """Stage runners whose compute is `costs` (seconds) of sleep; hidden states of `shape` travel between them."""
    runners = []
    for spec in specs:
        slot = _WeightGradSlot()

        def forward(x: torch.Tensor | None, microbatch: int, spec: StageSpec = spec, slot=slot) -> torch.Tensor:
            if x is None:
                x = torch.zeros(shape, requires_grad=True)
            out = _Sleep.apply(x, costs, slot)
            return out.sum() if spec.last else out

        runners.append(StageRunner(spec, forward, [slot]))
    return runners
