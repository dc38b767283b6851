"""ProcessGrid: the PP x DP process grid of paper 3.2, with EP inside DP (DESIGN.md "The process grid").

Rank order follows Megatron's tp-cp-ep-dp-pp convention, pipeline outermost:

    rank = pp_rank * DP + dp_rank          dp_rank = edp_rank * EP + ep_rank

so an expert-parallel group is a block of EP contiguous ranks (inside a node when EP <= gpus_per_node)
and an expert-data-parallel group is strided by EP. Node of a rank = rank // gpus_per_node. World 8,
pp 2, ep 2, gpus_per_node 4:

    rank      0  1  2  3 | 4  5  6  7        (node 0 | node 1)
    pp_rank   0  0  0  0 | 1  1  1  1
    dp_rank   0  1  2  3 | 0  1  2  3        DP groups  [0 1 2 3] [4 5 6 7]
    ep_rank   0  1  0  1 | 0  1  0  1        EP groups  [0 1] [2 3] [4 5] [6 7]
    edp_rank  0  0  1  1 | 0  0  1  1        EDP groups [0 2] [1 3] [4 6] [5 7]
                                             PP groups  [0 4] [1 5] [2 6] [3 7]

DualPipe (next milestone) keeps stages s and PP-1-s on one rank, so the ranks of pipeline positions s and
PP-1-s with the same dp_rank are a mirror pair whose gradients are summed; the embedding group is the rank
of pipeline position 0 (which also holds the last stage, output head and MTP under DualPipe) alone per DP
index. Both groups are built now so that the next milestone uses the same grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.config import ParallelConfig


@dataclass(frozen=True)
class GridLayout:
    """Rank arithmetic of one rank, without processes (used by tests and the planner)."""

    world_size: int
    rank: int
    pp: int
    dp: int
    ep: int
    edp: int
    gpus_per_node: int

    @classmethod
    def of(cls, world_size: int, cfg: ParallelConfig, rank: int) -> GridLayout:
        cfg.validate(world_size)
        dp = world_size // cfg.pp
        return cls(world_size, rank, cfg.pp, dp, cfg.ep, dp // cfg.ep, cfg.gpus_per_node)

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def node(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def n_nodes(self) -> int:
        return max(1, -(-self.world_size // self.gpus_per_node))

    # every group of a kind, as rank lists, in a fixed order (new_group must be called identically everywhere)
    def dp_groups(self) -> list[list[int]]:
        return [[p * self.dp + d for d in range(self.dp)] for p in range(self.pp)]

    def pp_groups(self) -> list[list[int]]:
        return [[p * self.dp + d for p in range(self.pp)] for d in range(self.dp)]

    def ep_groups(self) -> list[list[int]]:
        return [[p * self.dp + e * self.ep + i for i in range(self.ep)]
                for p in range(self.pp) for e in range(self.edp)]

    def edp_groups(self) -> list[list[int]]:
        return [[p * self.dp + e * self.ep + i for e in range(self.edp)]
                for p in range(self.pp) for i in range(self.ep)]

    def mirror_groups(self) -> list[list[int]]:
        pairs = []
        for d in range(self.dp):
            for s in range((self.pp + 1) // 2):
                pairs.append(sorted({s * self.dp + d, (self.pp - 1 - s) * self.dp + d}))
        return pairs

    def embed_groups(self) -> list[list[int]]:
        return [[d] for d in range(self.dp)]

    def group_of(self, groups: list[list[int]]) -> list[int] | None:
        return next((g for g in groups if self.rank in g), None)


class ProcessGrid:
    """The grid's groups for this process. Build it after (or instead of) `dist.init_process_group`."""

    def __init__(self, layout: GridLayout, cfg: ParallelConfig, backend: str, device: torch.device) -> None:
        self.layout, self.cfg, self.backend, self.device = layout, cfg, backend, device
        self.world_size, self.rank = layout.world_size, layout.rank
        self.pp, self.dp, self.ep, self.edp = layout.pp, layout.dp, layout.ep, layout.edp
        self.pp_rank, self.dp_rank, self.ep_rank, self.edp_rank = (layout.pp_rank, layout.dp_rank, layout.ep_rank,
                                                                   layout.edp_rank)
        self.gpus_per_node, self.node, self.n_nodes = cfg.gpus_per_node, layout.node, layout.n_nodes
        self.nodes_in_ep, self.dispatch = cfg.nodes_in_ep(), cfg.dispatch
        self.dp_group = self._new_groups(layout.dp_groups())
        self.pp_group = self._new_groups(layout.pp_groups())
        self.ep_group = self._new_groups(layout.ep_groups())
        self.edp_group = self._new_groups(layout.edp_groups())
        self.mirror_group = self._new_groups(layout.mirror_groups())
        self.embed_group = self._new_groups(layout.embed_groups())

    def _new_groups(self, groups: list[list[int]]) -> dist.ProcessGroup | None:
        mine = None
        for ranks in groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks, timeout=timedelta(seconds=self.cfg.timeout_s))
            if self.rank in ranks:
                mine = group
        return mine

    @classmethod
    def build(cls, cfg: ParallelConfig) -> ProcessGrid:
        """Join the default process group (initialising it from torchrun's environment if needed), validate the
        layout against the world size, then create every group. nccl on GPUs, gloo on CPU."""
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        layout = GridLayout.of(world, cfg, rank)  # raises before any group exists
        use_cuda = torch.cuda.is_available()
        device = torch.device("cpu")
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=cfg.timeout_s))
        return cls(layout, cfg, dist.get_backend(), device)
