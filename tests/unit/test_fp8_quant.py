"""Fine-grained FP8 quantisation (fp8/quant.py, paper 3.3), byte for byte.

Expected bytes are built here from the E4M3 definition (sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent
field 0 holds the subnormals m * 2^-9; 0x7F/0xFF are NaN, so 448 = 1.75 * 2^8 is the largest finite value) and the
expected scales from the rule in the module docstring, never from running the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from fp8.quant import (
    AMAX_FLOOR,
    E4M3_MAX,
    dequantize,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
    to_e4m3,
)

F32 = torch.float32


def e4m3(exp: int, man: int, sign: int = 0) -> int:
    """The E4M3 byte of (-1)^sign * 2^(exp-7) * (1 + man/8) (exp >= 1), or of man * 2^-9 (exp == 0)."""
    return sign << 7 | exp << 3 | man


def row(values: dict[int, float], k: int = 128) -> torch.Tensor:
    x = torch.zeros(1, k, dtype=F32)
    for i, v in values.items():
        x[0, i] = v
    return x


def bytes_of(q: torch.Tensor) -> list[int]:
    return q.view(torch.uint8).flatten().tolist()


def test_the_format_constants():
    assert E4M3_MAX == 2**8 * 1.75 and AMAX_FLOOR == 1e-4
    assert e4m3(15, 6) == 0x7E and e4m3(7, 0) == 0x38 and e4m3(0, 1) == 0x01


def test_round_to_nearest_ties_to_even_with_a_unit_scale():
    # amax = 448 exactly: amax / 448 = 1 = 2^0, so the scale is exactly 1 and x / scale = x
    cases = {
        0: (448.0, e4m3(15, 6)),
        1: (1.0625, e4m3(7, 0)),  # halfway between 1.0 (man 0) and 1.125 (man 1): even man 0
        2: (1.1875, e4m3(7, 2)),  # halfway between 1.125 (man 1) and 1.25 (man 2): even man 2
        3: (1.0625 + 2**-12, e4m3(7, 1)),  # just above the tie: up
        4: (-1.0625, e4m3(7, 0, sign=1)),
        5: (248.0, e4m3(15, 0)),  # halfway between 240 (exp 14, man 7: odd) and 256 (exp 15, man 0): 256
        6: (400.0, e4m3(15, 4)),  # halfway between 384 (man 4) and 416 (man 5): 384
        7: (432.0, e4m3(15, 6)),  # halfway between 416 (man 5) and 448 (man 6): 448
        8: (240.0, e4m3(14, 7)),  # exact
    }
    q, scale = quantize_1x128(row({i: v for i, (v, _) in cases.items()}))
    assert scale.dtype == F32 and scale.tolist() == [[1.0]]
    got = bytes_of(q)
    for i, (v, byte) in cases.items():
        assert got[i] == byte, (v, hex(got[i]), hex(byte))
    assert got[len(cases):] == [0] * (128 - len(cases))


def test_subnormal_outputs():
    # scale 1 again (448 in the group); E4M3 subnormals are m * 2^-9, m = 1..7
    cases = {
        1: (2.0**-9, e4m3(0, 1)),
        2: (3 * 2.0**-9, e4m3(0, 3)),
        3: (-3 * 2.0**-9, e4m3(0, 3, sign=1)),
        4: (7 * 2.0**-9, e4m3(0, 7)),  # the largest subnormal
        5: (2.0**-6, e4m3(1, 0)),  # the smallest normal
        6: (2.0**-10, 0x00),  # halfway between 0 and 2^-9: even (0)
        7: (3 * 2.0**-10, e4m3(0, 2)),  # 1.5 * 2^-9: halfway between m=1 and m=2: m=2
        8: (5 * 2.0**-10, e4m3(0, 2)),  # 2.5 * 2^-9: m=2
        9: (15 * 2.0**-10, e4m3(1, 0)),  # 7.5 * 2^-9: between 7 * 2^-9 (odd) and 2^-6 (even): 2^-6
        10: (2.0**-11, 0x00),  # below half the smallest subnormal
    }
    values = {i: v for i, (v, _) in cases.items()}
    values[0] = 448.0
    q, scale = quantize_1x128(row(values))
    assert scale.tolist() == [[1.0]]
    got = bytes_of(q)
    for i, (v, byte) in cases.items():
        assert got[i] == byte, (v, hex(got[i]), hex(byte))


@pytest.mark.parametrize("k", [-20, -3, 0, 5, 30])
def test_pow2_scale_at_the_power_of_two_boundary(k):
    # amax = 448 * 2^k exactly: amax / 448 = 2^k is a power of two, so the scale is 2^k (not 2^(k+1)) and amax
    # maps to 448
    amax = torch.tensor(448.0 * 2.0**k, dtype=F32)
    q, scale = quantize_1x128(row({0: amax.item(), 1: -amax.item()}))
    assert scale.item() == 2.0**k
    assert bytes_of(q)[:2] == [e4m3(15, 6), e4m3(15, 6, sign=1)]
    # the next fp32 above: 448 * 2^k * (1 + 2^-23 / 1.75); divided by 448 that is 2^k * (1 + 0.57 * 2^-23), more
    # than half an ulp (2^-24) above 2^k, so the fp32 ratio is the float after 2^k and the scale 2^(k+1) (a float
    # log2 of that ratio would round to exactly k); amax / 2^(k+1) = 224.0000x rounds to 224 = 1.75 * 2^7
    up = torch.nextafter(amax, torch.tensor(float("inf")))
    q, scale = quantize_1x128(row({0: up.item()}))
    assert scale.item() == 2.0 ** (k + 1) and bytes_of(q)[0] == e4m3(14, 6)
    # the fp32 below: the ratio is below 2^k, the scale 2^k, and amax / 2^k = 448 - 2^-15 rounds to 448
    down = torch.nextafter(amax, torch.tensor(0.0))
    q, scale = quantize_1x128(row({0: down.item()}))
    assert scale.item() == 2.0**k and bytes_of(q)[0] == e4m3(15, 6)


def test_pow2_scales_are_the_smallest_power_of_two_covering_the_group():
    x = torch.randn(64, 640, generator=torch.Generator().manual_seed(0))
    x *= 10 ** (torch.rand(64, 1, generator=torch.Generator().manual_seed(1)) * 8 - 4)
    _, scale = quantize_1x128(x)
    ratio = x.abs().view(64, 5, 128).amax(-1) / 448  # fp32, as the rule says
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()  # exactly powers of two
    assert (scale >= ratio).all() and (scale / 2 < ratio).all()


def test_pow2_false_scale_is_amax_over_448():
    q, scale = quantize_1x128(row({0: 3.0, 1: -1.5, 130: 0.25}, k=200), pow2=False)
    assert scale[0, 0].item() == (torch.tensor(3.0, dtype=F32) / 448).item()
    assert scale[0, 1].item() == (torch.tensor(0.25, dtype=F32) / 448).item()
    got = bytes_of(q)
    assert got[0] == e4m3(15, 6) and got[130] == e4m3(15, 6)
    assert got[1] == e4m3(14, 6, sign=1)  # -1.5 / (3 / 448) = -224 = -1.75 * 2^7


def test_saturation_clamps_to_448():
    # the final cast: anything beyond 448 becomes 448 (0x7E), never NaN; inf too; NaN stays NaN
    y = torch.tensor([448.0, 464.0, 500.0, 1e30, float("inf"), -1e30, float("nan")])
    got = bytes_of(to_e4m3(y))
    assert got[:6] == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE] and got[6] & 0x7F == 0x7F
    # in quantize: with scale = amax / 448 rounded down in fp32, amax / scale lands above 448 for some amax
    base = torch.tensor(448.0, dtype=F32)
    for j in range(1, 1000):
        amax = base + j * 2.0**-15  # fp32 values just above 448 (ulp 2^-15)
        if amax / (amax / 448) > 448:
            break
    else:
        pytest.fail("no fp32 amax above 448 whose amax / (amax / 448) exceeds 448")
    q, scale = quantize_1x128(row({0: amax.item(), 1: -amax.item()}), pow2=False)
    assert scale.item() == (amax / 448).item()
    assert bytes_of(q)[:2] == [0x7E, 0xFE]


@pytest.mark.parametrize("pow2", [True, False])
def test_all_zero_group_has_the_floored_scale_and_zero_bytes(pow2):
    x = torch.zeros(2, 256)
    x[0, 130] = 1.0
    q, scale = quantize_1x128(x, pow2)
    floor = torch.tensor(AMAX_FLOOR, dtype=F32) / 448  # 2.23e-7
    # pow2: 2^-22 = 2.38e-7 covers it, 2^-23 = 1.19e-7 does not
    expected = 2.0**-22 if pow2 else floor.item()
    assert scale[0, 0].item() == expected and scale[1, 0].item() == expected and scale[1, 1].item() == expected
    assert torch.isfinite(scale).all() and torch.isfinite(q.float()).all()
    assert bytes_of(q[1]) == [0] * 256 and bytes_of(q[0, :128]) == [0] * 128
    assert not dequantize(q, scale, (1, 128)).isnan().any()


def test_tails_are_zero_padded_and_separate():
    # 1x128 with K = 130: the second group holds two columns, amax 7 = 448 * 2^-6: scale 2^-6
    x = row({0: 448.0, 128: 3.5, 129: -7.0}, k=130)
    q, scale = quantize_1x128(x)
    assert q.shape == (1, 130) and scale.tolist() == [[1.0, 2.0**-6]]
    assert bytes_of(q)[128:] == [e4m3(14, 6), e4m3(15, 6, sign=1)]  # 224 and -448
    # negative values only in a tail: zero padding does not set its max
    q, scale = quantize_1x128(row({0: 448.0, 128: -7.0, 129: -3.5}, k=130))
    assert scale.tolist() == [[1.0, 2.0**-6]] and bytes_of(q)[128:] == [e4m3(15, 6, sign=1), e4m3(14, 6, sign=1)]
    # 128x1 with M = 129: row 128 is a group of its own in every column
    x = torch.zeros(129, 3)
    x[0, 0], x[128, 0], x[128, 1], x[5, 2] = 448.0, 7.0, -3.5 * 2.0**10, 1.0
    q, scale = quantize_128x1(x)
    assert q.shape == (129, 3) and scale.shape == (2, 3)
    assert scale[:, 0].tolist() == [1.0, 2.0**-6]
    assert scale[1, 1].item() == 2.0**3  # 3.5 * 2^10 / 448 = 8 exactly: the scale is 2^3, -3584 maps to -448
    assert scale[1, 2].item() == 2.0**-22  # row 128 of column 2 is all zero: the floored scale
    assert bytes_of(q[128]) == [e4m3(15, 6), e4m3(15, 6, sign=1), 0]
    # the tail does not touch the first group: changing it leaves rows 0..127 alone
    y = x.clone()
    y[128] = 1e4
    q2, scale2 = quantize_128x1(y)
    assert torch.equal(q2[:128].view(torch.uint8), q[:128].view(torch.uint8)) and torch.equal(scale2[0], scale[0])


def test_128x128_blocks_with_tails():
    w = torch.zeros(129, 130)
    w[0, 0], w[128, 0], w[0, 129], w[128, 129] = 448.0, 7.0, 56.0, -0.4375
    q, scale = quantize_128x128(w)
    assert q.shape == (129, 130) and scale.shape == (2, 2)
    # amaxes 448, 56 = 448 * 2^-3, 7 = 448 * 2^-6, 0.4375 = 448 * 2^-10
    assert scale.tolist() == [[1.0, 2.0**-3], [2.0**-6, 2.0**-10]]
    assert bytes_of(q[0, [0, 129]]) == [e4m3(15, 6)] * 2
    assert bytes_of(q[128, [0, 129]]) == [e4m3(15, 6), e4m3(15, 6, sign=1)]


@pytest.mark.parametrize("quantize,block,group,gi", [
    (quantize_1x128, (1, 128), (5, slice(0, 128)), (5, 0)),
    (quantize_128x128, (128, 128), (slice(0, 128), slice(0, 128)), (0, 0)),
    (quantize_128x1, (128, 1), (slice(0, 128), 7), (0, 7)),
])
@pytest.mark.parametrize("pow2", [True, False])
def test_nan_and_inf_do_not_vanish(quantize, block, group, gi, pow2):
    """Element (5, 7) lies in `group`, whose scale is scale[gi]."""
    x = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    clean_q, clean_s = quantize(x, pow2)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[5, 7] = bad
        q, scale = quantize(y, pow2)
        deq = dequantize(q, scale, block)
        if math.isnan(bad):  # NaN: the group's scale and every q of the group are NaN
            assert scale[gi].isnan() and q.float()[group].isnan().all()
        else:  # inf: the group's scale is inf, the inf element NaN
            assert scale[gi].item() == float("inf") and q.float()[5, 7].isnan()
        assert deq[group].isnan().all()  # the whole group dequantises to NaN
        # every other group is untouched
        mask = torch.ones_like(clean_s, dtype=torch.bool)
        mask[gi] = False
        assert torch.equal(scale[mask], clean_s[mask])
        keep = torch.ones(200, 300, dtype=torch.bool)
        keep[group] = False
        assert torch.equal(q.view(torch.uint8)[keep], clean_q.view(torch.uint8)[keep])


def test_shapes_dtypes_and_leading_dims():
    x = torch.randn(2, 3, 260, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_1x128(x)
    assert q.shape == (2, 3, 260) and q.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 3)
    q2, scale2 = quantize_1x128(x.view(6, 260))
    assert torch.equal(q.view(6, 260).view(torch.uint8), q2.view(torch.uint8)) and torch.equal(scale.view(6, 3), scale2)
    assert dequantize(q, scale, (1, 128)).shape == (2, 3, 260)
    q, scale = quantize_1x128(x[0, 0])
    assert q.shape == (260,) and scale.shape == (3,)
    w = torch.randn(257, 130, dtype=torch.bfloat16)
    q, scale = quantize_128x128(w)
    assert q.shape == (257, 130) and scale.shape == (3, 2) and scale.dtype == F32
    q, scale = quantize_128x1(w.double())
    assert q.shape == (257, 130) and scale.shape == (3, 130) and scale.dtype == F32
    q, scale = quantize_1x128(torch.zeros(0, 256))
    assert q.shape == (0, 256) and scale.shape == (0, 2)
    with pytest.raises(ValueError, match="2-D"):
        quantize_128x128(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="scale has shape"):
        dequantize(q, torch.zeros(1, 2), (1, 128))
    with pytest.raises(ValueError, match="block="):
        dequantize(q, scale, (2, 64))


@pytest.mark.parametrize("quantize,block", [(quantize_1x128, (1, 128)), (quantize_128x128, (128, 128)),
                                            (quantize_128x1, (128, 1))])
@pytest.mark.parametrize("pow2", [True, False])
def test_dequantize_round_trip_error_is_bounded(quantize, block, pow2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 270, generator=g) * 10 ** (torch.rand(300, 1, generator=g) * 6 - 3)
    q, scale = quantize(x, pow2)
    deq = dequantize(q, scale, block)
    assert deq.dtype == F32 and deq.shape == x.shape
    # the test's own spread of the scales: element (i, j) uses scale[i // rows, j // cols]
    rows, cols = block
    s = scale[torch.arange(300)[:, None] // rows, torch.arange(270)[None, :] // cols]
    err = (deq - x).abs()
    normal = x.abs() >= 2.0**-6 * s  # x / scale in E4M3's normal range: 3 mantissa bits
    assert normal.float().mean() > 0.5
    assert (err[normal] <= 2.0**-4 * x.abs()[normal]).all()
    assert (err[~normal] <= 2.0**-10 * s[~normal]).all()  # half the subnormal step 2^-9
    if pow2:  # exact: quantising the dequantised values again gives the same bytes
        q2, scale2 = quantize(deq, pow2)
        assert torch.equal(dequantize(q2, scale2, block), deq)
