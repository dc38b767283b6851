"""Fine-grained FP8 quantisation (paper 3.3): E4M3 values with one fp32 scale per small group of elements.

Every operand of an FP8 GEMM is quantised online, from the current max-abs of its own group:

    1x128    one row x 128 columns: per token per 128 channels   activations and activation gradients (Fprop, Dgrad)
    128x128  128 rows x 128 columns                               weights [out, in] (Fprop, Dgrad)
    128x1    128 rows x one column: over 128 tokens per channel   both operands of Wgrad, whose K is the token axis

Scale rule, per group. A tail group (a dimension not a multiple of 128) is padded with zeros first, so padding never
changes its max. amax = max |x| over the group, floored at AMAX_FLOOR so that an all-zero group gets a finite scale
(and q = 0) instead of 0 / 0. Then

    pow2=True    scale = 2^ceil(log2(amax / 448)), found exactly from the bits of the fp32 ratio (no float log2)
    pow2=False   scale = amax / 448 in fp32

and q = clamp(x / scale, -448, 448) cast to E4M3 (round to nearest, ties to even), the division done in fp32 whatever
the input dtype. 448 (E4M3_MAX) is E4M3's largest finite value; with the clamp, the rounding of amax / 448 can never
push an element past it.

The scale stored is the DEquantisation multiplier: x ~= q.float() * scale (`dequantize`). A power-of-two scale makes
that multiply exact, so dequantised values are FP8 values times 2^k and quantising them again loses nothing.
q always has the input's shape; scales are fp32, one per group.

Non-finite input never vanishes. A NaN anywhere in a group makes the group's amax, hence its scale, NaN, and every
q of the group is E4M3's NaN (x / NaN). An inf makes the group's scale inf: its inf elements become NaN (inf / inf),
the others 0, and the group dequantises to NaN everywhere (0 * inf). Other groups are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0  # largest finite E4M3 value: 2^8 * 1.75 (byte 0x7E)
AMAX_FLOOR = 1e-4  # smallest amax a scale is computed from (all-zero groups)
GROUP = 128  # the paper's group length (and N_C, the accumulation interval of the GEMM)
BLOCKS = ((1, GROUP), (GROUP, GROUP), (GROUP, 1))  # the three group shapes, as (rows, columns)
FP8 = torch.float8_e4m3fn


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """The final cast of already-scaled values: clamp to [-448, 448], then round to nearest E4M3 (ties to even).
    NaN stays NaN; +-inf saturates to +-448."""
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def pow2_ceil(r: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 r), exactly, for positive normal fp32 r; non-finite r (NaN, inf) is returned unchanged.

    frexp gives r = m * 2^e with m in [0.5, 1): r is a power of two iff m == 0.5, and then ceil(log2 r) = e - 1;
    otherwise it is e. The power of two is built from its exponent bits, so nothing is rounded."""
    m, e = torch.frexp(r.float())
    e = e - (m == 0.5).to(e.dtype)
    p = ((e + 127) << 23).view(torch.float32)  # sign 0, biased exponent e + 127, mantissa 0
    return torch.where(torch.isfinite(r), p, r.float())


def _quantize(x: torch.Tensor, rows: int, cols: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D x in groups of rows x cols: q [M, K] E4M3, scale [ceil(M/rows), ceil(K/cols)] fp32."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor for {rows}x{cols} groups, got shape {tuple(x.shape)}")
    m, k = x.shape
    mb, kb = -(-m // rows), -(-k // cols)
    g = F.pad(x.float(), (0, kb * cols - k, 0, mb * rows - m)).view(mb, rows, kb, cols)  # zero-padded groups
    amax = g.abs().amax(dim=(1, 3))  # [mb, kb]; NaN propagates
    scale = amax.clamp_min(AMAX_FLOOR) / E4M3_MAX
    if pow2:
        scale = pow2_ceil(scale)
    q = to_e4m3(g / scale[:, None, :, None]).view(mb * rows, kb * cols)[:m, :k]
    return q.contiguous(), scale


def quantize_1x128(x: torch.Tensor, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> q [..., K] E4M3, scale [..., ceil(K/128)]: one scale per row per 128 columns."""
    if x.dim() == 0:
        raise ValueError("quantize_1x128 needs at least one dimension")
    q, scale = _quantize(x.reshape(-1, x.shape[-1]), 1, GROUP, pow2)
    return q.view(x.shape), scale.view(*x.shape[:-1], scale.shape[-1])


def quantize_128x128(w: torch.Tensor, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> q [N, K] E4M3, scale [ceil(N/128), ceil(K/128)]: one scale per 128x128 block."""
    return _quantize(w, GROUP, GROUP, pow2)


def quantize_128x1(x: torch.Tensor, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> q [M, K] E4M3, scale [ceil(M/128), K]: one scale per 128 rows (tokens) of each column."""
    return _quantize(x, GROUP, 1, pow2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q.float() * scale, each scale spread over its group: fp32 of q's shape. `block` is the group shape
    (1, 128), (128, 128) or (128, 1); (1, 128) accepts leading dims ([..., K] with scale [..., ceil(K/128)])."""
    block = tuple(block)
    if block not in BLOCKS:
        raise ValueError(f"block={block}: must be one of {BLOCKS}")
    rows, cols = block
    if rows > 1 and q.dim() != 2:
        raise ValueError(f"{rows}x{cols} groups need a 2-D q, got shape {tuple(q.shape)}")
    if q.dim() == 0:
        raise ValueError("dequantize needs at least one dimension")
    expected = (*q.shape[:-2], -(-q.shape[-2] // rows)) if rows > 1 else q.shape[:-1]
    expected = (*expected, -(-q.shape[-1] // cols))
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale has shape {tuple(scale.shape)}; q of shape {tuple(q.shape)} in {rows}x{cols} "
                         f"groups needs {expected}")
    s = scale.float()
    if cols > 1:
        s = s.repeat_interleave(cols, dim=-1)[..., : q.shape[-1]]
    if rows > 1:
        s = s.repeat_interleave(rows, dim=-2)[: q.shape[-2]]
    return q.float() * s
