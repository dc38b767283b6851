"""Timing that is right on both devices: the one helper every timed site uses (exposed all-to-all, pipeline waits
and compute).

On the CPU a mark is the host clock, and a span is the host time between two marks. On CUDA the host runs ahead
of the device and a collective's `wait()` returns at once (it only makes the compute stream wait for NCCL's), so
host timers would read about 0: a mark is a CUDA event recorded on the current stream, and a span is the device
time between two events, i.e. how long that stream spent on the work between them, stalls included (the exposed
communication of a `wait()` is the stall it puts in the stream). Events are resolved only when totals are read,
with one synchronisation, once per step, never in the middle of one.

    clock = Clock(device)
    with clock.span("a2a_wait:FB"):
        work.wait()
    clock.totals()          # {"a2a_wait:FB": seconds, ...}: running totals since the clock was made
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Clock:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, Any, Any]] = []  # (name, start event, end event), unresolved

    def mark(self) -> Any:
        """A point in time: the host clock, or a CUDA event recorded now on the current stream."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """The time between two marks (on CUDA this waits for `end` to have happened on the device)."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000

    def add(self, name: str, start: Any, end: Any) -> None:
        """Count the span between two marks into `name`'s total."""
        if self.cuda:
            self._pending.append((name, start, end))
        else:
            self._totals[name] += end - start

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self.mark()
        try:
            yield
        finally:
            self.add(name, start, self.mark())

    def totals(self) -> dict[str, float]:
        """Running totals of every span name, in seconds (resolving the pending CUDA events: one sync)."""
        for name, start, end in self._pending:
            end.synchronize()  # the first waits for the device; the rest have happened by then on its stream
            self._totals[name] += start.elapsed_time(end) / 1000
        self._pending.clear()
        return dict(self._totals)
