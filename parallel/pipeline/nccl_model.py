"""A model of NCCL's point-to-point rules, to check on the CPU what a gloo run cannot show
(notes/nccl-and-gpu.md): `replay` runs every rank's sequence of p2p calls the way NCCL would and reports a
deadlock or a tensor delivered to the wrong receive.

The rules modelled:
- one FIFO per communicator and rank: the group calls a rank posts on a communicator run one after another, in
  posting order (one stream per communicator);
- untagged matching: on a communicator, the k-th send from rank a to rank b meets the k-th receive on b from a,
  whatever the tags say;
- no buffering: a send or receive completes only when its peer's matching op is running (NCCL buffers nothing
  above a few MB, and a hidden state is tens of MB);
- the ops of one group call (one `batch_isend_irecv`) progress together: the call runs when it reaches the head
  of its communicator's FIFO, and ends when all its ops have met their peers;
- `strict`: a wait also orders every op the rank posts later behind the waited ones (one compute stream: the
  host waits, or ProcessGroupNCCL makes each new op's stream wait for the compute stream that waited). Without
  it, a wait orders nothing (the host posts everything at once).

Which communicator an op runs on is the caller's to say (`Op.comm`): PyTorch gives a lone isend/irecv its own
2-rank communicator when the group was created without a device, the group's communicator when it was created
with `device_id`, and every op of a batch the group's communicator.

Used by the schedule validator on the executor's posting order (validate.py) and by the test that replays the
calls recorded in real gloo runs (tests/dist/test_nccl_model.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Op:
    """One send or receive: `peer` is the other rank (the programs' numbering), `comm` the communicator it runs on,
    `payload` what it carries (a name or a checksum: a matched send and receive must carry the same) and `meta`
    its shape and dtype."""

    send: bool
    peer: int
    comm: Hashable
    payload: Hashable = None
    meta: Hashable = None


@dataclass(frozen=True)
class Call:
    """One call a rank makes: `post` a group call (one op: a lone isend/irecv; several: one batch_isend_irecv) or
    `wait` for ops posted earlier (their indices in the rank's posting order, counting every posted op)."""

    post: tuple[Op, ...] = ()
    wait: tuple[int, ...] = ()


@dataclass
class Outcome:
    """What the replay found: `deadlock` (None, or which ranks wait for what), the matched pairs whose payload or
    meta differ (a tensor delivered to the wrong receive), and how many pairs met."""

    deadlock: str | None = None
    mismatched: list[str] = field(default_factory=list)
    matched: int = 0

    @property
    def ok(self) -> bool:
        return self.deadlock is None and not self.mismatched


@dataclass
class _Unit:
    """The ops of one posted call on one communicator (they run together)."""

    rank: int
    comm: Hashable
    ops: list[int]  # indices into the rank's posted ops
    open: int = 0  # ops not yet complete


def replay(programs: Sequence[Sequence[Call]], strict: bool = False) -> Outcome:
    """Run the ranks' `programs` (rank i's calls in the order it makes them) under the rules above."""
    n = len(programs)
    ops: list[list[Op]] = [[op for call in prog for op in call.post] for prog in programs]
    done = [[False] * len(o) for o in ops]
    unit_of: list[list[_Unit | None]] = [[None] * len(o) for o in ops]
    partner: dict[tuple[int, int], tuple[int, int]] = {}
    out = Outcome()
    # untagged matching: the k-th send a -> b on a communicator meets the k-th receive on b from a
    sends: dict[tuple, list[int]] = {}
    recvs: dict[tuple, list[int]] = {}
    for r, rank_ops in enumerate(ops):
        for i, op in enumerate(rank_ops):
            if not 0 <= op.peer < n or op.peer == r:
                raise ValueError(f"rank {r} op {i}: peer {op.peer} is not another rank of the {n}")
            key = (op.comm, r, op.peer) if op.send else (op.comm, op.peer, r)
            (sends if op.send else recvs).setdefault(key, []).append(i)
    for key, s_list in sends.items():
        _, a, b = key
        for i, j in zip(s_list, recvs.get(key, [])):
            partner[(a, i)], partner[(b, j)] = (b, j), (a, i)

    fifo: dict[tuple[int, Hashable], deque[_Unit]] = {}
    cursor = [0] * n  # next call of each rank
    posted = [0] * n  # ops posted so far by each rank

    def advance(r: int) -> bool:
        moved = False
        prog = programs[r]
        while cursor[r] < len(prog):
            call = prog[cursor[r]]
            if call.wait and strict and not all(done[r][i] for i in call.wait):
                break
            by_comm: dict[Hashable, _Unit] = {}
            for op in call.post:
                unit = by_comm.setdefault(op.comm, _Unit(r, op.comm, []))
                unit.ops.append(posted[r])
                unit.open += 1
                unit_of[r][posted[r]] = unit
                posted[r] += 1
            for comm, unit in by_comm.items():
                fifo.setdefault((r, comm), deque()).append(unit)
            cursor[r] += 1
            moved = True
        return moved

    def running(r: int, i: int) -> bool:
        unit = unit_of[r][i]
        return unit is not None and fifo[(r, unit.comm)][0] is unit

    def finish(r: int, i: int) -> None:
        done[r][i] = True
        unit = unit_of[r][i]
        unit.open -= 1
        queue = fifo[(r, unit.comm)]
        while queue and queue[0].open == 0:
            queue.popleft()

    progress = True
    while progress:
        progress = any([advance(r) for r in range(n)])
        for (r, _), queue in list(fifo.items()):
            if not queue:
                continue
            for i in list(queue[0].ops):
                if done[r][i] or (r, i) not in partner:
                    continue
                p, j = partner[(r, i)]
                if done[p][j] or not running(p, j):
                    continue
                mine, theirs = ops[r][i], ops[p][j]
                if (mine.payload, mine.meta) != (theirs.payload, theirs.meta):
                    sender, receiver = (mine, theirs) if mine.send else (theirs, mine)
                    a, b = (r, p) if mine.send else (p, r)
                    out.mismatched.append(f"rank {a} -> rank {b} on {mine.comm}: sent {sender.payload} "
                                          f"{sender.meta or ''}, the receive expected {receiver.payload} "
                                          f"{receiver.meta or ''}".replace("  ", " "))
                out.matched += 1
                finish(r, i)
                finish(p, j)
                progress = True
    blocked = []
    for r in range(n):
        heads = [(comm, q[0]) for (rank, comm), q in fifo.items() if rank == r and q]
        pending = [f"{'send to' if ops[r][i].send else 'receive from'} rank {ops[r][i].peer} "
                   f"({ops[r][i].payload}) on {comm}" for comm, unit in heads for i in unit.ops if not done[r][i]]
        if cursor[r] < len(programs[r]):
            pending.append(f"call {cursor[r]} waits for ops it posted")
        if pending:
            blocked.append(f"rank {r}: " + "; ".join(pending))
    if blocked:
        out.deadlock = "; ".join(blocked)
    return out
