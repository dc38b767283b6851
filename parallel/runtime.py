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
from parallel.fabric import Fabric
from trainer.checkpoint import CheckpointError, CheckpointReader, Shard


@dataclass
class Runtime:
    world_size: int = 1
    rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    pp: int = 1
    pp_rank: int = 0
    grid: object | None = None  # parallel.grid.ProcessGrid when distributed
    pipeline: object | None = None  # parallel.pipeline.pipeline.Pipeline when pp > 1 (set by `parallelize`)
    holder_of: dict | None = None  # pipeline ranks holding each model part (pp > 1)

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
                   ep_rank=grid.ep_rank, pp=grid.pp, pp_rank=grid.pp_rank, grid=grid)

    def close(self) -> None:
        """Leave the process group after a finished run (all ranks), so that no communication thread is still
        running when the interpreter exits (which aborts the process)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def dp_group(self):
        return self.grid.dp_group if self.grid else None

    @property
    def pp_group(self):
        return self.grid.pp_group if self.grid and self.pp > 1 else None

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        g = self.grid
        pipe = f"PP={self.pp} ({g.cfg.schedule}) x " if self.pp > 1 else ""
        return (f"{self.world_size} processes: {pipe}DP={self.dp} (ZeRO-1) x EP={self.ep} on {g.n_nodes} simulated "
                f"node(s) of {g.gpus_per_node} ranks, backend {g.backend}, dispatch {g.dispatch}")

    # ---- model and optimizer -------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> None:
        """Keep this rank's pipeline stages and routed experts of the whole model (built with the same seed on
        every rank) and connect them: the pipeline's executor, the expert all-to-all."""
        self._model = model
        self._global_shapes = {name: t.shape for name, t in model.state_dict().items()}
        self._global_params = {name for name, _ in model.named_parameters()}
        if self.pp > 1:
            from parallel.pipeline.pipeline import Pipeline
            from parallel.pipeline.stage import holders, keep_stages, rank_stages

            cfg, n_layers = self.grid.cfg, model.cfg.n_layers
            specs = rank_stages(cfg.schedule, self.pp, self.pp_rank, n_layers, cfg.stage_layers)
            keep_stages(model, specs)
            self.holder_of = holders(cfg.schedule, self.pp, n_layers, cfg.stage_layers, model.cfg.n_mtp_depth > 0)
            self.pipeline = Pipeline(model, cfg.schedule, self.pp, self.pp_rank, self.grid.pp_ranks, specs,
                                     self.holder_of, self._replica_groups(), Fabric.from_config(cfg.fabric),
                                     cfg.gpus_per_node, cfg.overlap)
        if self.ep > 1:
            g = self.grid
            apply_expert_parallel(model, g.ep_group, self.ep_rank, self.ep, g.gpus_per_node,
                                  hierarchical=g.dispatch == "hierarchical", fabric=Fabric.from_config(g.cfg.fabric))

    def _replica_groups(self) -> dict[tuple[int, ...], dist.ProcessGroup]:
        """The grid's group for each set of pipeline ranks holding the same parameters (this rank's sets): a
        DualPipe mirror pair, or the first and last position sharing the embedding with MTP."""
        out = {}
        for ranks in {tuple(r) for r in self.holder_of.values() if len(r) > 1 and self.pp_rank in r}:
            if ranks == tuple(sorted({self.pp_rank, self.pp - 1 - self.pp_rank})):
                out[ranks] = self.grid.mirror_group
            elif ranks == (0, self.pp - 1):
                out[ranks] = self.grid.embed_group
            else:
                raise RuntimeError(f"pipeline ranks {ranks} share parameters but the grid has no group for them")
        return out

    def _holders(self, name: str) -> list[int]:
        """Pipeline ranks holding parameter (or optimizer/EMA entry) `name`; [pp_rank] without a pipeline."""
        if self.holder_of is None:
            return [self.pp_rank]
        from parallel.pipeline.stage import part_of

        return self.holder_of[part_of(name)]

    def norm_share(self, name: str) -> float:
        """The share of a parameter's squared gradient this rank counts in the global norm."""
        return 1.0 / len(self._holders(name))

    def gate_replicas(self, model: nn.Module) -> list[tuple[list[str], dist.ProcessGroup]]:
        """Routers held by several pipeline ranks, grouped by the group of those ranks (for BiasBalancer)."""
        if self.pipeline is None:
            return []
        from trainer.balance import moe_gates

        by_set: dict[tuple[int, ...], list[str]] = {}
        for name in moe_gates(model):
            ranks = tuple(self._holders(name))
            if len(ranks) > 1:
                by_set.setdefault(ranks, []).append(name)
        return [(names, self.pipeline.replica_groups[ranks]) for ranks, names in sorted(by_set.items())]

    def optimizer(self, model: nn.Module, optim_cfg):
        """Plain AdamW over fp32 masters in one process; ZeRO-1 over the DP group otherwise."""
        if not self.distributed:
            from trainer.optim import AdamW

            return AdamW(model.named_parameters(), optim_cfg)
        from parallel.zero import ZeroOptimizer

        return ZeroOptimizer(model.named_parameters(), optim_cfg, self.grid.dp_group, self.grid.edp_group,
                             is_expert_param, extra_group=self.pp_group,
                             norm_share=self.norm_share if self.pp > 1 else None)

    # ---- collectives ---------------------------------------------------------------------------------------
    def pp_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum of per-rank scalars over the pipeline group (losses exist where their stage ran)."""
        if self.pp == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t, group=self.pp_group)
        return dict(zip(values, t.tolist()))

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

    def dispatch_stats(self) -> dict[str, object]:
        """Since the last call: cross-node bytes per token of the expert all-to-all (paper 3.2), summed over every
        MoE layer and rank, and per rank the seconds its compute waited for all-to-all exchanges (the exposed
        all-to-all) and, on a simulated fabric, the exchanges' modelled seconds; empty without expert parallelism."""
        if self.ep == 1:
            return {}
        from model.moe import MoE

        totals = torch.zeros(2, dtype=torch.float64)
        wait = link = 0.0
        for moe in (m for m in self._model.modules() if isinstance(m, MoE)):
            stats = moe.dispatcher.stats()
            totals += torch.tensor([stats["cross_node_bytes"], stats["tokens"]], dtype=torch.float64)
            wait += stats["wait_s"]
            link += stats["link_s"]
        dist.all_reduce(totals)
        out = {"cross_node_bytes_per_token": (totals[0] / totals[1].clamp_min(1)).item(),
               "all_to_all_wait_rank_s": self.gather(wait)}
        if self.grid.cfg.fabric is not None:
            out["all_to_all_link_rank_s"] = self.gather(link)
        return out

    def pipeline_stats(self) -> dict[str, list[float]]:
        """Per rank, the last step's pipeline compute time and the time it waited for stage-to-stage transfers
        (seconds); empty without a pipeline."""
        if self.pipeline is None or self.pipeline.last_stats is None:
            return {}
        stats = self.pipeline.last_stats
        return {"pipeline_busy_rank_s": self.gather(stats.busy), "pipeline_wait_rank_s": self.gather(stats.wait)}

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
        """Who writes an entry no optimizer shard covers (buffers such as the router bias, frozen weights), among
        the ranks of the pipeline position that writes it: DP rank 0, or for routed experts the expert-DP rank 0
        of every EP rank (each holds other experts)."""
        if self.grid is None:
            return True
        return self.grid.edp_rank == 0 if self.ep > 1 and is_expert_param(name) else self.dp_rank == 0

    def model_shards(self, state: dict[str, torch.Tensor], opt) -> dict[str, Shard]:
        """This rank's pieces of a model-shaped state (the weights, or their EMA): of a trained parameter the
        range its optimizer shard covers, so that every element has one writer; other entries per `_writes_whole`."""
        trained = set(opt.params)
        owned = opt.owned() if self.distributed else {n: (0, p.numel()) for n, p in opt.params.items()}
        out = {}
        for name, tensor in state.items():
            if self._holders(name)[0] != self.pp_rank:
                continue  # another pipeline rank holds the copy that is written
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
            if self._holders(name)[0] != self.pp_rank:
                continue
            shape, offset = self._place(name, opt.params[name].shape)
            if kind == "step":
                if owned.get(name, (-1,))[0] == 0 and offset == 0:
                    out[key] = Shard(data, (), 0)
            else:
                out[key] = Shard(data, shape, offset + start)
        return out

    def read_local(self, reader: CheckpointReader, group: str, shapes: dict[str, torch.Size],
                   every: set[str] | None = None) -> dict[str, torch.Tensor]:
        """This rank's view of a model-shaped group: every entry of `shapes` (its local shapes), experts cut to
        this EP rank's block, each read from just the checkpoint ranges that hold it. `every`: the names the
        whole model has in this group (this rank's pipeline stages hold only some), to check the checkpoint's."""
        saved = set(reader.names(group))
        every = set(shapes) if every is None else every
        missing, unexpected = sorted(every - saved), sorted(saved - every)
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
        model.load_state_dict(self.read_local(reader, "model", shapes, set(self._global_shapes)))

    def load_ema_state(self, ema, reader: CheckpointReader) -> None:
        shapes = {name: t.shape for name, t in ema.state_dict().items()}
        every = {name for name in self._global_shapes if name in self._global_params}
        ema.load_state_dict(self.read_local(reader, "ema", shapes, every))

    def load_optim_state(self, opt, reader: CheckpointReader) -> None:
        """Each rank reads its own optimizer shard ranges (ZeRO-1), or the whole state in one process. Load the
        model first: the masters of fp32 parameters are the parameters."""
        if not self.distributed:
            opt.load_state_dict({key: reader.tensor("optim", key) for key in reader.names("optim")})
            return
        shapes, offsets = {}, {}
        for key in reader.names("optim"):
            name = key.split(".", 1)[1]
            if name in opt.params or name not in self._global_params:  # other stages' entries are theirs
                shapes[key], offsets[key] = self._local(name, reader.shape("optim", key))
        opt.load_shards(shapes, lambda key, a, z: reader.read("optim", key, offsets[key] + a, offsets[key] + z))
