"""DualPipe's overlapped chunk (parallel/pipeline/overlap.py) in one process: a loopback dispatcher logs every
exchange and compute phase, so the test can check that one micro-batch's forward runs inside the other's backward
exchanges in DeepSeek's pairing, and that the result (losses, every gradient, the router's token counts) is
bitwise that of running the forward first and the backward after."""

from __future__ import annotations

import torch

from model import Transformer
from model.block import run_steps
from model.moe import Dispatched, MoE, Ready
from parallel.pipeline.overlap import ForwardInBackward
from parallel.pipeline.stage import MicroBatch, StageSpec, stage_steps
from tests.conftest import small_config


class _Backward(torch.autograd.Function):
    """Identity whose backward is an exchange: logs its launch, lets the dispatcher's hook run, logs its wait."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, disp: _Loopback, name: str) -> torch.Tensor:
        ctx.disp, ctx.name = disp, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        disp = ctx.disp
        disp.log.append(f"launch B.{ctx.name} {disp.layer}")
        if disp.during_exchange is not None:
            disp.during_exchange()
        disp.log.append(f"wait B.{ctx.name} {disp.layer}")
        return grad, None, None


class _Loopback:
    """The expert-parallel dispatcher's interface with one rank: rows stay here, every exchange is logged."""

    def __init__(self, log: list[str], layer: int) -> None:
        self.log, self.layer, self.during_exchange = log, layer, None

    def _handle(self, name: str, result):
        self.log.append(f"launch F.{name} {self.layer}")

        def done():
            self.log.append(f"wait F.{name} {self.layer}")
            return result
        handle = Ready(None)
        handle.wait = done
        return handle

    def dispatch_async(self, h, idx, w):
        return self._handle("dispatch", Dispatched(_Backward.apply(h, self, "dispatch"), idx, w, None))

    def combine_async(self, y, layout):
        return self._handle("combine", _Backward.apply(y, self, "combine"))


def _model(log: list[str]) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(small_config(n_layers=3, first_k_dense=1, n_mtp_depth=0))
    for i, layer in model.layers.items():
        if isinstance(layer.ffn, MoE):
            layer.ffn.dispatcher = _Loopback(log, int(i))
            layer.attn.register_forward_pre_hook(lambda *_, i=i: log.append(f"F.attn {i}"))
            layer.ffn.experts.register_forward_pre_hook(lambda *_, i=i: log.append(f"F.mlp {i}"))
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    return [MicroBatch(torch.randint(0, 101, (2, 8), generator=g), torch.randint(0, 101, (2, 8), generator=g))
            for _ in range(2)]


def _run(overlap: bool):
    """F(micro-batch 0); then the FB chunk (F of 1, B of 0); then B(1). Returns the log and the results."""
    log: list[str] = []
    model = _model(log)
    spec = StageSpec(0, 1, range(3))
    b0, b1 = _batches()
    loss0 = run_steps(stage_steps(model, spec, None, b0)).loss
    log.clear()
    if overlap:
        driver = ForwardInBackward(stage_steps(model, spec, None, b1), [m.ffn.dispatcher for m in _moes(model)])
        loss1 = driver.run(lambda: loss0.backward()).loss
        assert driver.resumed == 4  # two exchanges per MoE layer in the backward, each ran a piece of the forward
    else:
        loss1 = run_steps(stage_steps(model, spec, None, b1)).loss
        loss0.backward()
    fb_log = list(log)
    loss1.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    counts = [m.ffn.gate.tokens_per_expert.clone() for m in _moes(model)]
    return fb_log, (loss0.detach(), loss1.detach()), grads, counts


def _moes(model):
    return [layer for layer in model.layers.values() if isinstance(layer.ffn, MoE)]


def test_forward_runs_inside_the_backward_exchanges_in_deepseek_pairing():
    log, *_ = _run(overlap=True)
    # backward visits the MoE layers 2 then 1; the forward runs layers 1 then 2
    assert log == [
        "launch B.combine 2",            # combine(B) in flight ...
        "F.attn 1", "launch F.dispatch 1",  # ... behind attention (F); dispatch(F) launched
        "wait B.combine 2",
        # (the MLP backward of layer 2 runs here, behind dispatch(F))
        "launch B.dispatch 2",           # dispatch(B) in flight ...
        "wait F.dispatch 1", "F.mlp 1", "launch F.combine 1",  # ... behind the MLP (F); combine(F) launched
        "wait B.dispatch 2",
        # (the attention backward of layer 2 runs here, behind combine(F))
        "launch B.combine 1",
        "wait F.combine 1", "F.attn 2", "launch F.dispatch 2",
        "wait B.combine 1",
        "launch B.dispatch 1",
        "wait F.dispatch 2", "F.mlp 2", "launch F.combine 2",
        "wait B.dispatch 1",
        "wait F.combine 2",              # the rest of the forward, after the backward
    ]


def test_overlapped_chunk_equals_forward_then_backward_bitwise():
    seq_log, seq_losses, seq_grads, seq_counts = _run(overlap=False)
    assert seq_log[0] == "F.attn 1" and seq_log[-1].startswith("wait B.")  # the reference order: F, then B
    _, losses, grads, counts = _run(overlap=True)
    assert all(torch.equal(a, b) for a, b in zip(losses, seq_losses))
    assert grads.keys() == seq_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, seq_grads[name]), name
    assert all(torch.equal(a, b) for a, b in zip(counts, seq_counts))


def test_dense_blocks_and_local_dispatch_never_pause():
    model = Transformer(small_config(n_layers=2, first_k_dense=2))
    steps = stage_steps(model, StageSpec(0, 2, range(2)), None, _batches()[0])
    try:
        next(steps)
        raise AssertionError("a stage of dense blocks paused")
    except StopIteration as stop:
        assert stop.value.shape == (2, 8, model.cfg.dim)
