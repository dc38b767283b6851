"""A Transformer block (paper 2.1): MLA then a dense FFN or DeepSeekMoE, each behind an RMSNorm.

A MoE block runs as five phases (DESIGN.md principle 3), which `forward` calls in order and a pipeline
scheduler may interleave with another micro-batch's phases (model/phases.py runs them one at a time):

    attn_router: x = x + MLA(norm(x)); h = norm(x); route h          (compute)
    dispatch:    rows for the experts' owners                        (communication under EP)
    experts:     routed experts on the rows, shared experts on h     (compute)
    combine:     expert outputs back to their tokens                 (communication under EP)
    residual:    x + shared + routed
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.mla import MLA
from model.moe import MLP, MoE
from model.norm import RMSNorm


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
        if not self.is_moe:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
            return x + self.ffn(self.ffn_norm(x))
        x, h, idx, w = self.attn_router(x, cos, sin, mask)
        rows, ids, rw, layout = self.dispatch(h, idx, w)
        y, shared = self.experts(rows, ids, rw, h)
        return self.residual(x, shared, self.combine(y, layout))

    # ---- MoE phases -------------------------------------------------------------------------------
    def attn_router(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
        """-> x after attention [B, T, dim], h = norm(x) with the balance loss attached, ids/weights [B*T, K]."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        h, idx, w = self.ffn.route(self.ffn_norm(x))
        return x, h, idx, w

    def dispatch(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
        """-> rows [R, dim], local expert ids [R, K], weights [R, K], layout (opaque, for combine)."""
        return self.ffn.dispatcher.dispatch(h.flatten(0, 1), idx, w)

    def experts(self, rows: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, h: torch.Tensor):
        """-> weighted routed outputs per row [R, dim], shared-expert output [B, T, dim] (or None)."""
        shared = self.ffn.shared_experts(h) if self.ffn.shared_experts is not None else None
        return self.ffn.experts(rows, ids, w), shared

    def combine(self, y: torch.Tensor, layout: object) -> torch.Tensor:
        """-> routed output per token [B*T, dim]."""
        return self.ffn.dispatcher.combine(y, layout)

    def residual(self, x: torch.Tensor, shared: torch.Tensor | None, routed: torch.Tensor) -> torch.Tensor:
        routed = routed.view_as(x)
        return x + (routed if shared is None else shared + routed)
