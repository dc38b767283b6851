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
from model.transformer import Transformer
from parallel.config import ParallelConfig
from parallel.grid import ProcessGrid
from parallel.pipeline.executor import PipelineExecutor, StageRunner, StepStats
from parallel.pipeline.schedule import build_forward_schedule, build_schedule, check_schedule_args
from parallel.pipeline.stage import (
    MicroBatch,
    StageSpec,
    holders,
    keep_stages,
    part_of,
    rank_stages,
    stage_steps,
    sync_replicated_grads,
)

Batch = tuple[torch.Tensor, torch.Tensor]  # tokens, labels [B, T] (on the CPU: the pipeline moves them)
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss")


def apply_pipeline(model: Transformer, grid: ProcessGrid, cfg: ParallelConfig, dtype: torch.dtype) -> Pipeline:
    """Keep, in place, this pipeline rank's stages of the whole model, and return the rank's pipeline. `dtype`:
    the compute dtype, in which hidden states travel between stages."""
    specs = rank_stages(cfg.schedule, grid.pp, grid.pp_rank, model.cfg.n_layers, cfg.stage_layers)
    keep_stages(model, specs)
    return Pipeline(model, grid, cfg, specs, dtype)


class Pipeline:
    def __init__(self, model: Transformer, grid: ProcessGrid, cfg: ParallelConfig, specs: list[StageSpec],
                 dtype: torch.dtype) -> None:
        self.model, self.grid, self.cfg, self.specs, self.dtype = model, grid, cfg, specs, dtype
        self.holder_of = holders(cfg.schedule, grid.pp, model.cfg.n_layers, cfg.stage_layers,
                                 model.cfg.n_mtp_depth > 0)
        self.replica_groups = self._replica_groups()
        self.wgrad_modules = [m for m in model.modules() if hasattr(m, "wgrad_store")]
        self.last_stats: StepStats | None = None

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
    def _moes(self, spec: StageSpec) -> list[MoE]:
        layers = [self.model.layers[str(i)] for i in spec.layers]
        if spec.last and self.model.mtp is not None:
            layers += [module.block for module in self.model.mtp]
        return [layer.ffn for layer in layers if isinstance(layer.ffn, MoE)]

    def _executor(self, batch: Batch, steps) -> PipelineExecutor:
        """`steps(spec)` -> the stage's forward as a generator function (x, micro-batch) (see StageRunner)."""
        runners = []
        for spec in self.specs:
            run = steps(spec)
            runners.append(StageRunner(spec, lambda x, m, run=run: run_steps(run(x, m)), self.wgrad_modules, run,
                                       [moe.dispatcher for moe in self._moes(spec)]))
        g = self.grid
        shape = (*batch[0].shape, self.model.cfg.dim)
        return PipelineExecutor(self.cfg.schedule, g.pp, g.pp_rank, g.pp_ranks, runners, shape, self.dtype,
                                g.device, self.cfg.fabric, g.gpus_per_node, self.cfg.overlap)

    def _micro_batch(self, batch: Batch) -> MicroBatch:
        device = self.grid.device
        if device.type == "cpu":
            return MicroBatch(*batch)
        tokens, labels = (t.pin_memory().to(device, non_blocking=True) for t in batch)
        return MicroBatch(tokens, labels)

    def train_step(self, batches: list[Batch], mtp_lambda: float) -> torch.Tensor:
        """Forward and backward of one step's micro-batches through the schedule; returns this rank's sums of
        `LOSS_KEYS` over the micro-batches it finished (a float64 tensor on the device), and leaves the summed
        gradients in the parameters (each micro-batch's loss is scaled by 1 / len(batches))."""
        n_micro = len(batches)
        check_schedule_args(self.cfg.schedule, self.grid.pp, n_micro)
        sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=self.grid.device)
        for moe in (m for spec in self.specs for m in self._moes(spec)):
            moe.aux_loss_scale = 1.0 / n_micro  # the attached balance loss is averaged like the main loss

        def forward(spec: StageSpec):
            moes = self._moes(spec)

            def run(x: torch.Tensor | None, m: int) -> Generator[None, None, torch.Tensor]:
                out = yield from stage_steps(self.model, spec, x, self._micro_batch(batches[m]), mtp_lambda)
                for moe in moes:
                    if moe.last_aux_loss is not None:
                        sums[3] += moe.last_aux_loss
                if not spec.last:
                    return out
                sums[0] += out.loss.detach()
                sums[1] += out.main
                if out.mtp:
                    sums[2] += torch.stack(out.mtp).double().sum() / len(out.mtp)
                return out.loss / n_micro
            return run

        executor = self._executor(batches[0], forward)
        self.last_stats = executor.run(build_schedule(self.cfg.schedule, self.grid.pp, self.grid.pp_rank, n_micro),
                                       n_micro)
        sync_replicated_grads(self.model, self.replica_groups, self.holder_of)
        return sums

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Sum of the next-token losses of the micro-batches whose last stage ran on this rank (a float64 tensor
        on the device)."""
        total = torch.zeros((), dtype=torch.float64, device=self.grid.device)

        def forward(spec: StageSpec):
            def run(x: torch.Tensor | None, m: int) -> Generator[None, None, torch.Tensor]:
                out = yield from stage_steps(self.model, spec, x, self._micro_batch(batches[m]))
                if spec.last:
                    total.add_(out.main)
                    return out.main
                return out
            return run

        n = len(batches)
        executor = self._executor(batches[0], forward)
        executor.run(build_forward_schedule(self.cfg.schedule, self.grid.pp, self.grid.pp_rank, n), n,
                     forward_only=True)
        return total
