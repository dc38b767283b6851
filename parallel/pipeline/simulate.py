"""Pricing a pipeline schedule (paper 3.2.1, Table 2): an event-driven simulation of the per-rank action lists,
the bubble formulas of Table 2, and two views of a timeline, a Chrome/Perfetto trace and a PNG drawn like the
paper's Figure 5. The executor's measured runs give the same `Timeline`s, so the three compare directly.

The simulation is `validate.replay`, the validator's data-flow rules with durations: every rank runs its list in
order, each action as soon as its rank is free and its inputs exist, plus `p2p` for an input from another rank.

Table 2 against the simulation, with uniform costs (B the full backward, W its weight part, B - W the backward
for input, F&B an overlapped pair) and bubble(rank) = makespan - busy(rank):
- 1F1B: (PP-1)(F+B) on every rank, for any costs and any number of micro-batches.
- ZB1P: (PP-1)(F+B-2W) on every rank when micro-batches >= PP and W <= min(F, B-W).
- DualPipe: (PP/2-1)(F&B+B-3W) is the largest per-rank bubble, whatever the micro-batch count, when B - W = F
  (the paper's figure draws forward and backward-for-input chunks alike), W <= F and B <= F&B <= F+B; the middle
  ranks reach it and rank r idles max(0, PP/2-2-min(r, PP-1-r)) (F+B-F&B) less, having that many fewer FB pairs.
  Outside that region the simulated bubble differs, except on short pipelines: at PP=2 it is 0 for any costs,
  and at PP=4 F&B > F+B keeps the formula.
- DualPipeV over PP ranks: the DualPipe formula over its 2 PP stages, (PP-1)(F&B+B-3W), in costs of one of those
  (half-size) stages, under the same conditions (with PP=1 and PP=2 as DualPipe's 2 and 4); per rank, r idles
  max(0, PP-2-r)(F+B-F&B) less.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from parallel.pipeline.action import Action
from parallel.pipeline.schedule import Schedule
from parallel.pipeline.validate import Event, replay, validate_schedule


@dataclass
class Costs:
    """Durations of one chunk (one stage, one micro-batch), in any time unit (seconds for real traces)."""

    F: float  # forward chunk
    B: float  # full backward chunk, weight gradients included (Table 2's B); a B with defer_w costs B - W
    W: float  # the weight-gradient part of B, run by a W action
    FB: float | None = None  # an overlapped forward + backward pair (Table 2's F&B); None: F + B, no overlap gain
    p2p: float = 0.0  # latency from a producer's end to a consumer on another rank being able to start

    def __post_init__(self) -> None:
        if min(self.F, self.B, self.W, self.p2p, self.FB if self.FB is not None else 0.0) < 0:
            raise ValueError(f"pipeline costs must not be negative, got {self}")
        if self.W > self.B:
            raise ValueError(f"W={self.W} is part of the backward chunk and cannot exceed B={self.B}")

    @property
    def overlapped(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def __call__(self, rank: int, action: Action) -> float:
        """The duration of `action` on `rank` (the same on every rank); an FB whose backward defers W costs F&B - W."""
        if action.kind == "FB":
            return self.overlapped - (self.W if action.backward.defer_w else 0.0)
        if action.kind == "B":
            return self.B - (self.W if action.defer_w else 0.0)
        return self.F if action.kind == "F" else self.W


class Timeline:
    """Per-rank (start, end, action) lists of one step, times from the step's start at 0 (simulated or measured,
    e.g. `Timeline([stats.events for stats in per_rank_stats])` from the executor)."""

    def __init__(self, events: list[list[Event]], name: str = "") -> None:
        self.events = [list(rank_events) for rank_events in events]
        self.name = name

    @property
    def num_ranks(self) -> int:
        return len(self.events)

    @property
    def makespan(self) -> float:
        return max((end for rank_events in self.events for _, end, _ in rank_events), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(end - start for start, end, _ in self.events[rank])

    def bubble(self, rank: int) -> float:
        return self.makespan - self.busy(rank)

    @property
    def bubbles(self) -> list[float]:
        return [self.bubble(r) for r in range(self.num_ranks)]


def simulate(schedule: Schedule, n_micro: int, costs: Costs | Callable[[int, Action], float],
             lists: list[list[Action]] | None = None, *, p2p: float | None = None) -> Timeline:
    """The timeline of `lists` (default: the schedule's own), validated first. `costs` is a `Costs` or a function
    (rank, action) -> duration, given plain actions and whole FB pairs. `p2p` overrides the link latency
    (default: `costs.p2p`, or 0 for a function)."""
    if lists is None:
        lists = [schedule.actions(r, n_micro) for r in range(schedule.pp)]
    validate_schedule(schedule, n_micro, lists)
    if p2p is None:
        p2p = costs.p2p if isinstance(costs, Costs) else 0.0
    return Timeline(replay(schedule, n_micro, lists, costs, p2p), schedule.name)


def formula_bubble(schedule: Schedule, costs: Costs) -> float:
    """Table 2's bubble of `schedule` for `costs` (`Schedule.bubble`); the module docstring says when it is exact."""
    return schedule.bubble(costs.F, costs.B, costs.W, costs.overlapped)


def _args(action: Action) -> dict:
    if action.kind == "FB":
        return {"microbatch": [action.forward.microbatch, action.backward.microbatch],
                "phase": [action.forward.phase, action.backward.phase]}
    return {"microbatch": action.microbatch, "phase": action.phase, "defer_w": action.defer_w}


def write_chrome_trace(timeline: Timeline, path: str | Path) -> None:
    """A Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev): one process per rank, one complete event
    per action, timeline seconds written as microseconds."""
    events: list[dict] = []
    for rank, rank_events in enumerate(timeline.events):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        for start, end, action in rank_events:
            events.append({"name": str(action), "cat": action.kind, "ph": "X", "pid": rank, "tid": 0,
                           "ts": start * 1e6, "dur": (end - start) * 1e6, "args": _args(action)})
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                      "otherData": {"schedule": timeline.name}}))


_COLORS = {"F": "#f4b03c", "B": "#7bd44f", "Bi": "#4fb32f", "W": "#79b9f2"}


def plot_timeline(timeline: Timeline, path: str | Path) -> None:
    """A PNG like DeepSeek-V3's Figure 5: one row per rank (rank 0 on top), forward orange, full backward light
    green, backward-for-input dark green, W blue, an FB pair split into its forward and backward halves under one
    border; each box shows its micro-batch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    makespan = timeline.makespan or 1.0
    most = max((len(e) for e in timeline.events), default=1)
    fig = Figure(figsize=(min(4 + 0.35 * most, 60), 1 + 0.45 * max(timeline.num_ranks, 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    def box(rank: int, start: float, end: float, part: Action) -> None:
        color = _COLORS["Bi" if part.kind == "B" and part.defer_w else part.kind]
        ax.barh(rank, end - start, left=start, height=0.8, color=color, edgecolor="black", linewidth=0.4)
        ax.text((start + end) / 2, rank, str(part.microbatch), ha="center", va="center", fontsize=6)

    for rank, rank_events in enumerate(timeline.events):
        for start, end, action in rank_events:
            if action.kind == "FB":
                middle = (start + end) / 2
                box(rank, start, middle, action.forward)
                box(rank, middle, end, action.backward)
                ax.add_patch(Rectangle((start, rank - 0.4), end - start, 0.8, fill=False, linewidth=1.2))
            else:
                box(rank, start, end, action)
    ax.set_yticks(range(timeline.num_ranks), [f"rank {r}" for r in range(timeline.num_ranks)])
    ax.set_ylim(timeline.num_ranks - 0.5, -0.5)
    ax.set_xlim(0, makespan)
    ax.set_xlabel("time")
    worst = max(timeline.bubbles, default=0.0)
    ax.set_title(f"{timeline.name} schedule: makespan {makespan:.4g}, largest bubble {worst:.4g}")
    ax.legend(handles=[Patch(color=_COLORS["F"], label="forward"), Patch(color=_COLORS["B"], label="backward"),
                       Patch(color=_COLORS["Bi"], label="backward for input"),
                       Patch(color=_COLORS["W"], label="backward for weights")],
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
