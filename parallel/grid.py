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
                                             PP groups  [0 4] [1 5] [2 6] [3 7]   (ordered by stage)
                                             mirror pairs and embedding groups: the PP groups here

DualPipe (next milestone, DESIGN.md) keeps two copies of each stage: pipeline position s holds stages s
and PP-1-s, so positions s and PP-1-s with the same dp_rank form a mirror pair whose gradients are summed
(for odd PP the middle position pairs with itself). The embedding (stage 0) and the output head + MTP (last
stage) therefore sit together on positions 0 and PP-1: the embedding group is that pair, the ranks whose
embedding, head and MTP gradients are summed (the rank alone when PP = 1; middle positions are in none).
Both groups are built now so that the next milestone uses the same grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.config import ParallelConfig

__all__ = ["GridLayout", "ProcessGrid", "init"]


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
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside the world of {world_size} ranks")
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
    def local_rank(self) -> int:
        """Index of this rank inside its node."""
        return self.rank % self.gpus_per_node

    @property
    def n_nodes(self) -> int:
        return max(1, -(-self.world_size // self.gpus_per_node))

    @property
    def nodes_in_ep(self) -> int:
        """Nodes spanned by one EP group (EP contiguous ranks): the router's expert groups must match them."""
        return max(1, -(-self.ep // self.gpus_per_node))

    # this rank's groups, as sorted member lists (None: a member of no group of that kind)
    @property
    def dp_ranks(self) -> list[int]:
        return self._member(self.dp_groups())

    @property
    def pp_ranks(self) -> list[int]:
        """Ordered by pipeline position."""
        return self._member(self.pp_groups())

    @property
    def ep_ranks(self) -> list[int]:
        return self._member(self.ep_groups())

    @property
    def edp_ranks(self) -> list[int]:
        return self._member(self.edp_groups())

    @property
    def mirror_ranks(self) -> list[int]:
        return self._member(self.mirror_groups())

    @property
    def embed_ranks(self) -> list[int] | None:
        return self.group_of(self.embed_groups())

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
        last = (self.pp - 1) * self.dp
        return [sorted({d, last + d}) for d in range(self.dp)]

    def group_of(self, groups: list[list[int]]) -> list[int] | None:
        return next((g for g in groups if self.rank in g), None)

    def _member(self, groups: list[list[int]]) -> list[int]:
        mine = self.group_of(groups)
        if mine is None:  # every rank is in one group of each kind but the embedding's
            raise AssertionError(f"rank {self.rank} is in none of {groups}")
        return mine


class ProcessGrid:
    """The grid's groups for this process. Build it after (or instead of) `dist.init_process_group`.

    `spec` is this rank's `GridLayout`; `<kind>_ranks` the members of its `<kind>_group` (kinds dp, pp, ep, edp,
    mirror, embed; `embed_group`/`embed_ranks` are None on middle pipeline positions)."""

    def __init__(self, layout: GridLayout, cfg: ParallelConfig, backend: str, device: torch.device) -> None:
        self.spec, self.cfg, self.backend, self.device = layout, cfg, backend, device
        self.world_size, self.rank = layout.world_size, layout.rank
        self.pp, self.dp, self.ep, self.edp = layout.pp, layout.dp, layout.ep, layout.edp
        self.pp_rank, self.dp_rank, self.ep_rank, self.edp_rank = (layout.pp_rank, layout.dp_rank, layout.ep_rank,
                                                                   layout.edp_rank)
        self.gpus_per_node, self.node, self.n_nodes = cfg.gpus_per_node, layout.node, layout.n_nodes
        self.local_rank = layout.local_rank
        self.nodes_in_ep, self.dispatch = layout.nodes_in_ep, cfg.dispatch
        self.dp_group = self._new_groups(layout.dp_groups())
        self.pp_group = self._new_groups(layout.pp_groups())
        self.ep_group = self._new_groups(layout.ep_groups())
        self.edp_group = self._new_groups(layout.edp_groups())
        self.mirror_group = self._new_groups(layout.mirror_groups())
        self.embed_group = self._new_groups(layout.embed_groups())
        self.dp_ranks, self.pp_ranks, self.ep_ranks = layout.dp_ranks, layout.pp_ranks, layout.ep_ranks
        self.edp_ranks, self.mirror_ranks, self.embed_ranks = layout.edp_ranks, layout.mirror_ranks, layout.embed_ranks

    def _new_groups(self, groups: list[list[int]]) -> dist.ProcessGroup | None:
        mine = None
        for ranks in groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks, timeout=timedelta(seconds=self.cfg.timeout_s))
            if self.rank in ranks:
                mine = group
        return mine

    @staticmethod
    def layout(world_size: int, cfg: ParallelConfig, rank: int) -> GridLayout:
        """The rank arithmetic of `rank` in a world of `world_size`, without processes."""
        return GridLayout.of(world_size, cfg, rank)

    @classmethod
    def build(cls, cfg: ParallelConfig) -> ProcessGrid:
        """Validate the layout against the world size, join the default process group (initialising it from
        torchrun's environment if needed), then create every group. nccl on GPUs, gloo on CPU."""
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        cfg.validate(world)  # raises before any group exists
        layout = GridLayout.of(world, cfg, rank)
        device = init(cfg)
        return cls(layout, cfg, dist.get_backend(), device)


def init(cfg: ParallelConfig) -> torch.device:
    """This process's device, and the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) unless it already exists: nccl with the GPU LOCAL_RANK when CUDA is
    available, else gloo on CPU; collectives time out after `cfg.timeout_s`."""
    use_cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=cfg.timeout_s))
    return device
