"""DualPipe's overlapped forward-and-backward chunk on real expert-parallel all-to-alls (4 gloo processes: PP=2
DualPipe x EP=2, on the simulated fabric): the step with `overlap` on gives bitwise the losses, gradients and
router token counts of the step with every FB run as forward, then backward; and in the overlapped step every
backward exchange of an FB chunk had a piece of the other micro-batch's forward running behind it."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import small_config
from tests.dist.conftest import run_distributed

PP, EP, N_MICRO, SEQ, BATCH = 2, 2, 4, 8, 2


def _step(rank: int, overlap: bool):
    from model import Transformer
    from model.block import run_steps
    from model.moe import MoE
    from parallel.config import ParallelConfig
    from parallel.fabric import Fabric
    from parallel.grid import ProcessGrid
    from parallel.parallelize import apply_expert_parallel
    from parallel.pipeline.executor import PipelineExecutor, StageRunner
    from parallel.pipeline.schedule import make_schedule
    from parallel.pipeline.stage import MicroBatch, keep_stages, rank_stages, stage_steps

    pp_rank, ep_rank = divmod(rank, EP)  # ranks 0 1 run pipeline position 0, ranks 2 3 position 1
    pp_ranks = [p * EP + ep_rank for p in range(PP)]
    cfg = small_config(n_layers=4, first_k_dense=1)
    torch.manual_seed(0)
    specs = rank_stages(make_schedule("dualpipe", PP), pp_rank, cfg.n_layers)
    model = keep_stages(Transformer(cfg), specs)
    fabric = Fabric(intra_gbps=0.05, inter_gbps=0.02, latency_us=200)  # ~1 ms per exchange
    layout = ParallelConfig(pp=PP, ep=EP, gpus_per_node=1, schedule="dualpipe", fabric=fabric)
    grid = ProcessGrid.build(layout)  # EP groups [0 1] [2 3]
    apply_expert_parallel(model, grid, layout)
    g = torch.Generator().manual_seed(10 + ep_rank)  # each EP rank (data-parallel rank) its own data
    batches = [MicroBatch(torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g),
                          torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)) for _ in range(N_MICRO)]
    losses = {}

    def steps(spec):
        def run(x, m):
            out = yield from stage_steps(model, spec, x, batches[m], 0.3)
            if spec.last:
                losses[m] = out.loss.detach()
                return out.loss / N_MICRO
            return out
        return run

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    stores = [m for m in model.modules() if hasattr(m, "wgrad_store")]
    runners = []
    for spec in specs:
        run = steps(spec)
        dispatchers = [model.layers[str(i)].ffn.dispatcher for i in spec.layers
                       if isinstance(model.layers[str(i)].ffn, MoE)]
        runners.append(StageRunner(spec, lambda x, m, run=run: run_steps(run(x, m)), stores, run, dispatchers))
    assert grid.pp_ranks == pp_ranks
    executor = PipelineExecutor(grid.schedule, pp_rank, pp_ranks, runners, (BATCH, SEQ, cfg.dim), torch.float32,
                                channels=grid.channels, overlap=overlap)
    stats = executor.run(grid.schedule.actions(pp_rank, N_MICRO), N_MICRO)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = [m.gate.tokens_per_expert.clone() for m in moes]
    return stats, losses, grads, counts


def _worker(rank: int, world: int) -> None:
    ref_stats, ref_losses, ref_grads, ref_counts = _step(rank, overlap=False)
    stats, losses, grads, counts = _step(rank, overlap=True)
    assert ref_stats.overlapped == 0
    n_fb = sum(1 for _, _, a in stats.events if a.kind == "FB")
    assert n_fb > 0 and stats.overlapped >= n_fb, (n_fb, stats.overlapped)  # each FB ran its forward behind
    assert stats.exchange_link["FB"] > 0  # the fabric timed the FB chunks' all-to-alls
    assert losses.keys() == ref_losses.keys()
    assert all(torch.equal(losses[m], ref_losses[m]) for m in losses)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    assert all(torch.equal(a, b) for a, b in zip(counts, ref_counts))


@pytest.mark.slow
def test_overlapped_chunk_is_bitwise_the_sequential_one():
    run_distributed(_worker, PP * EP)
