"""(a) Every FP8 GEMM backend installed here (fp8/gemm.py: torch's blockwise scaled_mm, Transformer Engine,
DeepGEMM): its self-check, then its output against the exact reference GEMM (computed on the GPU in float64) for
bf16 and fp32 outputs, the weight in 1x128 tiles and in 128x128 blocks, over M in {1, 7, 4096}, K in {100, 7168},
N in {130, 129280}; and one 4096 x 7168 x 2048 FP8 GEMM timed against a bf16 `mm` with CUDA events (TFLOP/s)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fp8.gemm import BackendUnavailable, calc_diff, check_backend, gemm_reference, get_backend
from fp8.quant import quantize_1x128, quantize_128x128

BACKENDS = ("torch", "te", "deepgemm")
SHAPES = list(itertools.product((1, 7, 4096), (100, 7168), (130, 129280)))  # (M, K, N)
TOLERANCE = 1e-4  # calc_diff against the exact reference: fp32 accumulation, one rounding to the output dtype


def _available(name: str) -> str | None:
    try:
        check_backend(name)
    except BackendUnavailable as err:
        return str(err)
    return None


def _operands(m: int, k: int, n: int, blocks: bool, g: torch.Generator):
    a = torch.randn(m, k, generator=g, device="cuda") * torch.rand(m, 1, generator=g, device="cuda") * 4
    b = torch.randn(n, k, generator=g, device="cuda") * 0.05
    return (*quantize_1x128(a), *(quantize_128x128(b) if blocks else quantize_1x128(b)))


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_the_reference(name, smoke):
    missing = _available(name)
    if missing:
        smoke.setdefault("fp8_backends", {})[name] = f"not installed: {missing}"
        pytest.skip(missing)
    gemm = get_backend(name)  # runs the self-check
    g = torch.Generator(device="cuda").manual_seed(0)
    worst = {}
    for (m, k, n), blocks, out_dtype in itertools.product(SHAPES, (False, True), (torch.bfloat16, torch.float32)):
        a_q, a_s, b_q, b_s = _operands(m, k, n, blocks, g)
        want = gemm_reference(a_q, a_s, b_q, b_s, out_dtype, chunk_rows=64)
        got = gemm(a_q, a_s, b_q, b_s, out_dtype)
        assert got.shape == want.shape and got.dtype == out_dtype, (m, k, n, blocks, out_dtype)
        diff = calc_diff(got, want)
        key = f"M{m} K{k} N{n} {'blocks' if blocks else 'tiles'} {str(out_dtype).split('.')[1]}"
        worst[key] = diff
        assert diff < TOLERANCE, (name, key, diff)
    smoke.setdefault("fp8_backends", {})[name] = {"max_calc_diff": max(worst.values()), "cases": len(worst)}


def _time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def test_fp8_gemm_speed_against_bf16(smoke):
    m, k, n = 4096, 7168, 2048
    flops = 2 * m * n * k
    a, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda") * 0.05
    a16, b16 = a.bfloat16(), b.bfloat16()
    rows = {"bf16 mm": flops / _time(lambda: a16 @ b16.t()) / 1e12}
    a_q, a_s = quantize_1x128(a)
    b_q, b_s = quantize_128x128(b)
    for name in BACKENDS:
        if _available(name) is None:
            gemm = get_backend(name)
            rows[f"fp8 {name}"] = flops / _time(lambda gemm=gemm: gemm(a_q, a_s, b_q, b_s, torch.bfloat16)) / 1e12
    smoke["gemm_4096x7168x2048_tflops"] = rows
    assert rows["bf16 mm"] > 0
