"""Cross-entropy of the output head, fused with the head's GEMM and computed in row chunks (the head stays in
BF16/FP32, paper 3.3; its weight gradient is accumulated in FP32).

The logits of a large vocabulary dominate activation memory (4K tokens x 129,280 vocab is 2 GiB in fp32 per
micro-batch), so they are never materialised whole. Forward computes each chunk's logits and its loss (one fused
log-softmax) and keeps nothing but its inputs. Backward recomputes each chunk's logits from the saved hidden
states and the head weight, turns them into d loss / d logits = (softmax - onehot) * valid / n_valid with one
fused softmax, and takes the gradients of the hidden states and of the weight from them (the rows' scale
valid / n_valid is applied to the dim-sized operands, not to the vocabulary-sized chunk). Nothing of the
vocabulary's size outlives a chunk: the weight gradient (vocab x dim in fp32, 3.7 GB for DeepSeek-V3) exists only
inside backward; made in forward, one would live per live micro-batch (bench/multipliers.py). The price is one
more GEMM, the recomputed logits (a third more of the head's GEMM work); fused (log-)softmax kernels instead of
separate max, exp and sum passes win part of it back.

The weight gradient goes through `model.linear.return_or_defer`: with a deferred W (a pipeline's zero-bubble
"W") the queued closure holds the hidden states and the rows' scale and recomputes the logits when the W runs
(one GEMM more again, in the W, which the schedule places where the pipeline would idle); it is added into the
fp32 `main_grad` directly when the weight has one (model/grads.py), returned to autograd otherwise.

Chunks adapt to the device: on CPU a chunk's logits stay in cache (CHUNK_ELEMENTS); on GPU a chunk is about
GPU_CHUNK_BYTES of fp32 logits (2048 rows at vocab 129,280), so that each pass over the head weight feeds
thousands of rows. Written by hand because PyTorch has no fused linear cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.linear import Linear, return_or_defer

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 21  # CPU: logits elements per chunk (8 MiB in fp32: stays in cache, measured faster)
MIN_CHUNK_ROWS = 32  # CPU: keep the head GEMM efficient for very large vocabularies
GPU_CHUNK_BYTES = 1 << 30  # GPU: fp32 logits per chunk (its transients peak at about twice that)
GPU_ROW_MULTIPLE = 128  # GPU: chunk rows rounded down to whole GEMM tiles


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of the hidden states per chunk for this vocabulary on this device."""
    if device.type == "cpu":
        return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)
    rows = GPU_CHUNK_BYTES // (4 * vocab)
    return max(GPU_ROW_MULTIPLE, rows - rows % GPU_ROW_MULTIPLE)


def _chunks(n_rows: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _acc_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, torch.float32)


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A chunk's logits in at least fp32 (float64 stays float64)."""
    return (h @ w.t()).to(_acc_dtype(h))


def _softmax(logits: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(Log-)softmax over the vocabulary, one fused kernel. In place on CPU, whose kernel reads a row whole before
    writing it and where a fresh chunk-sized buffer costs its page faults (12% of the head's time, measured)."""
    fn = torch.log_softmax if log else torch.softmax
    return fn(logits, dim=-1, out=logits) if logits.device.type == "cpu" else fn(logits, dim=-1)


def _dlogits(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax - onehot of a chunk, recomputed from h and w, in h's dtype; the rows' scale is applied to the
    GEMMs' dim-sized operands instead (dh rows, h rows), which saves a pass over the vocabulary."""
    p = _softmax(_logits(h, w))
    p[torch.arange(h.shape[0], device=h.device), targets] -= 1
    return p.to(h.dtype)


def _scaled(t: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    return (t.to(row_scale.dtype) * row_scale[:, None]).to(t.dtype)


def _add_wgrad(dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor, row_scale: torch.Tensor) -> None:
    hs = _scaled(h, row_scale)
    if h.dtype == dw.dtype:
        dw.addmm_(g.t(), hs)
    else:  # low-precision GEMM, fp32 accumulation across chunks
        dw += (g.t() @ hs).to(dw.dtype)


def _head_wgrad(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                step: int) -> torch.Tensor:
    """The head's weight gradient alone (a deferred W): logits recomputed chunk by chunk, fp32 accumulation."""
    w = weight.to(h.dtype)
    dw = torch.zeros(w.shape, dtype=_acc_dtype(h), device=h.device)
    for s, e in _chunks(h.shape[0], step):
        _add_wgrad(dw, _dlogits(h[s:e], w, targets[s:e]), h[s:e], row_scale[s:e])
    return dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, head: Linear,
                step: int) -> torch.Tensor:
        w = weight.to(h.dtype)
        valid = labels != IGNORE_INDEX
        targets = labels.clamp_min(0)
        total = torch.zeros((), dtype=_acc_dtype(h), device=h.device)
        for s, e in _chunks(h.shape[0], step):
            picked = _softmax(_logits(h[s:e], w), log=True).gather(1, targets[s:e, None]).squeeze(1)
            total -= torch.where(valid[s:e], picked, 0).sum()
        n_valid = valid.sum().clamp_min(1)
        ctx.save_for_backward(h, weight, labels, n_valid)
        ctx.head, ctx.step = head, step
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        h, weight, labels, n_valid = ctx.saved_tensors
        head: Linear = ctx.head
        step, targets = ctx.step, labels.clamp_min(0)
        acc = _acc_dtype(h)
        row_scale = (labels != IGNORE_INDEX).to(acc) * (grad_loss.to(acc) / n_valid)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        deferred = head.wgrad_store is not None
        w = weight.to(h.dtype)
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros(w.shape, dtype=acc, device=h.device) if need_dw and not deferred else None
        if need_dh or dw is not None:
            for s, e in _chunks(h.shape[0], step):
                g = _dlogits(h[s:e], w, targets[s:e])
                if dh is not None:
                    dh[s:e] = _scaled(g @ w, row_scale[s:e])
                if dw is not None:
                    _add_wgrad(dw, g, h[s:e], row_scale[s:e])
        if not need_dw:
            return dh, None, None, None, None
        # deferred: the W recomputes the logits then; it holds h and the rows' scale, nothing vocabulary-sized
        wgrad = (lambda: dw) if dw is not None else (lambda: _head_wgrad(h, weight, targets, row_scale, step))
        fp32_main = hasattr(head.weight, "main_grad")  # add the fp32 gradient there, not through a bf16 .grad
        dtype = head.weight.dtype
        grad_w = return_or_defer(head, wgrad if fp32_main else (lambda: wgrad().to(dtype)),
                                 through_autograd=not fp32_main)
        return dh, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, head: Linear, labels: torch.Tensor,
                         rows_per_chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of softmax(head(h)) against labels, ignoring IGNORE_INDEX.

    h [..., dim], head.weight [vocab, dim], labels [...] -> scalar in fp32 (float64 for float64 h).
    `rows_per_chunk`: rows per chunk, `chunk_rows(vocab, device)` when None.
    """
    h2, labels, weight = h.reshape(-1, h.shape[-1]), labels.reshape(-1), head.weight
    step = rows_per_chunk or chunk_rows(weight.shape[0], h.device)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h2, weight, labels, head, step)
    total = h2.new_zeros((), dtype=_acc_dtype(h2))
    for s, e in _chunks(h2.shape[0], step):
        logits = _logits(h2[s:e], weight.to(h2.dtype))
        total += F.cross_entropy(logits, labels[s:e], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)
