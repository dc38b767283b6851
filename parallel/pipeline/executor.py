"""Runs one rank's pipeline schedule (paper 3.2.1): the actions of a `schedule.Schedule`, with point-to-point
transfers between the ranks that hold neighbouring stages, in the order of `p2p.StepPlan` (one 2-rank
communicator per channel, no tags, each channel's next receive posted before the current one is waited for,
sends waited for at the end of the step; p2p.py says why NCCL can run it).

Laid out like DualPipe's own runner: a small per-step state (`_Step`) and one method per chunk kind:
`_forward_chunk` (F: the stage's forward on the received activation, its output sent on), `_backward_chunk` (B:
autograd backward from the received gradient, or from the loss on the last stage, the input's gradient sent
back), `_overlapped_chunk` (FB: DualPipe's overlapped pair), `_weight_chunk` (W: the deferred weight-gradient
GEMMs), around `_receive` (wait for an action's tensors, post each channel's next receive) and `_send`. Where
the two stages sit on the same rank (DualPipeV's turn at rank PP-1) the tensor is handed over in memory. With a
simulated `fabric` (parallel/fabric.py) a receive lasts at least its modelled link time from when it is posted.

A stage's output is released as soon as it is sent (its values are not needed by the backward, only its graph);
its input, the activations its graph saved and its deferred W are released by the micro-batch's B and W.

An FB action runs its forward inside its backward when `overlap` is on and the forward stage has `steps`
(parallel/pipeline/overlap.py): each all-to-all of one micro-batch is then in flight while the other computes.
Otherwise it runs the forward, then the backward; the results are bitwise the same.

A B with `defer_w` leaves its weight-gradient GEMMs in a `model.linear.WeightGradStore` owned by this executor,
one per (phase, micro-batch), by pointing the stage's Linears at it during the backward; the matching W runs
them.

`run` returns per-action timings: the busy time (compute) and the time spent waiting for receives, per rank,
and per action kind the expert all-to-all time exposed (waited for) and modelled by the simulated fabric.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from model.linear import WeightGradStore
from parallel.clock import Clock
from parallel.fabric import Fabric, LinkDelay
from parallel.pipeline.action import Action
from parallel.pipeline.overlap import ForwardInBackward
from parallel.pipeline.p2p import Channel, StepPlan, Transfer, check_channels
from parallel.pipeline.schedule import Schedule, Tensor
from parallel.pipeline.stage import StageSpec

Steps = Generator[None, None, torch.Tensor]


class Stage(Protocol):
    """What the executor needs of one of the rank's stages (one per phase): its spec; `forward(x, m)` (input or
    None on the first stage, micro-batch) -> output, or the scaled loss on the last stage; `steps`, the same
    forward as a generator pausing after each all-to-all it launches (None: cannot overlap an FB); the modules
    with a `wgrad_store` (deferred W) and the stage's expert-parallel dispatchers (exchange hooks)."""

    spec: StageSpec
    modules: Sequence[nn.Module]
    dispatchers: Sequence[Any]
    steps: Callable[[torch.Tensor | None, int], Steps] | None

    def forward(self, x: torch.Tensor | None, microbatch: int) -> torch.Tensor: ...


@dataclass
class StageRunner:
    """A `Stage` from plain callables (tests and benches)."""

    spec: StageSpec
    forward: Callable[[torch.Tensor | None, int], torch.Tensor]
    modules: list[nn.Module] = field(default_factory=list)
    steps: Callable[[torch.Tensor | None, int], Steps] | None = None
    dispatchers: list = field(default_factory=list)


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


@dataclass
class _Posted:
    """A receive in flight on a channel: the tensor it will hold and what it is."""

    tensor: Tensor
    buffer: torch.Tensor
    works: list


@dataclass
class _Step:
    """The state of one step on this rank, keyed by (phase, micro-batch) unless said otherwise."""

    plan: StepPlan
    forward_only: bool
    inputs: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)
    outputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # until their B
    grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # received output gradients
    local: dict[Tensor, torch.Tensor] = field(default_factory=dict)  # handed over in memory
    posted: dict[Channel, _Posted] = field(default_factory=dict)  # the next receive of each incoming channel
    taken: dict[Channel, int] = field(default_factory=dict)  # tensors taken from each incoming channel
    sends: list = field(default_factory=list)  # works of sends in flight
    stats: StepStats = field(default_factory=StepStats)


class PipelineExecutor:
    """Executes the actions of `schedule` for pipeline rank `pp_rank`.

    `ranks[i]`: the global rank of pipeline rank i (this rank's pipeline group, in order). `stages`: this rank's
    stages by phase. `shape` and `dtype`: the hidden states passed between stages (one micro-batch; every
    micro-batch of a step must have that shape). `channels`: the 2-rank group of each p2p channel of this rank
    (the grid's `channels`; p2p.py); a schedule needing one that is missing is refused here.
    """

    def __init__(self, schedule: Schedule, pp_rank: int, ranks: Sequence[int], stages: Sequence[Stage],
                 shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu",
                 channels: Mapping[Channel, dist.ProcessGroup] | None = None, fabric: Fabric | None = None,
                 gpus_per_node: int = 8, overlap: bool = False) -> None:
        self.channels = dict(channels or {})
        check_channels(schedule, pp_rank, self.channels)
        self.schedule, self.pp_rank, self.ranks = schedule, pp_rank, list(ranks)
        self.fabric, self.gpus_per_node, self.overlap = fabric, gpus_per_node, overlap
        self.stages, self.shape, self.dtype, self.device = list(stages), tuple(shape), dtype, torch.device(device)
        self._phase_of = {stage.spec.index: phase for phase, stage in enumerate(self.stages)}
        self._dispatchers = list({id(d): d for s in self.stages for d in s.dispatchers}.values())
        self.stores: dict[tuple[int, int], WeightGradStore] = {}

    def run(self, actions: list[Action], n_micro: int, forward_only: bool = False,
            after: Callable[[int], None] | None = None) -> StepStats:
        """Run one step's actions. Losses are backpropagated from the last stage's outputs; gradients accumulate
        into the parameters (scale the loss per micro-batch in the stage's forward). `forward_only`: F actions
        only (evaluation, under no_grad); nothing is kept for a backward. `after(i)` runs after action i (the
        overlapped gradient reduction, parallel/grad_reduce.py)."""
        step = _Step(StepPlan(self.schedule, self.pp_rank, actions, n_micro), forward_only)
        clock = Clock(self.device)  # host time on the CPU, the compute stream's time on CUDA
        waits_before = self._exchange_waits()
        marks: list[tuple[Any, Any, Any, Action]] = []  # (before receives, after receives, after compute, action)
        t_step = clock.mark()
        for channel in sorted(step.plan.incoming):
            self._post_receive(step, channel)
        for i, action in enumerate(actions):
            t0 = clock.mark()
            t1 = clock.mark() if self._receive(step, step.plan.takes[i]) else t0
            linked_before = sum(d.linked_s for d in self._dispatchers)
            for d in self._dispatchers:
                d.tag = action.kind  # the dispatchers' waits of this action count under its kind
            if action.kind == "FB":
                self._overlapped_chunk(step, action)
            elif action.kind == "F":
                self._forward_chunk(step, action)
            elif action.kind == "B":
                self._backward_chunk(step, action)
            else:
                self._weight_chunk(action)
            linked = sum(d.linked_s for d in self._dispatchers) - linked_before
            step.stats.exchange_link[action.kind] = step.stats.exchange_link.get(action.kind, 0.0) + linked
            marks.append((t0, t1, clock.mark(), action))
            step.sends = [work for work in step.sends if not work.is_completed()]  # finished sends free their tensors
            if after is not None:
                after(i)
        return self._finish(step, clock, t_step, marks, waits_before)

    # ---- p2p ---------------------------------------------------------------------------------------------------
    def _post_receive(self, step: _Step, channel: Channel) -> None:
        """Post the next receive of `channel`, if the step has one more tensor for it."""
        k = step.taken.get(channel, 0)
        order = step.plan.incoming[channel]
        if k == len(order):
            return
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        src = self.ranks[channel[0]]
        works = [dist.irecv(buffer, src, group=self.channels[channel])]
        if self.fabric is not None:
            works.append(LinkDelay(self._link_seconds(src, buffer.nbytes)))
        step.posted[channel] = _Posted(order[k], buffer, works)

    def _receive(self, step: _Step, takes: list[Transfer]) -> bool:
        """Wait for an action's tensors (the forward's input before the backward's gradient), posting each
        channel's next receive first; whether any came over a channel."""
        waited = False
        for t in takes:
            if t.channel is None:
                tensor = step.local.pop(t.tensor)
            else:
                posted = step.posted.pop(t.channel)
                if posted.tensor != t.tensor:  # StepPlan's orders make this impossible
                    raise RuntimeError(f"channel {t.channel} holds {posted.tensor}, the action expects {t.tensor}")
                step.taken[t.channel] = step.taken.get(t.channel, 0) + 1
                self._post_receive(step, t.channel)  # the channel's next, posted while this one may still travel
                for work in posted.works:
                    work.wait()
                waited = True
                tensor = posted.buffer
            kind, stage, m = t.tensor
            key = (self._phase_of[stage], m)
            if kind == "activation":
                step.inputs[key] = tensor if step.forward_only else tensor.requires_grad_()
            else:
                step.grads[key] = tensor
        return waited

    def _send(self, step: _Step, tensor: torch.Tensor, what: Tensor) -> None:
        channel = step.plan.route[what]
        if channel is None:
            step.local[what] = tensor
        else:
            step.sends.append(dist.isend(tensor.contiguous(), self.ranks[channel[1]], group=self.channels[channel]))

    def _link_seconds(self, peer: int, nbytes: int) -> float:
        """The simulated fabric's time for a transfer from global rank `peer` (parallel/fabric.py)."""
        same_node = peer // self.gpus_per_node == self.ranks[self.pp_rank] // self.gpus_per_node
        return self.fabric.seconds(nbytes if same_node else 0, 0 if same_node else nbytes)

    # ---- chunks ------------------------------------------------------------------------------------------------
    def _forward_chunk(self, step: _Step, part: Action) -> None:
        x = step.inputs.setdefault((part.phase, part.microbatch), None)
        self._forward_done(step, part, self.stages[part.phase].forward(x, part.microbatch))

    def _forward_done(self, step: _Step, part: Action, out: torch.Tensor) -> None:
        spec = self.stages[part.phase].spec
        key = (part.phase, part.microbatch)
        if step.forward_only:
            step.inputs.pop(key)
        else:
            step.outputs[key] = out
        if spec.last:
            return
        if tuple(out.shape) != self.shape:
            raise ValueError(f"micro-batch {part.microbatch}: stage {spec.index} produced hidden states of shape "
                             f"{tuple(out.shape)}, the pipeline was set up for {self.shape}; every micro-batch of "
                             "a step must have the same shape (micro-batch size and sequence length)")
        self._send(step, out.detach(), ("activation", spec.index + 1, part.microbatch))
        if not step.forward_only and out.grad_fn is not None:
            _release(out)

    def _backward_chunk(self, step: _Step, part: Action) -> None:
        spec = self.stages[part.phase].spec
        key = (part.phase, part.microbatch)
        self._backward(part, step.outputs.pop(key), step.grads.pop(key, None))
        x = step.inputs.pop(key)
        if not spec.first:
            self._send(step, x.grad, ("gradient", spec.index - 1, part.microbatch))

    def _overlapped_chunk(self, step: _Step, action: Action) -> None:
        """DualPipe's FB: the forward part runs inside the backward part's exchanges when it can, else after."""
        f, b = action.forward, action.backward
        stage = self.stages[f.phase]
        if not self.overlap or stage.steps is None:
            self._forward_chunk(step, f)
            self._backward_chunk(step, b)
            return
        steps = stage.steps(step.inputs.setdefault((f.phase, f.microbatch), None), f.microbatch)
        driver = ForwardInBackward(steps, self.stages[b.phase].dispatchers)
        self._forward_done(step, f, driver.run(lambda: self._backward_chunk(step, b)))
        step.stats.overlapped += driver.resumed

    def _weight_chunk(self, part: Action) -> None:
        with torch.no_grad():  # as inside autograd's backward: a weight gradient builds no graph
            self.stores.pop((part.phase, part.microbatch)).flush()

    def _backward(self, part: Action, output: torch.Tensor, grad: torch.Tensor | None) -> None:
        stage = self.stages[part.phase]
        store = None
        if part.defer_w:
            store = self.stores[(part.phase, part.microbatch)] = WeightGradStore()
            for m in stage.modules:
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
                for m in stage.modules:
                    m.wgrad_store = None

    # ---- end of the step ---------------------------------------------------------------------------------------
    def _finish(self, step: _Step, clock: Clock, t_step: Any, marks: list, waits_before: dict) -> StepStats:
        for work in step.sends:
            work.wait()
        for d in self._dispatchers:
            d.tag = ""
        if step.inputs or step.outputs or step.local or step.posted or self.stores:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: the schedule left work undone (forwards without "
                               f"backward {sorted(step.outputs)}, deferred W {sorted(self.stores)}, receives "
                               f"{sorted(step.posted)}); it is not valid")
        stats = step.stats
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


def _release(output: torch.Tensor) -> None:
    """Free a stage output's memory once it is sent (Megatron's trick): the backward needs only its grad_fn and
    the gradient from the next stage, not its values (a stage ends in a residual add, which saves no output).
    The send holds its own reference until it completes."""
    output.data = torch.empty(0, dtype=output.dtype, device=output.device)
