"""FP8 GEMMs (fp8/gemm.py, paper 3.3): the reference against float64 products of operands dequantised here,
independence of the K-slice order, accuracy against the unquantised product on data with very different row and
block magnitudes, Wgrad from 128x1 groups, output dtypes, scale-layout errors, chunking, the GPU backends' operand
preparation (on torch's meta device) and their refusal on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch

from fp8 import gemm
from fp8.gemm import (
    BACKENDS,
    calc_diff,
    check_backend,
    gemm_reference,
    get_backend,
    torch_blockwise_gemm,
    wgrad_reference,
)
from fp8.quant import quantize_1x128, quantize_128x1, quantize_128x128
from model import ConfigError

QUANTIZE = {"tile": quantize_1x128, "block": quantize_128x128}


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _uneven(rows: int, cols: int, seed: int, row_decades: float = 6, block_decades: float = 2) -> torch.Tensor:
    """float64 values with per-row magnitudes over `row_decades` and per-128-column magnitudes over `block_decades`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    r = 10 ** ((torch.rand(rows, 1, generator=g, dtype=torch.float64) - 0.5) * row_decades)
    c = 10 ** ((torch.rand(1, -(-cols // 128), generator=g, dtype=torch.float64) - 0.5) * block_decades)
    return x * r * c.repeat_interleave(128, dim=1)[:, :cols]


def _dequantize64(q: torch.Tensor, scale: torch.Tensor, layout: str) -> torch.Tensor:
    """The test's own dequantisation: element (i, j) times scale[i // (128 or 1), j // 128], in float64."""
    rows, k = q.shape
    r = torch.arange(rows)[:, None] // (128 if layout == "block" else 1)
    return q.double() * scale.double()[r, torch.arange(k)[None, :] // 128]


def _operands(m: int, n: int, k: int, a_layout: str = "tile", b_layout: str = "block", seed: int = 0):
    a_q, a_s = QUANTIZE[a_layout](_randn(m, k, seed=seed))
    b_q, b_s = QUANTIZE[b_layout](_randn(n, k, seed=seed + 1))
    return a_q, a_s, b_q, b_s


@pytest.mark.parametrize("a_layout,b_layout", [("tile", "block"), ("tile", "tile"), ("block", "block"),
                                               ("block", "tile")])
def test_reference_equals_float64_product_of_dequantised_operands(a_layout, b_layout):
    """With power-of-two scales the float64 product of the dequantised operands is exact, so the reference (exact
    partial sums, scaled per slice) must equal it bit for bit: q * 2^9 is an integer below 2^18, so a product is a
    multiple of 2^-18 sa sb below 2^36 of those units; with the scales within 2^6 of each other, K = 320 terms stay
    below 2^51 units, inside float64's 53 bits whatever the summation order."""
    a_q, a_s, b_q, b_s = _operands(200, 136, 320, a_layout, b_layout)
    for s in (a_s, b_s):
        assert s.max() / s.min() <= 2**6
    want = _dequantize64(a_q, a_s, a_layout) @ _dequantize64(b_q, b_s, b_layout).t()
    got = gemm_reference(a_q, a_s, b_q, b_s, torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def _permute_k_slices(q: torch.Tensor, scale: torch.Tensor, perm: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = q.shape[0]
    u = q.view(torch.uint8).view(rows, len(perm), 128)[:, perm].reshape(rows, -1)
    return u.view(torch.float8_e4m3fn), scale[:, perm]


def test_result_does_not_depend_on_the_order_of_k_slices():
    perm = [2, 0, 3, 1]
    # uniform magnitudes: the float64 result itself is exact, so identical
    a_q, a_s, b_q, b_s = _operands(130, 140, 512)
    a_p, b_p = _permute_k_slices(a_q, a_s, perm), _permute_k_slices(b_q, b_s, perm)
    assert torch.equal(gemm_reference(*a_p, *b_p, torch.float64), gemm_reference(a_q, a_s, b_q, b_s, torch.float64))
    # magnitudes over decades: identical after the one rounding to fp32 / bf16
    a_q, a_s = quantize_1x128(_uneven(130, 512, 1))
    b_q, b_s = quantize_128x128(_uneven(140, 512, 2, row_decades=2))
    a_p, b_p = _permute_k_slices(a_q, a_s, perm), _permute_k_slices(b_q, b_s, perm)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(gemm_reference(*a_p, *b_p, dtype), gemm_reference(a_q, a_s, b_q, b_s, dtype))


@pytest.mark.parametrize("pow2", [True, False])
def test_emulated_fp8_gemm_is_close_to_the_exact_product(pow2):
    x = _uneven(256, 384, 3)  # rows over 6 decades, 128-column blocks over 2
    g = torch.Generator().manual_seed(4)
    blocks = 10 ** (torch.rand(3, 3, generator=g, dtype=torch.float64) * 4 - 2)  # weight blocks over 4 decades
    w = torch.randn(320, 384, generator=g, dtype=torch.float64)
    w *= blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)[:320]
    x_q, x_s = quantize_1x128(x, pow2)
    w_q, w_s = quantize_128x128(w, pow2)
    diff = calc_diff(gemm_reference(x_q, x_s, w_q, w_s, torch.float32), x @ w.t())
    assert 1e-5 < diff < 1e-3  # really FP8 (E4M3's 3 mantissa bits), and within DeepGEMM's tolerance


def test_wgrad_from_128x1_groups():
    dy, x = _uneven(300, 136, 5), _uneven(300, 200, 6)
    dy_q, dy_s = quantize_128x1(dy)
    x_q, x_s = quantize_128x1(x)
    dw = wgrad_reference(dy_q, dy_s, x_q, x_s)
    assert dw.shape == (136, 200) and dw.dtype == torch.float32
    assert calc_diff(dw, dy.t() @ x) < 1e-3
    # it is the reference GEMM on the transposed operands, whose 128x1 scales are 1x128 tiles of dy.T and x.T
    assert torch.equal(dw, gemm_reference(dy_q.t(), dy_s.t(), x_q.t(), x_s.t(), torch.float32))
    with pytest.raises(ValueError, match="x_scale"):
        wgrad_reference(dy_q, dy_s, x_q, x_s.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_out_dtype_is_honoured_with_one_rounding(dtype):
    a_q, a_s, b_q, b_s = _operands(70, 90, 300)
    out = gemm_reference(a_q, a_s, b_q, b_s, dtype)
    assert out.dtype == dtype and out.shape == (70, 90)
    assert torch.equal(out, gemm_reference(a_q, a_s, b_q, b_s, torch.float64).to(dtype))


def test_bad_scale_shapes_name_the_operand():
    a_q, a_s, b_q, b_s = _operands(200, 136, 320)
    with pytest.raises(ValueError, match=r"b_scale has shape \(2, 2\).*\(136, 3\).*\(2, 3\)"):
        gemm_reference(a_q, a_s, b_q, b_s[:, :2], torch.float32)
    with pytest.raises(ValueError, match="a_scale has shape"):
        gemm_reference(a_q, a_s.t(), b_q, b_s, torch.float32)
    with pytest.raises(ValueError, match="a_q must be a 2-D"):
        gemm_reference(a_q.float(), a_s, b_q, b_s, torch.float32)
    with pytest.raises(ValueError, match="share K"):
        gemm_reference(a_q[:, :256], a_s, b_q, b_s, torch.float32)


def test_scale_layout_is_read_from_the_shape():
    # 100 rows with scales [1, Kb]: the 128x128 block layout (one block row), the same as its tiles repeated
    a_q, a_s, b_q, b_s = _operands(30, 100, 256)
    assert b_s.shape == (1, 2) and gemm.scale_layout("b", b_s, 100, 256) == "block"
    tiles = b_s.expand(100, 2)
    assert torch.equal(gemm_reference(a_q, a_s, b_q, b_s, torch.float64),
                       gemm_reference(a_q, a_s, b_q, tiles, torch.float64))
    # one row: both readings coincide
    assert gemm.scale_layout("a", a_s[:1], 1, 256) == "tile"
    out = gemm_reference(a_q[:1], a_s[:1], b_q, b_s, torch.float64)
    assert torch.equal(out, gemm_reference(a_q, a_s, b_q, b_s, torch.float64)[:1])


def test_chunked_rows_equal_one_chunk():
    a_q, a_s = quantize_1x128(_uneven(300, 320, 7))
    b_q, b_s = quantize_128x128(_uneven(136, 320, 8, row_decades=2))
    for dtype in (torch.float64, torch.float32):
        whole = gemm_reference(a_q, a_s, b_q, b_s, dtype, chunk_rows=300)
        assert torch.equal(gemm_reference(a_q, a_s, b_q, b_s, dtype, chunk_rows=37), whole)  # 8 x 37 rows + 4
        assert torch.equal(gemm_reference(a_q, a_s, b_q, b_s, dtype), whole)


def test_empty_operands():
    a_q, a_s, b_q, b_s = _operands(0, 136, 320)
    out = gemm_reference(a_q, a_s, b_q, b_s, torch.bfloat16)
    assert out.shape == (0, 136) and out.dtype == torch.bfloat16
    a_q, a_s, b_q, b_s = _operands(5, 0, 320, b_layout="tile")
    assert gemm_reference(a_q, a_s, b_q, b_s, torch.float32).shape == (5, 0)


def test_calc_diff():
    x = _randn(50, 60, seed=9).double()
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    eps = 1e-2  # 1 - 2(1+eps) / (1 + (1+eps)^2) = eps^2 / (2 + 2 eps + eps^2): about half the squared error
    assert calc_diff(x * (1 + eps), x) == pytest.approx(eps**2 / (2 + 2 * eps + eps**2), rel=1e-6)
    y = x.clone()
    y[0, 0] = float("nan")
    assert calc_diff(x, y) != calc_diff(x, y)  # NaN


@pytest.mark.parametrize("m,n,k,a_layout,b_layout", [(200, 136, 320, "tile", "block"), (256, 384, 512, "tile", "block"),
                                                     (130, 140, 300, "tile", "tile"), (1, 7, 100, "tile", "block"),
                                                     (129, 257, 129, "block", "block")])
def test_torch_backend_operands_pass_torchs_own_checks(m, n, k, a_layout, b_layout):
    """On the meta device torch.nn.functional.scaled_mm runs only its shape and stride checks of the blockwise
    recipes, so the torch backend's operand layout is checked here without a GPU."""
    ops = [t.to("meta") for t in _operands(m, n, k, a_layout, b_layout)]
    out = torch_blockwise_gemm(*ops, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@pytest.mark.parametrize("m,n,k,a_layout,b_layout", [(200, 136, 320, "tile", "block"), (70, 20, 129, "tile", "tile"),
                                                     (129, 257, 200, "block", "block"), (3, 1, 60, "tile", "tile")])
def test_kernel_padding_changes_nothing(m, n, k, a_layout, b_layout):
    """The GPU backends' padding (K to 128, rows to 16 or 128, a's blocks as tiles) run through the reference in
    place of a kernel gives the reference's result (fp32: what the kernels are asked for)."""
    ops = _operands(m, n, k, a_layout, b_layout)
    seen = []

    def kernel(a, sa, b, sb, b_block, dtype):
        seen.append((a.shape, b.shape, b_block))
        return gemm_reference(a, sa, b, sb, dtype)

    out = gemm._run(kernel, *ops, torch.float32)
    assert torch.equal(out, gemm_reference(*ops, torch.float32)) and out.is_contiguous()
    (a_shape, b_shape, b_block), = seen
    assert a_shape[1] % 128 == 0 and a_shape[0] % 16 == 0 and b_shape[0] % (128 if b_block else 16) == 0
    assert b_block == (b_layout == "block" and n > 1)


def test_unavailable_backends_fail_with_the_reason():
    assert BACKENDS == ("emulate", "torch", "te", "deepgemm")
    assert get_backend("emulate") is gemm_reference
    with pytest.raises(ConfigError, match="fp8.backend='fp4'"):
        get_backend("fp4")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for name, piece in (("torch", "CUDA"), ("te", "transformer_engine"), ("deepgemm", "deep_gemm")):
        with pytest.raises(RuntimeError, match=f"fp8.backend={name} .*{piece}"):
            check_backend(name)
        with pytest.raises(RuntimeError, match=f"fp8.backend={name}"):
            get_backend(name)
