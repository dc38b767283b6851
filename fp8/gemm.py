"""FP8 GEMMs with fine-grained scales (paper 3.3): out = a @ b.T from E4M3 operands and their per-group scales.

Every backend has one interface, `gemm(a_q, a_scale, b_q, b_scale, out_dtype) -> [M, N]`, with a_q [M, K] and
b_q [N, K] float8_e4m3fn (fp8/quant.py). Each operand's scales come in one of two layouts, told apart by shape
(rows = M for a, N for b; Kb = ceil(K / 128)):

    1x128 tiles      [rows, Kb]                  activations and gradients (quantize_1x128)
    128x128 blocks   [ceil(rows / 128), Kb]      weights (quantize_128x128)

A shape matching both (rows <= 1) is the same numbers either way; [1, Kb] for 2..128 rows is the block layout.

The three GEMMs of a Linear (fp8/linear.py) map onto it as follows:

    Fprop  y  = x @ W.T     a = x tiles,  b = W blocks
    Dgrad  dx = dy @ W      a = dy tiles, b = W.t() with scale.t(): the 128x128 block layout of W.T
    Wgrad  dW = dy.T @ x    K is the token axis. quantize_128x1(dy [M, N]) groups 128 tokens of one channel;
                            its q.t() [N, M] and scale.t() [N, ceil(M/128)] are exactly the 1x128 tile layout of
                            dy.T, and likewise for x: a = dy.T tiles, b = x.T tiles (`wgrad_reference`)

The reference (backend "emulate", `gemm_reference`) is the paper's accumulation with N_C = 128: for each 128-wide
slice of K the FP8 products are summed, that partial sum is multiplied by both operands' scales for the slice, and
the slices are summed. It computes this in float64, where it is exact up to the scale multiplies: an E4M3 value has
4 significant bits and lies in [2^-9, 448], so every product and every sum of 128 of them is exact in float64. The
result is rounded once, to out_dtype. The tensor-core kernels (backends "torch", "te", "deepgemm") do the same with
fp32 partial sums; they need a Hopper GPU and are checked against the reference when first requested.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from core.config import ConfigError
from fp8.quant import FP8, GROUP

BACKENDS = ("emulate", "torch", "te", "deepgemm")
CHUNK_BYTES = 256 * 2**20  # float64 working set of one row chunk of gemm_reference

Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


class BackendUnavailable(ConfigError, RuntimeError):
    """The requested GEMM backend cannot run on this machine; the message says what is missing (a config error:
    choose another fp8.backend or fp8.recipe)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(x y) / sum(x^2 + y^2) in float64 (DeepGEMM's test metric): 0 for equal tensors, about half the
    squared relative error for close ones, NaN if either holds a NaN. Two all-zero tensors give 0."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


# ----------------------------------------------------------------------------------------------------
# The reference


def _check_operand(name: str, q: torch.Tensor) -> tuple[int, int]:
    if q.dim() != 2 or q.dtype != FP8:
        raise ValueError(f"{name}_q must be a 2-D {FP8} tensor, got {q.dtype} of shape {tuple(q.shape)}")
    return q.shape[0], q.shape[1]


def scale_layout(name: str, scale: torch.Tensor, rows: int, k: int) -> str:
    """'tile' (1x128) or 'block' (128x128) for an operand of shape [rows, k]; ValueError naming the operand and
    both expected shapes otherwise."""
    kb = _cdiv(k, GROUP)
    tile, block = (rows, kb), (_cdiv(rows, GROUP), kb)
    shape = tuple(scale.shape)
    if shape == tile:
        return "tile"
    if shape == block:
        return "block"
    raise ValueError(f"{name}_scale has shape {shape}; operand {name} of shape [{rows}, {k}] needs {tile} "
                     f"(1x128 tiles) or {block} (128x128 blocks)")


def _row_scales(name: str, scale: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The operand's scales as 1x128 tiles [rows, Kb] (a block's scale repeated over its 128 rows)."""
    if scale_layout(name, scale, rows, k) == "tile":
        return scale
    return scale.repeat_interleave(GROUP, dim=0)[:rows]


def _slices(q: torch.Tensor, kb: int) -> torch.Tensor:
    """q [rows, K] E4M3 -> float64 [Kb, rows, 128], K zero-padded to Kb * 128."""
    x = F.pad(q.double(), (0, kb * GROUP - q.shape[1]))
    return x.view(q.shape[0], kb, GROUP).transpose(0, 1)


def gemm_reference(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, *, chunk_rows: int | None = None) -> torch.Tensor:
    """a @ b.T with the paper's per-128 promotion, exact in float64 and rounded once to out_dtype (see the module
    docstring). Rows of a are processed `chunk_rows` at a time (default: a float64 working set of CHUNK_BYTES)."""
    m, k = _check_operand("a", a_q)
    n, k_b = _check_operand("b", b_q)
    if k != k_b:
        raise ValueError(f"a_q {tuple(a_q.shape)} and b_q {tuple(b_q.shape)} must share K (a @ b.T)")
    sa = _row_scales("a", a_scale, m, k).double()  # [M, Kb]
    sb = _row_scales("b", b_scale, n, k).double()  # [N, Kb]
    kb = sa.shape[1]
    out = torch.zeros(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0 or kb == 0:
        return out
    b = _slices(b_q, kb).transpose(1, 2)  # [Kb, 128, N]
    sb = sb.t()[:, None, :]  # [Kb, 1, N]
    rows = chunk_rows or max(1, CHUNK_BYTES // (8 * kb * n))
    for i in range(0, m, rows):
        partial = torch.bmm(_slices(a_q[i:i + rows], kb), b)  # [Kb, r, N]: exact sums of 128 products
        partial.mul_(sa[i:i + rows].t()[:, :, None]).mul_(sb)  # promoted and scaled per slice
        out[i:i + rows] = partial.sum(0).to(out_dtype)  # [r, N]: summed over slices, rounded once
    return out


def wgrad_reference(dy_q: torch.Tensor, dy_scale: torch.Tensor, x_q: torch.Tensor,
                    x_scale: torch.Tensor) -> torch.Tensor:
    """dW = dy.T @ x in fp32 from dy [M, N] and x [M, K] quantised in 128x1 groups (quantize_128x1, M = tokens):
    the transposed operands are the 1x128 tiles of dy.T and x.T (module docstring)."""
    m, n = _check_operand("dy", dy_q)
    m_x, k = _check_operand("x", x_q)
    if m != m_x:
        raise ValueError(f"dy_q {tuple(dy_q.shape)} and x_q {tuple(x_q.shape)} must share the token axis M")
    for name, scale, cols in (("dy", dy_scale, n), ("x", x_scale, k)):
        if tuple(scale.shape) != (_cdiv(m, GROUP), cols):
            raise ValueError(f"{name}_scale has shape {tuple(scale.shape)}; 128x1 groups of {name} "
                             f"[{m}, {cols}] need {(_cdiv(m, GROUP), cols)}")
    return gemm_reference(dy_q.t(), dy_scale.t(), x_q.t(), x_scale.t(), torch.float32)


# ----------------------------------------------------------------------------------------------------
# Tensor-core backends. Each takes the reference's operands; `_kernel_operands` brings them to the kernels'
# alignment: a in 1x128 tiles (a block layout of a is expanded to its tiles: the same numbers), b in tiles or
# blocks, K zero-padded to a multiple of 128, tiled rows to a multiple of 16 and blocked rows to a multiple of 128.
# Zero padding adds nothing to the products; padded tile scales are 1; the result is cut back to [M, N].


def _pad_q(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    u = q.view(torch.uint8)  # byte 0x00 is +0.0 in E4M3
    return F.pad(u, (0, cols - q.shape[1], 0, rows - q.shape[0])).view(FP8)


def _kernel_operands(a_q, a_scale, b_q, b_scale):
    m, k = _check_operand("a", a_q)
    n, k_b = _check_operand("b", b_q)
    if k != k_b:
        raise ValueError(f"a_q {tuple(a_q.shape)} and b_q {tuple(b_q.shape)} must share K (a @ b.T)")
    sa = _row_scales("a", a_scale, m, k).float()
    b_block = scale_layout("b", b_scale, n, k) == "block"
    kp, mp, np_ = _round_up(k, GROUP), _round_up(m, 16), _round_up(n, GROUP if b_block else 16)
    sb = b_scale.float() if b_block else F.pad(b_scale.float(), (0, 0, 0, np_ - n), value=1.0)
    return (_pad_q(a_q, mp, kp), F.pad(sa, (0, 0, 0, mp - m), value=1.0).contiguous(), _pad_q(b_q, np_, kp),
            sb.contiguous(), b_block)


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.dtype], torch.Tensor]
KERNEL_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _run(kernel: Kernel, a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
         out_dtype: torch.dtype) -> torch.Tensor:
    """Align the operands, call kernel(a, a_scale, b, b_scale, b_is_blocks, dtype) -> padded [M', N'] and cut the
    result back to [M, N] in out_dtype (the kernel is asked for out_dtype, or fp32 where it cannot produce that)."""
    a, sa, b, sb, b_block = _kernel_operands(a_q, a_scale, b_q, b_scale)
    m, k, n = a_q.shape[0], a_q.shape[1], b_q.shape[0]
    if 0 in (m, n, k):
        return torch.zeros(m, n, dtype=out_dtype, device=a_q.device)
    out = kernel(a, sa, b, sb, b_block, out_dtype if out_dtype in KERNEL_OUT_DTYPES else torch.float32)
    return out[:m, :n].to(out_dtype).contiguous()


def _torch_kernel(a, sa, b, sb, b_block: bool, dtype: torch.dtype) -> torch.Tensor:
    kb = sa.shape[1]
    if b_block:  # [round_up(Kb, 4), N/128], stride (1, round_up(Kb, 4))
        scale_b, recipe_b = F.pad(sb, (0, _round_up(kb, 4) - kb), value=1.0).t(), F.ScalingType.BlockWise128x128
    else:  # [N, Kb], stride (1, N)
        scale_b, recipe_b = sb.t().contiguous().t(), F.ScalingType.BlockWise1x128
    return F.scaled_mm(a, b.t(), sa.t().contiguous().t(), F.ScalingType.BlockWise1x128, scale_b, recipe_b,
                       output_dtype=dtype, use_fast_accum=False)


def torch_blockwise_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """PyTorch's blockwise scaled GEMM (torch.nn.functional.scaled_mm; sm90 with CUDA 12.9+): recipes
    (BlockWise1x128, BlockWise128x128) or (BlockWise1x128, BlockWise1x128), no fast accumulation (partial sums
    promoted at every 128 of K). Layouts it requires: mat_b column-major (b.t()); 1x128 scales [rows, Kb] with
    stride (1, rows); 128x128 scales [round_up(Kb, 4), N/128] with stride (1, round_up(Kb, 4)). Runs on the meta
    device too, where torch checks those shapes and strides."""
    return _run(_torch_kernel, a_q, a_scale, b_q, b_scale, out_dtype)


def _deepgemm_kernel(a, sa, b, sb, b_block: bool, dtype: torch.dtype) -> torch.Tensor:
    import deep_gemm

    if b_block:  # the 1d2d kernel writes bf16 only, and takes no accumulator
        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16, device=a.device)
        deep_gemm.fp8_gemm_nt((a, sa), (b, sb), out, recipe=(1, 128, 128))
        return out
    # the 1d1d kernel accumulates into an fp32 `c` (here the output itself, zeroed: D = C + A B^T)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    deep_gemm.fp8_gemm_nt((a, sa), (b, sb), out, c=out, recipe=(1, 1, 128))
    return out


def deepgemm_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """DeepGEMM's fp8_gemm_nt on SM90, written against its csrc/apis/gemm.hpp and jit_kernels/impls/sm90_fp8_gemm_*
    (2025-2026): the 1d2d kernel (recipe (1, 128, 128): 1x128 x 128x128, Fprop and Dgrad) writes bf16 and refuses
    an accumulator, so an fp32 result is that bf16 widened (within the self-check's tolerance); the 1d1d kernel
    (recipe (1, 1, 128): 1x128 x 1x128, Wgrad) writes fp32 and requires the accumulator `c`. DeepGEMM brings the
    fp32 scales to its TMA layout itself."""
    return _run(_deepgemm_kernel, a_q, a_scale, b_q, b_scale, out_dtype)


def _te_kernel(a, sa, b, sb, b_block: bool, dtype: torch.dtype) -> torch.Tensor:
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.cpp_extensions import general_gemm
    from transformer_engine.pytorch.module.base import get_workspace
    from transformer_engine.pytorch.tensor.float8_blockwise_tensor import (
        Float8BlockQuantizer,
        Float8BlockwiseQTensor,
    )

    def wrap(q: torch.Tensor, scale: torch.Tensor, blocks: bool):
        if blocks:  # [rows/128, round_up(Kb, 4)]
            scale = F.pad(scale, (0, _round_up(scale.shape[1], 4) - scale.shape[1]), value=1.0)
        else:  # [Kb, rows], rows already a multiple of 16
            scale = scale.t()
        quantizer = Float8BlockQuantizer(tex.DType.kFloat8E4M3, rowwise=True, columnwise=False,
                                         block_scaling_dim=2 if blocks else 1)
        return Float8BlockwiseQTensor(shape=q.shape, dtype=torch.bfloat16, fp8_dtype=tex.DType.kFloat8E4M3,
                                      rowwise_data=q.view(torch.uint8), rowwise_scale_inv=scale.contiguous(),
                                      columnwise_data=None, columnwise_scale_inv=None, quantizer=quantizer,
                                      is_2D_scaled=blocks, requires_grad=False)

    # TE's "TN" GEMM of (A, B) is B @ A.T
    return general_gemm(wrap(b, sb, b_block), wrap(a, sa, False), get_workspace(), out_dtype=dtype, layout="TN",
                        use_split_accumulator=True)[0]


def te_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
            out_dtype: torch.dtype) -> torch.Tensor:
    """Transformer Engine's blockwise FP8 GEMM (the kernels of its Float8BlockScaling recipe; written against
    TE 2.x): the operands wrapped as Float8BlockwiseQTensor with TE's GEMM-ready scales, general_gemm."""
    return _run(_te_kernel, a_q, a_scale, b_q, b_scale, out_dtype)


# ----------------------------------------------------------------------------------------------------
# Backend selection


def _gpu_missing(min_cc: tuple[int, int] = (9, 0)) -> list[str]:
    if not torch.cuda.is_available():
        return ["a CUDA GPU (torch.cuda.is_available() is False)"]
    if torch.version.hip:
        return ["a CUDA build of torch (this one is built for ROCm)"]
    cc = torch.cuda.get_device_capability()
    if cc < min_cc:
        return [f"a Hopper GPU (sm90 or newer); this one is sm{cc[0]}{cc[1]} ({torch.cuda.get_device_name()})"]
    return []


def _package_missing(module: str, hint: str) -> list[str]:
    if importlib.util.find_spec(module) is None:
        return [f"the {module} package ({hint})"]
    return []


def _torch_missing() -> list[str]:
    st = getattr(F, "ScalingType", None)
    if not (hasattr(F, "scaled_mm") and hasattr(st, "BlockWise1x128") and hasattr(st, "BlockWise128x128")):
        return ["a torch with blockwise torch.nn.functional.scaled_mm (ScalingType.BlockWise1x128 and "
                f"BlockWise128x128); this is torch {torch.__version__}"]
    missing = _gpu_missing()
    if not missing and torch.version.cuda:
        cuda = tuple(int(p) for p in torch.version.cuda.split(".")[:2])
        if cuda < (12, 9):
            missing.append(f"CUDA 12.9+ for blockwise scaled_mm (torch is built with CUDA {torch.version.cuda})")
    return missing


def _te_missing() -> list[str]:
    missing = _package_missing("transformer_engine", "pip install 'hai-llm[te]'") + _gpu_missing()
    if not missing:
        try:
            import transformer_engine.pytorch  # noqa: F401
        except Exception as e:  # an install without its CUDA libraries fails in many ways
            missing.append(f"an importable transformer_engine.pytorch ({e})")
    return missing


def _deepgemm_missing() -> list[str]:
    missing = _package_missing("deep_gemm", "build and install DeepGEMM from its repository") + _gpu_missing()
    if not missing:
        try:
            import deep_gemm
        except Exception as e:
            return [f"an importable deep_gemm ({e})"]
        if not hasattr(deep_gemm, "fp8_gemm_nt"):
            missing.append("deep_gemm.fp8_gemm_nt (DeepGEMM of July 2025 or later)")
    return missing


_BACKENDS: dict[str, tuple[Gemm, Callable[[], list[str]]]] = {
    "emulate": (gemm_reference, lambda: []),
    "torch": (torch_blockwise_gemm, _torch_missing),
    "te": (te_gemm, _te_missing),
    "deepgemm": (deepgemm_gemm, _deepgemm_missing),
}
_checked: set[str] = set()


def check_backend(name: str) -> None:
    """Raise ConfigError for an unknown backend and BackendUnavailable (a RuntimeError) naming what is missing
    when it cannot run here."""
    if name not in BACKENDS:
        raise ConfigError(f"fp8.backend={name!r}: choose one of {', '.join(BACKENDS)}")
    missing = _BACKENDS[name][1]()
    if missing:
        raise BackendUnavailable(f"fp8.backend={name} cannot run on this machine; missing: {'; '.join(missing)}. "
                                 "fp8.recipe=emulate (fp8.backend=emulate) runs the same recipe on any machine")


def _self_check(name: str, gemm: Gemm) -> None:
    """Compare a GPU backend with the reference on both scale layouts and unaligned shapes, once per process."""
    from fp8.quant import quantize_1x128, quantize_128x128

    g = torch.Generator().manual_seed(0)
    for m, n, k, quantize_b, out_dtype in ((200, 192, 320, quantize_128x128, torch.bfloat16),
                                           (136, 144, 256, quantize_1x128, torch.float32)):
        a_q, a_s = quantize_1x128(torch.randn(m, k, generator=g, device="cpu"))
        b_q, b_s = quantize_b(torch.randn(n, k, generator=g, device="cpu"))
        want = gemm_reference(a_q, a_s, b_q, b_s, out_dtype)
        try:
            got = gemm(*(t.cuda() for t in (a_q, a_s, b_q, b_s)), out_dtype).cpu()
            diff = calc_diff(got, want) if got.shape == want.shape else float("nan")
        except Exception as e:
            raise BackendUnavailable(f"fp8.backend={name} failed on a {m}x{n}x{k} test GEMM: {e}") from e
        if not diff < 1e-4:
            raise BackendUnavailable(f"fp8.backend={name} disagrees with the reference GEMM on a {m}x{n}x{k} test "
                                     f"({quantize_b.__name__} for b): calc_diff={diff:.3g}")


def get_backend(name: str) -> Gemm:
    """The GEMM function of backend `name` (see BACKENDS); raises with the reason when it cannot run here. A GPU
    backend is checked against the reference the first time it is requested."""
    check_backend(name)
    gemm = _BACKENDS[name][0]
    if name != "emulate" and name not in _checked:
        _self_check(name, gemm)
        _checked.add(name)
    return gemm
