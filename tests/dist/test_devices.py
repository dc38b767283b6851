"""What gloo hides and CUDA + NCCL would not: a tensor allocated without naming its device, and host syncs in the
hot path (notes/nccl-and-gpu.md), on the main job's layout PP=2 DualPipe x DP=2 (ZeRO-1) x EP=2 (4 gloo
processes; EP, ZeRO and the pipeline at once), and in one process.

Devices: the second of two optimizer steps, an evaluation and a checkpoint run with the default device set to
`meta`; every allocation that does not name its device (the grid's, or "cpu" on purpose) becomes a meta tensor
and fails when it meets real data, or changes the numbers, which must equal a run without it.

Host syncs (core/syncs.py counts the calls that would make the host wait for a CUDA device): the micro-batches'
forward and backward may hold at most one per all-to-all exchange (the counts exchange's copy, which also gives
the expert GEMM sizes), none else; the rest of the step one per value read (the loss means, the gradient norm,
the MaxVio report).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist.conftest import run_distributed

SMALL = ["model.n_layers=4", "model.dim=64", "model.vocab_size=512", "model.n_routed_experts=8", "model.n_group=2",
         "model.topk_group=1", "model.n_activated_experts=2", "model.inter_dim=128", "model.moe_inter_dim=32",
         "data.vocab_size=512", "data.corpus_bytes=300000", "data.seq_len=32", "trainer.eval_every=0",
         "trainer.checkpoint_every=0", "logging.plot=false", "optim.warmup_steps=2", "trainer.global_batch_size=8"]
MAIN_JOB = ["experiment=tiny_parallel", *SMALL, "trainer.micro_batch_size=1", "trainer.eval_batches=2"]
STEP_READS = 3  # the loss means, the gradient norm, the MaxVio report


def steps_on_meta(overrides: list[str], world: int, run_dir: Path) -> dict:
    """Two optimizer steps as usual, then the same two with the second (and an evaluation and a checkpoint) on a
    meta default device while host syncs are counted; returns the losses of both and the counts."""
    from core.syncs import HostSyncCounter
    from model.moe import MoE
    from parallel.grid import ProcessGrid
    from trainer.config import compose_config, load_config
    from trainer.state import TrainState, save
    from trainer.train import build, evaluate, optimizer_step

    torch.set_num_threads(1)
    cfg = load_config(compose_config(overrides), world_size=world)
    grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
    ref, state = build(cfg, grid), TrainState()
    expected = [optimizer_step(cfg, grid, state, ref, None, run_dir)["loss"] for _ in range(2)]
    expected_val = evaluate(grid, ref.pipeline, ref.data.valid_batches(2, cfg.trainer.micro_batch_size))

    run, state = build(cfg, grid), TrainState()
    passes = [0]
    for moe in (m for m in run.model.modules() if isinstance(m, MoE)):
        def counted(h, route=moe.route):
            passes[0] += 1
            return route(h)
        moe.route = counted
    micro = HostSyncCounter(where=True)
    train_step = run.pipeline.train_step

    def counted_step(*args, **kwargs):
        with micro:
            return train_step(*args, **kwargs)

    got = [optimizer_step(cfg, grid, state, run, None, run_dir)["loss"]]
    passes[0] = 0
    run.pipeline.train_step = counted_step
    valid = run.data.valid_batches(2, cfg.trainer.micro_batch_size)
    with torch.device("meta"):
        with HostSyncCounter(where=True) as whole:
            got.append(optimizer_step(cfg, grid, state, run, None, run_dir)["loss"])
        step_passes = passes[0]
        val = evaluate(grid, run.pipeline, valid)
        save(run_dir, cfg, grid, run.shards, state, run.model, run.opt, run.data, None)
    return {"expected": expected, "got": got, "val": (expected_val, val), "passes": step_passes,
            "micro": micro.total, "micro_sites": dict(micro.sites), "rest": whole.total - micro.total,
            "rest_calls": dict(whole.counts - micro.counts)}


def _spawned(rank: int, world: int, overrides: list[str], run_dir: str, out: str) -> None:
    import json

    result = steps_on_meta(overrides, world, Path(run_dir))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_main_job_layout_names_every_device_and_keeps_the_sync_budget(tmp_path):
    import json

    run_distributed(_spawned, 4, [*MAIN_JOB, f"data.cache_dir={tmp_path / 'cache'}"], str(tmp_path / "run"),
                    str(tmp_path), timeout=300)
    for rank in range(4):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["got"] == r["expected"] and r["val"][0] == r["val"][1], (rank, r)
        # every rank runs 4 micro-batches, half through its stage and half through its mirror copy: 8 MoE passes
        assert r["passes"] == 8
        assert r["micro"] <= r["passes"], (rank, r["micro"], r["micro_sites"])  # flat EP: one exchange each
        assert r["rest"] <= STEP_READS, (rank, r["rest_calls"])
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()  # written under the meta default device
