"""Pipeline bubbles, measured against the simulator and the paper's formulas (paper 3.2.1, Table 2).

For each schedule (1f1b, zb1p, dualpipe, dualpipev) at PP = 2, 4 and 8, PP gloo processes run the real executor
(parallel/pipeline/executor.py) on the schedule's real action lists with real point-to-point transfers of
hidden-state tensors, in the timing mode of bench/timing_mode.py: each chunk's compute is a sleep of
F = 20 ms, B = 40 ms (W = 20 ms of it), so that 8 processes on 2 cores behave like 8 dedicated accelerators.
Micro-batches per step: 2 x PP (1f1b and zb1p: the same number). Each step is barrier-aligned; a rank's
bubble is the step's wall time minus the time that rank spent in its actions (compute plus waiting for
receives counts as bubble), median over steps after a warm-up.

Printed next to each other, per schedule and PP: the measured bubble (worst rank), the simulator's (same
costs, parallel/pipeline/simulate.py) and Table 2's formula, all in units of F. FB chunks run their forward
and backward one after the other here (no overlap: F&B = F + B). The measured trace of the last run is
written as a Chrome trace and a PNG timeline next to the simulated one.

    python -m bench.pipeline   # prints a table, writes bench/results/pipeline.json and pipeline_*.png/json
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from bench.gloo import run_gloo
from bench.timing_mode import sleep_runners
from parallel.config import ParallelConfig
from parallel.grid import ProcessGrid
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.schedule import make_schedule
from parallel.pipeline.simulate import Costs, Timeline, formula_bubble, plot_timeline, simulate, write_chrome_trace
from parallel.pipeline.stage import rank_stages

RESULTS = Path(__file__).resolve().parent / "results"
COSTS = Costs(F=0.02, B=0.04, W=0.02)
SHAPE = (1, 256, 64)  # hidden states of one micro-batch travelling between stages
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
PPS = (2, 4, 8)
WARMUP, STEPS = 1, 3


def measure(rank: int, pp: int, schedule: str) -> dict:
    n_micro = 2 * pp
    grid = ProcessGrid.build(ParallelConfig(pp=pp, schedule=schedule))
    specs = rank_stages(grid.schedule, rank, n_layers=0)
    runners = sleep_runners(specs, COSTS, SHAPE)
    executor = PipelineExecutor(grid.schedule, rank, grid.pp_ranks, runners, SHAPE, torch.float32,
                                channels=grid.channels)
    actions = grid.schedule.actions(rank, n_micro)
    bubbles, events = [], []
    for step in range(WARMUP + STEPS):
        dist.barrier()
        stats = executor.run(actions, n_micro)
        total = torch.tensor([stats.total], dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank ends
        if step >= WARMUP:
            bubbles.append(total.item() - stats.busy)
            events = [(a, b, str(act)) for a, b, act in stats.events]
    return {"bubble": statistics.median(bubbles), "events": events}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'schedule':10} {'PP':>3} {'measured':>9} {'simulated':>10} {'formula':>8}   (bubble of the worst rank, "
          f"in units of F = {COSTS.F * 1e3:.0f} ms)")
    for schedule in SCHEDULES:
        for pp in PPS:
            ranks = run_gloo(measure, pp, schedule)
            timeline = simulate(make_schedule(schedule, pp), 2 * pp, COSTS)
            row = {"schedule": schedule, "pp": pp, "microbatches": 2 * pp,
                   "measured_bubble_s": max(r["bubble"] for r in ranks),
                   "measured_bubble_rank_s": [r["bubble"] for r in ranks],
                   "simulated_bubble_s": max(timeline.bubbles),
                   "formula_bubble_s": formula_bubble(make_schedule(schedule, pp), COSTS)}
            rows.append(row)
            print(f"{schedule:10} {pp:>3} {row['measured_bubble_s'] / COSTS.F:>9.2f} "
                  f"{row['simulated_bubble_s'] / COSTS.F:>10.2f} {row['formula_bubble_s'] / COSTS.F:>8.2f}")
            if pp == 4 and schedule == "dualpipe":
                by_label = {str(a): a for r in range(pp) for a in make_schedule(schedule, pp).actions(r, 2 * pp)}
                measured = Timeline([[(a, b, by_label[label]) for a, b, label in r["events"]] for r in ranks],
                                    name=f"{schedule} PP={pp}, measured (timing mode)")
                write_chrome_trace(measured, RESULTS / "pipeline_dualpipe_measured.json")
                plot_timeline(measured, RESULTS / "pipeline_dualpipe_measured.png")
                plot_timeline(timeline, RESULTS / "pipeline_dualpipe_simulated.png")
    (RESULTS / "pipeline.json").write_text(json.dumps({"costs_s": vars(COSTS), "rows": rows}, indent=1))
    print(f"wrote {RESULTS / 'pipeline.json'} and the DualPipe PP=4 timelines (measured and simulated)")


if __name__ == "__main__":
    main()
