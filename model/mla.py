"""Multi-head Latent Attention (paper 2.1.1, equations 1-11).

Keys and values come from a compressed latent c_KV = W_DKV h (with its RMSNorm) through the up-projection
W_UK/W_UV (one matrix, `wkv_b`); the query from a compressed latent c_Q = W_DQ h (with its RMSNorm) through
W_UQ (`wq_b`), or directly from h when `q_lora_rank` is None. A decoupled RoPE key k^R = RoPE(W_KR h) is
shared by all heads. Attention runs through `scaled_dot_product_attention`, causal; packed documents see
each other unless a per-document mask is given (paper 4.2 trains without one).

With `recompute_mla_up_proj` (paper 3.2.3) only the latents are kept for backward: the up-projections are
run again during back-propagation. Because the attention kernel keeps its own inputs (the up-projected q, k,
v) for backward, the recomputed region also spans the core attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.linear import Linear
from model.norm import RMSNorm
from model.rope import apply_rope, softmax_scale

# DeepSeek's reference code and transformers build the latent norms with the default epsilon, whatever
# rms_norm_eps says; matching them keeps checkpoints interchangeable.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        self.q_lora_rank = cfg.q_lora_rank
        self.recompute_up_proj = cfg.recompute_mla_up_proj
        self.softmax_scale = softmax_scale(cfg)
        if cfg.q_lora_rank is None:
            self.wq = Linear(cfg.dim, cfg.n_heads * cfg.qk_head_dim)  # W_Q
        else:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank)  # W_DQ
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, cfg.recompute_norm)
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim)  # W_UQ and W_QR
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # W_DKV and W_KR
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, cfg.recompute_norm)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))  # W_UK, W_UV
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim)  # W_O

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim], cos/sin [T, rope/2], mask None (causal) or bool [B, 1, T, T] (True = attend)."""
        q_in = x if self.q_lora_rank is None else self.wq_a(x)  # (B, T, dim | q_lora)
        kv = self.wkv_a(x)  # (B, T, kv_lora + rope)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.recompute_up_proj and torch.is_grad_enabled():
            o = checkpoint(self._attend, q_in, c_kv, k_pe, cos, sin, mask, use_reentrant=False)
        else:
            o = self._attend(q_in, c_kv, k_pe, cos, sin, mask)
        return self.wo(o)

    def _attend(self, q_in: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = q_in.shape
        H = self.n_heads
        q = self.wq(q_in) if self.q_lora_rank is None else self.wq_b(self.q_norm(q_in))
        q = q.view(B, T, H, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)  # (B, T, H, qk_head_dim)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).expand(B, T, H, self.qk_rope_head_dim)
        k = torch.cat([k_nope, k_pe], dim=-1)  # (B, T, H, qk_head_dim)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
        )  # (B, H, T, v_head_dim)
        return o.transpose(1, 2).reshape(B, T, H * self.v_head_dim)
