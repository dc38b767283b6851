"""FP8 weights quantised once per optimizer step and shared by every micro-batch (fp8/linear.py `fp8_weights`):
one quantisation per weight for several micro-batches, again after an in-place update, a checkpoint load, a new
tensor or `clear_fp8_weight_caches`; results bitwise those of a fresh quantisation on every forward; a deferred W
gives bitwise the immediate weight gradient and holds only FP8 bytes and their scales (paper 3.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fp8.linear as fp8_linear
from fp8.config import FP8Config
from fp8.gemm import get_backend
from fp8.linear import FP8Spec, clear_fp8_weight_caches
from fp8.quant import FP8, quantize_1x128, quantize_128x128
from fp8.recipe import apply_fp8, fp8_modules
from model import Transformer
from model.linear import GroupedLinear, Linear, WeightGradStore, swiglu_experts
from tests.conftest import small_config

SPEC = FP8Spec(get_backend("emulate"), pow2=True)
COUNTS = [70, 0, 130, 56]


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes fp8/linear.py quantises in 128x128 blocks (weights), in order."""
    seen: list[tuple[int, ...]] = []

    def counting(w: torch.Tensor, pow2: bool = True):
        seen.append(tuple(w.shape))
        return quantize_128x128(w, pow2)

    monkeypatch.setattr(fp8_linear, "quantize_128x128", counting)
    return seen


def _linear(k: int = 256, n: int = 192, e5m6: bool = False, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(k, n)
    lin.fp8 = FP8Spec(SPEC.gemm, True, e5m6_cache=e5m6)
    return lin


def _inputs(n_micro: int, m: int, k: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, k, generator=g) * 10 ** (torch.rand(m, 1, generator=g) * 2 - 1)).requires_grad_()
            for _ in range(n_micro)]


def _experts(seed: int = 0) -> list[GroupedLinear]:
    torch.manual_seed(seed)
    mods = [GroupedLinear(4, 128, 256, "loop"), GroupedLinear(4, 128, 256, "loop"), GroupedLinear(4, 256, 128, "loop")]
    for m in mods:
        m.fp8 = SPEC
    return mods


def _held(fn) -> list[torch.Tensor]:
    """Every tensor a queued W reaches: through closures, functools.cache wrappers and containers."""
    out, seen, todo = [], set(), [fn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, (list, tuple)):
            todo += list(obj)
        else:
            todo += [c.cell_contents for c in getattr(obj, "__closure__", None) or ()]
            if hasattr(obj, "__wrapped__"):
                todo.append(obj.__wrapped__)
    return out


def _assert_fp8_only(store: WeightGradStore, activation_bytes: int) -> None:
    """What the store holds, parameters aside: E4M3 (or packed E5M6) bytes and fp32 scales, one per 128 of them."""
    held = [t for fn in store._queue for t in _held(fn) if not isinstance(t, nn.Parameter)]
    fp8_bytes = sum(t.nbytes for t in held if t.dtype in (FP8, torch.uint8))
    scales = [t for t in held if t.dtype not in (FP8, torch.uint8)]
    assert fp8_bytes > 0 and all(t.dtype == torch.float32 for t in scales), {t.dtype for t in scales}
    assert sum(t.nbytes for t in scales) <= fp8_bytes / 8  # 128x1 groups of short expert segments: more
    assert sum(t.nbytes for t in held) < 0.4 * activation_bytes  # the fp32 activations it replaces


def test_a_weight_is_quantised_once_for_all_micro_batches_and_again_after_an_update(calls):
    lin = _linear()
    xs = _inputs(3, 130, 256)
    ys = [lin(x) for x in xs]  # three live micro-batches
    for y in ys:
        y.square().sum().backward()
    assert calls == [(192, 256)]
    with torch.no_grad():
        lin.weight.add_(1e-3)  # an optimizer step
    lin(xs[0]).sum().backward()
    assert len(calls) == 2
    lin.load_state_dict({"weight": torch.randn(192, 256) * 0.02})  # a checkpoint load
    lin(xs[0]).sum()
    lin.weight.data = lin.weight.data.clone()  # a new tensor, same values
    lin(xs[0]).sum()
    assert len(calls) == 4
    lin.weight.data.mul_(2)  # a write the version counter does not see (as a collective's) ...
    torch.autograd.graph.increment_version(lin.weight)  # ... made visible
    lin(xs[0]).sum()
    assert len(calls) == 5
    assert clear_fp8_weight_caches(lin) == 1
    lin(xs[0]).sum()
    assert len(calls) == 6


def test_expert_weights_are_quantised_once_per_expert(calls):
    mods = _experts()
    rows = _inputs(3, sum(COUNTS), 128)
    counts = torch.tensor(COUNTS)
    for x in rows:
        swiglu_experts(*mods, x, torch.arange(x.shape[0]), counts, None, COUNTS).sum().backward()
        mods[0](x, counts, COUNTS).sum().backward()  # the unfused grouped GEMM shares w1's cache
    assert len(calls) == 3 * 4
    with torch.no_grad():
        mods[2].weight.mul_(0.5)
    swiglu_experts(*mods, rows[0], torch.arange(rows[0].shape[0]), counts, None, COUNTS)
    assert len(calls) == 4 * 4 and calls[-1] == (128, 256)


def test_a_model_quantises_each_weight_once_per_step(calls):
    torch.manual_seed(0)
    model = Transformer(small_config(n_layers=2))
    apply_fp8(model, FP8Config(recipe="emulate"))
    n_weights = sum(m.weight.shape[0] if m.weight.dim() == 3 else 1 for m in fp8_modules(model))
    tokens = torch.randint(0, 101, (3, 1, 8), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        losses = [model.loss(t, t.roll(-1, 1), 0.3).loss for t in tokens]  # three live micro-batches
        for loss in losses:
            loss.backward()
        assert len(calls) == (step + 1) * n_weights
        with torch.no_grad():  # an optimizer step
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(1e-3 * p.grad.sign())


def _run_linear(lin: Linear, xs: list[torch.Tensor], fresh: bool, store: WeightGradStore | None = None):
    lin.weight.grad, lin.wgrad_store = None, store
    outs = []
    for x in xs:
        if fresh:
            clear_fp8_weight_caches(lin)
        x.grad = None
        y = lin(x)
        y.backward(torch.cos(y.detach()))
        outs.append((y.detach(), x.grad.clone()))
    if store is not None:
        assert lin.weight.grad is None and len(store) == len(xs)
        _assert_fp8_only(store, sum(x.nbytes + y.nbytes for x, (y, _) in zip(xs, outs)))
        store.flush()
    return outs, lin.weight.grad.clone()


@pytest.mark.parametrize("e5m6", [False, True])
def test_cached_linear_is_bitwise_a_fresh_quantisation_and_a_deferred_w_holds_fp8_only(e5m6):
    lin = _linear(e5m6=e5m6)
    xs = _inputs(3, 200, 256)
    cached, dw = _run_linear(lin, xs, fresh=False)
    fresh, dw_fresh = _run_linear(lin, xs, fresh=True)
    deferred, dw_deferred = _run_linear(lin, xs, fresh=False, store=WeightGradStore())
    for (y, dx), (y1, dx1), (y2, dx2) in zip(cached, fresh, deferred):
        assert torch.equal(y, y1) and torch.equal(dx, dx1) and torch.equal(y, y2) and torch.equal(dx, dx2)
    assert torch.equal(dw, dw_fresh) and torch.equal(dw, dw_deferred)
    # and Fprop is exactly the GEMM of a fresh quantisation of this input and this weight
    want = SPEC.gemm(*quantize_1x128(xs[0].detach()), *quantize_128x128(lin.weight.detach()), torch.float32)
    assert torch.equal(cached[0][0], want)


def _run_experts(fused: bool, fresh: bool, defer: bool):
    mods = _experts()
    rows = _inputs(2, sum(COUNTS), 128, seed=4)
    counts = torch.tensor(COUNTS)
    store = WeightGradStore() if defer else None
    for m in mods:
        m.wgrad_store = store
    outs = []
    for x in rows:
        if fresh:
            for m in mods:
                clear_fp8_weight_caches(m)
        if fused:
            y = swiglu_experts(*mods, x, torch.arange(x.shape[0]), counts, None, COUNTS)
        else:
            y = mods[2](torch.nn.functional.silu(mods[0](x, counts, COUNTS)), counts, COUNTS)
        y.backward(torch.sin(y.detach()))
        outs.append((y.detach(), x.grad))
    if defer:
        assert all(m.weight.grad is None for m in mods)
        # what the W needs in fp32: x, dy (128 wide), the SwiGLU's a, b, h (256 wide) or one of them
        _assert_fp8_only(store, sum(x.nbytes for x in rows) * (8 if fused else 6))
        store.flush()
    grads = [m.weight.grad for m in (mods if fused else (mods[0], mods[2]))]
    return outs, grads


@pytest.mark.parametrize("fused", [True, False])
def test_cached_experts_are_bitwise_a_fresh_quantisation_and_a_deferred_w_holds_fp8_only(fused):
    ref = _run_experts(fused, fresh=True, defer=False)
    for fresh, defer in ((False, False), (False, True)):
        outs, grads = _run_experts(fused, fresh, defer)
        assert all(torch.equal(a, b) for pair in zip(outs, ref[0]) for a, b in zip(*pair))
        assert all(torch.equal(a, b) for a, b in zip(grads, ref[1]))


def test_deferred_x_cache_is_dequantised_only_when_the_w_runs(monkeypatch):
    """The B leaves the input's FP8 cache to the W: it is dequantised when the W runs, not before."""
    lin = _linear()
    x = _inputs(1, 128, 256)[0]
    store = lin.wgrad_store = WeightGradStore()
    seen = []
    real = fp8_linear.dequantize

    def counting(*args):
        seen.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(fp8_linear, "dequantize", counting)
    lin(x).sum().backward()
    assert seen == []
    store.flush()
    assert seen == [FP8]
