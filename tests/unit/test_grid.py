"""Process-grid rank arithmetic and layout validation, without processes."""

from __future__ import annotations

import pytest

from model import ConfigError
from parallel.config import ParallelConfig, check_model_layout
from parallel.grid import GridLayout
from tests.conftest import small_config


def layouts(world: int, **kw) -> list[GridLayout]:
    cfg = ParallelConfig(**kw)
    return [GridLayout.of(world, cfg, r) for r in range(world)]


@pytest.mark.parametrize("world,ep,gpn", [(1, 1, 8), (4, 2, 2), (8, 2, 4), (8, 4, 2), (8, 8, 8), (4, 1, 8)])
def test_every_rank_is_in_exactly_one_group_of_each_kind(world, ep, gpn):
    all_layouts = layouts(world, ep=ep, gpus_per_node=gpn)
    first = all_layouts[0]
    for groups, size in ((first.dp_groups(), first.dp), (first.ep_groups(), ep), (first.edp_groups(), first.edp),
                         (first.pp_groups(), first.pp)):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world))
        assert all(len(g) == size for g in groups)
    for lay in all_layouts:
        ep_group = lay.group_of(lay.ep_groups())
        assert ep_group == list(range(ep_group[0], ep_group[0] + ep))  # contiguous
        assert ep_group.index(lay.rank) == lay.ep_rank
        edp_group = lay.group_of(lay.edp_groups())
        assert all(b - a == ep for a, b in zip(edp_group, edp_group[1:]))  # strided by EP
        assert edp_group.index(lay.rank) == lay.edp_rank
        assert lay.dp_rank == lay.edp_rank * ep + lay.ep_rank


def test_documented_rank_table_world_8():
    # pp is refused by validation until the pipeline exists, so the table is built from the arithmetic
    lay = GridLayout(world_size=8, rank=5, pp=2, dp=4, ep=2, edp=2, gpus_per_node=4)
    assert (lay.pp_rank, lay.dp_rank, lay.ep_rank, lay.edp_rank, lay.node) == (1, 1, 1, 0, 1)
    assert lay.dp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.ep_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.edp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.mirror_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("world,kw,words", [
    (4, dict(ep=3), "parallel.ep=3 does not divide the data-parallel size 4"),
    (6, dict(gpus_per_node=4), "parallel.gpus_per_node=4 does not divide the world size 6"),
    (3, dict(pp=2), "parallel.pp=2 does not divide the world size 3"),
    (4, dict(pp=2), "pipeline parallelism is not built yet"),
    (4, dict(dispatch="mesh"), "parallel.dispatch"),
])
def test_bad_layouts_stop_with_the_numbers(world, kw, words):
    with pytest.raises(ConfigError, match=words):
        ParallelConfig(**kw).validate(world)


def test_model_must_split_over_the_grid():
    with pytest.raises(ConfigError, match="n_routed_experts=8 is not divisible by parallel.ep=3"):
        check_model_layout(ParallelConfig(ep=3), small_config(), 3)
    # EP of 4 over nodes of 2 spans 2 nodes: the router needs one group per node
    with pytest.raises(ConfigError, match="model.n_group=4 must equal the 2 nodes"):
        check_model_layout(ParallelConfig(ep=4, gpus_per_node=2), small_config(), 4)
    check_model_layout(ParallelConfig(ep=4, gpus_per_node=2), small_config(n_group=2, topk_group=1), 4)
