"""Our pipeline executor next to torch.distributed.pipelining on the same stages and data (paper 3.2.1).

PP = 2 gloo processes, the `tiny` preset with 4 layers (fp32, MTP on), 8 micro-batches of 1 x 256 tokens per
step. Four runs on identical stage modules (parallel/pipeline/stage.py: each rank keeps its stages of the same
seeded model): our executor with our 1F1B and DualPipeV action lists, and torch's `Schedule1F1B` and
`ScheduleDualPipeV` (torch 2.13) driving `PipelineStage`s that wrap the same blocks; the last stage's loss
(final norm, head, MTP) is torch's `loss_fn`. The four runs are interleaved: each round runs one step of each,
in an order that rotates from round to round, so that the machine's drift falls on all of them alike. A step is
barrier-aligned; its time is the slowest rank's, the median over ROUNDS rounds after a warm-up round. Gradient
synchronisation and the optimizer are left out of both.

Printed: step time per run, the ratios ours / torch for the same schedule (below 1 = ours faster), and the
compute time of our busiest rank (the floor no executor can beat on these stages: the rank holding the last
stage, with the head, the loss and the MTP module, computes about 2.6x the other). Two processes share the
machine's two cores, so this compares the schedules' and executors' overheads on real compute, not a GPU
cluster.

    python -m bench.pipeline_torch   # prints a table, writes bench/results/pipeline_torch.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bench.gloo import run_gloo
from model import Transformer
from model.presets import load
from parallel.config import ParallelConfig
from parallel.grid import ProcessGrid
from parallel.pipeline.executor import PipelineExecutor, StageRunner
from parallel.pipeline.schedule import make_schedule
from parallel.pipeline.stage import MicroBatch, StageSpec, keep_stages, rank_stages, stage_forward

RESULTS = Path(__file__).resolve().parent / "results"
PP, N_MICRO, SEQ, MTP_LAMBDA = 2, 8, 256, 0.3
WARMUP, ROUNDS = 1, 7
RUNS = [("ours", "1f1b"), ("torch", "1f1b"), ("ours", "dualpipev"), ("torch", "dualpipev")]


class _TorchStage(nn.Module):
    """One of our stages as a torch.distributed.pipelining submodule: tokens or hidden states in, hidden out."""

    def __init__(self, model: Transformer, spec: StageSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.first:
            return stage_forward(self.model, self.spec, None, MicroBatch(x, x), output=False)
        return stage_forward(self.model, self.spec, x, MicroBatch(torch.empty(0), torch.empty(0)), output=False)


def _build(rank: int, schedule: str) -> tuple[Transformer, list[StageSpec]]:
    cfg = load("tiny")
    torch.manual_seed(0)
    specs = rank_stages(make_schedule(schedule, PP), rank, cfg.n_layers)
    return keep_stages(Transformer(cfg), specs), specs


def _data(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, vocab, (N_MICRO, SEQ + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _ours(rank: int, schedule: str):
    model, specs = _build(rank, schedule)
    tokens, labels = _data(model.cfg.vocab_size)

    def forward(spec: StageSpec):
        def run(x, m):
            out = stage_forward(model, spec, x, MicroBatch(tokens[m:m + 1], labels[m:m + 1]), MTP_LAMBDA)
            return out.loss / N_MICRO if spec.last else out
        return run

    stores = [m for m in model.modules() if hasattr(m, "wgrad_store")]
    runners = [StageRunner(spec, forward(spec), stores) for spec in specs]
    grid = ProcessGrid.build(ParallelConfig(pp=PP, schedule=schedule))
    executor = PipelineExecutor(grid.schedule, rank, grid.pp_ranks, runners, (1, SEQ, model.cfg.dim), torch.float32,
                                channels=grid.channels)
    actions = grid.schedule.actions(rank, N_MICRO)

    def step() -> float:
        busy = executor.run(actions, N_MICRO).busy
        model.zero_grad(set_to_none=True)
        return busy
    return step


def _torch(rank: int, schedule: str):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    model, specs = _build(rank, schedule)
    tokens, labels = _data(model.cfg.vocab_size)
    n_stages = specs[0].n_stages
    stages = [PipelineStage(_TorchStage(model, spec), spec.index, n_stages, torch.device("cpu")) for spec in specs]

    def loss_fn(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return model.output_loss(h, target, MTP_LAMBDA).loss

    runner = Schedule1F1B(stages[0], N_MICRO, loss_fn=loss_fn) if schedule == "1f1b" else \
        ScheduleDualPipeV(stages, N_MICRO, loss_fn=loss_fn)
    first = any(spec.first for spec in specs)
    last = any(spec.last for spec in specs)

    def step() -> float:
        args = (tokens,) if first else ()
        runner.step(*args, target=labels if last else None)
        model.zero_grad(set_to_none=True)
        return float("nan")  # torch's schedules do not report their compute time
    return step


def measure(rank: int, world: int) -> list[dict]:
    makers = {"ours": _ours, "torch": _torch}
    steps = [makers[executor](rank, schedule) for executor, schedule in RUNS]
    times: list[list[float]] = [[] for _ in RUNS]
    busy: list[list[float]] = [[] for _ in RUNS]
    for round_ in range(WARMUP + ROUNDS):
        for k in range(len(RUNS)):
            i = (k + round_) % len(RUNS)  # rotate the order from round to round
            dist.barrier()
            t0 = time.perf_counter()
            compute = steps[i]()
            facts = torch.tensor([time.perf_counter() - t0, compute], dtype=torch.float64)
            dist.all_reduce(facts, op=dist.ReduceOp.MAX)
            if round_ >= WARMUP:
                times[i].append(facts[0].item())
                busy[i].append(facts[1].item())
    return [{"executor": e, "schedule": s, "step_s": statistics.median(t), "steps_s": t,
             "critical_busy_s": statistics.median(b)} for (e, s), t, b in zip(RUNS, times, busy)]


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = run_gloo(measure, PP)[0]
    by = {(r["executor"], r["schedule"]): r["step_s"] for r in rows}
    print(f"PP={PP}, {N_MICRO} micro-batches of 1 x {SEQ} tokens, tiny preset (fp32); step time, slowest rank, median "
          f"of {ROUNDS} interleaved rounds")
    busy = {r["schedule"]: r["critical_busy_s"] for r in rows if r["executor"] == "ours"}
    print(f"{'schedule':10} {'ours':>9} {'torch':>9} {'ours/torch':>11} {'ours: busiest rank computing':>29}")
    for schedule in ("1f1b", "dualpipev"):
        ours, theirs = by[("ours", schedule)], by[("torch", schedule)]
        print(f"{schedule:10} {ours:>8.3f}s {theirs:>8.3f}s {ours / theirs:>11.2f} "
              f"{busy[schedule]:>8.3f}s ({busy[schedule] / ours:.0%} of the step)")
    print(f"our dualpipev / torch's 1f1b: {by[('ours', 'dualpipev')] / by[('torch', '1f1b')]:.2f}")
    (RESULTS / "pipeline_torch.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
