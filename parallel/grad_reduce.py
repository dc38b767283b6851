"""Gradient reduction overlapped with the pipeline's cool-down (paper 3.2.1; Megatron's overlap of the gradient
reduce with the backward): each ZeRO-1 bucket's gradients are summed over the pipeline copies that hold them
(DualPipe's mirror pairs, the first and last stage sharing the embedding with MTP) and reduce-scattered over
data parallelism as soon as the bucket's last weight gradient of the step is final, while the rank still runs
the rest of its schedule, instead of after the whole step.

Buckets. The optimizer's buckets are cut by the pipeline's gradient groups (`Pipeline.grad_group`: the pipeline
ranks holding a parameter and the stages whose chunks produce its gradient), so a bucket's gradients become
final at one action: the last action of the step that runs a weight gradient (a B that does not defer it, or a
W) of one of its stages on this rank. For a bucket of DualPipe's stage s, the mirror ranks s and PP-1-s both
hold it and finish it in the same local phase, so they reach it in the same order.

Order. Every member of a group must post its collectives on that group in one order. Buckets are started in
one order agreed by every rank without communication (by their ready action on the lowest pipeline rank
holding them, from the schedule, then their key, dtype and kind), each once it is ready and all before it have
started; a bucket's reduce-scatter is posted after its copies' sum has completed (polled between actions with
`is_completed`, which neither blocks the host nor stalls a stream) and after the previous bucket's, so the
data-parallel group sees one order too. `finish` drives what is left after the last action and waits for everything.

The arithmetic is exactly the unoverlapped path's (the copies' sum, then 1/DP and the reduce-scatter, per
bucket), so results are bitwise the same: tests/dist/test_grad_reduce.py. With `overlap` off (the trainer's
parallel.overlap_grad_reduce=false) the same reducer starts every bucket after the last action. Memory: the sums
and the reduce-scatters run in place on the optimizer's persistent flat gradient buffers (parallel/zero.py), in
which the backward accumulated, so the gradients never exist twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel.clock import Clock
from parallel.pipeline.action import Action
from parallel.pipeline.schedule import Schedule
from parallel.zero import ZeroOptimizer, _Bucket


@dataclass
class _Job:
    """One bucket's reduction in flight."""

    bucket: _Bucket
    ready: int  # the action after which its gradients are final on this rank
    order: tuple  # the key every member sorts by
    flat: torch.Tensor | None = None
    summed: Any = None  # the copies' all-reduce in flight (None: none, or done)
    scatter: Any = None  # the reduce-scatter in flight


class OverlappedGradReduce:
    """Starts each of `opt`'s buckets' reductions once its gradients are final (see the module docstring).
    `replica_groups[ranks]`: the group of the pipeline ranks `ranks` that hold the same parameters; a bucket's
    key is (holder ranks, stages producing its gradients), as `Pipeline.grad_group` makes it."""

    def __init__(self, opt: ZeroOptimizer, schedule: Schedule, pp_rank: int,
                 replica_groups: dict[tuple[int, ...], dist.ProcessGroup], device: torch.device,
                 overlap: bool = True) -> None:
        self.opt, self.schedule, self.pp_rank, self.replica_groups = opt, schedule, pp_rank, replica_groups
        self.overlap = overlap  # False: every bucket starts in `finish` (parallel.overlap_grad_reduce=false)
        self.clock = Clock(device)
        self.exposed_s = 0.0  # time `finish` waited, summed over steps (the reduction not hidden behind compute)
        self.early = 0  # buckets started before the step's last action, summed over steps
        self._jobs: list[_Job] = []
        self._started = self._scattered = self._last = 0

    def begin(self, actions: Sequence[Action], n_micro: int) -> None:
        """Plan one step of `actions` (this rank's): when each bucket is ready, and the agreed order."""
        ready_here = _last_weight_gradients(self.schedule, self.pp_rank, actions)
        lists: dict[int, dict[int, int]] = {self.pp_rank: ready_here}
        jobs = []
        for b in self.opt.buckets:
            holders, stages = b.key
            first = min(holders)
            if first not in lists:
                lists[first] = _last_weight_gradients(self.schedule, first, self.schedule.actions(first, n_micro))
            agreed = max(lists[first][s] for s in stages if s in lists[first])
            jobs.append(_Job(b, max(ready_here[s] for s in stages if s in ready_here),
                             (agreed, holders, stages, str(b.dtype), b.expert)))
        self._jobs = sorted(jobs, key=lambda j: j.order)
        self._started = self._scattered = 0
        self._last = len(actions) - 1

    def after(self, index: int) -> None:
        """Action `index` has finished: start the buckets it made ready, post the reduce-scatters that can go."""
        if not self.overlap:
            return
        while self._started < len(self._jobs) and self._jobs[self._started].ready <= index:
            self._start(self._jobs[self._started])
            self.early += index < self._last
        self._scatter(block=False)

    def finish(self) -> None:
        """Start and complete every bucket's reduction (after the step's last action); each bucket's reduced
        shard is then in `bucket.grad_shard` for the optimizer."""
        t0 = self.clock.mark()
        while self._started < len(self._jobs):
            self._start(self._jobs[self._started])
        self._scatter(block=True)
        for job in self._jobs:
            if job.scatter is not None:
                job.scatter.wait()
            job.flat = job.scatter = None
        self.exposed_s += self.clock.seconds(t0, self.clock.mark())
        self._jobs = []

    def _start(self, job: _Job) -> None:
        job.flat = self.opt.flat_grads(job.bucket)
        holders = job.bucket.key[0]
        if len(holders) > 1:
            job.summed = dist.all_reduce(job.flat, group=self.replica_groups[holders], async_op=True)
        self._started += 1

    def _scatter(self, block: bool) -> None:
        while self._scattered < self._started:
            job = self._jobs[self._scattered]
            if job.summed is not None:
                if not block and not job.summed.is_completed():
                    return
                job.summed.wait()
                job.summed = None
            job.scatter = self.opt.start_reduce_scatter(job.bucket, job.flat)
            self._scattered += 1


def _last_weight_gradients(schedule: Schedule, rank: int, actions: Sequence[Action]) -> dict[int, int]:
    """stage -> index of the last action that runs a weight gradient of it on `rank` (a B not deferring it, or a
    W)."""
    last: dict[int, int] = {}
    for i, action in enumerate(actions):
        for part in action.parts():
            if part.kind == "W" or (part.kind == "B" and not part.defer_w):
                last[schedule.stage_of(rank, part.phase)] = i
    return last
