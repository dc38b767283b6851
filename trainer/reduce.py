"""The numbers of a step reduced across ranks for the metrics (trainer/metrics.py writes them): losses summed over
the pipeline and averaged over data parallelism (device tensors, over the grid's device groups), the per-rank
quantities of a step (step time, exposed communication, GPU memory) summarised by fixed-size collectives, and rank
0's value of a small object (host values, as CPU tensors: on CUDA the process groups also carry a gloo backend for
them, parallel/grid.py). Every function is a collective over the grid's groups and a no-op in one process.

Per-rank quantities at scale. A record holds, for each per-rank quantity `x` (e.g. `step_time_s`), `x_max`,
`x_mean` and `x_argmax_rank` (the lowest rank holding the max), whatever the world size: one SUM and one MAX
all-reduce of a few numbers per step, issued together. The MAX carries value and rank in one int64 (the value's
float32 bits, order-preserving, above the complement of the rank), so that the argmax is exact; hence `x_max` is
rounded to float32 (7 significant digits) while `x_mean` is the float64 mean. Every `logging.per_rank_every`
steps the record also holds `per_rank`: {x: [the value of rank 0, 1, ...]}, from one all-gather.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from model.moe import MoE
from parallel.grid import ProcessGrid
from parallel.pipeline.pipeline import Pipeline
from trainer.metrics import GpuMonitor

_LOW = 1 << 32  # the packed MAX: float32 order key in the high 32 bits, (2^32 - 1 - rank) in the low 32
_ABSENT = torch.iinfo(torch.int64).min  # a rank without a value loses every MAX


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


def broadcast(grid: ProcessGrid, obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if grid.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _order_key(values: torch.Tensor) -> torch.Tensor:
    """float32 values as int64 keys in the same order (negative floats' bits flipped below the sign)."""
    bits = values.to(torch.float32).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _from_order_key(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32).to(torch.float64)


def summarize(grid: ProcessGrid, names: Sequence[str], values: Mapping[str, float],
              sums: Mapping[str, float] | None = None) -> dict[str, float | int | None]:
    """For each of `names` (the same on every rank, in the same order): `<name>_max`, `<name>_mean` and
    `<name>_argmax_rank` over the ranks that have a value in `values` (None where no rank has one); and for each
    key of `sums` (the same keys on every rank) its sum over all ranks, under its own name. Two all-reduces of
    len(names) and 2 x len(names) + len(sums) numbers, issued together (see the module docstring)."""
    sums = dict(sums or {})
    present = torch.tensor([n in values for n in names], dtype=torch.bool, device="cpu")
    local = torch.tensor([float(values.get(n, 0.0)) for n in names], dtype=torch.float64, device="cpu")
    added = torch.cat([torch.where(present, local, 0.0), present.double(),
                       torch.tensor(list(sums.values()), dtype=torch.float64, device="cpu")])
    packed = torch.where(present, _order_key(local) * _LOW + (_LOW - 1 - grid.rank), _ABSENT)
    if grid.world_size > 1:
        works = [dist.all_reduce(added, op=dist.ReduceOp.SUM, async_op=True),
                 dist.all_reduce(packed, op=dist.ReduceOp.MAX, async_op=True)]
        for work in works:
            work.wait()
    k = len(names)
    total, count = added[:k].tolist(), added[k:2 * k].tolist()
    top = _from_order_key(torch.div(packed, _LOW, rounding_mode="floor")).tolist()
    rank = (_LOW - 1 - torch.remainder(packed, _LOW)).tolist()
    out: dict[str, float | int | None] = {}
    for i, name in enumerate(names):
        held = count[i] > 0
        out[f"{name}_max"] = top[i] if held else None
        out[f"{name}_mean"] = total[i] / count[i] if held else None
        out[f"{name}_argmax_rank"] = int(rank[i]) if held else None
    out.update(zip(sums, added[2 * k:].tolist()))
    return out


def per_rank_lists(grid: ProcessGrid, names: Sequence[str], values: Mapping[str, float]) -> dict[str, list]:
    """Every rank's value of each of `names`, in rank order (NaN where a rank has none): one all-gather."""
    local = torch.tensor([float(values.get(n, math.nan)) for n in names], dtype=torch.float64, device="cpu")
    if grid.world_size == 1:
        rows = [local]
    else:
        rows = [torch.empty_like(local) for _ in range(grid.world_size)]
        dist.all_gather(rows, local)
    table = torch.stack(rows)
    return {name: table[:, i].tolist() for i, name in enumerate(names)}


def _dispatch_counts(model: nn.Module) -> tuple[float, float, float, float]:
    """Since the last call, summed over this rank's MoE layers: cross-node bytes and tokens of the expert
    all-to-all, the seconds compute waited for its exchanges and, on a simulated fabric, their modelled seconds."""
    cross = tokens = wait = link = 0.0
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        stats = moe.dispatcher.stats()
        cross += stats["cross_node_bytes"]
        tokens += stats["tokens"]
        wait += stats["wait_s"]
        link += stats["link_s"]
    return cross, tokens, wait, link


class RankStats:
    """The per-rank quantities of each step, summarised for the step's record (module docstring); built once per
    run on every rank. Which quantities exist follows from the layout, so every rank names the same ones:
    `step_time_s`; with expert parallelism `all_to_all_wait_s` (the exposed all-to-all) and, on a simulated
    `fabric`, `all_to_all_link_s` (its modelled time); with a pipeline `pipeline_busy_s` and `pipeline_wait_s`
    (compute, and waiting for stage transfers); on CUDA `gpu_mem_gb` and `gpu_util` (NVML; a rank whose NVML
    fails is left out of the summaries)."""

    def __init__(self, grid: ProcessGrid, model: nn.Module, pipeline: Pipeline, fabric: bool,
                 per_rank_every: int) -> None:
        self.grid, self.model, self.pipeline, self.every = grid, model, pipeline, per_rank_every
        expert = ("all_to_all_wait_s", *(("all_to_all_link_s",) if fabric else ())) if grid.ep > 1 else ()
        pipe = ("pipeline_busy_s", "pipeline_wait_s") if grid.pp > 1 else ()
        cuda = grid.device.type == "cuda"
        self.names = ("step_time_s", *expert, *pipe, *(("gpu_mem_gb", "gpu_util") if cuda else ()))
        self.gpu = GpuMonitor.create() if cuda else None

    def collect(self, step: int, step_time: float) -> dict[str, object]:
        """The summaries of step `step`, whose time on this rank was `step_time` seconds, plus
        `cross_node_bytes_per_token` (all ranks and MoE layers) with expert parallelism, and `per_rank` on every
        `per_rank_every`-th step. Collective."""
        values, sums = self._local(step_time)
        out = summarize(self.grid, self.names, values, sums)
        if sums:
            out["cross_node_bytes_per_token"] = out.pop("cross_node_bytes") / max(out.pop("tokens"), 1.0)
        if self.every and step % self.every == 0:
            out["per_rank"] = per_rank_lists(self.grid, self.names, values)
        return out

    def _local(self, step_time: float) -> tuple[dict[str, float], dict[str, float]]:
        values, sums = {"step_time_s": step_time}, {}
        if self.grid.ep > 1:
            cross, tokens, values["all_to_all_wait_s"], link = _dispatch_counts(self.model)
            sums = {"cross_node_bytes": cross, "tokens": tokens}
            if "all_to_all_link_s" in self.names:
                values["all_to_all_link_s"] = link
        stats = self.pipeline.last_stats
        if self.grid.pp > 1 and stats is not None:
            values.update(pipeline_busy_s=stats.busy, pipeline_wait_s=stats.wait)
        if self.gpu is not None:
            values.update(self.gpu.read())
        return values, sums
