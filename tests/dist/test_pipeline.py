"""The pipeline executor (parallel/pipeline/) against the single-process model, on gloo.

Every schedule at PP=2 and PP=4 (and DualPipeV's 2 x PP stages): the model is built whole on every rank with one
seed, each rank keeps its stages (parallel/pipeline/stage.py), runs its actions of `build_schedule` for one
step of 2 x PP micro-batches in fp32, sums the gradients of parameters held by several ranks (DualPipe's two
copies, the embedding that MTP shares) and compares with the same micro-batches through the whole model in one
process (computed on every rank): each micro-batch's loss to 1e-6 relative, each gradient within a float64
cosine difference of 1e-10 and fp32 tolerance. Deferred weight gradients (ZB1P's W) must land exactly where
autograd would have put them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.conftest import small_config
from tests.dist.conftest import run_distributed

SEQ, BATCH = 8, 2


def _batches(n: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        seq = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def _modules_with_store(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "wgrad_store")]


def _pipeline_worker(rank: int, world: int, schedule: str) -> None:
    from model import Transformer
    from parallel.pipeline.executor import PipelineExecutor, StageRunner
    from parallel.pipeline.p2p import new_channel_groups
    from parallel.pipeline.schedule import build_schedule, make_schedule
    from parallel.pipeline.stage import (
        MicroBatch,
        holders,
        keep_stages,
        rank_stages,
        stage_forward,
        sync_replicated_grads,
    )

    pp, n_micro, mtp_lambda = world, 2 * world, 0.3
    plan = make_schedule(schedule, pp)
    cfg = small_config(n_layers=plan.n_stages + 1, first_k_dense=1)
    batches = _batches(n_micro, cfg.vocab_size)

    torch.manual_seed(0)
    ref = Transformer(cfg)
    ref_losses = []
    for tokens, labels in batches:
        out = ref.loss(tokens, labels, mtp_lambda)
        (out.loss / n_micro).backward()
        ref_losses.append(out.main.item())

    torch.manual_seed(0)
    specs = rank_stages(plan, rank, cfg.n_layers)
    model = keep_stages(Transformer(cfg), specs)
    losses: dict[int, float] = {}

    def forward_fn(spec):
        def run(x, m):
            tokens, labels = batches[m]
            out = stage_forward(model, spec, x, MicroBatch(tokens, labels), mtp_lambda)
            if spec.last:
                losses[m] = out.main.item()
                return out.loss / n_micro
            return out
        return run

    runners = [StageRunner(spec, forward_fn(spec), _modules_with_store(model)) for spec in specs]
    channels = new_channel_groups(plan, [list(range(world))], rank, None)
    executor = PipelineExecutor(plan, rank, list(range(world)), runners, (BATCH, SEQ, cfg.dim), torch.float32,
                                channels=channels)
    stats = executor.run(build_schedule(schedule, pp, rank, n_micro), n_micro)
    assert 0 < stats.busy <= stats.total and len(stats.events) == len(build_schedule(schedule, pp, rank, n_micro))

    holder_of = holders(plan, cfg.n_layers, None, mtp=cfg.n_mtp_depth > 0)
    sets = sorted({tuple(r) for r in holder_of.values() if len(r) > 1})
    groups = {s: dist.new_group(list(s)) for s in sets}  # every rank creates every group, in one order
    sync_replicated_grads(model, groups, holder_of)

    for m, value in losses.items():
        assert math.isclose(value, ref_losses[m], rel_tol=1e-6), (m, value, ref_losses[m])
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names, "every rank holds some parameters"
    for name, p in model.named_parameters():
        g, r = p.grad.double().reshape(-1), ref_params[name].grad.double().reshape(-1)
        if r.norm() == 0:
            assert g.norm() == 0, name
            continue
        cos = torch.nn.functional.cosine_similarity(g, r, dim=0).item()
        assert 1 - cos < 1e-10, (name, 1 - cos)
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    # across the pipeline every stage's layers are held somewhere, and the losses came from the last stage(s)
    gathered = [None] * world
    dist.all_gather_object(gathered, (sorted(losses), [n for n in names if n.startswith("layers.")]))
    assert sorted(m for got, _ in gathered for m in got) == list(range(n_micro))
    held = {n.split(".")[1] for _, layer_names in gathered for n in layer_names}
    assert held == {str(i) for i in range(cfg.n_layers)}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4])
def test_schedule_equals_single_process(schedule, pp):
    run_distributed(_pipeline_worker, pp, schedule)


def _bf16_mirror_worker(rank: int, world: int) -> None:
    """DualPipe in bf16 with fp32 main gradients and deferred W: after the mirror sums both copies of every stage
    hold the same fp32 gradient (the sums must read `main_grad`, where bf16 parameters keep theirs)."""
    from model import Transformer
    from model.grads import attach_main_grads
    from parallel.pipeline.executor import PipelineExecutor, StageRunner
    from parallel.pipeline.p2p import new_channel_groups
    from parallel.pipeline.schedule import make_schedule
    from parallel.pipeline.stage import (
        MicroBatch,
        holders,
        keep_stages,
        rank_stages,
        stage_forward,
        sync_replicated_grads,
    )

    pp, n_micro = world, 2 * world
    cfg = small_config(n_layers=3, first_k_dense=1)
    batches = _batches(n_micro, cfg.vocab_size)
    torch.manual_seed(0)
    plan = make_schedule("dualpipe", pp)
    specs = rank_stages(plan, rank, cfg.n_layers)
    model = keep_stages(Transformer(cfg), specs).to(torch.bfloat16)
    attach_main_grads(model.parameters())

    def forward_fn(spec):
        def run(x, m):
            out = stage_forward(model, spec, x, MicroBatch(*batches[m]), 0.3)
            return out.loss / n_micro if spec.last else out
        return run

    runners = [StageRunner(spec, forward_fn(spec), _modules_with_store(model)) for spec in specs]
    executor = PipelineExecutor(plan, rank, list(range(world)), runners, (BATCH, SEQ, cfg.dim), torch.bfloat16,
                                channels=new_channel_groups(plan, [list(range(world))], rank, None))
    actions = plan.actions(rank, n_micro)
    assert any(a.kind == "W" or (a.backward is not None and a.backward.defer_w) or a.defer_w for a in actions)
    executor.run(actions, n_micro)
    holder_of = holders(plan, cfg.n_layers, None, mtp=cfg.n_mtp_depth > 0)
    sets = sorted({tuple(r) for r in holder_of.values() if len(r) > 1})
    sync_replicated_grads(model, {s: dist.new_group(list(s)) for s in sets}, holder_of)
    assert all(p.grad is None for p in model.parameters())
    grads = {n: p.main_grad for n, p in model.named_parameters() if p.main_grad is not None}
    assert grads and all(g.dtype == torch.float32 for g in grads.values())
    gathered = [None] * world
    dist.all_gather_object(gathered, grads)
    for name, g in grads.items():
        for other in gathered:
            if name in other:
                assert torch.equal(other[name], g), name


@pytest.mark.slow
def test_bf16_dualpipe_copies_get_the_same_fp32_gradients():
    run_distributed(_bf16_mirror_worker, 2)
