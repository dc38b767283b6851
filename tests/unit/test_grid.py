"""Process-grid rank arithmetic (parallel/grid.py) and layout validation (parallel/config.py), without processes."""

from __future__ import annotations

import pytest

from model import ConfigError
from parallel.config import ParallelConfig, check_model_layout
from parallel.expert import is_expert_param
from parallel.grid import GridLayout, ProcessGrid
from tests.conftest import small_config

# (world, pp, ep, gpus_per_node); pp > 1 goes through the arithmetic only (validate refuses it for training)
LAYOUTS = [(1, 1, 1, 8), (4, 1, 2, 2), (4, 1, 1, 8), (8, 1, 4, 2), (8, 1, 8, 8), (8, 2, 2, 4), (8, 4, 1, 2),
           (12, 3, 2, 4), (16, 2, 4, 4)]


def layouts(world: int, pp: int, ep: int, gpn: int) -> list[GridLayout]:
    cfg = ParallelConfig(pp=pp, ep=ep, gpus_per_node=gpn)
    return [ProcessGrid.layout(world, cfg, r) for r in range(world)]


@pytest.mark.parametrize("world,pp,ep,gpn", LAYOUTS)
def test_every_rank_is_in_exactly_one_group_of_each_kind(world, pp, ep, gpn):
    first = layouts(world, pp, ep, gpn)[0]
    dp = world // pp
    assert (first.pp, first.dp, first.ep, first.edp) == (pp, dp, ep, dp // ep)
    for groups, size in ((first.dp_groups(), dp), (first.pp_groups(), pp), (first.ep_groups(), ep),
                         (first.edp_groups(), dp // ep)):
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert all(len(g) == size for g in groups)
    mirror = first.mirror_groups()
    assert sorted(r for g in mirror for r in g) == list(range(world))


@pytest.mark.parametrize("world,pp,ep,gpn", LAYOUTS)
def test_each_rank_sees_its_groups(world, pp, ep, gpn):
    dp = world // pp
    for lay in layouts(world, pp, ep, gpn):
        assert lay.rank == lay.pp_rank * dp + lay.dp_rank  # PP outermost
        assert lay.dp_rank == lay.edp_rank * ep + lay.ep_rank
        assert (lay.node, lay.local_rank) == divmod(lay.rank, gpn)
        assert lay.dp_ranks == [lay.pp_rank * dp + d for d in range(dp)]
        assert lay.pp_ranks == [p * dp + lay.dp_rank for p in range(pp)]  # ordered by stage
        assert lay.ep_ranks == list(range(lay.rank - lay.ep_rank, lay.rank - lay.ep_rank + ep))  # contiguous
        assert lay.ep_ranks.index(lay.rank) == lay.ep_rank
        assert all(b - a == ep for a, b in zip(lay.edp_ranks, lay.edp_ranks[1:]))  # strided by EP
        assert lay.edp_ranks.index(lay.rank) == lay.edp_rank
        assert {r // dp for r in lay.edp_ranks} == {lay.pp_rank}  # inside one stage
        # DualPipe: positions s and pp-1-s of the same DP index sum their gradients
        partner = (pp - 1 - lay.pp_rank) * dp + lay.dp_rank
        assert lay.mirror_ranks == sorted({lay.rank, partner})
        # the embedding/head/MTP live on positions 0 and pp-1
        if lay.pp_rank in (0, pp - 1):
            assert lay.embed_ranks == sorted({lay.dp_rank, (pp - 1) * dp + lay.dp_rank})
        else:
            assert lay.embed_ranks is None
        assert lay.nodes_in_ep == max(1, -(-ep // gpn))
        assert len({r // gpn for r in lay.ep_ranks}) == lay.nodes_in_ep


def test_pp1_groups_of_one():
    lay = ProcessGrid.layout(4, ParallelConfig(ep=2, gpus_per_node=2), 3)
    assert (lay.pp_ranks, lay.mirror_ranks, lay.embed_ranks) == ([3], [3], [3])
    assert (lay.dp_ranks, lay.ep_ranks, lay.edp_ranks) == ([0, 1, 2, 3], [2, 3], [1, 3])
    assert (lay.node, lay.local_rank, lay.n_nodes, lay.nodes_in_ep) == (1, 1, 2, 1)


def test_documented_rank_table_world_8():
    cfg = ParallelConfig(pp=2, ep=2, gpus_per_node=4)
    table = [(lay.pp_rank, lay.dp_rank, lay.ep_rank, lay.edp_rank, lay.node)
             for lay in (ProcessGrid.layout(8, cfg, r) for r in range(8))]
    assert [list(col) for col in zip(*table)] == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3],
                                                  [0, 1, 0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 0, 0, 1, 1],
                                                  [0, 0, 0, 0, 1, 1, 1, 1]]
    lay = ProcessGrid.layout(8, cfg, 5)
    assert lay.dp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.ep_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.edp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.mirror_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.embed_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 4 outside the world of 4"):
        ProcessGrid.layout(4, ParallelConfig(), 4)


@pytest.mark.parametrize("world,kw,words", [
    (4, dict(ep=3), r"parallel.ep=3 does not divide the data-parallel size 4 \(world 4 / pp 1\); "
                    r"choose ep among 1, 2, 4"),
    (8, dict(pp=2, ep=3), r"parallel.ep=3 does not divide the data-parallel size 4 \(world 8 / pp 2\)"),
    (6, dict(gpus_per_node=4), "parallel.gpus_per_node=4 does not divide the world size 6.*among 1, 2, 3, 6"),
    (3, dict(pp=2), "parallel.pp=2 does not divide the world size 3.*choose pp among 1, 3"),
    (6, dict(pp=3, schedule="dualpipe"), "dualpipe needs an even number of pipeline ranks, got parallel.pp=3"),
    (2, dict(pp=2, schedule="gpipe"), "parallel.schedule='gpipe' does not exist; choose one of 1f1b, zb1p"),
    (2, dict(pp=2, microbatches=0), "parallel.microbatches=0: must be >= 1"),
    (4, dict(dispatch="mesh"), "parallel.dispatch='mesh' is not a dispatch mode; choose one of flat, hierarchical"),
    (12, dict(ep=3, gpus_per_node=2), "parallel.ep=3 with parallel.gpus_per_node=2: .*fit inside one node"),
    (4, dict(ep=0), "parallel.ep: must be >= 1, got 0"),
    (4, dict(timeout_s=0), "parallel.timeout_s: must be >= 1, got 0"),
    (2, dict(pp=2, schedule="dualpipe", overlap="yes"), "parallel.overlap='yes': must be true or false"),
])
def test_bad_layouts_stop_with_the_numbers(world, kw, words):
    with pytest.raises(ConfigError, match=words):
        ParallelConfig(**kw).validate(world)


def test_small_worlds_are_one_node_and_ep_is_allowed():
    ParallelConfig(ep=4, gpus_per_node=8).validate(4)  # 4 ranks on one 8-rank node
    ParallelConfig(ep=3, gpus_per_node=8).validate(6)  # one node: EP needs no alignment
    ParallelConfig(ep=4, gpus_per_node=2, dispatch="hierarchical").validate(8)
    assert ParallelConfig(pp=2, ep=2).validate(8).pp == 2


def test_model_must_split_over_the_grid():
    with pytest.raises(ConfigError, match="n_routed_experts=8 is not divisible by parallel.ep=3; "
                                          "choose ep among 1, 2, 4, 8"):
        check_model_layout(ParallelConfig(ep=3), small_config())
    # EP of 4 over nodes of 2 spans 2 nodes: the router needs one group per node
    with pytest.raises(ConfigError, match="model.n_group=4 must equal the 2 nodes spanned by the EP group.*"
                                          "set model.n_group=2"):
        check_model_layout(ParallelConfig(ep=4, gpus_per_node=2), small_config())
    check_model_layout(ParallelConfig(ep=4, gpus_per_node=2), small_config(n_group=2, topk_group=1))
    check_model_layout(ParallelConfig(ep=2, gpus_per_node=2), small_config())  # EP inside a node: any n_group
    check_model_layout(ParallelConfig(ep=4, gpus_per_node=8), small_config())


def test_expert_params_are_the_routed_experts():
    assert is_expert_param("layers.3.ffn.experts.w1.weight")
    assert not is_expert_param("layers.3.ffn.shared_experts.w1.weight")
    assert not is_expert_param("layers.3.ffn.gate.weight")
    assert not is_expert_param("embed.weight")
