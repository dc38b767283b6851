"""The pipeline executor (parallel/pipeline/executor.py) without processes: DualPipeV over one rank holds both
stages, so every tensor is handed over in memory. Its gradients equal autograd through the whole model, and a
micro-batch whose shape differs from the pipeline's is refused naming it."""

from __future__ import annotations

import pytest
import torch

from model import Transformer
from parallel.pipeline.executor import PipelineExecutor, StageRunner
from parallel.pipeline.schedule import build_schedule, make_schedule
from parallel.pipeline.stage import MicroBatch, keep_stages, rank_stages, stage_forward
from tests.conftest import small_config


def _setup(batches, shapes_ok=True):
    cfg = small_config(n_layers=4)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    torch.manual_seed(0)
    specs = rank_stages(make_schedule("dualpipev", 1), 0, cfg.n_layers)
    model = keep_stages(Transformer(cfg), specs)
    n = len(batches)

    def forward(spec):
        def run(x, m):
            out = stage_forward(model, spec, x, MicroBatch(*batches[m]), 0.3)
            if spec.last:
                return out.loss / n
            sent.append(out)
            return out
        return run

    stores = [m for m in model.modules() if hasattr(m, "wgrad_store")]
    sent = []
    runners = [StageRunner(spec, forward(spec), stores) for spec in specs]
    shape = (*batches[0][0].shape, cfg.dim)
    return ref, model, PipelineExecutor(make_schedule("dualpipev", 1), 0, [0], runners, shape, torch.float32), sent


def test_one_rank_dualpipev_equals_autograd():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 101, (2, 8), generator=g), torch.randint(0, 101, (2, 8), generator=g))
               for _ in range(4)]
    ref, model, executor, sent = _setup(batches)
    stats = executor.run(build_schedule("dualpipev", 1, 0, 4), 4)
    assert stats.busy > 0 and stats.wait == 0
    assert len(sent) == 4 and all(out.numel() == 0 for out in sent)  # released once handed to the next stage
    for tokens, labels in batches:
        (ref.loss(tokens, labels, 0.3).loss / 4).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_micro_batch_of_another_shape_is_refused():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 101, (2, 8), generator=g), torch.randint(0, 101, (2, 8), generator=g)),
               (torch.randint(0, 101, (2, 6), generator=g), torch.randint(0, 101, (2, 6), generator=g))]
    _, _, executor, _ = _setup(batches)
    with pytest.raises(ValueError, match=r"micro-batch 1: stage 0 produced hidden states of shape \(2, 6, 32\).*"
                                         r"same shape"):
        executor.run(build_schedule("dualpipev", 1, 0, 2), 2)
