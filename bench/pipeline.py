"""Pipeline bubbles, measured against the simulator and the paper's formulas (paper 3.2.1, Table 2).

For each schedule (1f1b, zb1p, dualpipe, dualpipev) at PP = 2, 4 and 8, PP gloo processes run the real executor
(parallel/pipeline/executor.py) on the schedule's real action lists with real point-to-point transfers of
hidden-state tensors on the grid's p2p channels, in the timing mode of bench/timing_mode.py: each chunk's
compute is a sleep of F = 20 ms, B = 40 ms (W = 20 ms of it), so that 8 processes on 2 cores behave like 8
dedicated accelerators. Micro-batches per step: 2 x PP (1f1b and zb1p: the same number). Each step is
barrier-aligned; a rank's bubble is the step's wall time (first start to last end over the ranks) minus the time
that rank spent in its actions (waiting for receives counts as bubble); the worst rank's is reported.

Next to it, all in units of F: the simulator on the nominal costs (parallel/pipeline/simulate.py), the simulator
on the costs the run really had, and Table 2's formula. The run's costs are each action's measured duration
(a 20 ms sleep lasts a little longer: the wake-up and Python around it) and the measured p2p latency (from a
producer's end to its consumer's start when the consumer waited for the tensor, median), the two things the
nominal simulation leaves out; the target is the measured bubble within 5% of that simulation. FB chunks run
their forward and backward one after the other here (no overlap: F&B = F + B). The measured trace of the
DualPipe PP=4 run is written as a Chrome trace and a PNG timeline next to the simulated one.

    python -m bench.pipeline   # prints a table, writes bench/results/pipeline.json and pipeline_*.png/json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.gloo import run_gloo
from bench.timing_mode import sleep_runners
from parallel.config import ParallelConfig
from parallel.grid import ProcessGrid
from parallel.pipeline.action import Action
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.p2p import StepPlan
from parallel.pipeline.schedule import Schedule, make_schedule
from parallel.pipeline.simulate import Costs, Timeline, formula_bubble, plot_timeline, simulate, write_chrome_trace
from parallel.pipeline.stage import rank_stages

RESULTS = Path(__file__).resolve().parent / "results"
COSTS = Costs(F=0.02, B=0.04, W=0.02)
SHAPE = (1, 256, 64)  # hidden states of one micro-batch travelling between stages
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
PPS = (2, 4, 8)
WARMUP, STEPS = 1, 3


def measure(rank: int, pp: int, schedule: str) -> list[dict]:
    n_micro = 2 * pp
    grid = ProcessGrid.build(ParallelConfig(pp=pp, schedule=schedule))
    specs = rank_stages(grid.schedule, rank, n_layers=0)
    runners = sleep_runners(specs, COSTS, SHAPE)
    executor = PipelineExecutor(grid.schedule, rank, grid.pp_ranks, runners, SHAPE, torch.float32,
                                channels=grid.channels)
    actions = grid.schedule.actions(rank, n_micro)
    steps = []
    for step in range(WARMUP + STEPS):
        dist.barrier()
        t0 = time.perf_counter()  # the step's start on the machine's clock, to compare ranks
        stats = executor.run(actions, n_micro)
        if step >= WARMUP:
            steps.append({"t0": t0, "total": stats.total, "busy": stats.busy,
                          "events": [(a, b, str(act)) for a, b, act in stats.events]})
    return steps


def run_costs(schedule: Schedule, steps: list[dict]) -> tuple[dict, float]:
    """The costs one measured step really had: each action's duration on its rank, and the median p2p latency
    (a consumer's start minus its producer's end, where the consumer started within 5 ms of that end, i.e. it
    was waiting for the tensor)."""
    n = 2 * schedule.pp
    duration, ends, starts = {}, {}, []
    for rank, step in enumerate(steps):
        plan = StepPlan(schedule, rank, schedule.actions(rank, n), n)
        for (start, end, label), makes, takes in zip(step["events"], plan.makes, plan.takes):
            duration[(rank, label)] = end - start
            for t in makes:
                ends[t.tensor] = step["t0"] + end
            starts += [(t.tensor, step["t0"] + start) for t in takes if t.channel is not None]
    lags = [start - ends[t] for t, start in starts if 0 <= start - ends[t] < 0.005]
    return duration, statistics.median(lags) if lags else 0.0


def step_bubble(steps: list[dict]) -> float:
    """The worst rank's bubble of one measured step: first start to last end, minus the rank's busy time."""
    first = min(s["t0"] for s in steps)
    makespan = max(s["t0"] + s["total"] for s in steps) - first
    return max(makespan - s["busy"] for s in steps)


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'schedule':10} {'PP':>3} {'measured':>9} {'simulated':>10} {'sim, run costs':>15} {'ratio':>6} "
          f"{'formula':>8}  {'overrun':>8} {'p2p':>7}   (worst rank's bubble in units of F = {COSTS.F * 1e3:.0f} ms;"
          " overrun: per action, p2p: latency)")
    for name in SCHEDULES:
        for pp in PPS:
            schedule = make_schedule(name, pp)
            ranks = run_gloo(measure, pp, name)  # [rank][step]
            nominal = simulate(schedule, 2 * pp, COSTS)
            per_step = []
            for i in range(STEPS):
                steps = [r[i] for r in ranks]
                duration, p2p = run_costs(schedule, steps)
                priced = simulate(schedule, 2 * pp, lambda r, a, d=duration: d[(r, str(a))], p2p=p2p)
                overrun = statistics.mean(d - COSTS(r, _action(schedule, r, label))
                                          for (r, label), d in duration.items())
                per_step.append((step_bubble(steps), max(priced.bubbles), overrun, p2p))
            measured, priced, overrun, p2p = (statistics.median(x) for x in zip(*per_step))
            row = {"schedule": name, "pp": pp, "microbatches": 2 * pp, "measured_bubble_s": measured,
                   "simulated_bubble_s": max(nominal.bubbles), "simulated_run_costs_bubble_s": priced,
                   "ratio_to_run_costs": measured / priced if priced else None,
                   "formula_bubble_s": formula_bubble(schedule, COSTS), "overrun_per_action_s": overrun,
                   "p2p_latency_s": p2p}
            rows.append(row)
            ratio = f"{row['ratio_to_run_costs']:.3f}" if priced else "-"
            print(f"{name:10} {pp:>3} {measured / COSTS.F:>9.2f} {row['simulated_bubble_s'] / COSTS.F:>10.2f} "
                  f"{priced / COSTS.F:>15.2f} {ratio:>6} {row['formula_bubble_s'] / COSTS.F:>8.2f}  "
                  f"{overrun * 1e3:>6.2f}ms {p2p * 1e6:>5.0f}us")
            if pp == 4 and name == "dualpipe":
                by_label = {str(a): a for r in range(pp) for a in schedule.actions(r, 2 * pp)}
                last = [r[-1] for r in ranks]
                first = min(s["t0"] for s in last)
                measured_tl = Timeline([[(s["t0"] - first + a, s["t0"] - first + b, by_label[label])
                                         for a, b, label in s["events"]] for s in last],
                                       name=f"{name} PP={pp}, measured (timing mode)")
                write_chrome_trace(measured_tl, RESULTS / "pipeline_dualpipe_measured.json")
                plot_timeline(measured_tl, RESULTS / "pipeline_dualpipe_measured.png")
                plot_timeline(nominal, RESULTS / "pipeline_dualpipe_simulated.png")
    (RESULTS / "pipeline.json").write_text(json.dumps({"costs_s": vars(COSTS), "rows": rows}, indent=1))
    print(f"wrote {RESULTS / 'pipeline.json'} and the DualPipe PP=4 timelines (measured and simulated)")


def _action(schedule: Schedule, rank: int, label: str) -> Action:
    return next(a for a in schedule.actions(rank, 2 * schedule.pp) if str(a) == label)


if __name__ == "__main__":
    main()
