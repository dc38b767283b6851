"""Cross-entropy of the output head, fused with the head's GEMM and computed in row chunks.

The logits of a large vocabulary dominate activation memory (4K tokens x 129,280 vocab is 2 GiB in fp32
per micro-batch) and, on small models, the step time. This function never keeps them: for each chunk of
rows it computes the logits, the loss, and at once the gradient of the loss w.r.t. the hidden states and the
head weight (softmax minus one-hot, the only thing backward would need the logits for). Backward then only
scales those gradients by the incoming scalar. Same three GEMMs as the unfused head, no logits stored, no
log-softmax backward. Written by hand because PyTorch has no fused linear cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.linear import Linear, return_or_defer

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 21  # logits elements per chunk (8 MiB in fp32: stays in cache, measured faster)
MIN_CHUNK_ROWS = 32  # keep the head GEMM efficient for very large vocabularies


def _chunks(n_rows: int, vocab: int) -> list[tuple[int, int]]:
    step = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)
    return [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, head: Linear) -> torch.Tensor:
        w = weight.to(h.dtype)
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum().clamp_min(1)
        targets = labels.clamp_min(0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        for s, e in _chunks(h.shape[0], w.shape[0]):
            logits = (h[s:e] @ w.t()).float()  # (c, V)
            target_logit = logits.gather(1, targets[s:e, None]).squeeze(1)
            # one pass of exp serves both the log-sum-exp and the softmax
            row_max = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(row_max).exp_()  # (c, V), unnormalised softmax
            denom = grad.sum(dim=-1, keepdim=True)
            lse = (row_max + denom.log()).squeeze(1)
            total += ((lse - target_logit) * valid[s:e]).sum()
            # d loss / d logits = (softmax - onehot) * valid / n_valid
            grad *= (valid[s:e].float() / n_valid)[:, None] / denom
            grad[torch.arange(e - s, device=h.device), targets[s:e]] -= valid[s:e].float() / n_valid
            grad = grad.to(h.dtype)
            if dh is not None:
                dh[s:e] = grad @ w
            if dw is not None:
                if h.dtype == torch.float32:
                    dw.addmm_(grad.t(), h[s:e])
                else:  # low-precision GEMM, fp32 accumulation across chunks
                    dw += (grad.t() @ h[s:e]).float()
        ctx.save_for_backward(dh, dw)
        ctx.head = head
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh, dw = ctx.saved_tensors
        head: Linear = ctx.head
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        if dw is None:
            return dh, None, None, None
        dtype = head.weight.dtype
        return dh, return_or_defer(head, lambda: (dw * grad_loss).to(dtype)), None, None  # deferrable like any W


def linear_cross_entropy(h: torch.Tensor, head: Linear, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(head(h)) against labels, ignoring IGNORE_INDEX.

    h [..., dim], head.weight [vocab, dim], labels [...] -> scalar fp32.
    """
    h2, labels, weight = h.reshape(-1, h.shape[-1]), labels.reshape(-1), head.weight
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h2, weight, labels, head)
    total = h2.new_zeros((), dtype=torch.float32)
    for s, e in _chunks(h2.shape[0], weight.shape[0]):
        logits = (h2[s:e] @ weight.to(h2.dtype).t()).float()
        total += F.cross_entropy(logits, labels[s:e], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)
