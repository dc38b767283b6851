"""The fused head + cross-entropy (model/loss.py): loss and both gradients equal plain float64 autograd of
F.cross_entropy(h @ W.T) for any chunk size, with ignored labels; nothing vocabulary-sized is kept between forward
and backward (the weight gradient is made in backward); a deferred W equals the immediate one bitwise and holds
nothing vocabulary-sized either; an fp32 main gradient receives the weight gradient in fp32; chunk sizes per
device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.grads import attach_main_grads
from model.linear import Linear, WeightGradStore
from model.loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy

DIM, VOCAB = 24, 70


def _case(dtype: torch.dtype = torch.float64, rows: int = 23, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = Linear(DIM, VOCAB, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64) * 0.5)
    h = (torch.randn(rows, DIM, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (rows,), generator=g)
    labels[[1, 5, 6, rows - 1]] = IGNORE_INDEX
    return head, h, labels


def _reference(head: Linear, h: torch.Tensor, labels: torch.Tensor, scale: float):
    h64 = h.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.t(), labels, ignore_index=IGNORE_INDEX)
    (loss * scale).backward()
    return loss.detach(), h64.grad, w64.grad


def _walk_tensors(obj, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from a queued closure (through cells, functions, containers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _walk_tensors(o, seen)]
    out = []
    for cell in getattr(obj, "__closure__", None) or ():
        out += _walk_tensors(cell.cell_contents, seen)
    return out


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 7, 23, 64, None])
def test_loss_and_both_gradients_equal_float64_cross_entropy(rows_per_chunk):
    head, h, labels = _case()
    loss = linear_cross_entropy(h, head, labels, rows_per_chunk)
    (loss * 3.0).backward()
    ref_loss, ref_dh, ref_dw = _reference(head, h, labels, 3.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(head.weight.grad, ref_dw, rtol=1e-10, atol=1e-13)
    assert not h.grad[[1, 5, 6, 22]].any()  # ignored rows get no gradient
    with torch.no_grad():  # the forward-only path agrees
        torch.testing.assert_close(linear_cross_entropy(h, head, labels, rows_per_chunk), loss.detach())


def test_fp32_head_is_within_float_tolerance_of_float64():
    head, h, labels = _case(torch.float32, rows=300)
    loss = linear_cross_entropy(h, head, labels, rows_per_chunk=64)
    loss.backward()
    ref_loss, ref_dh, ref_dw = _reference(head, h, labels, 1.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad.double(), ref_dh, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(head.weight.grad.double(), ref_dw, rtol=1e-5, atol=1e-8)


def test_every_label_ignored_gives_zero_loss_and_gradients():
    head, h, labels = _case()
    labels[:] = IGNORE_INDEX
    loss = linear_cross_entropy(h, head, labels, 4)
    loss.backward()
    assert loss.item() == 0 and not h.grad.any() and not head.weight.grad.any()


def test_nothing_vocabulary_sized_is_kept_for_backward():
    """Between forward and backward the head keeps its inputs (h, labels; the weight is the parameter itself) and
    a scalar: no logits, no weight gradient."""
    head, h, labels = _case(torch.float32, rows=40)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(h, head, labels, rows_per_chunk=8)
    kept = [t for t in saved if t.data_ptr() != head.weight.data_ptr()]
    assert sum(t.nbytes for t in kept) <= h.nbytes + labels.nbytes + 8
    assert all(t.numel() <= h.numel() for t in kept)
    loss.backward()


def test_deferred_weight_gradient_is_bitwise_the_immediate_one_and_holds_nothing_vocabulary_sized():
    head, h, labels = _case(torch.float32, rows=50)
    linear_cross_entropy(h, head, labels, rows_per_chunk=16).mul(0.7).backward()
    dh, dw = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    store = head.wgrad_store = WeightGradStore()
    linear_cross_entropy(h, head, labels, rows_per_chunk=16).mul(0.7).backward()
    assert head.weight.grad is None and len(store) == 1  # B ran, W waits
    held = [t for t in _walk_tensors(store._queue) if t is not head.weight]
    assert held and all(t.numel() <= h.numel() for t in held)  # h, labels, the rows' scale: no vocab x dim
    store.flush()
    assert torch.equal(h.grad, dh) and torch.equal(head.weight.grad, dw)


@pytest.mark.parametrize("defer", [False, True])
def test_bf16_weight_gradient_lands_in_the_fp32_main_grad(defer):
    head, h, labels = _case(torch.bfloat16, rows=64)
    ref_loss, ref_dh, ref_dw = _reference(head, h, labels, 1.0)  # of the same bf16 values
    attach_main_grads(head.parameters())
    store = WeightGradStore()
    head.wgrad_store = store if defer else None
    hb = h.detach().requires_grad_()
    linear_cross_entropy(hb, head, labels, rows_per_chunk=16).backward()
    store.flush()
    assert head.weight.grad is None and head.weight.main_grad.dtype == torch.float32
    for got, want in ((head.weight.main_grad, ref_dw), (hb.grad, ref_dh)):  # bf16 GEMMs: ~1% in norm
        assert (got.double() - want).norm() < 2e-2 * want.norm()


def test_chunk_rows_follow_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(8192, cpu) == 256 and chunk_rows(129280, cpu) == 32  # a chunk's logits stay in cache
    assert chunk_rows(129280, gpu) == 2048  # 1 GiB of fp32 logits, whole 128-row tiles
    assert chunk_rows(8192, gpu) % 128 == 0 and chunk_rows(8192, gpu) >= 2048
