"""Sharded checkpoints written by several ranks at once (trainer/checkpoint.py), on gloo.

Three ranks each write a third of a tensor (uneven ranges), rank 0 a replicated one and every rank its own
entry: the checkpoint has one file per rank, reads back whole and by range equal to the single-process tensor.
Pieces that overlap or leave a hole, and a rank that cannot write, make every rank raise and publish nothing,
while the previous checkpoint stays the latest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist.conftest import run_distributed

BOUNDS = [0, 5, 17, 24]  # rank r writes elements [BOUNDS[r], BOUNDS[r + 1]) of W


def _full() -> torch.Tensor:
    return torch.arange(24, dtype=torch.float64).view(4, 6) / 7


def _pieces(rank: int, bounds: list[int]) -> dict[str, dict]:
    from trainer.checkpoint import Shard

    flat = _full().reshape(-1)
    lo, hi = bounds[rank], bounds[rank + 1]
    model = {"w": Shard(flat[lo:hi], (4, 6), lo), f"own_{rank}": torch.full((2,), rank)}
    if rank == 0:
        model["bias"] = torch.ones(3, dtype=torch.bfloat16)
    return {"model": model}


def _writer(rank: int, world: int, run_dir: str) -> None:
    from trainer.checkpoint import CheckpointReader, Shard, latest_checkpoint, save_checkpoint

    run = Path(run_dir)
    path = save_checkpoint(run, 1, _pieces(rank, BOUNDS), {"step": 1, "who": rank}, keep=2)
    assert path == run / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json"] + [f"rank_{r:05d}.safetensors" for r in range(world)]
    reader = CheckpointReader(path)
    assert reader.meta["who"] == 0  # rank 0's meta is the one written
    assert torch.equal(reader.tensor("model", "w"), _full())
    assert torch.equal(reader.read("model", "w", 3, 20), _full().reshape(-1)[3:20])  # spans all three files
    assert [p[0] for p in reader.meta["tensors"]["model"]["w"]["pieces"]] == [f"rank_{r:05d}.safetensors"
                                                                               for r in range(world)]
    assert all(torch.equal(reader.tensor("model", f"own_{r}"), torch.full((2,), r)) for r in range(world))
    assert reader.tensor("model", "bias").dtype == torch.bfloat16

    flat = _full().reshape(-1)
    # rank 1 starts inside rank 0's range (an overlap), then after its end (a hole): refused on every rank
    for start, message in ((3, "overlaps"), (7, r"leaves \[5, 7\) unwritten")):
        pieces = _pieces(rank, BOUNDS)
        if rank == 1:
            pieces["model"]["w"] = Shard(flat[start:17], (4, 6), start)
        with pytest.raises(ValueError, match=message):
            save_checkpoint(run, 2, pieces, {"step": 2}, keep=2)
    # a rank whose piece is wrong: its error reaches everyone, naming it
    bad = _pieces(rank, BOUNDS)
    if rank == 2:
        bad["model"]["w"] = Shard(torch.zeros(10, dtype=torch.float64), (4, 6), 20)
    with pytest.raises(ValueError, match="rank 2: .*outside"):
        save_checkpoint(run, 3, bad, {"step": 3}, keep=2)
    dist.barrier()
    assert latest_checkpoint(run) == path
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_three_ranks_write_one_checkpoint(tmp_path):
    run_distributed(_writer, 3, str(tmp_path / "run"))
