"""Timing mode for CPU runs of the pipeline: every chunk's computation is replaced by a sleep of its modelled
duration (paper 3.2.1's F, B, W costs), so that eight processes sharing two cores behave like dedicated
accelerators. With real compute they fill each other's bubbles and hide them from the wall clock; sleeping
ranks use no CPU, so a rank that waits shows its bubble. Everything else is real: the processes, the
executor, the schedule's actions and the point-to-point transfers of hidden-state-sized tensors.

`sleep_runners` builds the executor's stage runners for one rank: a forward sleeps F and passes its input on (a
first stage starts from a leaf tensor), a backward sleeps B, or B - W when the executor defers the weight
gradients, queueing a W that sleeps W into the executor's store.

`sleep_moe_runners` goes one level down, to the phases of MoE layers (for DualPipe's overlapped chunk): each
layer's attention and MLP sleep their modelled forward and backward, while the dispatch and the combine between
them are the real expert-parallel all-to-alls (parallel/expert.py, on a simulated fabric), with the same pause
points as `model.block.Block.steps`. Tokens are routed to fixed random experts.
"""

from __future__ import annotations

import time
from collections.abc import Generator

import torch

from model.block import run_steps
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


class SleepMoELayer:
    """A MoE layer whose attention and MLP are sleeps of `attn` and `mlp` (F, B, W seconds) and whose dispatch and
    combine go through `dispatcher` (an ExpertParallelDispatcher); each token goes to `topk` random experts."""

    def __init__(self, dispatcher, attn: Costs, mlp: Costs, n_experts: int, topk: int, seed: int) -> None:
        self.dispatcher, self.attn, self.mlp = dispatcher, attn, mlp
        self.n_experts, self.topk, self.seed = n_experts, topk, seed
        self.slot = _WeightGradSlot()

    def steps(self, x: torch.Tensor, microbatch: int) -> Generator[None, None, torch.Tensor]:
        x = _Sleep.apply(x, self.attn, self.slot)
        n = x.shape[0] * x.shape[1]
        g = torch.Generator().manual_seed(self.seed * 1000 + microbatch)
        idx = torch.rand(n, self.n_experts, generator=g).topk(self.topk, dim=-1).indices
        weights = torch.full((n, self.topk), 1.0 / self.topk)
        exchange = self.dispatcher.dispatch_async(x.flatten(0, 1), idx, weights)
        yield
        rows, _, _, layout, *_ = exchange.wait()
        y = _Sleep.apply(rows, self.mlp, self.slot)
        exchange = self.dispatcher.combine_async(y, layout)
        yield
        return x + exchange.wait().view_as(x)


def sleep_moe_runners(specs: list[StageSpec], layers: dict[int, SleepMoELayer], shape: tuple[int, ...]
                      ) -> list[StageRunner]:
    """Stage runners whose stages are the `SleepMoELayer`s of their layer indices (shape: the hidden states)."""
    runners = []
    for spec in specs:
        own = [layers[i] for i in spec.layers]

        def steps(x: torch.Tensor | None, microbatch: int, spec: StageSpec = spec, own=own):
            if x is None:
                x = torch.zeros(shape, requires_grad=True)
            for layer in own:
                x = yield from layer.steps(x, microbatch)
            return x.sum() if spec.last else x

        runners.append(StageRunner(spec, lambda x, m, steps=steps: run_steps(steps(x, m)), [l.slot for l in own],
                                   steps, [layer.dispatcher for layer in own]))
    return runners
