"""Pipeline schedules as data (paper 3.2.1, Table 2): `build_schedule` returns one rank's list of `Action`s for
1F1B, ZB1P (ZeroBubble's ZB-H1), DualPipe and DualPipeV; `validate_schedule` proves a set of per-rank lists
complete, ordered, deadlock-free and FIFO-consistent on every link; `peak_activations` counts live chunks.

`replay` is the one implementation of the data-flow rules (action.py's docstring): the validator runs it with
unit costs to find deadlocks, `simulate.simulate` runs it with real costs to price a schedule.

FB convention (validator, simulator and executor agree): an FB starts once the inputs of both its parts exist;
on a link it consumes its forward's input before its backward's; both parts' outputs exist when the FB ends and
go out forward's first. For activation counting its forward is allocated before its backward frees.

Links and tags. A link (producer rank -> consumer rank) carries activations and gradients. Each kind arrives in
the order the consumer's actions use it for every schedule here, so two tags (the executor's) make matching
exact. In one untagged FIFO, DualPipe from PP=6 and DualPipeV from PP=3 do not hold: a rank's first main-step
forward uses an activation sent before the gradients its step-3 backwards use; the reference receives it ahead,
at the end of step 2 (`recv0=False`), which action lists cannot express. `validate_schedule(tags=False)` checks
the untagged order for executors without tags.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from parallel.pipeline.action import (
    Action,
    ScheduleError,
    check_schedule_layout,
    direction_of,
    num_stages,
    owner,
    phases,
    stage_of,
)

__all__ = ["Action", "Event", "ScheduleError", "build_forward_schedule", "build_schedule", "check_schedule_args",
           "check_schedule_layout", "peak_activations", "replay", "validate_schedule"]

Event = tuple[float, float, Action]


def check_schedule_args(name: str, num_ranks: int, num_microbatches: int) -> None:
    """The rules the reference implementations assert, as errors naming the config keys and the fix."""
    check_schedule_layout(name, num_ranks)
    if num_microbatches < 1:
        raise ScheduleError(f"parallel.microbatches={num_microbatches}: a step needs at least one micro-batch")
    if name == "dualpipe":
        if num_microbatches % 2:
            raise ScheduleError(f"parallel.schedule=dualpipe feeds half the micro-batches from each end, so "
                                f"parallel.microbatches={num_microbatches} must be even")
    if name in ("dualpipe", "dualpipev") and num_microbatches < 2 * num_ranks:
        raise ScheduleError(f"parallel.microbatches={num_microbatches} is below 2 x pp = {2 * num_ranks} "
                            f"(parallel.pp={num_ranks}), which parallel.schedule={name} needs to fill its steady "
                            f"phase; raise the micro-batch count or lower pp")


def build_schedule(name: str, num_ranks: int, rank: int, num_microbatches: int) -> list[Action]:
    """The actions `rank` runs in one step of `num_microbatches` micro-batches (a pure function)."""
    check_schedule_args(name, num_ranks, num_microbatches)
    if not 0 <= rank < num_ranks:
        raise ScheduleError(f"pipeline rank {rank} does not exist with parallel.pp={num_ranks}")
    if name in ("1f1b", "zb1p"):
        return _one_f_one_b(num_ranks, rank, num_microbatches, zero_bubble=name == "zb1p")
    return _dual(name, num_ranks, rank, num_microbatches)


def build_forward_schedule(name: str, num_ranks: int, rank: int, num_microbatches: int) -> list[Action]:
    """Forward-only actions (evaluation): every micro-batch through each of the rank's stages, phase by phase.
    It cannot deadlock, because sends never block: a rank's phase-0 forwards need only upstream phase-0 outputs,
    and its phase-1 forwards only outputs that ranks produce after their own phase-0 forwards."""
    check_schedule_layout(name, num_ranks)
    if not 0 <= rank < num_ranks:
        raise ScheduleError(f"pipeline rank {rank} does not exist with parallel.pp={num_ranks}")
    return [Action("F", phase, m) for phase in range(phases(name)) for m in range(num_microbatches)
            if name != "dualpipe" or direction_of(name, m, num_microbatches) == phase]


def _one_f_one_b(num_ranks: int, rank: int, n: int, zero_bubble: bool) -> list[Action]:
    """1F1B: warm-up forwards, steady one-forward-one-backward, cool-down backwards.

    ZB-H1 (Qi et al. 2023, section 3.1) keeps that order of F and B, so the peak activations stay 1F1B's, splits
    each backward into B (input gradient, on the critical path back to rank 0) and W, and runs W's late: rank r holds
    back its first r W's and runs the others right after their B, so the W's left over fill the cool-down
    while the gradients travel on without waiting for anyone's weight-gradient GEMMs."""
    warmup = min(num_ranks - rank - 1, n)
    held = min(rank, n) if zero_bubble else 0
    actions = [Action("F", 0, m) for m in range(warmup)]
    for m in range(n):
        if m + warmup < n:
            actions.append(Action("F", 0, m + warmup))
        actions.append(Action("B", 0, m, defer_w=zero_bubble))
        if zero_bubble and m >= held:
            actions.append(Action("W", 0, m - held))
    actions += [Action("W", 0, m) for m in range(n - held, n)]
    return actions


class _DualBuilder:
    """Appends DualPipe(V) steps for one rank, in the reference's local phases: under DualPipe local phase 0 is
    the direction that enters at the rank's nearer end (our phase 0 on the first half of the ranks, phase 1 on the
    second); under DualPipeV it is our phase 0. Micro-batches run in order within each phase; W's run deferred
    B's in the order they were deferred."""

    def __init__(self, name: str, num_ranks: int, rank: int, n: int) -> None:
        self.swap = name == "dualpipe" and rank >= num_ranks // 2
        per_phase = n // 2 if name == "dualpipe" else n
        self.first = [0, per_phase] if name == "dualpipe" else [0, 0]  # first micro-batch of our phase 0, 1
        self.next_f, self.next_b = [0, 0], [0, 0]
        self.deferred: deque[tuple[int, int]] = deque()
        self.actions: list[Action] = []

    def _f(self, local: int) -> Action:
        phase = local ^ self.swap
        self.next_f[phase] += 1
        return Action("F", phase, self.first[phase] + self.next_f[phase] - 1)

    def _b(self, local: int, defer_w: bool = False) -> Action:
        phase = local ^ self.swap
        self.next_b[phase] += 1
        action = Action("B", phase, self.first[phase] + self.next_b[phase] - 1, defer_w=defer_w)
        if defer_w:
            self.deferred.append((phase, action.microbatch))
        return action

    def f(self, local: int) -> None:
        self.actions.append(self._f(local))

    def b(self, local: int, defer_w: bool = False) -> None:
        self.actions.append(self._b(local, defer_w))

    def w(self) -> None:
        self.actions.append(Action("W", *self.deferred.popleft()))

    def fb(self, local_f: int, local_b: int) -> None:
        self.actions.append(Action("FB", forward=self._f(local_f), backward=self._b(local_b)))


def _dual(name: str, num_ranks: int, rank: int, n: int) -> list[Action]:
    """DualPipe / DualPipeV in the 8 steps of deepseek-ai/DualPipe (paper Figure 5). DualPipe pairs ranks r and
    R-1-r (pos = min(r, R-1-r) among half = R/2 positions, each end fed n/2 micro-batches); DualPipeV folds the
    pipeline into a V (pos = r among half = R, all n micro-batches enter at rank 0)."""
    half, pos = (num_ranks // 2, min(rank, num_ranks - 1 - rank)) if name == "dualpipe" else (num_ranks, rank)
    per_phase = n // 2 if name == "dualpipe" else n
    s = _DualBuilder(name, num_ranks, rank, n)
    outer = half - pos - 1  # warm-up and cool-down steps that grow towards the ends of the pipeline
    for _ in range(2 * outer):  # 1: forwards of the near direction
        s.f(0)
    for _ in range(pos + 1):  # 2: forwards of both directions, alternating
        s.f(0)
        s.f(1)
    for _ in range(outer):  # 3: B-W-F of the far direction (zero bubble)
        s.b(1, defer_w=True)
        s.w()
        s.f(1)
    for i in range(per_phase - 2 * half + pos + 1):  # 4: the main overlapped steps
        if i == 0 and pos == half - 1:
            s.f(0)  # the middle rank runs its first pair apart: the forward need not wait for the gradient
            s.b(1)
        else:
            s.fb(0, 1)
        s.fb(1, 0)
    for _ in range(outer):  # 5: B of the far direction, then an overlapped pair
        s.b(1)
        s.fb(1, 0)
    zero_bubble = False
    for i in range(pos + 1):  # 6: backwards of both directions; from the middle of the step on they defer W
        if i == (pos + 1) // 2 and pos % 2 == 1:
            zero_bubble = True
        s.b(1, zero_bubble)
        if i == (pos + 1) // 2 and pos % 2 == 0:
            zero_bubble = True
        s.b(0, zero_bubble)
    for _ in range(outer):  # 7: W then B of the near direction (zero bubble)
        s.w()
        s.b(0, defer_w=True)
    for _ in range(pos + 1):  # 8: the W's left
        s.w()
    return s.actions


def peak_activations(actions: list[Action]) -> int:
    """Most chunks alive at once on one rank: a (phase, micro-batch) is alive from its F until its B (input
    gradient). The unit is one stage's activations for one micro-batch; an FB's forward counts before its
    backward frees."""
    live: set[tuple[int, int]] = set()
    peak = 0
    for action in actions:
        for part in action.parts():
            if part.kind == "F":
                live.add((part.phase, part.microbatch))
                peak = max(peak, len(live))
            elif part.kind == "B":
                live.discard((part.phase, part.microbatch))
    return peak


# ---- the data flow: what each action needs, and who produces it --------------------------------------------------
Key = tuple[str, int, int]  # (kind, stage, micro-batch) of a finished part


def _stage(name: str, num_ranks: int, rank: int, part: Action) -> int:
    return stage_of(name, num_ranks, rank, part.phase)


def _needs(name: str, num_ranks: int, rank: int, part: Action) -> list[Key]:
    """What must have finished before `part` can run on `rank` (action.py's data flow)."""
    s, m = _stage(name, num_ranks, rank, part), part.microbatch
    if part.kind == "F":
        return [("F", s - 1, m)] if s > 0 else []
    if part.kind == "B":
        return [("F", s, m)] + ([("B", s + 1, m)] if s < num_stages(name, num_ranks) - 1 else [])
    return [("B", s, m)]


def _owner_rank(name: str, num_ranks: int, num_microbatches: int, stage: int, microbatch: int) -> int:
    return owner(name, num_ranks, stage, direction_of(name, microbatch, num_microbatches))[0]


def _links(name: str, num_ranks: int, num_microbatches: int, rank: int, part: Action) -> tuple[list, list]:
    """The tensors `part` receives over links ([(producer rank, tensor)]) and sends ([(consumer rank, tensor)]);
    a tensor is (what, stage that consumes it, micro-batch). Hand-overs on the same rank are not links."""
    s, m, last = _stage(name, num_ranks, rank, part), part.microbatch, num_stages(name, num_ranks) - 1
    recv, send = [], []
    if part.kind == "F":
        if s > 0:
            recv.append((_owner_rank(name, num_ranks, num_microbatches, s - 1, m), ("activation", s, m)))
        if s < last:
            send.append((_owner_rank(name, num_ranks, num_microbatches, s + 1, m), ("activation", s + 1, m)))
    elif part.kind == "B":
        if s < last:
            recv.append((_owner_rank(name, num_ranks, num_microbatches, s + 1, m), ("gradient", s, m)))
        if s > 0:
            send.append((_owner_rank(name, num_ranks, num_microbatches, s - 1, m), ("gradient", s - 1, m)))
    return [x for x in recv if x[0] != rank], [x for x in send if x[0] != rank]


def replay(name: str, num_ranks: int, num_microbatches: int, schedules: list[list[Action]],
           duration: Callable[[int, Action], float], p2p: float = 0.0) -> list[list[Event]]:
    """Run every rank's list in order, each action as soon as its rank is free and its inputs exist (plus `p2p`
    for an input made on another rank); returns per-rank (start, end, action). Raises ScheduleError naming each
    blocked rank's next action and what it waits for when no rank can go on (a deadlock)."""
    done: dict[Key, tuple[int, float]] = {}  # finished part -> (rank, end time)
    clock = [0.0] * num_ranks
    nxt = [0] * num_ranks
    events: list[list[Event]] = [[] for _ in range(num_ranks)]
    progress = True
    while progress:
        progress = False
        for r, actions in enumerate(schedules):
            while nxt[r] < len(actions):
                action = actions[nxt[r]]
                needs = [k for part in action.parts() for k in _needs(name, num_ranks, r, part)]
                if any(k not in done for k in needs):
                    break
                start = max([clock[r]] + [done[k][1] + (p2p if done[k][0] != r else 0.0) for k in needs])
                clock[r] = end = start + duration(r, action)
                for part in action.parts():
                    done[(part.kind, _stage(name, num_ranks, r, part), part.microbatch)] = (r, end)
                events[r].append((start, end, action))
                nxt[r] += 1
                progress = True
    blocked = []
    for r, actions in enumerate(schedules):
        if nxt[r] < len(actions):
            action = actions[nxt[r]]
            missing = [k for part in action.parts() for k in _needs(name, num_ranks, r, part) if k not in done]
            what = ", ".join(f"{k[0]} of stage {k[1]} micro-batch {k[2]} (rank "
                             f"{_owner_rank(name, num_ranks, num_microbatches, k[1], k[2])})" for k in missing)
            blocked.append(f"rank {r} at action {nxt[r]} {action} waits for {what}")
    if blocked:
        raise ScheduleError(f"{name} over {num_ranks} ranks, {num_microbatches} micro-batches deadlocks: "
                            + "; ".join(blocked))
    return events


def validate_schedule(name: str, num_ranks: int, num_microbatches: int,
                      schedules: list[list[Action]] | None = None, *, tags: bool = True) -> None:
    """Raise ScheduleError (naming the rank, the action and the reason) unless `schedules` (default: the built
    ones) give every owned (stage, micro-batch) exactly one F, one B and one W iff its B deferred it, in the
    order F, B, W on the owning rank; run without deadlock; and send on every link in the order the receiving
    rank consumes, per kind of tensor (activations, gradients) or, with `tags=False`, both kinds in one FIFO."""
    check_schedule_args(name, num_ranks, num_microbatches)
    if schedules is None:
        schedules = [build_schedule(name, num_ranks, r, num_microbatches) for r in range(num_ranks)]
    if len(schedules) != num_ranks:
        raise ScheduleError(f"{name}: {len(schedules)} action lists for {num_ranks} ranks")
    for r, actions in enumerate(schedules):
        _check_rank(name, num_ranks, num_microbatches, r, actions)
    _check_links(name, num_ranks, num_microbatches, schedules, tags)
    replay(name, num_ranks, num_microbatches, schedules, lambda r, a: 1.0)


def _check_rank(name: str, num_ranks: int, num_microbatches: int, rank: int, actions: list[Action]) -> None:
    def fail(i: int, action: Action, reason: str) -> None:
        raise ScheduleError(f"{name} rank {rank}, action {i} {action}: {reason}")

    owned = {(p, m) for p in range(phases(name)) for m in range(num_microbatches)
             if owner(name, num_ranks, stage_of(name, num_ranks, rank, p),
                      direction_of(name, m, num_microbatches)) == (rank, p)}
    seen: dict[tuple[str, int, int], int] = {}  # (kind, phase, micro-batch) -> index of its action
    deferred = set()
    for i, action in enumerate(actions):
        for part in action.parts():
            key = (part.phase, part.microbatch)
            if key not in owned:
                where = (f"phase {part.phase} (stage {stage_of(name, num_ranks, rank, part.phase)})"
                         if part.phase < phases(name) else f"phase {part.phase} ({name} has {phases(name)})")
                fail(i, action, f"micro-batch {part.microbatch} does not run {where} on this rank")
            if (part.kind, *key) in seen:
                fail(i, action, f"a second {part.kind} of phase {key[0]} micro-batch {key[1]}")
            before = {"F": None, "B": "F", "W": "B"}[part.kind]
            if before and seen.get((before, *key), i) >= i:
                fail(i, action, f"{part.kind} of phase {key[0]} micro-batch {key[1]} does not follow its {before}")
            if part.kind == "W" and key not in deferred:
                fail(i, action, f"W of phase {key[0]} micro-batch {key[1]} but its B did not defer the weight "
                                "gradients (defer_w)")
            if part.defer_w:
                deferred.add(key)
            seen[(part.kind, *key)] = i
    counts = Counter(kind for kind, *_ in seen)
    for kind in ("F", "B"):
        for p, m in sorted(owned):
            if (kind, p, m) not in seen:
                raise ScheduleError(f"{name} rank {rank}: no {kind} for phase {p} micro-batch {m} "
                                    f"({counts[kind]} of {len(owned)} present)")
    for p, m in sorted(deferred):
        if ("W", p, m) not in seen:
            raise ScheduleError(f"{name} rank {rank}: B{p}.{m} deferred its weight gradients but no W runs them")


def _check_links(name: str, num_ranks: int, num_microbatches: int, schedules: list[list[Action]],
                 tags: bool) -> None:
    sent: dict[tuple, list] = {}  # link -> tensors in the producer's order
    received: dict[tuple, list] = {}  # link -> (tensor, consumer's action index, action) in the consumer's order
    for r, actions in enumerate(schedules):
        for i, action in enumerate(actions):
            for part in action.parts():
                recv, send = _links(name, num_ranks, num_microbatches, r, part)
                for src, tensor in recv:
                    received.setdefault((src, r, tensor[0] if tags else ""), []).append((tensor, i, action))
                for dst, tensor in send:
                    sent.setdefault((r, dst, tensor[0] if tags else ""), []).append(tensor)
    for link in sorted(set(sent) | set(received)):
        src, dst, tag = link
        out, into = sent.get(link, []), received.get(link, [])
        where = f"link rank {src} -> rank {dst}" + (f" ({tag}s)" if tags else "")
        for j, (a, (b, i, action)) in enumerate(zip(out, into)):
            if a != b:
                raise ScheduleError(f"{name}: {where} is not FIFO: tensor {j} sent is the {_tensor(a)}, but rank "
                                    f"{dst} at action {i} {action} expects the {_tensor(b)}")
        if len(out) != len(into):
            raise ScheduleError(f"{name}: {where} carries {len(out)} tensors but rank {dst} receives {len(into)}")


def _tensor(t: tuple[str, int, int]) -> str:
    return f"{t[0]} into stage {t[1]} of micro-batch {t[2]}"
