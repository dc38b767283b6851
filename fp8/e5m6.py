"""The E5M6 cache format (paper 3.3): the input of the Linear after attention is kept for the backward pass in a
12-bit floating-point format with power-of-two scales, finer than E4M3 because this activation is sensitive.

The paper does not give the bit layout; we assume the IEEE-like one:

    code = sign << 11 | exponent << 6 | mantissa         (12 bits; exponent bias 15)
    exponent 1..30   (1 + mantissa / 64) * 2^(exponent - 15)
    exponent 0       mantissa * 2^-20                      (subnormals, down to 2^-20)
    exponent 31      inf (mantissa 0) or NaN (mantissa 63 is the one we write)

so the largest finite value E5M6_MAX is 2^15 * (1 + 63/64) = 65024. Rounding from fp32 is to nearest, ties to
even, done exactly: the value's quantum 2^(max(floor(log2 |x|), -14) - 6) is a power of two, so |x| / quantum is
exact, `torch.round` rounds it half-to-even, and a carry to 128 quanta lands on the next binade by itself. Finite
values beyond E5M6_MAX saturate to +-E5M6_MAX; inf stays inf and NaN stays NaN (never vanish).

Storage: two codes in three bytes along the last dimension (an odd length gets one zero code of padding):

    byte 0 = c0 & 0xFF,   byte 1 = (c0 >> 8) | (c1 & 0xF) << 4,   byte 2 = c1 >> 4

Scaling: one power-of-two scale per 1x128 tile (per token, per 128 channels), from the tile's amax as in
fp8/quant.py, so that the tile's largest element lands in the format's top binade; the stored scale is the
dequantisation multiplier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8.quant import AMAX_FLOOR, GROUP, pow2_ceil

E5M6_MAX = 65024.0
_MIN_NORMAL_EXP = -14
_MANTISSA_BITS = 6
_NAN_CODE, _INF_CODE = 0x7FF, 0x7C0  # exponent 31 with mantissa 63 / 0 (sign 0)


def round_e5m6(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to the nearest E5M6 value (ties to even), finite overflow saturated; fp32."""
    x = x.float()
    a = x.abs()
    _, e = torch.frexp(a)  # a = m 2^e, m in [0.5, 1): floor(log2 a) = e - 1
    quantum = torch.ldexp(torch.ones_like(a), (e - 1).clamp_min(_MIN_NORMAL_EXP) - _MANTISSA_BITS)
    r = torch.round(a / quantum) * quantum
    r = torch.where(torch.isfinite(a), r.clamp_max(E5M6_MAX), a)
    return torch.copysign(r, x)


def encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 values (already scaled) -> 12-bit E5M6 codes (int16)."""
    r = round_e5m6(x)
    a = r.abs()
    _, e = torch.frexp(a)
    exp = torch.where(a == 0, 0, (e - 1 + 15).clamp_min(0))  # biased exponent; 0 for subnormals and zero
    normal = exp > 0
    mant = torch.where(normal, torch.ldexp(a, -(e - 1)) - 1, torch.ldexp(a, torch.full_like(e, 20)))
    mant = torch.where(normal, mant * 64, mant)
    code = torch.where(normal, exp.to(torch.int32) << 6, torch.zeros_like(e, dtype=torch.int32))
    code = code | mant.to(torch.int32)
    code = torch.where(torch.isinf(a), _INF_CODE, code)
    code = torch.where(torch.isnan(a), _NAN_CODE, code)
    return (code | (torch.signbit(r).to(torch.int32) << 11)).to(torch.int16)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """12-bit E5M6 codes -> fp32 values (exact)."""
    c = codes.to(torch.int32)
    sign = torch.where((c >> 11) & 1 == 1, -1.0, 1.0)
    exp, mant = (c >> 6) & 0x1F, (c & 0x3F).float()
    normal = torch.ldexp(1 + mant / 64, exp - 15)
    sub = torch.ldexp(mant, torch.full_like(exp, -20))
    value = torch.where(exp == 0, sub, normal)
    value = torch.where(exp == 31, torch.where(mant == 0, torch.inf, torch.nan), value)
    return sign * value


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., n] -> bytes [..., 3 * ceil(n / 2)] (uint8), two codes in three bytes."""
    c = codes.to(torch.int32) & 0xFFF
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    c0, c1 = c[..., 0::2], c[..., 1::2]
    out = torch.stack([c0 & 0xFF, (c0 >> 8) | ((c1 & 0xF) << 4), c1 >> 4], dim=-1)
    return out.flatten(-2).to(torch.uint8)


def unpack(data: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack`: bytes [..., 3 * ceil(n / 2)] -> codes [..., n] (int16)."""
    b = data.to(torch.int32).unflatten(-1, (-1, 3))
    c0 = b[..., 0] | ((b[..., 1] & 0xF) << 8)
    c1 = (b[..., 1] >> 4) | (b[..., 2] << 4)
    return torch.stack([c0, c1], dim=-1).flatten(-2)[..., :n].to(torch.int16)


def _tiles(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    k = x.shape[-1]
    kb = -(-k // GROUP)
    return F.pad(x.float(), (0, kb * GROUP - k)).unflatten(-1, (kb, GROUP)), k


def quantize_e5m6_1x128(x: torch.Tensor, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed E5M6 codes uint8 [..., 3 ceil(K/2)], fp32 scales [..., ceil(K/128)]): one scale per
    row per 128 columns, amax floored at AMAX_FLOOR; power-of-two by default."""
    g, k = _tiles(x)
    scale = g.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / E5M6_MAX  # NaN propagates
    if pow2:
        scale = pow2_ceil(scale)
    codes = encode((g / scale[..., None]).flatten(-2)[..., :k])
    return pack(codes), scale


def dequantize_e5m6_1x128(packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `quantize_e5m6_1x128` for K = k columns: fp32 [..., k]."""
    values = decode(unpack(packed, k))
    return values * scale.float().repeat_interleave(GROUP, dim=-1)[..., :k]
