"""What the training loop needs to know about ranks, in one object (DESIGN.md principle 5: one loop for
every layout). A one-process run gets a `Runtime` whose collectives are no-ops, so the loop has no
branches on the world size beyond choosing the optimizer.

The loop's contract under data parallelism (paper 3.2): every rank reads its own micro-batches (the sampler
is sharded by DP rank), its loss is the mean over its micro-batches, gradients are averaged over DP by the
ZeRO-1 optimizer, expert loads are summed over DP by the bias loop, and logged losses are DP means.
Checkpoints hold layout-independent full tensors: the routed experts are gathered over the EP group and the
optimizer state over the DP group, then written by rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel.apply import apply_expert_parallel, full_state, is_expert_param, local_state
from parallel.config import ParallelConfig


@dataclass
class Runtime:
    world_size: int = 1
    rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    grid: object | None = None  # parallel.grid.ProcessGrid when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.grid is not None

    @classmethod
    def start(cls, cfg: ParallelConfig) -> Runtime:
        """Join the job torchrun (or a test harness) started, or run alone when there is none."""
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            cfg.validate(1)
            return cls()
        from parallel.grid import ProcessGrid

        grid = ProcessGrid.build(cfg)
        return cls(world_size=grid.world_size, rank=grid.rank, dp=grid.dp, dp_rank=grid.dp_rank, ep=grid.ep,
                   ep_rank=grid.ep_rank, grid=grid)

    @property
    def dp_group(self):
        return self.grid.dp_group if self.grid else None

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        g = self.grid
        return (f"{self.world_size} processes: DP={self.dp} (ZeRO-1) x EP={self.ep} on {g.n_nodes} simulated "
                f"node(s) of {g.gpus_per_node} ranks, backend {g.backend}, dispatch {g.dispatch}")

    # ---- model and optimizer -------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> None:
        self._model = model
        if self.ep > 1:
            g = self.grid
            apply_expert_parallel(model, g.ep_group, self.ep_rank, self.ep, g.gpus_per_node,
                                  hierarchical=g.dispatch == "hierarchical")

    def optimizer(self, model: nn.Module, optim_cfg):
        """Plain AdamW over fp32 masters in one process; ZeRO-1 over the DP group otherwise."""
        if not self.distributed:
            from trainer.optim import AdamW

            return AdamW(model.named_parameters(), optim_cfg)
        from parallel.zero import ZeroOptimizer

        return ZeroOptimizer(model.named_parameters(), optim_cfg, self.grid.dp_group, self.grid.edp_group,
                             is_expert_param)

    # ---- collectives ---------------------------------------------------------------------------------------
    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """DP mean of per-rank scalars (each rank's mean over its own micro-batches)."""
        if not self.distributed or self.dp == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t, group=self.dp_group)
        return dict(zip(values, (t / self.dp).tolist()))

    def gather(self, value: float) -> list[float]:
        """One float from every rank (for per-rank step times)."""
        if not self.distributed:
            return [value]
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.float64))
        return [t.item() for t in out]

    def broadcast(self, obj):
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def dispatch_stats(self) -> dict[str, float]:
        """Cross-node bytes per token of the expert all-to-all since the last call (paper 3.2), summed over
        every MoE layer and rank; empty without expert parallelism."""
        if self.ep == 1:
            return {}
        from model.moe import MoE

        totals = torch.zeros(2, dtype=torch.float64)
        for moe in (m for m in self._model.modules() if isinstance(m, MoE)):
            stats = moe.dispatcher.stats()
            totals += torch.tensor([stats["cross_node_bytes"], stats["tokens"]], dtype=torch.float64)
        dist.all_reduce(totals)
        return {"cross_node_bytes_per_token": (totals[0] / totals[1].clamp_min(1)).item()}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- layout-independent state --------------------------------------------------------------------------
    def full_state(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layout-independent tensors: expert entries gathered over the EP group."""
        return full_state(local, self.grid.ep_group if self.grid else None, self.ep)

    def local_state(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return local_state(full, self.ep_rank, self.ep)

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.full_state(model.state_dict())

    def load_model_state(self, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(self.local_state(full))

    def full_optim_state(self, opt) -> dict[str, torch.Tensor]:
        if not self.distributed:
            return opt.state_dict()
        return self.full_state(opt.full_state_dict())

    def load_optim_state(self, opt, full: dict[str, torch.Tensor]) -> None:
        local = self.local_state(full)
        if self.distributed:
            opt.load_full_state_dict(local)
        else:
            opt.load_state_dict(local)
