"""What a pipeline schedule is made of (paper 3.2.1): per-rank lists of `Action`s, and where each rank's stages
sit in the model. Schedules are data (DESIGN.md): `schedule.build_schedule` returns these lists, the validator
and the simulator read them, the executor runs them; nothing here knows about processes.

Stages. A schedule named `name` over R ranks splits the model into `num_stages(name, R)` stages, numbered in
model order (stage 0 holds the embedding, the last stage the output head and MTP). `stage_of(name, R, rank,
phase)` says which stage a rank runs in its phase 0 or 1:

    1f1b, zb1p   one stage per rank: stage = rank (phase 0 only); R stages
    dualpipe     R stages, every rank holds two: phase 0 = stage rank, phase 1 = stage R-1-rank (a second copy of
                 the mirror rank's stage; the two copies' gradients are summed). Micro-batches of direction 0
                 enter at rank 0 and run through phase 0 of ranks 0..R-1; those of direction 1 enter at rank R-1
                 and run through phase 1 of ranks R-1..0.
    dualpipev    2R stages in a V: phase 0 = stage rank, phase 1 = stage 2R-1-rank; every micro-batch runs phase
                 0 down ranks 0..R-1, then phase 1 back up ranks R-1..0. Rank 0 holds the first and last stage.

Micro-batches are numbered globally in [0, num_microbatches). Under dualpipe the first half [0, C/2) travels in
direction 0 and the second half [C/2, C) in direction 1; `direction_of` says which.

Data flow implied by the stages (no explicit send/recv actions): F of (stage s, micro-batch m) consumes the
output of F(s-1, m) and produces the input of F(s+1, m); B(s, m) consumes the gradient from B(s+1, m) and
produces the one B(s-1, m) needs; W(s, m) (the deferred weight-gradient GEMMs of B(s, m)) needs only B(s, m)
on the same rank. When producer and consumer sit on different ranks the tensor travels over the link between
them, in the order the producer runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, choice

ScheduleName = choice("ScheduleName", "1f1b zb1p dualpipe dualpipev", __name__, refusal="does not exist")
SCHEDULES = tuple(s.value for s in ScheduleName)
KINDS = ("F", "B", "W", "FB")


@dataclass(frozen=True)
class Action:
    """One step of one rank's schedule.

    kind: "F" forward, "B" backward (input gradients, plus weight gradients unless `defer_w`), "W" the weight
    gradients a deferred B left, "FB" a forward and a backward chunk run interleaved (`forward` and `backward`
    are then the two Actions, of kinds F and B). phase: which of the rank's two stages (0 or 1; 0 for
    single-stage schedules). microbatch: the global micro-batch index (-1 for FB, see its parts).
    """

    kind: str
    phase: int = 0
    microbatch: int = -1
    defer_w: bool = False
    forward: Action | None = None
    backward: Action | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Action kind {self.kind!r}: must be one of {', '.join(KINDS)}")
        if self.phase not in (0, 1):
            raise ValueError(f"Action phase {self.phase}: must be 0 or 1")
        if self.kind == "FB":
            if self.forward is None or self.backward is None or self.forward.kind != "F" \
                    or self.backward.kind != "B":
                raise ValueError("an FB Action needs forward (kind F) and backward (kind B) Actions")
        elif self.microbatch < 0:
            raise ValueError(f"{self.kind} Action needs a micro-batch index >= 0, got {self.microbatch}")
        if self.defer_w and self.kind != "B":
            raise ValueError("defer_w applies to B Actions only")

    def parts(self) -> tuple[Action, ...]:
        """The plain actions this one runs: itself, or an FB's forward and backward."""
        return (self.forward, self.backward) if self.kind == "FB" else (self,)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"FB[{self.forward}|{self.backward}]"
        return f"{self.kind}{self.phase}.{self.microbatch}{'*' if self.defer_w else ''}"


class ScheduleError(ConfigError):
    """A schedule that cannot be built for the configuration, or a set of action lists that cannot run."""


def check_schedule_layout(name: str, num_ranks: int) -> None:
    """The schedule's rules on the pipeline size alone (parallel.schedule, parallel.pp)."""
    _check(name, num_ranks)
    if name == "dualpipe" and num_ranks % 2:
        raise ScheduleError(f"parallel.schedule=dualpipe needs an even number of pipeline ranks, got "
                            f"parallel.pp={num_ranks}; use dualpipev or an even pp")


def _check(name: str, num_ranks: int) -> None:
    """A schedule that exists, over at least one rank."""
    try:
        ScheduleName.parse(name, "parallel.schedule")
    except ConfigError as err:
        raise ScheduleError(str(err)) from None
    if num_ranks < 1:
        raise ScheduleError(f"parallel.pp={num_ranks}: a pipeline needs at least one rank")


def num_stages(name: str, num_ranks: int) -> int:
    """How many stages the model is split into."""
    _check(name, num_ranks)
    return 2 * num_ranks if name == "dualpipev" else num_ranks


def phases(name: str) -> int:
    """Stages per rank: 2 for dualpipe and dualpipev, else 1."""
    _check(name, 1)
    return 2 if name in ("dualpipe", "dualpipev") else 1


def stage_of(name: str, num_ranks: int, rank: int, phase: int) -> int:
    """The stage (model order) that `rank` runs in `phase`."""
    _check(name, num_ranks)
    if not 0 <= rank < num_ranks or phase >= phases(name) or phase < 0:
        raise ValueError(f"rank {rank} phase {phase} does not exist in {name} over {num_ranks} ranks")
    if phase == 0:
        return rank
    return num_ranks - 1 - rank if name == "dualpipe" else 2 * num_ranks - 1 - rank


def direction_of(name: str, microbatch: int, num_microbatches: int) -> int:
    """0 for micro-batches that enter at rank 0; 1 for dualpipe's second half, which enters at rank R-1."""
    return int(name == "dualpipe" and microbatch >= num_microbatches // 2)


def owner(name: str, num_ranks: int, stage: int, direction: int = 0) -> tuple[int, int]:
    """(rank, phase) that runs `stage` for micro-batches of `direction` (the inverse of `stage_of`)."""
    for rank in range(num_ranks):
        for phase in range(phases(name)):
            if stage_of(name, num_ranks, rank, phase) == stage and (name != "dualpipe" or phase == direction):
                return rank, phase
    raise ValueError(f"stage {stage} does not exist in {name} over {num_ranks} ranks")
