"""One rank's pipeline in the training loop (paper 3.2.1), for every layout: its stages of the model, the executor
running the schedule's actions for a step's micro-batches, and the gradient sums between pipeline ranks that hold
the same parameters. A one-process or data-parallel run is a pipeline of one rank (its schedule's one-stage form),
so the loop has one path (DESIGN.md principle 5).

`apply_pipeline` cuts the model to this rank's stages and returns its `Pipeline`; the loop calls `train_step`
and `evaluate` instead of running micro-batches itself, and asks the pipeline which pipeline ranks hold a
parameter (`holders`): the optimizer's norm counts such a parameter once, a checkpoint writes it once, the bias
loop sums its router's counts over the copies.

Loss bookkeeping, the only one: the loss of a micro-batch exists only on the rank that ran its last stage, and
each MoE layer's balance loss on the rank that ran the layer. `train_step` returns this rank's sums over the
micro-batches (not yet divided by their number) as one device tensor, `LOSS_KEYS` in order; the caller sums them
over the pipeline group and reads them once per step (nothing here makes the host wait for the device).
Micro-batches arrive on the host and are copied to the device from pinned memory without blocking.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
import torch.distributed as dist

from model.block import run_steps
from model.moe import MoE, gates
from model.transformer import LossOutput, Transformer, position_losses
from parallel.config import ParallelConfig
from parallel.grid import ProcessGrid
from parallel.pipeline.executor import PipelineExecutor, StepStats
from parallel.pipeline.schedule import ForwardOnly, Schedule
from parallel.pipeline.stage import (
    MicroBatch,
    StageSpec,
    holders,
    keep_stages,
    part_of,
    rank_stages,
    split_layers,
    stage_steps,
    sync_replicated_grads,
)
from parallel.pipeline.validate import validate_schedule

Batch = tuple[torch.Tensor, torch.Tensor]  # tokens, labels [B, T] (on the CPU: the pipeline moves them)
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss")


def apply_pipeline(model: Transformer, grid: ProcessGrid, cfg: ParallelConfig, dtype: torch.dtype) -> Pipeline:
    """Keep, in place, this pipeline rank's stages of the whole model, and return the rank's pipeline. `dtype`:
    the compute dtype, in which hidden states travel between stages. The schedule is the grid's (the one its
    p2p channels were built for)."""
    schedule = grid.schedule if grid.schedule is not None else cfg.pipeline_schedule()
    specs = rank_stages(schedule, grid.pp_rank, model.cfg.n_layers, cfg.stage_layers)
    keep_stages(model, specs)
    return Pipeline(model, grid, cfg, schedule, specs, dtype)


class ModelStage:
    """One of this rank's stages of the model for one step (the executor's `Stage`): its forward on micro-batch m
    adds the loss terms it produces to the step's `sums` (LOSS_KEYS) and, on the last stage, returns the
    micro-batch's loss scaled by 1 / micro-batches (training) or its next-token loss (evaluation)."""

    def __init__(self, pipeline: Pipeline, spec: StageSpec, batches: list[Batch], sums: torch.Tensor,
                 mtp_lambda: float, training: bool, buckets: int = 0) -> None:
        self.pipeline, self.spec, self.batches, self.sums = pipeline, spec, batches, sums
        self.mtp_lambda, self.training, self.buckets = mtp_lambda, training, buckets
        self.moes = pipeline.moes(spec)
        self.modules = pipeline.wgrad_modules
        self.dispatchers = [moe.dispatcher for moe in self.moes]

    def steps(self, x: torch.Tensor | None, m: int) -> Generator[None, None, torch.Tensor]:
        """The forward as a generator pausing after each all-to-all it launches (model.block.Block.steps)."""
        batch = self.pipeline.micro_batch(self.batches[m])
        if not self.training:
            h = yield from stage_steps(self.pipeline.model, self.spec, x, batch, output=False)
            if not self.spec.last:
                return h
            main = self.pipeline.model.output_loss(h, batch.labels).main
            self.sums[0] += main
            if self.buckets:
                self.sums[1:] += position_losses(self.pipeline.model, h, batch.labels, self.buckets)
            return main
        out = yield from stage_steps(self.pipeline.model, self.spec, x, batch, self.mtp_lambda)
        for moe in self.moes:
            if moe.last_aux_loss is not None:
                self.sums[3] += moe.last_aux_loss
        if not self.spec.last:
            return out
        return self._losses(out)

    def _losses(self, out: LossOutput) -> torch.Tensor:
        self.sums[0] += out.loss.detach()
        self.sums[1] += out.main
        if out.mtp:
            self.sums[2] += torch.stack(out.mtp).double().sum() / len(out.mtp)
        return out.loss / len(self.batches)

    def forward(self, x: torch.Tensor | None, m: int) -> torch.Tensor:
        return run_steps(self.steps(x, m))


class Pipeline:
    def __init__(self, model: Transformer, grid: ProcessGrid, cfg: ParallelConfig, schedule: Schedule,
                 specs: list[StageSpec], dtype: torch.dtype) -> None:
        self.model, self.grid, self.cfg, self.specs, self.dtype = model, grid, cfg, specs, dtype
        self.schedule = schedule
        self.holder_of = holders(schedule, model.cfg.n_layers, cfg.stage_layers, model.cfg.n_mtp_depth > 0)
        self.replica_groups = self._replica_groups()
        self.wgrad_modules = [m for m in model.modules() if hasattr(m, "wgrad_store")]
        self.last_stats: StepStats | None = None
        self._validated: set[int] = set()
        n = schedule.n_stages
        blocks = split_layers(model.cfg.n_layers, n, cfg.stage_layers)
        self._stages_of = {f"layers.{i}": (s,) for s, block in enumerate(blocks) for i in block}
        self._stages_of["embed"] = (0, n - 1) if model.cfg.n_mtp_depth > 0 and n > 1 else (0,)
        self._stages_of["head"] = (n - 1,)
        # the optimizer's overlapped gradient reduction (parallel/grad_reduce.py), when the run has one
        self.reducer = None
    # ---- who holds what ----------------------------------------------------------------------------------------
    def _replica_groups(self) -> dict[tuple[int, ...], dist.ProcessGroup]:
        """The grid's group for each set of pipeline ranks holding the same parameters (this rank's sets): a
        DualPipe mirror pair, or the first and last position sharing the embedding with MTP."""
        g, out = self.grid, {}
        for ranks in {tuple(r) for r in self.holder_of.values() if len(r) > 1 and g.pp_rank in r}:
            if ranks == tuple(sorted({g.pp_rank, g.pp - 1 - g.pp_rank})):
                out[ranks] = g.mirror_group
            elif ranks == (0, g.pp - 1):
                out[ranks] = g.embed_group
            else:
                raise RuntimeError(f"pipeline ranks {ranks} share parameters but the grid has no group for them")
        return out

    def holders(self, name: str) -> list[int]:
        """Pipeline ranks holding parameter (or optimizer/EMA entry) `name`, in order."""
        return self.holder_of[part_of(name)]

    def grad_group(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The pipeline ranks holding parameter `name` and the stages whose chunks produce its gradient: the
        optimizer's buckets do not mix groups (parallel/grad_reduce.py)."""
        part = part_of(name)
        return tuple(self.holder_of[part]), self._stages_of[part]

    def norm_share(self, name: str) -> float:
        """The share of a parameter's squared gradient this rank counts in the global norm."""
        return 1.0 / len(self.holders(name))

    def gate_replicas(self) -> list[tuple[list[str], dist.ProcessGroup]]:
        """Routers held by several pipeline ranks, grouped by the group of those ranks (trainer/balance.py)."""
        by_set: dict[tuple[int, ...], list[str]] = {}
        for name in gates(self.model):
            ranks = tuple(self.holders(name))
            if len(ranks) > 1:
                by_set.setdefault(ranks, []).append(name)
        return [(names, self.replica_groups[ranks]) for ranks, names in sorted(by_set.items())]

    # ---- running micro-batches -----------------------------------------------------------------------------
    def moes(self, spec: StageSpec) -> list[MoE]:
        """The MoE layers a stage runs (its layers', and the MTP modules' on the last stage)."""
        layers = [self.model.layers[str(i)] for i in spec.layers]
        if spec.last and self.model.mtp is not None:
            layers += [module.block for module in self.model.mtp]
        return [layer.ffn for layer in layers if isinstance(layer.ffn, MoE)]

    def micro_batch(self, batch: Batch) -> MicroBatch:
        """A micro-batch on the grid's device (copied from pinned memory without blocking on CUDA)."""
        device = self.grid.device
        if device.type == "cpu":
            return MicroBatch(*batch)
        tokens, labels = (t.pin_memory().to(device, non_blocking=True) for t in batch)
        return MicroBatch(tokens, labels)

    def _executor(self, schedule: Schedule, stages: list[ModelStage], batch: Batch) -> PipelineExecutor:
        g = self.grid
        shape = (*batch[0].shape, self.model.cfg.dim)
        return PipelineExecutor(schedule, g.pp_rank, g.pp_ranks, stages, shape, self.dtype, g.device, g.channels,
                                self.cfg.fabric, g.gpus_per_node, self.cfg.overlap)

    def _check(self, n_micro: int) -> None:
        """The schedule's rules for `n_micro`, and its p2p order under NCCL's rules (once per count)."""
        if n_micro not in self._validated:
            validate_schedule(self.schedule, n_micro)
            self._validated.add(n_micro)

    def train_step(self, batches: list[Batch], mtp_lambda: float) -> torch.Tensor:
        """Forward and backward of one step's micro-batches through the schedule; returns this rank's sums of
        `LOSS_KEYS` over the micro-batches it finished (a float64 tensor on the device), and leaves the summed
        gradients in the parameters (each micro-batch's loss is scaled by 1 / len(batches)), or, with the
        overlapped reduction (`reducer`), each rank's own in the parameters and their sums over the copies and
        data parallelism already reduced into the optimizer's shards."""
        n_micro = len(batches)
        self._check(n_micro)
        sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=self.grid.device)
        stages = [ModelStage(self, spec, batches, sums, mtp_lambda, training=True) for spec in self.specs]
        for moe in (m for stage in stages for m in stage.moes):
            moe.aux_loss_scale = 1.0 / n_micro  # the attached balance loss is averaged like the main loss
        executor = self._executor(self.schedule, stages, batches[0])
        actions = self.schedule.actions(self.grid.pp_rank, n_micro)
        if self.reducer is None:
            self.last_stats = executor.run(actions, n_micro)
            sync_replicated_grads(self.model, self.replica_groups, self.holder_of)
        else:  # the copies' sums and the reduce-scatters start per bucket inside the step
            self.reducer.begin(actions, n_micro)
            self.last_stats = executor.run(actions, n_micro, after=self.reducer.after)
            self.reducer.finish()
        return sums

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], buckets: int = 0) -> torch.Tensor:
        """Sums over the micro-batches whose last stage ran on this rank (a float64 tensor on the device): of the
        next-token losses, then of the losses of each of `buckets` position ranges (model.transformer:
        position_losses)."""
        total = torch.zeros(1 + buckets, dtype=torch.float64, device=self.grid.device)
        stages = [ModelStage(self, spec, batches, total, 0.0, training=False, buckets=buckets) for spec in self.specs]
        n = len(batches)
        schedule = ForwardOnly(self.schedule)
        self._executor(schedule, stages, batches[0]).run(schedule.actions(self.grid.pp_rank, n), n,
                                                         forward_only=True)
        return total
