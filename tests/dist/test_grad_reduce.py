"""The gradient reduction overlapped with the pipeline's cool-down (parallel/grad_reduce.py) gives bitwise the
results of reducing after the step: PP=2 DualPipe x DP=2 with EP=2 (mirror pairs, dense and expert buckets),
PP=2 1F1B x DP=2 (the embedding shared with MTP by the first and last stage), PP=4 ZB1P and PP=4 DualPipeV,
two steps each with parallel.overlap_grad_reduce on and off in the same 4 processes: the same losses and
gradient norms, the same weights in the final checkpoint; and with DualPipe some buckets start before the
step's last action."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist.conftest import run_distributed

WORLD = 4
LAYOUTS = {
    "dualpipe": ["parallel.pp=2", "parallel.schedule=dualpipe", "parallel.ep=2", "parallel.gpus_per_node=2"],
    "1f1b": ["parallel.pp=2", "parallel.schedule=1f1b"],
    "zb1p": ["parallel.pp=4", "parallel.schedule=zb1p"],
    "dualpipev": ["parallel.pp=4", "parallel.schedule=dualpipev", "model.n_layers=8"],
}


def _worker(rank: int, world: int, out: str) -> None:
    from parallel.grid import ProcessGrid
    from tests.dist.test_train_parallel import config
    from trainer.train import train

    torch.set_num_threads(1)
    for name, overrides in LAYOUTS.items():
        for overlap in (True, False):
            run = Path(out) / f"{name}-{overlap}"
            cfg = config(overrides + [f"parallel.overlap_grad_reduce={overlap}", f"data.cache_dir={Path(out) / 'c'}",
                                      "trainer.micro_batch_size=1", "trainer.global_batch_size=8",
                                      "trainer.max_steps=2", f"trainer.run_dir={run}"], world)
            grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
            overlapping, early = _train_counting(cfg, run, grid, train)
            assert overlapping == overlap
            if overlap and name == "dualpipe":
                assert early > 0, "no bucket started inside the cool-down"
            for group in [*grid.groups.values(), *grid.channels.values()]:
                if group is not None:
                    dist.destroy_process_group(group)


def _train_counting(cfg, run: Path, grid, train) -> tuple[int, int]:
    """Train, returning how many overlapping reducers the run made and how many buckets they started before a
    step's last action."""
    import parallel.parallelize as parallelize

    reducers = []
    original = parallelize.OverlappedGradReduce

    class Counting(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            reducers.append(self)

    parallelize.OverlappedGradReduce = Counting
    try:
        train(cfg, run, grid)
    finally:
        parallelize.OverlappedGradReduce = original
    return sum(r.overlap for r in reducers), sum(r.early for r in reducers)


def _records(run: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_overlapped_gradient_reduction_is_bitwise_the_reduction_after_the_step(tmp_path):
    from trainer.checkpoint import load_checkpoint

    run_distributed(_worker, WORLD, str(tmp_path), timeout=600)
    for name in LAYOUTS:
        on, off = tmp_path / f"{name}-True", tmp_path / f"{name}-False"
        assert _records(on) == _records(off) and len(_records(on)) == 2, name
        a, b = load_checkpoint(on)[0]["model"], load_checkpoint(off)[0]["model"]
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
