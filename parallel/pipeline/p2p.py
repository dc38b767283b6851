"""The pipeline's point-to-point order (paper 3.2.1), made for NCCL's rules (notes/nccl-and-gpu.md): no tags, no
buffering, one FIFO per communicator.

Channels. Every tensor a stage sends to a stage on another rank travels on a channel: (producer pipeline rank,
consumer pipeline rank, kind), kind "activation" or "gradient". Each channel is its own 2-rank process group
(the grid builds one per channel a schedule uses, `channels`), so on a channel only one rank sends and only one
receives, and one kind of tensor travels. A channel carries its tensors in the producer's order and the consumer
takes them in its own order; the validator proves that the two agree for every schedule (per channel FIFO), so
the k-th send meets the k-th receive without a tag, whatever PyTorch's choice of communicator for a lone op
(the pair's own or the group's: for a 2-rank group they are the same pair).

Order (`StepPlan`, the executor's and the validator's one source). At the start of a step the rank posts the
first receive of each of its incoming channels; when an action takes a tensor from a channel it first posts the
channel's next receive, then waits for this one, so that the next transfer can land while it waits and computes
(and a sender never blocks for want of a posted receive; at most two receives per channel are in flight).
Sends are lone isends on their channel, posted when the tensor is made; the host waits for them only at the
end of the step. The ops a rank posts
are therefore, per communicator, exactly the channel's tensors in order, and nothing waits behind a send: the
step cannot deadlock unless the schedule's data flow itself does (validate.py replays this program under the
NCCL model, nccl_model.py, for every schedule up to PP=16).

Each 2-rank communicator NCCL creates lazily blocks both hosts on its first use, so the grid warms every channel
up once in a fixed global order when it builds them (`warm_up`), which cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.pipeline.action import Action
from parallel.pipeline.nccl_model import Call, Op
from parallel.pipeline.schedule import Schedule, ScheduleError, Tensor

Channel = tuple[int, int, str]  # (producer pipeline rank, consumer pipeline rank, "activation" | "gradient")
KINDS = ("activation", "gradient")


def channels(schedule: Schedule) -> list[Channel]:
    """Every channel the schedule's data flow uses, sorted (F(s) -> F(s+1) activations, B(s+1) -> B(s) gradients,
    for every direction, between different ranks)."""
    out: set[Channel] = set()
    for d in range(schedule.directions):
        for s in range(schedule.n_stages - 1):
            a, b = schedule.owner(s, d)[0], schedule.owner(s + 1, d)[0]
            if a != b:
                out |= {(a, b, "activation"), (b, a, "gradient")}
    return sorted(out)


def rank_channels(schedule: Schedule, rank: int) -> list[Channel]:
    """The channels `rank` sends or receives on."""
    return [c for c in channels(schedule) if rank in c[:2]]


@dataclass(frozen=True)
class Transfer:
    """One tensor a part of an action takes or makes: on `channel`, or (None) handed over in memory because both
    stages sit on this rank (DualPipeV's turn)."""

    tensor: Tensor
    channel: Channel | None


class StepPlan:
    """One rank's p2p order for one step of `actions` (see the module docstring): per action, the transfers it
    takes (in the order it waits for them: a forward's input before a backward's gradient) and makes; per
    incoming channel, the order of its tensors."""

    def __init__(self, schedule: Schedule, rank: int, actions: Sequence[Action], n_micro: int) -> None:
        self.schedule, self.rank, self.actions = schedule, rank, list(actions)
        self.takes: list[list[Transfer]] = []
        self.makes: list[list[Transfer]] = []
        self.incoming: dict[Channel, list[Tensor]] = {}
        self.outgoing: dict[Channel, list[Tensor]] = {}
        self.route: dict[Tensor, Channel | None] = {}  # where each tensor this rank makes goes
        for action in self.actions:
            takes, makes = [], []
            for part in action.parts():
                takes += self._transfers(part, n_micro, receive=True)
                makes += self._transfers(part, n_micro, receive=False)
            for t in takes:
                if t.channel is not None:
                    self.incoming.setdefault(t.channel, []).append(t.tensor)
            for t in makes:
                self.route[t.tensor] = t.channel
                if t.channel is not None:
                    self.outgoing.setdefault(t.channel, []).append(t.tensor)
            self.takes.append(takes)
            self.makes.append(makes)

    def _transfers(self, part: Action, n_micro: int, receive: bool) -> list[Transfer]:
        """The part's transfers, including in-memory hand-overs (same rank)."""
        flow = (self.schedule.takes if receive else self.schedule.makes)(self.rank, part, n_micro)
        out = []
        for peer, tensor in flow:
            kind = tensor[0]
            channel = None if peer == self.rank else ((peer, self.rank, kind) if receive else (self.rank, peer, kind))
            out.append(Transfer(tensor, channel))
        return out

    def channels(self) -> list[Channel]:
        return sorted(set(self.incoming) | set(self.outgoing))

    def program(self, comm: Mapping[Channel, object] | None = None) -> list[Call]:
        """This plan as the NCCL model's calls (nccl_model.py), exactly as the executor posts them. `comm` names
        each channel's communicator (default: the channel itself); peers are pipeline ranks."""
        comm = comm or {}
        calls: list[Call] = []
        index: dict[tuple[Channel, int], int] = {}  # (channel, position) -> posted op index
        taken = dict.fromkeys(self.incoming, 0)
        sends: list[int] = []
        count = 0

        def post(channel: Channel, send: bool, tensor: Tensor) -> int:
            nonlocal count
            peer = channel[1] if send else channel[0]
            calls.append(Call(post=(Op(send, peer, comm.get(channel, channel), tensor),)))
            count += 1
            return count - 1

        for channel in sorted(self.incoming):
            index[(channel, 0)] = post(channel, False, self.incoming[channel][0])
        for takes, makes in zip(self.takes, self.makes):
            for t in takes:
                if t.channel is None:
                    continue
                k = taken[t.channel]
                taken[t.channel] = k + 1
                if k + 1 < len(self.incoming[t.channel]):
                    index[(t.channel, k + 1)] = post(t.channel, False, self.incoming[t.channel][k + 1])
                calls.append(Call(wait=(index[(t.channel, k)],)))
            for t in makes:
                if t.channel is not None:
                    sends.append(post(t.channel, True, t.tensor))
        if sends:
            calls.append(Call(wait=tuple(sends)))
        return calls


def check_channels(schedule: Schedule, rank: int, have: Mapping[Channel, object]) -> None:
    """Refuse to start when the schedule would use a channel of `rank` that the grid did not build."""
    missing = [c for c in rank_channels(schedule, rank) if c not in have]
    if missing:
        built = ", ".join(_name(c) for c in sorted(have)) or "none"
        raise ScheduleError(f"{schedule} needs the p2p channel(s) {', '.join(map(_name, missing))} of pipeline rank "
                            f"{rank}, but the grid built {built}: build the grid for this schedule "
                            "(ProcessGrid.build with the same parallel.schedule and parallel.pp)")


def _name(c: Channel) -> str:
    return f"{c[0]}->{c[1]} {c[2]}s"


def new_channel_groups(schedule: Schedule, pipelines: Sequence[Sequence[int]], rank: int, backend: str | None,
                       timeout: timedelta | None = None,
                       members_only: bool = False) -> dict[Channel, dist.ProcessGroup]:
    """Create one 2-rank group per channel of every pipeline (`pipelines[d][p]`: the global rank at pipeline
    position p of pipeline d), in the same order on every rank, and return this rank's, keyed by channel in
    pipeline positions. `members_only`: create only this rank's (torch's fake backend, whose groups need no
    agreement on names)."""
    mine: dict[Channel, dist.ProcessGroup] = {}
    kwargs = {"backend": backend} if backend else {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    for members in pipelines:
        for channel in channels(schedule):
            ranks = sorted({members[channel[0]], members[channel[1]]})
            if members_only and rank not in ranks:
                continue
            group = dist.new_group(ranks, group_desc=group_desc(f"p2p {channel[0]}->{channel[1]} ", ranks),
                                   **kwargs)
            if rank in ranks:
                mine[channel] = group
    return mine


def group_desc(kind: str, ranks: Sequence[int]) -> str:
    """What a process group is, as torch's flight recorder names it in every entry (a hang's trace then says
    which group a rank waits in): its kind and its global ranks (the first two and the last of a large one)."""
    shown = ranks if len(ranks) <= 8 else [*ranks[:2], "...", ranks[-1]]
    return f"{kind}[{','.join(map(str, shown))}]" + (f" ({len(ranks)} ranks)" if len(ranks) > 8 else "")


def warm_up(groups: Mapping[Channel, dist.ProcessGroup], pipeline: Sequence[int], device: torch.device) -> None:
    """One small exchange on each of this rank's channels, in the global order (sorted channels), so that NCCL
    creates every channel's communicator now: its lazy creation blocks both hosts until both arrive, which in
    the middle of a step could wait on a peer that waits on us. Both ends take the channels in the same order
    and every rank's order is a restriction of one global order, so the waits form no cycle."""
    me = dist.get_rank()
    for channel in sorted(groups):
        src, dst = pipeline[channel[0]], pipeline[channel[1]]
        t = torch.zeros(1, device=device)
        work = dist.isend(t, dst, group=groups[channel]) if me == src else dist.irecv(t, src, group=groups[channel])
        work.wait()
