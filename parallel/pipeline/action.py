"""What a pipeline schedule is made of (paper 3.2.1): per-rank lists of `Action`s. Schedule objects
(schedule.py) produce them, the validator and the simulator read them, the executor runs them; nothing here
knows about processes or where stages sit.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, choice

ScheduleName = choice("ScheduleName", "1f1b zb1p dualpipe dualpipev", __name__, refusal="does not exist")
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
