"""A Transformer block (paper 2.1): MLA then a dense FFN or DeepSeekMoE, each behind an RMSNorm.

A MoE block runs as five phases (DESIGN.md principle 3):

    attn_router: x = x + MLA(norm(x)); h = norm(x); route h          (compute)
    dispatch:    rows for the experts' owners                        (communication under EP)
    experts:     routed experts on the rows, shared experts on h     (compute)
    combine:     expert outputs back to their tokens                 (communication under EP)
    residual:    x + shared + routed

`steps` is the block's forward as a generator that pauses right after each all-to-all is launched, before
waiting for it: a pipeline scheduler resumes it while another micro-batch's backward computes, so the
exchange runs behind that compute (DualPipe's overlapped chunk, paper 3.2.1; parallel/pipeline/overlap.py).
`forward` runs the same steps without pausing, so both are one computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import TypeVar

import torch
from torch import nn

from model.config import ModelConfig
from model.mla import MLA
from model.moe import MLP, Dispatched, MoE
from model.norm import RMSNorm, recomputed_norm_outputs


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.recompute_norm)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.recompute_norm)
        self.is_moe = layer_id >= cfg.first_k_dense
        self.ffn = MoE(cfg) if self.is_moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return run_steps(self.steps(x, cos, sin, mask))

    def steps(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: torch.Tensor | None = None) -> Generator[None, None, torch.Tensor]:
        """The forward, pausing (yield) after launching the dispatch and after launching the combine."""
        if not self.is_moe:
            with self._recompute():
                x = x + self.attn(self.attn_norm(x), cos, sin, mask)
                return x + self.ffn(self.ffn_norm(x))
        x, h, idx, w = self.attn_router(x, cos, sin, mask)
        exchange = self.ffn.dispatcher.dispatch_async(h.flatten(0, 1), idx, w)
        yield
        arrived = exchange.wait()
        y, shared = self.experts(arrived, h)
        exchange = self.ffn.dispatcher.combine_async(y, arrived.layout)
        yield
        return self.residual(x, shared, exchange.wait())

    def _recompute(self) -> contextlib.AbstractContextManager:
        """Around each compute phase (never across a pause): with recompute_norm, the norms' outputs that the
        phase's GEMMs read are recomputed in backward instead of kept (model/norm.py)."""
        return recomputed_norm_outputs() if self.attn_norm.recompute else contextlib.nullcontext()

    # ---- MoE compute phases (dispatch and combine are the dispatcher's) -----------------------------------
    def attn_router(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
        """-> x after attention [B, T, dim], h = norm(x) with the balance loss attached, ids/weights [B*T, K]."""
        with self._recompute():
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
            h, idx, w = self.ffn.route(self.ffn_norm(x))
        return x, h, idx, w

    def experts(self, arrived: Dispatched, h: torch.Tensor):
        """-> weighted routed outputs per dispatched row [R, dim], shared-expert output [B, T, dim] (or None)."""
        with self._recompute():
            shared = self.ffn.shared_experts(h) if self.ffn.shared_experts is not None else None
        return self.ffn.experts(arrived.rows, arrived.expert_ids, arrived.weights, arrived.packed,
                                arrived.expert_counts, arrived.complete), shared

    def residual(self, x: torch.Tensor, shared: torch.Tensor | None, routed: torch.Tensor) -> torch.Tensor:
        routed = routed.view_as(x)
        return x + (routed if shared is None else shared + routed)


T = TypeVar("T")


def run_steps(steps: Generator[None, None, T]) -> T:
    """Run a `steps` generator to its end without pausing; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
