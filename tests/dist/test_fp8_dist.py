"""FP8 training (fp8=emulate, paper 3.3) on PP=2 DualPipe x DP=2 x EP=2 (4 gloo processes, FP8 dispatch payload)
against the FP8 single-process run on the same global batch, and against the run without FP8.

Why not bitwise: the per-token 1x128 tiles are the same in every layout, but the 128x1 groups of the weight-gradient
GEMM run over a micro-batch's tokens (and, for routed experts, over the rows an EP rank receives from every DP
rank), which the layout changes; the FP8 dispatch rounds the rows once more. So the test bounds the difference
between layouts by a small fraction of the difference FP8 itself makes."""

from __future__ import annotations

import pytest
import torch

from tests.dist.conftest import run_distributed
from tests.dist.test_train_parallel import _train, config, losses

STEPS = 4
COMMON = ["model.n_layers=4", f"trainer.max_steps={STEPS}", "trainer.eval_every=0", "trainer.global_batch_size=8"]


@pytest.mark.slow
def test_fp8_pipeline_expert_parallel_run_equals_the_fp8_single_process_run(tmp_path):
    from trainer.train import train

    cache = tmp_path / "cache"
    runs = {}
    for recipe in ("off", "emulate"):
        run = runs[recipe] = tmp_path / f"single_{recipe}"
        train(config(COMMON + [f"fp8={recipe}", "optim.moment_dtype=bf16", f"data.cache_dir={cache}",
                               "trainer.micro_batch_size=8", f"trainer.run_dir={run}"], 1), run)
    run = tmp_path / "layout"
    run_distributed(_train, 4, COMMON + ["fp8=emulate", f"data.cache_dir={cache}", "trainer.micro_batch_size=1",
                                         "parallel.pp=2", "parallel.schedule=dualpipe", "parallel.ep=2",
                                         "parallel.gpus_per_node=2", f"trainer.run_dir={run}"], str(run), timeout=300)
    single, layout, off = (torch.tensor(losses(r), dtype=torch.float64)
                           for r in (runs["emulate"], run, runs["off"]))
    assert len(single) == len(layout) == len(off) == STEPS and torch.isfinite(layout).all()
    assert torch.equal(single[0], layout[0]) or (single[0] - layout[0]).abs() < 1e-4 * single[0]  # same weights
    fp8_effect = (single - off).abs().max()
    assert fp8_effect > 0  # FP8 changed the numbers ...
    assert ((layout - single).abs() / single).max() < 2e-3  # ... and the layouts agree within FP8 rounding
