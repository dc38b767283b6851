"""DualPipe's overlapped forward-and-backward chunk (paper 3.2.1, Figure 4): one micro-batch's forward runs inside
another micro-batch's backward, so that each all-to-all of one chunk is in flight while the other chunk computes.

How. The forward chunk is a generator (`model.block.Block.steps`, `parallel.pipeline.stage.stage_steps`) that
pauses right after it launches a dispatch or a combine. The backward chunk is one ordinary autograd backward;
its exchanges (the backward of a combine is a dispatch of gradients, the backward of a dispatch is a combine)
call the dispatcher's `during_exchange` between launching and waiting, and there `ForwardInBackward.step`
resumes the forward until its next launch. Per MoE layer this gives exactly DeepSeek's pairing:

    combine(B) in flight   <->  attention + router (F), then dispatch(F) is launched
    dispatch(F) in flight  <->  MLP (B) (the expert and shared-expert backward, with W unless deferred)
    dispatch(B) in flight  <->  MLP (F) (experts and shared expert), then combine(F) is launched
    combine(F) in flight   <->  attention (B) (with W unless deferred), up to the next layer's combine(B)

What is left of the forward when the backward ends (when the backward chunk has fewer exchanges) runs then.

Why the result is bitwise that of running the forward first and the backward after: the two chunks belong to
different micro-batches, so neither reads what the other writes except through parameter gradients, which
only the backward accumulates, in the order autograd alone decides; every forward op runs with the same inputs
in the same order (grad mode is switched on for it, since autograd runs backward functions with it off). The
order of the collectives is the same on every rank of an EP group, since they run the same schedule on the
same layers. tests/unit/test_overlap.py and tests/dist/test_overlap_dist.py check both.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch


class ForwardInBackward:
    """Resumes a forward chunk's `steps` generator whenever a backward exchange of `dispatchers` is in flight."""

    def __init__(self, steps: Generator[None, None, Any], dispatchers: Sequence[Any]) -> None:
        self._steps, self._dispatchers = steps, list(dispatchers)
        self.done, self.result = False, None
        self.resumed = 0  # how many exchanges the forward ran behind (for tests and stats)

    def step(self) -> None:
        """Run the forward up to its next launched exchange (or to its end)."""
        if self.done:
            return
        with torch.enable_grad():
            try:
                next(self._steps)
            except StopIteration as stop:
                self.done, self.result = True, stop.value

    def _during_exchange(self) -> None:
        if not self.done:
            self.resumed += 1
            self.step()

    def run(self, backward: Callable[[], None]) -> Any:
        """Run `backward` with the forward interleaved into its exchanges, finish the forward; its output."""
        for d in self._dispatchers:
            d.during_exchange = self._during_exchange
        try:
            backward()
        finally:
            for d in self._dispatchers:
                d.during_exchange = None
        while not self.done:
            self.step()
        return self.result
