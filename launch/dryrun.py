"""`hai-plan --dry-run`: one rank of a full-scale job built for real on one CPU, and held against the planner.

For each rank asked for, a process group of the job's world size is started with torch's fake backend (it moves
no data and needs no peers) and that rank's grid, model part, pipeline and ZeRO-1 optimizer are built with the
trainer's own code (`trainer.train.build_model`, `ProcessGrid.build`) on the meta device: every tensor the rank
would allocate exists with its shape and dtype, none has memory. What the rank holds is then measured from those
tensors: parameters (DualPipe's mirror copies included), the fp32 gradient buffers, the optimizer's masters and
moments; and compared with the planner's figures for the same rank (launch/cost.py: `rank_memory`), which also
gives the activations (priced, not measured: the dry run runs no step).

`params_owned` counts each parameter once per model replica: a dense parameter on the lowest pipeline rank
holding it and DP rank 0, a routed expert on the lowest pipeline rank holding it and expert-DP index 0; over the
ranks with `edp_rank == 0` the counts add up to the model's parameters (MTP included).

A compute weight is priced as the run would hold it on a GPU: `trainer.dtype=auto` means bf16 here. The job's
batch shape is the planner's (`--global-batch`, `--micro-batch`, `--seq-len`), not the trainer group's.

    hai-plan experiment=deepseek_v3 parallel.pp=16 parallel.ep=64 parallel.schedule=dualpipe \\
        parallel.gpus_per_node=8 --world 2048 --dry-run --rank all --json
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from core.config import ConfigError
from launch.cost import GB
from model.params import count_params
from parallel.config import check_model_layout
from parallel.expert import is_expert_param
from parallel.grid import ProcessGrid
from parallel.pipeline.stage import part_of
from parallel.zero import ZeroOptimizer
from trainer.config import RunConfig

if TYPE_CHECKING:  # launch.plan imports this module
    from launch.plan import Plan

MEASURED = ("param_bytes", "grad_bytes", "optimizer_bytes")  # measured from the tensors, and planned
KEYS = ("rank", "pp_rank", "dp_rank", "ep_rank", "edp_rank", "params_held", "params_owned", "param_bytes",
        "grad_bytes", "optimizer_bytes", "planned")


@dataclass
class RankReport:
    """What one rank holds (measured from its tensors) and what the planner says it holds."""

    rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int  # index in the expert-data-parallel group (the ranks holding the same experts)
    params_held: int  # parameter elements on the rank, DualPipe's copies included
    params_owned: int  # each parameter counted once per model replica (module docstring)
    param_bytes: int
    grad_bytes: int  # the fp32 gradient buffers
    optimizer_bytes: int  # ZeRO-1 masters and moments
    planned: dict[str, float]  # the planner's param_bytes, grad_bytes, optimizer_bytes, activation_bytes

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in KEYS}

    def total(self, plan: Plan) -> float:
        """Bytes the rank needs: measured weights, gradients and optimizer, planned activations and FP8 copies,
        and the cluster's reserve."""
        mem = plan.ranks[self.pp_rank]
        return (self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.planned["activation_bytes"]
                + mem.fp8_cache + mem.reserved)


def dry_run_config(cfg: RunConfig, world: int) -> RunConfig:
    """The run config the dry run builds, from one not yet resolved (`trainer.config.run_config(...,
    resolve=False)`): `trainer.dtype=auto` as on a GPU (bf16), then resolved; the layout checked for `world`
    ranks (the trainer group's batch is not: the planner's job shape is priced)."""
    if world < 2:
        raise ConfigError(f"--world {world}: a dry run builds one rank of a multi-rank job; give --world 2 or more")
    if cfg.trainer.dtype == "auto":
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, dtype="bf16"))
    cfg = cfg.resolved()
    for group in (cfg.model, cfg.fp8, cfg.optim):
        group.validate()
    cfg.parallel.validate(world)
    check_model_layout(cfg.parallel, cfg.model)
    return cfg


def parse_ranks(spec: str, world: int) -> list[int]:
    """--rank: `all`, one rank, or a comma list; each must lie in [0, world)."""
    if spec == "all":
        return list(range(world))
    try:
        ranks = [int(r) for r in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--rank {spec!r}: give a rank number, a comma list of them, or 'all'") from None
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise ConfigError(f"--rank {spec}: rank(s) {bad} outside the world of {world} ranks (0..{world - 1})")
    return ranks


def run_rank(cfg: RunConfig, world: int, rank: int, plan: Plan) -> RankReport:
    """Build `rank` of a `world`-rank job on the meta device over a fake process group and measure it."""
    from trainer.train import build_model

    dist.init_process_group("fake", rank=rank, world_size=world)
    try:
        grid = ProcessGrid.build(cfg.parallel, "meta")
        part = build_model(cfg, grid)
        report = _measure(grid, part.model, part.pipeline, part.opt, plan)
    finally:
        dist.destroy_process_group()
    return report


def _run_chunk(cfg: RunConfig, world: int, ranks: list[int], plan: Plan) -> list[RankReport]:
    out = []
    for rank in ranks:
        out.append(run_rank(cfg, world, rank, plan))
        gc.collect()  # nothing of a rank survives the next
    return out


def run(cfg: RunConfig, world: int, ranks: list[int], plan: Plan, workers: int = 1) -> Iterator[RankReport]:
    """`run_rank` for each of `ranks`, in rank order; with `workers` > 1 in that many processes (each builds its
    ranks one after the other, so peak memory is a worker's one rank at a time)."""
    if workers <= 1 or len(ranks) < 2 * workers:
        yield from _run_chunk(cfg, world, ranks, plan)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    size = max(1, min(64, len(ranks) // (4 * workers)))
    chunks = [ranks[i:i + size] for i in range(0, len(ranks), size)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for reports in pool.map(_run_chunk, *zip(*[(cfg, world, c, plan) for c in chunks])):
            yield from reports


def _measure(grid: ProcessGrid, model: torch.nn.Module, pipeline, opt, plan: Plan) -> RankReport:
    params = dict(model.named_parameters())
    owned = 0
    for name, p in params.items():
        first_holder = min(pipeline.holder_of[part_of(name)])
        replica_index = _edp_rank(grid) if is_expert_param(name) else grid.dp_rank
        if grid.pp_rank == first_holder and replica_index == 0:
            owned += p.numel()
    if isinstance(opt, ZeroOptimizer):
        grad_bytes, optimizer_bytes = opt.grad_buffer_bytes(), opt.optimizer_state_bytes()
    else:  # one process: AdamW's state is allocated at its first step
        grad_bytes, optimizer_bytes = sum(4 * p.numel() for p in params.values()), 0
    mem = plan.ranks[grid.pp_rank]
    planned = {"param_bytes": mem.weights, "grad_bytes": mem.grads, "optimizer_bytes": mem.optimizer,
               "activation_bytes": mem.activations}
    return RankReport(grid.rank, grid.pp_rank, grid.dp_rank, grid.ep_rank, _edp_rank(grid),
                      sum(p.numel() for p in params.values()), owned,
                      sum(p.numel() * p.element_size() for p in params.values()), grad_bytes, optimizer_bytes,
                      planned)


def _edp_rank(grid: ProcessGrid) -> int:
    return dist.get_rank(grid.edp_group) if grid.edp_group is not None else 0


def expected_owned(cfg: RunConfig) -> int:
    """What `params_owned` must add up to over the ranks with edp_rank 0: the model with its MTP modules."""
    counts = count_params(cfg.model)
    return counts["total"] + counts["mtp"]


def overflow(report: RankReport, plan: Plan) -> str | None:
    """Why the rank does not fit the cluster's GPU memory, or None."""
    need, cap = report.total(plan), plan.cluster.gpu_memory_gb * GB
    if need <= cap:
        return None
    mem = plan.ranks[report.pp_rank]
    return (f"rank {report.rank} (pipeline rank {report.pp_rank}) needs {need / GB:.1f} GB of "
            f"{plan.cluster.gpu_memory_gb:g} GB: weights {report.param_bytes / GB:.1f}, FP8 copies "
            f"{mem.fp8_cache / GB:.1f}, gradients {report.grad_bytes / GB:.1f}, optimizer "
            f"{report.optimizer_bytes / GB:.1f}, activations {report.planned['activation_bytes'] / GB:.1f} "
            f"({mem.live_chunks} live chunks), reserved {mem.reserved / GB:.1f}; use more pipeline or expert "
            "ranks, recompute (model.recompute_norm, model.recompute_mla_up_proj), or fewer micro-batches in flight")
