"""Per-rank metrics at scale (trainer/reduce.py): the fixed-size summary collectives give exactly the max, mean and
argmax rank of a gather, in gloo processes; a training record's keys are the same at world 2 and 4; the per-rank
lists appear exactly every logging.per_rank_every steps, one value per rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist.conftest import run_distributed
from tests.dist.test_train_parallel import _train

NAMES = ("tie", "negative", "fine", "sparse", "dyadic")


def _values(rank: int) -> dict[str, float]:
    values = {"tie": 2.5 if rank in (1, 3) else 1.0 - rank,  # the max on two ranks: the lower one is reported
              "negative": -1.5 - rank * 0.25,
              "fine": 0.1 + rank * 1e-10,  # differences below float32's resolution: a tie after rounding
              "dyadic": rank / 8 + 0.125}
    if rank % 2 == 0:
        values["sparse"] = float(torch.randn(1, generator=torch.Generator().manual_seed(rank)).item() * 1e3)
    return values


def _check_summaries(rank: int, world: int) -> None:
    from parallel.config import ParallelConfig
    from parallel.grid import ProcessGrid
    from trainer import reduce

    grid = ProcessGrid.build(ParallelConfig())
    mine = _values(rank)
    got = reduce.summarize(grid, NAMES, mine, {"bytes": 10.0 * (rank + 1)})
    everyone: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    assert set(got) == {f"{n}_{s}" for n in NAMES for s in ("max", "mean", "argmax_rank")} | {"bytes"}
    for name in NAMES:
        held = [(r, v[name]) for r, v in enumerate(everyone) if name in v]
        rounded = [float(torch.tensor(v, dtype=torch.float32)) for _, v in held]
        top = max(rounded)
        assert got[f"{name}_max"] == top, name
        assert got[f"{name}_argmax_rank"] == held[rounded.index(top)][0], name
        mean = math.fsum(v for _, v in held) / len(held)
        if name == "dyadic":
            assert got[f"{name}_mean"] == mean  # exact sums in any order
        else:
            assert math.isclose(got[f"{name}_mean"], mean, rel_tol=1e-12, abs_tol=1e-15), name
    assert got["tie_argmax_rank"] == 1 and got["fine_argmax_rank"] == 0
    assert got["bytes"] == 10.0 * world * (world + 1) / 2
    lists = reduce.per_rank_lists(grid, NAMES, mine)
    for name in NAMES:
        want = [v.get(name, math.nan) for v in everyone]
        assert len(lists[name]) == world
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(lists[name], want)), name


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 4])
def test_summaries_equal_a_gather_reference(world):
    run_distributed(_check_summaries, world)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
def test_record_keys_do_not_grow_with_world_size(tmp_path):
    """EP=2 x DP at world 2 and 4, 5 steps, logging.per_rank_every=2: every record has the same keys at both sizes,
    the summaries of every per-rank quantity and no list but at steps 2 and 4, whose `per_rank` lists hold one value
    per rank whose max, mean and argmax are the record's summaries."""
    cache = tmp_path / "cache"
    keys = {}
    for world in (2, 4):
        run = tmp_path / f"world{world}"
        run_distributed(_train, world, [f"data.cache_dir={cache}", f"trainer.micro_batch_size={8 // world}",
                                        f"trainer.run_dir={run}", "parallel.ep=2", "parallel.gpus_per_node=2",
                                        "logging.per_rank_every=2"], str(run))
        records = _records(run)
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        assert [r["step"] for r in records if "per_rank" in r] == [2, 4]
        plain = {frozenset(r) for r in records if "per_rank" not in r}
        assert len(plain) == 1
        keys[world] = plain.pop()
        for r in records:
            assert r["step_time_s"] == r["step_time_s_max"] > 0 and r["cross_node_bytes_per_token"] >= 0
            assert 0 <= r["all_to_all_wait_s_argmax_rank"] < world
            assert not any(isinstance(v, list) for k, v in r.items()), r["step"]
            lists = r.get("per_rank", {})
            assert set(lists) <= {"step_time_s", "all_to_all_wait_s"}
            for name, values in lists.items():
                assert len(values) == world and min(values) >= 0 and (name != "step_time_s" or min(values) > 0)
                rounded = [float(torch.tensor(v, dtype=torch.float32)) for v in values]
                assert r[f"{name}_max"] == max(rounded) and r[f"{name}_argmax_rank"] == rounded.index(max(rounded))
                assert math.isclose(r[f"{name}_mean"], sum(values) / world, rel_tol=1e-12)
    assert keys[2] == keys[4]
    assert {"step_time_s_max", "step_time_s_mean", "step_time_s_argmax_rank", "all_to_all_wait_s_max",
            "all_to_all_wait_s_mean", "all_to_all_wait_s_argmax_rank"} <= keys[2]
