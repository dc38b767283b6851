"""The EMA under ZeRO-1 (trainer/ema.py): each rank keeps only the parameter ranges its optimizer shard owns, about
1/DP of a full fp32 copy, saved as the same pieces as the optimizer state; `hai-export --ema` of a multi-rank run
assembles them into the single-process run's EMA (same data, same steps), also after a resume on another layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist.conftest import run_distributed
from tests.dist.test_train_parallel import _train, config

EMA = ["trainer.ema_decay=0.9"]
EP2 = ["parallel.ep=2", "parallel.gpus_per_node=2"]


def _exported(run: Path, out: Path, ema: bool) -> dict[str, torch.Tensor]:
    from trainer.export import export
    from trainer.hf import load_hf

    export(run, out, ema=ema)
    return load_hf(out).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("layouts", [
    [(4, EP2, 5)],  # EP=2 x DP=4: dense ranges over 4 ranks, each EP rank's experts over 2
    [(4, EP2, 3), (2, [], 5)],  # 3 steps there, then a resume on DP=2 (each rank reads its new ranges), to step 5
], ids=["ep2-dp4", "resharded-to-dp2"])
def test_exported_ema_equals_the_single_process_run(tmp_path, layouts):
    from trainer.train import train

    cache = tmp_path / "cache"
    single = tmp_path / "single"
    train(config(EMA + [f"data.cache_dir={cache}", "trainer.micro_batch_size=8", f"trainer.run_dir={single}"], 1),
          single)
    run = tmp_path / "parallel"
    for world, extra, steps in layouts:
        run_distributed(_train, world, EMA + extra + [f"data.cache_dir={cache}", f"trainer.run_dir={run}",
                                                      f"trainer.micro_batch_size={8 // world}",
                                                      f"trainer.max_steps={steps}"], str(run))
    last = run / "checkpoints" / "step_00000005"
    index = json.loads((last / "meta.json").read_text())["tensors"]
    world = layouts[-1][0]
    def ranges(entry: dict) -> list[tuple[str, int, int]]:
        return [(file, start, end) for file, _, start, end in entry["pieces"]]

    for name, entry in index["ema"].items():  # stored as the optimizer's shards are: the same ranks and ranges
        assert ranges(entry) == ranges(index["optim"][f"exp_avg.{name}"]), name
    assert len({p[0] for entry in index["ema"].values() for p in entry["pieces"]}) == world

    want, got = _exported(single, tmp_path / "hf_single", True), _exported(run, tmp_path / "hf_parallel", True)
    weights = _exported(single, tmp_path / "hf_weights", False)
    assert got.keys() == want.keys()
    # as the weights of tests/dist/test_train_parallel.py: the DP sums of gradients are ordered differently
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, rtol=0, atol=2e-5, msg=name)
    assert not torch.equal(want["embed.weight"], weights["embed.weight"])


def _measure(rank: int, world: int, overrides: list[str]) -> None:
    from parallel.grid import ProcessGrid
    from trainer.ema import EMA as Average
    from trainer.train import build

    torch.set_num_threads(1)
    cfg = config(overrides, world)
    grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
    run = build(cfg, grid)
    sharded = Average(run.model, 0.9, owned=run.opt.owned())
    replicated = Average(run.model, 0.9)  # what every DP rank kept before: the whole model in fp32
    full = 4 * sum(p.numel() for p in run.model.parameters())  # EP = 1: this rank holds the whole model
    assert replicated.nbytes() == full
    total = torch.tensor([sharded.nbytes()], dtype=torch.int64)
    dist.all_reduce(total)
    assert total.item() == full  # the ranks' ranges partition every parameter: each element kept once
    assert abs(sharded.nbytes() - full / grid.dp) <= 4 * grid.dp * len(run.opt.buckets), (sharded.nbytes(), full)
    pieces = sharded.pieces()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for _, t in pieces.values())
    with pytest.raises(ValueError, match="hai-export --ema"):
        sharded.copy_to(run.model)


@pytest.mark.slow
def test_ema_memory_per_rank_is_one_over_dp(tmp_path):
    """DP=4 (ZeRO-1): each rank's EMA holds a quarter of the fp32 copy each rank kept before, up to ZeRO's padding,
    and the four quarters together are the whole model."""
    run_distributed(_measure, 4, [f"data.cache_dir={tmp_path / 'cache'}", "trainer.micro_batch_size=2"])
