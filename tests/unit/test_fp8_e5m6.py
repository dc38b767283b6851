"""The E5M6 cache format (fp8/e5m6.py): codes derived by hand from the layout (sign << 11 | exponent << 6 | mantissa,
bias 15), round-to-nearest-even including subnormals and carries, saturation, NaN/inf, the exhaustive round trip of
every finite code, the 2-codes-in-3-bytes packing, and the scaled 1x128 quantisation."""

from __future__ import annotations

import math

import torch

from fp8.e5m6 import E5M6_MAX, decode, dequantize_e5m6_1x128, encode, pack, quantize_e5m6_1x128, unpack
from fp8.quant import dequantize, quantize_1x128

CASES = [  # value, (sign, exponent field, mantissa)
    (1.0, (0, 15, 0)),
    (E5M6_MAX, (0, 30, 63)),
    (2.0 ** -14, (0, 1, 0)),  # smallest normal
    (2.0 ** -20, (0, 0, 1)),  # smallest subnormal
    (63 * 2.0 ** -20, (0, 0, 63)),  # largest subnormal
    (1 + 1 / 128, (0, 15, 0)),  # tie between 1 and 1 + 1/64: to the even mantissa 0
    (1 + 3 / 128, (0, 15, 2)),  # tie between 1 + 1/64 and 1 + 2/64: to the even mantissa 2
    (2 - 2.0 ** -8, (0, 16, 0)),  # rounds up past 1 + 63/64: carries into the next binade
    (2.5 * 2.0 ** -20, (0, 0, 2)),  # subnormal tie: 2.5 quanta -> 2
    (3.5 * 2.0 ** -20, (0, 0, 4)),  # 3.5 quanta -> 4
    (2.0 ** -22, (0, 0, 0)),  # a quarter quantum -> 0
    (1e6, (0, 30, 63)),  # finite overflow saturates
    (-1.5, (1, 15, 32)),
    (-0.0, (1, 0, 0)),
    (math.inf, (0, 31, 0)),
    (-math.inf, (1, 31, 0)),
]


def test_hand_built_codes():
    values = torch.tensor([v for v, _ in CASES], dtype=torch.float32)
    expected = torch.tensor([s << 11 | e << 6 | m for _, (s, e, m) in CASES], dtype=torch.int16)
    assert torch.equal(encode(values), expected)


def test_hand_built_decodes():
    codes = torch.tensor([0x3C0, 0x7BF, 0x040, 0x001, 0x03F, 0x3C2, 0xBE0, 0x800, 0x7C0, 0xFC0], dtype=torch.int16)
    expected = torch.tensor([1.0, E5M6_MAX, 2.0 ** -14, 2.0 ** -20, 63 * 2.0 ** -20, 1 + 2 / 64, -1.5, -0.0,
                             math.inf, -math.inf])
    values = decode(codes)
    assert values.dtype == torch.float32 and torch.equal(values, expected)
    assert torch.equal(torch.signbit(values), torch.signbit(expected))  # -0 keeps its sign


def test_nan_never_vanishes():
    code = encode(torch.tensor([float("nan")]))
    assert (int(code) >> 6) & 0x1F == 31 and int(code) & 0x3F != 0
    assert torch.isnan(decode(code)).all()


def test_every_finite_code_round_trips():
    codes = torch.arange(4096, dtype=torch.int32).to(torch.int16)
    values = decode(codes)
    finite = torch.isfinite(values)
    assert int(finite.sum()) == 2 * 31 * 64  # 31 exponent fields (0..30) x 64 mantissas x 2 signs
    assert torch.equal(encode(values[finite]), codes[finite])
    positive = values[finite & ~torch.signbit(values)].sort().values
    assert positive[-1] == E5M6_MAX and (positive.diff() > 0).all()  # distinct and ordered


def test_pack_layout_and_round_trip():
    c0, c1 = 0xABC, 0x123
    packed = pack(torch.tensor([[c0, c1]], dtype=torch.int16))
    assert packed.tolist() == [[0xBC, 0x0A | 0x3 << 4, 0x12]]
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 129):
        codes = torch.randint(0, 4096, (3, n), generator=g).to(torch.int16)
        data = pack(codes)
        assert data.dtype == torch.uint8 and data.shape == (3, 3 * ((n + 1) // 2))
        assert torch.equal(unpack(data, n), codes)


def test_scaled_quantisation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 130, generator=g) * torch.tensor([[1e-3], [1.0], [1e3], [0.0]])
    packed, scale = quantize_e5m6_1x128(x)
    assert scale.shape == (4, 2) and torch.isfinite(scale).all()
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()  # powers of two
    y = dequantize_e5m6_1x128(packed, scale, 130)
    assert not y[3].any()  # a zero row stays zero, no NaN
    big = x.abs() > 2.0 ** -7 * x.abs().amax(dim=1, keepdim=True)  # normal range of each row's scale
    assert ((y - x).abs()[big] <= 2.0 ** -7 * x.abs()[big]).all()
    # finer than E4M3: about 8x (3 more mantissa bits) on the same tiles
    q, s = quantize_1x128(x[:3])
    err_e4m3 = (dequantize(q, s, (1, 128)) - x[:3]).abs().mean()
    err_e5m6 = (y[:3] - x[:3]).abs().mean()
    assert err_e5m6 * 5 < err_e4m3
