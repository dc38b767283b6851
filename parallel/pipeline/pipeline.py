"""One rank's pipeline in the training loop (paper 3.2.1): its stages of the model, the executor running the
schedule's actions for a step's micro-batches, and the gradient sums between pipeline ranks that hold the same
parameters. `parallel.runtime.Runtime` builds it when parallel.pp > 1; the loop calls `train_step` and
`evaluate` instead of running the micro-batches itself.

Loss bookkeeping: the loss of a micro-batch exists only on the rank that ran its last stage, and each MoE
layer's balance loss on the rank that ran the layer. `train_step` returns this rank's sums over the
micro-batches (not yet divided by their number); the caller sums them over the pipeline group.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
import torch.distributed as dist

from model.block import run_steps
from model.moe import MoE
from model.transformer import Transformer
from parallel.fabric import Fabric
from parallel.pipeline.executor import PipelineExecutor, StageRunner, StepStats
from parallel.pipeline.schedule import build_forward_schedule, build_schedule
from parallel.pipeline.stage import MicroBatch, StageSpec, stage_steps, sync_replicated_grads


class Pipeline:
    def __init__(self, model: Transformer, schedule: str, pp: int, pp_rank: int, ranks: list[int],
                 specs: list[StageSpec], holder_of: dict[str, list[int]],
                 replica_groups: dict[tuple[int, ...], dist.ProcessGroup], fabric: Fabric | None = None,
                 gpus_per_node: int = 8, overlap: bool = True) -> None:
        self.model, self.schedule, self.pp, self.pp_rank, self.ranks = model, schedule, pp, pp_rank, ranks
        self.specs, self.holder_of, self.replica_groups = specs, holder_of, replica_groups
        self.fabric, self.gpus_per_node, self.overlap = fabric, gpus_per_node, overlap
        self.device, self.dtype = torch.device("cpu"), torch.float32  # set by `to` once the model is placed
        self.wgrad_modules = [m for m in model.modules() if hasattr(m, "wgrad_store")]
        self.last_stats: StepStats | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Where and in which dtype hidden states travel between stages (the compute dtype)."""
        self.device, self.dtype = device, dtype

    def _moes(self, spec: StageSpec) -> list[MoE]:
        layers = [self.model.layers[str(i)] for i in spec.layers]
        if spec.last and self.model.mtp is not None:
            layers += [module.block for module in self.model.mtp]
        return [layer.ffn for layer in layers if isinstance(layer.ffn, MoE)]

    def _executor(self, shape: tuple[int, ...], steps) -> PipelineExecutor:
        """`steps(spec)` -> the stage's forward as a generator function (x, micro-batch) (see StageRunner)."""
        runners = []
        for spec in self.specs:
            run = steps(spec)
            runners.append(StageRunner(spec, lambda x, m, run=run: run_steps(run(x, m)), self.wgrad_modules, run,
                                       [moe.dispatcher for moe in self._moes(spec)]))
        return PipelineExecutor(self.schedule, self.pp, self.pp_rank, self.ranks, runners, shape, self.dtype,
                                self.device, self.fabric, self.gpus_per_node, self.overlap)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], mtp_lambda: float) -> dict[str, float]:
        """Forward and backward of one step's micro-batches through the schedule; returns this rank's sums
        {"loss", "lm_loss", "mtp_loss", "aux_loss"} over the micro-batches it finished, and leaves the summed
        gradients in the parameters."""
        n_micro = len(batches)
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}

        def forward(spec: StageSpec):
            moes = self._moes(spec)

            def run(x: torch.Tensor | None, m: int) -> Generator[None, None, torch.Tensor]:
                tokens, labels = (t.to(self.device) for t in batches[m])
                out = yield from stage_steps(self.model, spec, x, MicroBatch(tokens, labels), mtp_lambda)
                sums["aux_loss"] += sum(moe.last_aux_loss.item() for moe in moes if moe.last_aux_loss is not None)
                if not spec.last:
                    return out
                sums["loss"] += out.loss.item()
                sums["lm_loss"] += out.main.item()
                sums["mtp_loss"] += sum(x.item() for x in out.mtp) / max(1, len(out.mtp))
                return out.loss / n_micro
            return run

        tokens = batches[0][0]
        executor = self._executor((*tokens.shape, self.model.cfg.dim), forward)
        self.last_stats = executor.run(build_schedule(self.schedule, self.pp, self.pp_rank, n_micro), n_micro)
        sync_replicated_grads(self.model, self.replica_groups, self.holder_of)
        return sums

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Sum of the next-token losses of the micro-batches whose last stage ran on this rank."""
        total = [0.0]

        def forward(spec: StageSpec):
            def run(x: torch.Tensor | None, m: int) -> Generator[None, None, torch.Tensor]:
                tokens, labels = (t.to(self.device) for t in batches[m])
                out = yield from stage_steps(self.model, spec, x, MicroBatch(tokens, labels))
                if spec.last:
                    total[0] += out.main.item()
                    return out.main
                return out
            return run

        n = len(batches)
        executor = self._executor((*batches[0][0].shape, self.model.cfg.dim), forward)
        executor.run(build_forward_schedule(self.schedule, self.pp, self.pp_rank, n), n, forward_only=True)
        return total[0]
