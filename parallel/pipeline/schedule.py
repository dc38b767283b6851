"""Pipeline schedules as objects (paper 3.2.1, Table 2): one type per schedule (`OneFOneB`, `ZB1P`, `DualPipe`,
`DualPipeV`, and `ForwardOnly` for evaluation), built once from the config by `make_schedule(name, pp)` and
validated on construction. A schedule owns the stage placement (`stage_of`, `owner`, `direction_of`,
`n_stages`), the data flow it implies (`takes`, `makes`), its rules on micro-batch counts
(`check_microbatches`) and each rank's `actions` for one step; nothing else compares schedule names.

Placement. Over R ranks the model is split into `n_stages` stages in model order (stage 0 embeds, the last
computes the output head and MTP); rank r runs `stage_of(r, phase)` in its phase 0 and (dual schedules) 1:

    1f1b, zb1p   one stage per rank: stage = rank; R stages
    dualpipe     R stages, every rank holds two: phase 0 = stage rank, phase 1 = stage R-1-rank (a second copy of
                 the mirror rank's stage; the copies' gradients are summed). Micro-batches of direction 0 enter at
                 rank 0 and run through phase 0 of ranks 0..R-1; those of direction 1 (the second half of the
                 step's micro-batches) enter at rank R-1 and run through phase 1 of ranks R-1..0.
    dualpipev    2R stages in a V: phase 0 = stage rank, phase 1 = stage 2R-1-rank; every micro-batch runs phase 0
                 down ranks 0..R-1, then phase 1 back up ranks R-1..0. Rank 0 holds the first and last stage.

Data flow (no explicit send/receive actions): F of (stage s, micro-batch m) consumes F(s-1, m)'s output and
produces F(s+1, m)'s input; B(s, m) consumes the gradient from B(s+1, m) and produces the one B(s-1, m) needs;
W(s, m), the weight-gradient GEMMs B(s, m) deferred, needs only B(s, m) on the same rank. When producer and
consumer sit on different ranks the tensor travels between them, in the order the producer runs.

Orders. 1F1B: warm-up forwards, one-forward-one-backward, cool-down backwards. ZB1P (ZeroBubble's ZB-H1): 1F1B's
order with every backward split into B and a W run late. DualPipe and DualPipeV: the 8 steps of
deepseek-ai/DualPipe (paper Figure 5), with FB actions (an overlapped forward-backward pair) in the steady phase.
`build_schedule(name, R, rank, C)` is the name-string entry point (the checks and tools use it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import ClassVar

from core.config import ConfigError
from parallel.pipeline.action import Action, ScheduleError, ScheduleName

__all__ = ["DualPipe", "DualPipeV", "ForwardOnly", "OneFOneB", "Schedule", "ScheduleError", "Tensor", "ZB1P",
           "build_schedule", "make_schedule"]

Tensor = tuple[str, int, int]  # what travels: ("activation" | "gradient", the stage consuming it, micro-batch)


class Schedule(ABC):
    """A pipeline schedule over `pp` ranks (see the module docstring). Subclasses set `name`, `phases` (stages per
    rank) and the order (`_actions`); the placement defaults are one stage per rank."""

    name: ClassVar[str]
    phases: ClassVar[int] = 1
    directions: ClassVar[int] = 1  # ends micro-batches enter at (DualPipe: both)
    overlaps: ClassVar[bool] = False  # FB actions: a forward chunk overlapped with another micro-batch's backward

    def __init__(self, pp: int) -> None:
        if pp < 1:
            raise ScheduleError(f"parallel.pp={pp}: a pipeline needs at least one rank")
        self.pp = pp

    def __repr__(self) -> str:
        return f"{self.name} over {self.pp} pipeline ranks"

    # ---- placement -----------------------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        """How many stages the model is split into."""
        return self.pp

    def stage_of(self, rank: int, phase: int) -> int:
        """The stage (model order) that `rank` runs in `phase`."""
        self._check_place(rank, phase)
        return rank

    def direction_of(self, microbatch: int, n_micro: int) -> int:
        """0 for micro-batches that enter at rank 0 (all but DualPipe's second half)."""
        return 0

    def owner(self, stage: int, direction: int = 0) -> tuple[int, int]:
        """(rank, phase) that runs `stage` for micro-batches of `direction` (the inverse of `stage_of`)."""
        if not 0 <= stage < self.n_stages:
            raise ValueError(f"stage {stage} does not exist in {self}")
        return stage, 0

    def placement(self) -> str:
        """Where the stages sit, in words (hai-plan prints it)."""
        return "one stage per rank"

    def _check_place(self, rank: int, phase: int) -> None:
        if not 0 <= rank < self.pp or not 0 <= phase < self.phases:
            raise ValueError(f"rank {rank} phase {phase} does not exist in {self}")

    # ---- data flow -----------------------------------------------------------------------------------------
    def _owner_rank(self, stage: int, microbatch: int, n_micro: int) -> int:
        return self.owner(stage, self.direction_of(microbatch, n_micro))[0]

    def takes(self, rank: int, part: Action, n_micro: int) -> list[tuple[int, Tensor]]:
        """What plain action `part` on `rank` consumes from another stage: [(producer rank, tensor)]; the
        producer may be `rank` itself (DualPipeV's turn)."""
        s, m = self.stage_of(rank, part.phase), part.microbatch
        if part.kind == "F" and s > 0:
            return [(self._owner_rank(s - 1, m, n_micro), ("activation", s, m))]
        if part.kind == "B" and s < self.n_stages - 1:
            return [(self._owner_rank(s + 1, m, n_micro), ("gradient", s, m))]
        return []

    def makes(self, rank: int, part: Action, n_micro: int) -> list[tuple[int, Tensor]]:
        """What plain action `part` on `rank` produces for another stage: [(consumer rank, tensor)]."""
        s, m = self.stage_of(rank, part.phase), part.microbatch
        if part.kind == "F" and s < self.n_stages - 1:
            return [(self._owner_rank(s + 1, m, n_micro), ("activation", s + 1, m))]
        if part.kind == "B" and s > 0:
            return [(self._owner_rank(s - 1, m, n_micro), ("gradient", s - 1, m))]
        return []

    # ---- micro-batches and actions -------------------------------------------------------------------------
    def check_microbatches(self, n_micro: int) -> None:
        """The schedule's rules on the micro-batches per step, as errors naming the config keys and the fix."""
        if n_micro < 1:
            raise ScheduleError(f"parallel.microbatches={n_micro}: a step needs at least one micro-batch")

    def actions(self, rank: int, n_micro: int) -> list[Action]:
        """The actions `rank` runs in one step of `n_micro` micro-batches (a pure function)."""
        self.check_microbatches(n_micro)
        if not 0 <= rank < self.pp:
            raise ScheduleError(f"pipeline rank {rank} does not exist with parallel.pp={self.pp}")
        return self._actions(rank, n_micro)

    def forward_actions(self, rank: int, n_micro: int) -> list[Action]:
        """Forward-only actions (evaluation): every micro-batch of each phase's direction, phase by phase. It
        cannot deadlock: a rank's phase-0 forwards need only upstream phase-0 outputs, and its phase-1 forwards
        only outputs that ranks produce after their own phase-0 forwards."""
        if not 0 <= rank < self.pp:
            raise ScheduleError(f"pipeline rank {rank} does not exist with parallel.pp={self.pp}")
        return [Action("F", phase, m) for phase in range(self.phases) for m in range(n_micro)
                if self._runs(phase, m, n_micro)]

    def _runs(self, phase: int, microbatch: int, n_micro: int) -> bool:
        """Whether micro-batch `microbatch` passes through the rank's `phase` (DualPipe: one direction each)."""
        return True

    @abstractmethod
    def _actions(self, rank: int, n_micro: int) -> list[Action]:
        """The schedule's order for `rank` (`actions` has checked the arguments)."""

    @abstractmethod
    def bubble(self, F: float, B: float, W: float, FB: float) -> float:  # noqa: N803 (Table 2's names)
        """Table 2's bubble for chunk costs F, B (full backward), W (its weight part), FB (an overlapped pair);
        simulate.py's docstring says when it is exact."""


class OneFOneB(Schedule):
    name = "1f1b"

    def _actions(self, rank: int, n_micro: int) -> list[Action]:
        return _one_f_one_b(self.pp, rank, n_micro, zero_bubble=False)

    def bubble(self, F: float, B: float, W: float, FB: float) -> float:  # noqa: N803
        return (self.pp - 1) * (F + B)


class ZB1P(OneFOneB):
    name = "zb1p"

    def _actions(self, rank: int, n_micro: int) -> list[Action]:
        return _one_f_one_b(self.pp, rank, n_micro, zero_bubble=True)

    def bubble(self, F: float, B: float, W: float, FB: float) -> float:  # noqa: N803
        return (self.pp - 1) * (F + B - 2 * W)


class _Dual(Schedule):
    """DualPipe and DualPipeV: two stages per rank, the 8 steps of the reference (`_dual`)."""

    phases = 2
    overlaps = True

    def check_microbatches(self, n_micro: int) -> None:
        super().check_microbatches(n_micro)
        if n_micro < 2 * self.pp:
            raise ScheduleError(f"parallel.microbatches={n_micro} is below 2 x pp = {2 * self.pp} "
                                f"(parallel.pp={self.pp}), which parallel.schedule={self.name} needs to fill its "
                                "steady phase; raise the micro-batch count or lower pp")

    @abstractmethod
    def _position(self, rank: int) -> tuple[int, int]:
        """(half, pos): the reference's number of positions and this rank's."""

    def _actions(self, rank: int, n_micro: int) -> list[Action]:
        half, pos = self._position(rank)
        return _dual(half, pos, self._swap(rank), self._first(n_micro), self._per_phase(n_micro))

    def _swap(self, rank: int) -> bool:
        return False

    def _first(self, n_micro: int) -> tuple[int, int]:
        return 0, 0

    def _per_phase(self, n_micro: int) -> int:
        return n_micro


class DualPipe(_Dual):
    name = "dualpipe"
    directions = 2

    def __init__(self, pp: int) -> None:
        super().__init__(pp)
        if pp % 2:
            raise ScheduleError(f"parallel.schedule=dualpipe needs an even number of pipeline ranks, got "
                                f"parallel.pp={pp}; use dualpipev or an even pp")

    def stage_of(self, rank: int, phase: int) -> int:
        self._check_place(rank, phase)
        return rank if phase == 0 else self.pp - 1 - rank

    def direction_of(self, microbatch: int, n_micro: int) -> int:
        return int(microbatch >= n_micro // 2)

    def owner(self, stage: int, direction: int = 0) -> tuple[int, int]:
        super().owner(stage)
        return (stage, 0) if direction == 0 else (self.pp - 1 - stage, 1)

    def placement(self) -> str:
        return f"rank r holds stages r and {self.pp - 1}-r: two copies of every stage"

    def check_microbatches(self, n_micro: int) -> None:
        if n_micro >= 1 and n_micro % 2:
            raise ScheduleError(f"parallel.schedule=dualpipe feeds half the micro-batches from each end, so "
                                f"parallel.microbatches={n_micro} must be even")
        super().check_microbatches(n_micro)

    def _runs(self, phase: int, microbatch: int, n_micro: int) -> bool:
        return self.direction_of(microbatch, n_micro) == phase

    def _position(self, rank: int) -> tuple[int, int]:
        return self.pp // 2, min(rank, self.pp - 1 - rank)

    def _swap(self, rank: int) -> bool:
        return rank >= self.pp // 2  # the reference's local phase 0 is the direction entering at the nearer end

    def _first(self, n_micro: int) -> tuple[int, int]:
        return 0, n_micro // 2

    def _per_phase(self, n_micro: int) -> int:
        return n_micro // 2

    def bubble(self, F: float, B: float, W: float, FB: float) -> float:  # noqa: N803
        return (self.pp / 2 - 1) * (FB + B - 3 * W)


class DualPipeV(_Dual):
    name = "dualpipev"

    @property
    def n_stages(self) -> int:
        return 2 * self.pp

    def stage_of(self, rank: int, phase: int) -> int:
        self._check_place(rank, phase)
        return rank if phase == 0 else 2 * self.pp - 1 - rank

    def owner(self, stage: int, direction: int = 0) -> tuple[int, int]:
        super().owner(stage)
        return (stage, 0) if stage < self.pp else (2 * self.pp - 1 - stage, 1)

    def placement(self) -> str:
        return f"rank r holds stages r and {2 * self.pp - 1}-r"

    def _position(self, rank: int) -> tuple[int, int]:
        return self.pp, rank

    def bubble(self, F: float, B: float, W: float, FB: float) -> float:  # noqa: N803
        """The paper gives no formula. DualPipeV's lists over PP ranks are DualPipe's over 2 PP ranks with each
        rank and its mirror merged into one ("cut in half"), so it has DualPipe's critical path over 2 PP stages:
        (2PP/2 - 1)(F&B + B - 3W) in costs of one of its 2 PP stages. The DualPipe repository's table states the
        same; the simulation matches it exactly."""
        return (self.pp - 1) * (FB + B - 3 * W)


class ForwardOnly(Schedule):
    """Evaluation over a training schedule's placement: `actions` are the base schedule's `forward_actions`."""

    name = "forward-only"

    def __init__(self, base: Schedule) -> None:
        super().__init__(base.pp)
        self.base = base
        self.phases = base.phases

    def __repr__(self) -> str:
        return f"{self.base.name} forward-only over {self.pp} pipeline ranks"

    @property
    def n_stages(self) -> int:
        return self.base.n_stages

    def stage_of(self, rank: int, phase: int) -> int:
        return self.base.stage_of(rank, phase)

    def direction_of(self, microbatch: int, n_micro: int) -> int:
        return self.base.direction_of(microbatch, n_micro)

    def owner(self, stage: int, direction: int = 0) -> tuple[int, int]:
        return self.base.owner(stage, direction)

    def placement(self) -> str:
        return self.base.placement()

    def _runs(self, phase: int, microbatch: int, n_micro: int) -> bool:
        return self.base._runs(phase, microbatch, n_micro)

    def _actions(self, rank: int, n_micro: int) -> list[Action]:
        return self.base.forward_actions(rank, n_micro)

    def bubble(self, F: float, B: float, W: float, FB: float) -> float:  # noqa: N803
        raise ScheduleError(f"{self}: Table 2 gives bubbles of training schedules only; simulate the forward-only "
                            "actions (parallel/pipeline/simulate.py) for evaluation")


SCHEDULE_TYPES: dict[str, type[Schedule]] = {cls.name: cls for cls in (OneFOneB, ZB1P, DualPipe, DualPipeV)}


def make_schedule(name: str, pp: int) -> Schedule:
    """The schedule `name` (parallel.schedule) over `pp` ranks (parallel.pp), validated: the one name check."""
    try:
        key = ScheduleName.parse(name, "parallel.schedule").value
    except ConfigError as err:
        raise ScheduleError(str(err)) from None
    return SCHEDULE_TYPES[key](pp)


def build_schedule(name: str, num_ranks: int, rank: int, num_microbatches: int) -> list[Action]:
    """The actions `rank` runs in one step of `num_microbatches` micro-batches of schedule `name` over
    `num_ranks` pipeline ranks."""
    return make_schedule(name, num_ranks).actions(rank, num_microbatches)


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
    """Appends DualPipe(V) steps for one rank, in the reference's local phases: local phase 0 is our phase 0
    unless `swap` (DualPipe's second half of the ranks, whose nearer end feeds our phase 1). `first[p]`: the first
    micro-batch of our phase p. Micro-batches run in order within each phase; W's run deferred B's in the order
    they were deferred."""

    def __init__(self, swap: bool, first: tuple[int, int]) -> None:
        self.swap, self.first = swap, first
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


def _dual(half: int, pos: int, swap: bool, first: tuple[int, int], per_phase: int) -> list[Action]:
    """DualPipe / DualPipeV in the 8 steps of deepseek-ai/DualPipe (paper Figure 5). DualPipe pairs ranks r and
    R-1-r (pos = min(r, R-1-r) among half = R/2 positions, each end fed n/2 micro-batches); DualPipeV folds the
    pipeline into a V (pos = r among half = R, all n micro-batches enter at rank 0)."""
    s = _DualBuilder(swap, first)
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
