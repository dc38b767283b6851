"""Rotary position embedding for MLA's decoupled key/query (paper 2.1.1), with YaRN scaling (paper 4.3).

Pairs are interleaved, (x0, x1), (x2, x3), ..., as in DeepSeek's checkpoints. YaRN follows Hugging Face's
`rope_scaling` semantics (type "yarn"): frequencies blended between extrapolation and interpolation by a
linear ramp over the correction range [beta_fast, beta_slow], cos/sin multiplied by
mscale(s, mscale) / mscale(s, mscale_all_dim) (or mscale(s) when either is 0), and the softmax scale
multiplied by mscale(s, mscale_all_dim)^2.
"""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(s) + 1, the YaRN attention temperature (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [rope_dim/2] and the cos/sin multiplier."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    yarn = cfg.yarn
    if yarn is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        # the channel index whose wavelength makes `rotations` turns over the original context
        return dim * math.log(yarn.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # keep the ramp finite
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 = keep the original frequency (high-frequency channels)
    inv_freq = inv_freq / yarn.factor * (1 - extrapolate) + inv_freq * extrapolate
    if yarn.mscale and yarn.mscale_all_dim:
        attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:  # YaRN's own temperature when the pair is not given (Hugging Face semantics)
        attention_factor = yarn_mscale(yarn.factor)
    return inv_freq, attention_factor


def rope_tables(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, rope_dim/2] in fp32."""
    inv_freq, attention_factor = inv_frequencies(cfg)
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, rope_dim/2)
    return (freqs.cos() * attention_factor).to(device), (freqs.sin() * attention_factor).to(device)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn is not None and cfg.yarn.mscale_all_dim:
        scale *= yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, rope_dim] by cos/sin [T, rope_dim/2]."""
    xp = x.unflatten(-1, (-1, 2))  # (B, T, H, rope_dim/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, rope_dim/2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
