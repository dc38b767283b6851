"""The hand-written autograd functions that keep less for backward than autograd would (model/norm.py's RMSNorm and
its recomputed outputs, model/swiglu.py with the gate weight, the routed experts' combine in model/moe.py): values
and gradients against the same computation written with plain ops and differentiated by autograd (float64), and
what each one saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp8.config import FP8Config
from fp8.recipe import apply_fp8
from model import Transformer
from model.moe import _ScatterAddFn
from model.norm import RMSNorm
from model.swiglu import swiglu
from tests.conftest import small_config
from trainer.train import cast_for_compute


def _saved_storages(fn, *args) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        fn(*args)
    return saved


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [False, True])
def test_rmsnorm_matches_autograd_reference(dtype, recompute):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6, recompute=recompute)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    norm.to(dtype)
    x = (torch.randn(2, 5, 48) * 3).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 48).to(dtype)
    y = norm(x)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    ref.backward(dy.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol)
    assert _cosine(x.grad, x64.grad) > 1 - tol and _cosine(norm.weight.grad, w64.grad) > 1 - tol
    if dtype == torch.float32:
        assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
        assert torch.allclose(norm.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    saved = _saved_storages(norm, x)
    # the input (in its own dtype) and, without recompute, one fp32 statistic per token; never a full fp32 copy
    assert sum(t.numel() * t.element_size() for t in saved if t is not norm.weight) <= (
        x.numel() * x.element_size() + 4 * 10)


def test_swiglu_matches_autograd_and_keeps_only_its_inputs():
    torch.manual_seed(0)
    a, b = (torch.randn(7, 33, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dh = torch.randn(7, 33, dtype=torch.float64)
    h = swiglu(a, b)
    h.backward(dh)
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    ref = F.silu(a2) * b2
    ref.backward(dh)
    assert torch.allclose(h, ref) and torch.allclose(a.grad, a2.grad) and torch.allclose(b.grad, b2.grad)
    saved = _saved_storages(swiglu, a, b)
    assert len(saved) == 2 and saved[0] is a and saved[1] is b


def test_scaled_swiglu_matches_autograd_and_keeps_its_inputs_and_scale():
    """A routed expert's gate weight scales the SwiGLU output (model/swiglu.py): same values and gradients as
    scaling the expert's output, without keeping that output."""
    torch.manual_seed(0)
    a, b = (torch.randn(7, 33, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = torch.rand(7, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 33, dtype=torch.float64)
    dy = torch.randn(7, 5, dtype=torch.float64)
    (swiglu(a, b, g) @ w2.t()).backward(dy)
    a2, b2, g2 = (t.detach().clone().requires_grad_() for t in (a, b, g))
    ((F.silu(a2) * b2) @ w2.t() * g2.unsqueeze(-1)).backward(dy)  # the gate weight on the expert's output
    for ours, ref in ((a, a2), (b, b2), (g, g2)):
        assert torch.allclose(ours.grad, ref.grad)
    saved = _saved_storages(swiglu, a, b, g)
    assert len(saved) == 3 and saved[0] is a and saved[1] is b and saved[2] is g


def test_scatter_add_keeps_only_the_index():
    torch.manual_seed(0)
    y = torch.randn(12, 16, dtype=torch.bfloat16, requires_grad=True)
    token = torch.randint(0, 5, (12,))
    dout = torch.randn(5, 16, dtype=torch.bfloat16)
    out = _ScatterAddFn.apply(y, token, 5)
    out.backward(dout)
    ref = torch.zeros(5, 16).index_add(0, token, y.detach().float()).bfloat16()
    assert torch.equal(out, ref) and torch.equal(y.grad, dout.index_select(0, token))
    saved = _saved_storages(_ScatterAddFn.apply, y, token, 5)
    assert len(saved) == 1 and saved[0] is token


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_recomputed_norm_outputs_give_the_same_gradients_and_are_not_kept(fp8):
    """recompute_norm (model/norm.py): the GEMMs after a norm keep a note instead of its output and get it
    recomputed in backward; losses and gradients are bitwise those of keeping it, and less is saved."""
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    results = {}
    for recompute in (False, True):
        torch.manual_seed(3)
        model = Transformer(small_config(recompute_norm=recompute))
        cast_for_compute(model, torch.bfloat16)
        if fp8:
            apply_fp8(model, FP8Config(recipe="emulate"))
        nbytes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (nbytes.append(t.untyped_storage().nbytes()), t)[1],
                                                      lambda t: t):
            loss = model.loss(tokens, tokens.roll(-1, 1), mtp_lambda=0.3).loss
        loss.backward()
        results[recompute] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                              sum(nbytes))
    (loss0, grads0, kept0), (loss1, grads1, kept1) = results[False], results[True]
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert kept1 < kept0
