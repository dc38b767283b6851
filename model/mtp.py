"""Multi-token prediction (paper 2.2): D sequential modules sharing the embedding and output head.

The loss over the depths is assembled by `Transformer.loss`; the modules can be dropped for inference.
"""

from __future__ import annotations

import torch
from torch import nn

from model.block import Block
from model.config import ModelConfig
from model.linear import Linear
from model.norm import RMSNorm


class MTPModule(nn.Module):
    """Multi-token prediction module k (paper 2.2): h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
    then one Transformer block; `norm` precedes the shared output head. Names follow DeepSeek's checkpoint.
    """

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.recompute_norm)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.recompute_norm)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim)  # M_k, embedding half first
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.recompute_norm)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, mask)
