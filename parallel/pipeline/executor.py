"""Runs one rank's pipeline schedule (paper 3.2.1): the actions of `schedule.build_schedule`, with point-to-point
transfers between the ranks that hold neighbouring stages.

For F of (stage s, micro-batch m) the rank receives s-1's output (unless s is the first stage), runs the stage
and sends its output on to s+1 (unless s is the last stage, whose output is the micro-batch's loss). For B it
receives the gradient of that output from s+1 (the last stage starts from its loss), runs autograd backward and
sends the gradient of the stage's input back to s-1. Where the two stages sit on the same rank (DualPipeV's turn
at rank PP-1) the tensor is handed over in memory. Receives are posted together as one batch per action
(`batch_isend_irecv`) and waited for before the compute; sends are asynchronous and waited for at the end of the
step, so a rank never blocks on a send. Which tensor travels next on a link is fixed by the schedule (the
validator checks that both ends agree); activations and gradients use two tags. With a simulated `fabric`
(parallel/fabric.py) an action's receives take at least their modelled link time.

A stage's output is released as soon as it is sent (its values are not needed by the backward, only its graph);
its input, the activations its graph saved and its deferred W are released by the micro-batch's B and W.

An FB action (DualPipe's overlapped chunk) runs its forward inside its backward when `overlap` is on and the
forward stage has `steps` (parallel/pipeline/overlap.py): each all-to-all of one micro-batch is then in flight
while the other computes. Otherwise, and always for the forward-then-backward reference order, it runs the
forward, then the backward; the results are bitwise the same.

A B with `defer_w` leaves its weight-gradient GEMMs in a `model.linear.WeightGradStore` owned by this executor,
one per (phase, micro-batch), by pointing the stage's Linears at it during the backward; the matching W runs
them.

`run` returns per-action timings: the busy time (compute) and the time spent waiting for receives, per rank,
and per action kind the expert all-to-all time exposed (waited for) and modelled by the simulated fabric.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from model.linear import WeightGradStore
from parallel.clock import Clock
from parallel.fabric import Fabric, LinkDelay
from parallel.pipeline.action import Action, direction_of, owner
from parallel.pipeline.overlap import ForwardInBackward
from parallel.pipeline.stage import StageSpec

ACTIVATION, GRADIENT = 0, 1  # p2p tags


def _release(output: torch.Tensor) -> None:
    """Free a stage output's memory once it is sent (Megatron's trick): the backward needs only its grad_fn and
    the gradient from the next stage, not its values (a stage ends in a residual add, which saves no output).
    The send holds its own reference until it completes."""
    output.data = torch.empty(0, dtype=output.dtype, device=output.device)


@dataclass
class StageRunner:
    """What the executor needs of one of the rank's stages (one per phase)."""

    spec: StageSpec
    forward: Callable[[torch.Tensor | None, int], torch.Tensor]  # (input or None, micro-batch) -> output / loss
    modules: list[nn.Module] = field(default_factory=list)  # modules with a `wgrad_store` (deferred W)
    # the same forward as a generator pausing after each all-to-all it launches (needed to overlap an FB)
    steps: Callable[[torch.Tensor | None, int], Generator[None, None, torch.Tensor]] | None = None
    dispatchers: list = field(default_factory=list)  # the stage's expert-parallel dispatchers (exchange hooks)


@dataclass
class StepStats:
    """Wall-clock facts of one step on this rank, in seconds: `busy` computing, `wait` waiting for receives,
    `total` from the step's start to its end; `events` are each action's compute (start, end, action) from the
    step's start, as the simulator's timelines (`simulate.Timeline([stats.events, ...])`). Per action kind:
    `exchange_wait` the seconds spent waiting for expert all-to-alls (exposed), `exchange_link` their modelled
    duration on the simulated fabric; `overlapped` counts the FB chunks' backward exchanges that ran a piece of
    the other micro-batch's forward while in flight."""

    busy: float = 0.0
    wait: float = 0.0
    total: float = 0.0
    events: list[tuple[float, float, Action]] = field(default_factory=list)
    exchange_wait: dict[str, float] = field(default_factory=dict)
    exchange_link: dict[str, float] = field(default_factory=dict)
    overlapped: int = 0  # backward exchanges that had the other micro-batch's forward running behind them


class PipelineExecutor:
    """Executes `actions` for pipeline rank `pp_rank` of a `schedule` over `pp` ranks.

    `ranks[i]` is the global rank of pipeline rank i (the members of this rank's pipeline group, in order).
    `shape` and `dtype` describe the hidden states passed between stages (one micro-batch); every micro-batch of
    a step must have that shape.
    """

    def __init__(self, schedule: str, pp: int, pp_rank: int, ranks: list[int], stages: list[StageRunner],
                 shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu",
                 fabric: Fabric | None = None, gpus_per_node: int = 8, overlap: bool = False) -> None:
        self.schedule, self.pp, self.pp_rank, self.ranks = schedule, pp, pp_rank, ranks
        self.fabric, self.gpus_per_node, self.overlap = fabric, gpus_per_node, overlap
        self._dispatchers = list({id(d): d for r in stages for d in r.dispatchers}.values())
        self.stages, self.shape, self.dtype, self.device = stages, tuple(shape), dtype, torch.device(device)
        self.stores: dict[tuple[int, int], WeightGradStore] = {}

    # ---- where tensors come from and go to ---------------------------------------------------------------------
    def _peer(self, stage: int, microbatch: int, n_micro: int) -> tuple[int, int]:
        """(pipeline rank, phase) running `stage` for `microbatch`."""
        return owner(self.schedule, self.pp, stage, direction_of(self.schedule, microbatch, n_micro))

    def run(self, actions: list[Action], n_micro: int, forward_only: bool = False) -> StepStats:
        """Run one step's actions. Losses are backpropagated from the last stage's outputs; gradients accumulate
        into the parameters (scale the loss per micro-batch in the stage's forward). `forward_only`: F actions
        only (evaluation, under no_grad); nothing is kept for a backward."""
        inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        grads: dict[tuple[int, int], torch.Tensor] = {}  # received output gradients, until their B
        local: dict[tuple[int, int, int], torch.Tensor] = {}  # (tag, stage, micro-batch) handed over in memory
        sends: list[dist.Work] = []
        stats = StepStats()
        clock = Clock(self.device)  # host time on the CPU, the compute stream's time on CUDA
        waits_before = self._exchange_waits()
        marks: list[tuple[Any, Any, Any, Action]] = []  # (before receives, after receives, after compute, action)
        t_step = clock.mark()

        def recv_ops(a: Action) -> tuple[list, list]:
            """The receives `a` needs: (P2POps, (key, tensor) to store), or in-memory hand-overs."""
            spec = self.stages[a.phase].spec
            ops, got = [], []
            if a.kind == "F" and not spec.first:
                peer, _ = self._peer(spec.index - 1, a.microbatch, n_micro)
                got.append((("in", a.phase, a.microbatch), peer, ACTIVATION, spec.index))
            if a.kind == "B" and not spec.last:
                peer, _ = self._peer(spec.index + 1, a.microbatch, n_micro)
                got.append((("grad", a.phase, a.microbatch), peer, GRADIENT, spec.index))
            out = []
            for key, peer, tag, stage in got:
                if peer == self.pp_rank:
                    out.append((key, local.pop((tag, stage, a.microbatch))))
                else:
                    t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                    ops.append(dist.P2POp(dist.irecv, t, self.ranks[peer], tag=tag))
                    out.append((key, t))
            return ops, out

        def send(tensor: torch.Tensor, stage: int, microbatch: int, tag: int) -> None:
            peer, _ = self._peer(stage, microbatch, n_micro)
            if peer == self.pp_rank:
                local[(tag, stage, microbatch)] = tensor
            else:
                sends.extend(dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor.contiguous(), self.ranks[peer],
                                                                tag=tag)]))

        def forward_done(part: Action, out: torch.Tensor) -> None:
            spec = self.stages[part.phase].spec
            key = (part.phase, part.microbatch)
            if forward_only:
                inputs.pop(key)
            else:
                outputs[key] = out
            if not spec.last and tuple(out.shape) != self.shape:
                raise ValueError(f"micro-batch {part.microbatch}: stage {spec.index} produced hidden states "
                                 f"of shape {tuple(out.shape)}, the pipeline was set up for {self.shape}; "
                                 "every micro-batch of a step must have the same shape (micro-batch size "
                                 "and sequence length)")
            if not spec.last:
                send(out.detach(), spec.index + 1, part.microbatch, ACTIVATION)
                if not forward_only and out.grad_fn is not None:
                    _release(out)

        def backward(part: Action) -> None:
            spec = self.stages[part.phase].spec
            key = (part.phase, part.microbatch)
            self._backward(part, outputs.pop(key), grads.pop(key, None))
            x = inputs.pop(key)
            if not spec.first:
                send(x.grad, spec.index - 1, part.microbatch, GRADIENT)

        for action in actions:
            parts = action.parts()
            ops, received = [], []
            for part in parts:
                o, r = recv_ops(part)
                ops += o
                received += r
            t0 = t1 = clock.mark()
            if ops:
                for work in dist.batch_isend_irecv(ops) + self._link_delay(ops):
                    work.wait()
                t1 = clock.mark()
            for key, tensor in received:
                if key[0] == "in":
                    inputs[key[1:]] = tensor if forward_only else tensor.requires_grad_()
                else:
                    grads[key[1:]] = tensor

            linked_before = sum(d.linked_s for d in self._dispatchers)
            for d in self._dispatchers:
                d.tag = action.kind  # the dispatchers' waits of this action count under its kind
            f_runner = self.stages[action.forward.phase] if action.kind == "FB" else None
            if f_runner is not None and self.overlap and f_runner.steps is not None:
                f, b = action.forward, action.backward
                steps = f_runner.steps(inputs.setdefault((f.phase, f.microbatch), None), f.microbatch)
                driver = ForwardInBackward(steps, self.stages[b.phase].dispatchers)
                forward_done(f, driver.run(lambda: backward(b)))
                stats.overlapped += driver.resumed
            else:
                for part in parts:
                    key = (part.phase, part.microbatch)
                    if part.kind == "F":
                        forward_done(part, self.stages[part.phase].forward(inputs.setdefault(key, None),
                                                                            part.microbatch))
                    elif part.kind == "B":
                        backward(part)
                    else:  # W
                        self.stores.pop(key).flush()
            linked = sum(d.linked_s for d in self._dispatchers) - linked_before
            stats.exchange_link[action.kind] = stats.exchange_link.get(action.kind, 0.0) + linked
            marks.append((t0, t1, clock.mark(), action))
            sends = [work for work in sends if not work.is_completed()]  # finished sends free their tensors
        for work in sends:
            work.wait()
        for d in self._dispatchers:
            d.tag = ""
        if inputs or outputs or local or self.stores:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: the schedule left work undone (forwards without "
                               f"backward {sorted(outputs)}, deferred W {sorted(self.stores)}); it is not valid")
        stats.total = clock.seconds(t_step, clock.mark())  # resolves every mark of the step at once on CUDA
        for t0, t1, t2, action in marks:
            start, end = clock.seconds(t_step, t1), clock.seconds(t_step, t2)
            stats.wait += clock.seconds(t0, t1)
            stats.busy += end - start
            stats.events.append((start, end, action))
        for key, seconds in self._exchange_waits().items():
            kind = key.split(":", 1)[1]
            if kind:
                stats.exchange_wait[kind] = seconds - waits_before.get(key, 0.0)
        return stats

    def _exchange_waits(self) -> dict[str, float]:
        """Running totals of the stages' exposed expert all-to-all seconds, by the action kind they ran under."""
        out: dict[str, float] = {}
        for d in self._dispatchers:
            for key, seconds in (d.clock.totals() if d.clock is not None else {}).items():
                out[key] = out.get(key, 0.0) + seconds
        return out

    def _link_delay(self, ops: list[dist.P2POp]) -> list[LinkDelay]:
        """The simulated fabric's time for this action's receives, from now (parallel/fabric.py)."""
        if self.fabric is None:
            return []
        node = self.ranks[self.pp_rank] // self.gpus_per_node
        intra = sum(op.tensor.nbytes for op in ops if op.peer // self.gpus_per_node == node)
        inter = sum(op.tensor.nbytes for op in ops if op.peer // self.gpus_per_node != node)
        return [LinkDelay(self.fabric.seconds(intra, inter))]

    def _backward(self, action: Action, output: torch.Tensor, grad: torch.Tensor | None) -> None:
        runner = self.stages[action.phase]
        store = None
        if action.defer_w:
            store = self.stores[(action.phase, action.microbatch)] = WeightGradStore()
            for m in runner.modules:
                m.wgrad_store = store
        try:
            if grad is None:
                torch.autograd.backward(output)
            else:
                # `output`'s data was released after its send (`_release`); torch.autograd.backward would compare
                # its shape with the gradient's, the engine checks against the graph's recorded shape instead
                Variable._execution_engine.run_backward((output,), (grad,), False, False, (), True, True)
        finally:
            if store is not None:
                for m in runner.modules:
                    m.wgrad_store = None
