"""What the training loop needs to know about ranks, in one object (DESIGN.md principle 5: one loop for
every layout). A one-process run gets a `Runtime` whose collectives are no-ops, so the loop has no
branches on the world size beyond choosing the optimizer.

The loop's contract under data parallelism (paper 3.2): every rank reads its own micro-batches (the sampler
is sharded by DP rank), its loss is the mean over its micro-batches, gradients are averaged over DP by the
ZeRO-1 optimizer, expert loads are summed over DP by the bias loop, and logged losses are DP means.
Checkpoints are written by every rank at once, each element by one rank (the one whose ZeRO shard holds it),
under the names and shapes of the single-process model, so a checkpoint of one layout loads into another.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel.apply import apply_expert_parallel, is_expert_param
from parallel.config import ParallelConfig
from trainer.checkpoint import CheckpointError, CheckpointReader, Shard


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

    # ---- checkpoints: every rank writes what it owns and reads what it needs (trainer/checkpoint.py) ------------
    def _place(self, name: str, local_shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """The global shape of entry `name` and where this rank's block starts in it, flattened: routed experts
        are dim-0 blocks of E/EP experts (contiguous when flattened); every other entry is whole."""
        local_shape = tuple(local_shape)
        if self.ep > 1 and is_expert_param(name) and local_shape:
            return (local_shape[0] * self.ep, *local_shape[1:]), self.ep_rank * math.prod(local_shape)
        return local_shape, 0

    def _local(self, name: str, global_shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """The inverse of `_place`: this rank's shape of a saved entry and its start in the flattened whole."""
        global_shape = tuple(global_shape)
        if self.ep > 1 and is_expert_param(name) and global_shape:
            local = (global_shape[0] // self.ep, *global_shape[1:])
            return local, self.ep_rank * math.prod(local)
        return global_shape, 0

    def _writes_whole(self, name: str) -> bool:
        """Who writes an entry no optimizer shard covers (buffers such as the router bias, frozen weights): rank
        0, or for routed experts the expert-DP rank 0 of every EP rank (each holds other experts)."""
        if self.grid is None:
            return True
        return self.grid.edp_rank == 0 if self.ep > 1 and is_expert_param(name) else self.rank == 0

    def model_shards(self, state: dict[str, torch.Tensor], opt) -> dict[str, Shard]:
        """This rank's pieces of a model-shaped state (the weights, or their EMA): of a trained parameter the
        range its optimizer shard covers, so that every element has one writer; other entries per `_writes_whole`."""
        trained = set(opt.params)
        owned = opt.owned() if self.distributed else {n: (0, p.numel()) for n, p in opt.params.items()}
        out = {}
        for name, tensor in state.items():
            if name in trained:
                if name not in owned:
                    continue
                a, z = owned[name]
            elif self._writes_whole(name):
                a, z = 0, tensor.numel()
            else:
                continue
            shape, offset = self._place(name, tensor.shape)
            out[name] = Shard(tensor.detach().reshape(-1)[a:z], shape, offset + a)
        return out

    def optim_shards(self, opt) -> dict[str, Shard]:
        """This rank's pieces of the optimizer state, under `trainer.optim.AdamW.state_dict`'s keys. A
        parameter's step count is written by the rank holding its first element."""
        if not self.distributed:
            return {key: Shard.whole(t) for key, t in opt.state_dict().items()}
        out, owned = {}, opt.owned()
        for key, (start, data) in opt.shards().items():
            kind, name = key.split(".", 1)
            shape, offset = self._place(name, opt.params[name].shape)
            if kind == "step":
                if owned.get(name, (-1,))[0] == 0 and offset == 0:
                    out[key] = Shard(data, (), 0)
            else:
                out[key] = Shard(data, shape, offset + start)
        return out

    def read_local(self, reader: CheckpointReader, group: str, shapes: dict[str, torch.Size],
                   ) -> dict[str, torch.Tensor]:
        """This rank's view of a model-shaped group: every entry of `shapes` (its local shapes), experts cut to
        this EP rank's block, each read from just the checkpoint ranges that hold it."""
        saved = set(reader.names(group))
        missing, unexpected = sorted(shapes.keys() - saved), sorted(saved - shapes.keys())
        wrong = [f"{n} {list(reader.shape(group, n))} (now {list(self._place(n, s)[0])})"
                 for n, s in shapes.items() if n in saved and reader.shape(group, n) != self._place(n, s)[0]]
        if missing or unexpected or wrong:
            raise CheckpointError(f"{reader.path}: the {group} tensors do not fit this model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}. It was written by "
                                  "another model config; resume with that config or start anew (trainer.resume=null)")
        out = {}
        for name, shape in shapes.items():
            _, offset = self._place(name, shape)
            out[name] = reader.read(group, name, offset, offset + math.prod(shape)).view(shape)
        return out

    def load_model_state(self, model: nn.Module, reader: CheckpointReader) -> None:
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        model.load_state_dict(self.read_local(reader, "model", shapes))

    def load_optim_state(self, opt, reader: CheckpointReader) -> None:
        """Each rank reads its own optimizer shard ranges (ZeRO-1), or the whole state in one process. Load the
        model first: the masters of fp32 parameters are the parameters."""
        if not self.distributed:
            opt.load_state_dict({key: reader.tensor("optim", key) for key in reader.names("optim")})
            return
        shapes, offsets = {}, {}
        for key in reader.names("optim"):
            shapes[key], offsets[key] = self._local(key.split(".", 1)[1], reader.shape("optim", key))
        opt.load_shards(shapes, lambda key, a, z: reader.read("optim", key, offsets[key] + a, offsets[key] + z))
