"""Proofs about a schedule's action lists (paper 3.2.1): `validate_schedule` shows a set of per-rank lists complete,
ordered, deadlock-free and consistent on every link in the order the p2p layer uses; `replay` runs the data flow
(schedule.py's docstring) with durations; `peak_activations` counts live chunks.

`replay` is the one implementation of the data-flow rules: the validator runs it with unit costs to find
deadlocks, `simulate.simulate` with real costs to price a schedule.

FB convention (validator, simulator and executor agree): an FB starts once the inputs of both its parts exist;
it takes its forward's input before its backward's gradient; both parts' outputs exist when the FB ends. For
activation counting its forward is allocated before its backward frees.

Links (`p2p=`): what a send must agree with to meet the right receive.
- "channels" (the executor's, p2p.py): one communicator per (producer, consumer, kind); per channel the
  producer's order must be the consumer's, and the executor's posting order (`p2p.StepPlan.program`) must run
  under NCCL's rules (nccl_model.py, strict: every wait orders what follows) without deadlock or swap.
- "tags": per link and kind of tensor (gloo's tags; the order condition is that of "channels").
- "untagged": both kinds of tensor in one FIFO per link, in action order. DualPipe from PP=6 and DualPipeV from
  PP=3 fail it: a rank's first main-step forward uses an activation sent before the gradients its step-3
  backwards use (the reference receives it ahead, at the end of step 2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from parallel.pipeline import nccl_model
from parallel.pipeline.action import Action
from parallel.pipeline.p2p import StepPlan
from parallel.pipeline.schedule import Schedule, ScheduleError, Tensor

__all__ = ["Event", "P2P_MODES", "peak_activations", "replay", "validate_schedule"]

Event = tuple[float, float, Action]
Key = tuple[str, int, int]  # (kind, stage, micro-batch) of a finished part
P2P_MODES = ("channels", "tags", "untagged")


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


def _needs(schedule: Schedule, rank: int, part: Action) -> list[Key]:
    """What must have finished before `part` can run on `rank`."""
    s, m = schedule.stage_of(rank, part.phase), part.microbatch
    if part.kind == "F":
        return [("F", s - 1, m)] if s > 0 else []
    if part.kind == "B":
        return [("F", s, m)] + ([("B", s + 1, m)] if s < schedule.n_stages - 1 else [])
    return [("B", s, m)]


def replay(schedule: Schedule, n_micro: int, lists: list[list[Action]], duration: Callable[[int, Action], float],
           p2p: float = 0.0) -> list[list[Event]]:
    """Run every rank's list in order, each action as soon as its rank is free and its inputs exist (plus `p2p`
    for an input made on another rank); returns per-rank (start, end, action). Raises ScheduleError naming each
    blocked rank's next action and what it waits for when no rank can go on (a deadlock)."""
    done: dict[Key, tuple[int, float]] = {}  # finished part -> (rank, end time)
    clock = [0.0] * schedule.pp
    nxt = [0] * schedule.pp
    events: list[list[Event]] = [[] for _ in range(schedule.pp)]
    progress = True
    while progress:
        progress = False
        for r, actions in enumerate(lists):
            while nxt[r] < len(actions):
                action = actions[nxt[r]]
                needs = [k for part in action.parts() for k in _needs(schedule, r, part)]
                if any(k not in done for k in needs):
                    break
                start = max([clock[r]] + [done[k][1] + (p2p if done[k][0] != r else 0.0) for k in needs])
                clock[r] = end = start + duration(r, action)
                for part in action.parts():
                    done[(part.kind, schedule.stage_of(r, part.phase), part.microbatch)] = (r, end)
                events[r].append((start, end, action))
                nxt[r] += 1
                progress = True
    blocked = []
    for r, actions in enumerate(lists):
        if nxt[r] < len(actions):
            action = actions[nxt[r]]
            missing = [k for part in action.parts() for k in _needs(schedule, r, part) if k not in done]
            what = ", ".join(f"{k[0]} of stage {k[1]} micro-batch {k[2]} (rank "
                             f"{schedule.owner(k[1], schedule.direction_of(k[2], n_micro))[0]})" for k in missing)
            blocked.append(f"rank {r} at action {nxt[r]} {action} waits for {what}")
    if blocked:
        raise ScheduleError(f"{schedule.name} over {schedule.pp} ranks, {n_micro} micro-batches deadlocks: "
                            + "; ".join(blocked))
    return events


def validate_schedule(schedule: Schedule, n_micro: int, lists: list[list[Action]] | None = None, *,
                      p2p: str = "channels") -> None:
    """Raise ScheduleError (naming the rank, the action and the reason) unless `lists` (default: the schedule's
    own) give every owned (stage, micro-batch) exactly one F, one B and one W iff its B deferred it, in the order
    F, B, W on the owning rank; run without deadlock; and agree on every link as `p2p` requires (module
    docstring)."""
    if p2p not in P2P_MODES:
        raise ValueError(f"p2p={p2p!r}: choose one of {', '.join(P2P_MODES)}")
    schedule.check_microbatches(n_micro)
    own = lists is None
    key = (type(schedule), type(getattr(schedule, "base", None)), repr(schedule), n_micro, p2p)
    if own and key in _VALID:  # the config's validation and the pipeline's both ask (0.5 s at PP=16)
        return
    if own:
        lists = [schedule.actions(r, n_micro) for r in range(schedule.pp)]
    if len(lists) != schedule.pp:
        raise ScheduleError(f"{schedule.name}: {len(lists)} action lists for {schedule.pp} ranks")
    for r, actions in enumerate(lists):
        _check_rank(schedule, n_micro, r, actions)
    _check_links(schedule, n_micro, lists, tags=p2p != "untagged")
    replay(schedule, n_micro, lists, lambda r, a: 1.0)
    if p2p == "channels":
        _check_posting_order(schedule, n_micro, lists)
    if own:
        _VALID.add(key)


_VALID: set[tuple] = set()  # schedules (their types, name and pp) already found valid for n_micro


def _check_rank(schedule: Schedule, n_micro: int, rank: int, actions: list[Action]) -> None:
    name = schedule.name

    def fail(i: int, action: Action, reason: str) -> None:
        raise ScheduleError(f"{name} rank {rank}, action {i} {action}: {reason}")

    owned = {(p, m) for p in range(schedule.phases) for m in range(n_micro)
             if schedule.owner(schedule.stage_of(rank, p), schedule.direction_of(m, n_micro)) == (rank, p)}
    seen: dict[tuple[str, int, int], int] = {}  # (kind, phase, micro-batch) -> index of its action
    deferred = set()
    for i, action in enumerate(actions):
        for part in action.parts():
            key = (part.phase, part.microbatch)
            if key not in owned:
                where = (f"phase {part.phase} (stage {schedule.stage_of(rank, part.phase)})"
                         if part.phase < schedule.phases else f"phase {part.phase} ({name} has {schedule.phases})")
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


def _check_links(schedule: Schedule, n_micro: int, lists: list[list[Action]], tags: bool) -> None:
    sent: dict[tuple, list] = {}  # link -> tensors in the producer's order
    received: dict[tuple, list] = {}  # link -> (tensor, consumer's action index, action) in the consumer's order
    for r, actions in enumerate(lists):
        for i, action in enumerate(actions):
            for part in action.parts():
                for src, tensor in schedule.takes(r, part, n_micro):
                    if src != r:
                        received.setdefault((src, r, tensor[0] if tags else ""), []).append((tensor, i, action))
                for dst, tensor in schedule.makes(r, part, n_micro):
                    if dst != r:
                        sent.setdefault((r, dst, tensor[0] if tags else ""), []).append(tensor)
    for link in sorted(set(sent) | set(received)):
        src, dst, tag = link
        out, into = sent.get(link, []), received.get(link, [])
        where = f"link rank {src} -> rank {dst}" + (f" ({tag}s)" if tags else "")
        for j, (a, (b, i, action)) in enumerate(zip(out, into)):
            if a != b:
                raise ScheduleError(f"{schedule.name}: {where} is not FIFO: tensor {j} sent is the {_tensor(a)}, but "
                                    f"rank {dst} at action {i} {action} expects the {_tensor(b)}")
        if len(out) != len(into):
            raise ScheduleError(f"{schedule.name}: {where} carries {len(out)} tensors but rank {dst} receives "
                                f"{len(into)}")


def _check_posting_order(schedule: Schedule, n_micro: int, lists: list[list[Action]]) -> None:
    """The executor's posting order (p2p.StepPlan) replayed under NCCL's rules, strict."""
    programs = [StepPlan(schedule, r, actions, n_micro).program() for r, actions in enumerate(lists)]
    outcome = nccl_model.replay(programs, strict=True)
    if outcome.deadlock:
        raise ScheduleError(f"{schedule.name} over {schedule.pp} ranks, {n_micro} micro-batches: the executor's p2p "
                            f"order deadlocks under NCCL's rules: {outcome.deadlock}")
    if outcome.mismatched:
        raise ScheduleError(f"{schedule.name} over {schedule.pp} ranks, {n_micro} micro-batches: without tags "
                            f"{len(outcome.mismatched)} tensor(s) would meet the wrong receive, first: "
                            f"{outcome.mismatched[0]}")


def _tensor(t: Tensor) -> str:
    return f"{t[0]} into stage {t[1]} of micro-batch {t[2]}"
