"""The numbers of a step gathered across ranks for the metrics (trainer/metrics.py writes them): losses summed over
the pipeline and averaged over data parallelism (device tensors, over the grid's device groups), per-rank lists
(step times, exposed communication) and rank 0's value of a small object (host values, as CPU tensors: on CUDA
the process groups also carry a gloo backend for them, parallel/grid.py). Every function is a collective over the
grid's groups and a no-op in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.moe import MoE
from parallel.grid import ProcessGrid
from parallel.pipeline.pipeline import Pipeline


def step_means(grid: ProcessGrid, sums: torch.Tensor, n_micro: int, keys: tuple[str, ...]) -> dict[str, float]:
    """Per-rank sums over micro-batches (a device tensor, `keys` in order) summed over the pipeline group (each
    loss exists where its stage ran), divided by the micro-batches and averaged over DP; read to the host once."""
    if grid.pp > 1:
        dist.all_reduce(sums, group=grid.pp_group)
    means = sums / n_micro
    if grid.dp > 1:
        dist.all_reduce(means, group=grid.dp_group)
        means = means / grid.dp
    return dict(zip(keys, means.tolist()))  # the step's one read of its losses


def gather(grid: ProcessGrid, value: float) -> list[float]:
    """One float from every rank, in rank order (for per-rank step times)."""
    if grid.world_size == 1:
        return [value]
    out = [torch.zeros(1, dtype=torch.float64, device="cpu") for _ in range(grid.world_size)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device="cpu"))
    return [t.item() for t in out]


def broadcast(grid: ProcessGrid, obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if grid.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def dispatch_stats(grid: ProcessGrid, model: nn.Module, fabric: bool) -> dict[str, object]:
    """Since the last call: cross-node bytes per token of the expert all-to-all (paper 3.2), summed over every
    MoE layer and rank, and per rank the seconds its compute waited for all-to-all exchanges (the exposed
    all-to-all) and, on a simulated `fabric`, the exchanges' modelled seconds; empty without expert parallelism."""
    if grid.ep == 1:
        return {}
    totals = torch.zeros(2, dtype=torch.float64, device="cpu")
    wait = link = 0.0
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        stats = moe.dispatcher.stats()
        totals += torch.tensor([stats["cross_node_bytes"], stats["tokens"]], dtype=torch.float64, device="cpu")
        wait += stats["wait_s"]
        link += stats["link_s"]
    dist.all_reduce(totals)
    out = {"cross_node_bytes_per_token": (totals[0] / totals[1].clamp_min(1)).item(),
           "all_to_all_wait_rank_s": gather(grid, wait)}
    if fabric:
        out["all_to_all_link_rank_s"] = gather(grid, link)
    return out


def pipeline_stats(grid: ProcessGrid, pipeline: Pipeline) -> dict[str, list[float]]:
    """Per rank, the last step's pipeline compute time and the time it waited for stage-to-stage transfers
    (seconds); empty without a pipeline of several ranks."""
    if grid.pp == 1 or pipeline.last_stats is None:
        return {}
    stats = pipeline.last_stats
    return {"pipeline_busy_rank_s": gather(grid, stats.busy), "pipeline_wait_rank_s": gather(grid, stats.wait)}
