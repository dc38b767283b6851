"""ProcessGrid (parallel/grid.py) in 4 gloo processes: the groups it builds hold exactly the ranks the layout
arithmetic names (pp 1, ep 2, two simulated nodes of 2 ranks: configs/parallel/dp4_ep2.yaml)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.grid import ProcessGrid
from tests.dist.conftest import run_distributed


def _members(group: dist.ProcessGroup, rank: int, world: int) -> list[int]:
    """The ranks of `group`, found by summing one-hot rank vectors over it."""
    onehot = torch.zeros(world)
    onehot[rank] = 1
    dist.all_reduce(onehot, group=group)
    return [r for r in range(world) if onehot[r] == 1]


def _check_grid(rank: int, world: int) -> None:
    cfg = ParallelConfig(pp=1, ep=2, gpus_per_node=2)
    grid = ProcessGrid.build(cfg)
    lay = ProcessGrid.layout(world, cfg, rank)
    assert (grid.rank, grid.world_size, grid.backend, grid.device.type) == (rank, world, "gloo", "cpu")
    assert (grid.dp, grid.ep, grid.edp, grid.pp) == (4, 2, 2, 1)
    assert (grid.dp_rank, grid.ep_rank, grid.edp_rank, grid.pp_rank) == (rank, rank % 2, rank // 2, 0)
    assert (grid.node, grid.local_rank, grid.n_nodes, grid.nodes_in_ep) == (rank // 2, rank % 2, 2, 1)
    expected = {"dp": [0, 1, 2, 3], "ep": [rank - rank % 2, rank - rank % 2 + 1], "edp": [rank % 2, rank % 2 + 2],
                "pp": [rank], "mirror": [rank], "embed": [rank]}
    for kind, ranks in expected.items():
        group = getattr(grid, f"{kind}_group")
        assert getattr(lay, f"{kind}_ranks") == getattr(grid, f"{kind}_ranks") == ranks, kind
        assert _members(group, rank, world) == ranks, kind
        assert dist.get_world_size(group) == len(ranks), kind
        assert dist.get_group_rank(group, rank) == ranks.index(rank), kind


@pytest.mark.slow
def test_groups_hold_the_ranks_of_the_layout():
    run_distributed(_check_grid, 4)
