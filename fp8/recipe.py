"""Which GEMMs of the model run in FP8, applied from outside (paper 3.3, Figure 6; DESIGN.md principle 1).

FP8: every projection of MLA (wq / wq_a, wq_b, wkv_a, wkv_b, wo), the dense FFNs, the shared experts and the routed
experts, in the main blocks and in the MTP modules' blocks. Kept in bf16/fp32, as in the paper: the embedding, the
output head, the router (fp32), the norms, the attention core (softmax), the MTP projection `eh_proj`, and the
optimizer's master weights, gradients and (bf16) moments.

With `fp8.e5m6_cache` the Linear after attention (`attn.wo`) keeps its input for backward in E5M6 with power-of-two
scales (fp8/e5m6.py) rather than E4M3, as the paper does for this precision-sensitive activation.

With `fp8.dispatch` the expert-parallel dispatch sends each row as E4M3 bytes with power-of-two 1x128 scales
(`FP8Payload`), which the expert up-projection consumes without quantising again, and so does the matching gradient
exchange in the combine's backward (the activation gradient
before the down-projection); the combine itself stays in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8.config import FP8Config
from fp8.linear import FP8Spec, GroupedLinear, Linear
from model.block import Block
from model.moe import MoE


class FP8Payload:
    """Dispatch payload hook (parallel/expert.py `payload`): rows [N, dim] -> [E4M3 bytes as uint8, fp32 scales per
    1x128 tile]; always power-of-two scales (paper 3.3), so the receiver's dequantised rows are exactly the FP8
    values and quantising them again for the up-projection loses nothing."""

    def pack(self, rows: torch.Tensor) -> list[torch.Tensor]:
        from fp8.quant import quantize_1x128

        q, scale = quantize_1x128(rows, pow2=True)
        return [q.view(torch.uint8), scale]

    def unpack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The rows dequantised, carrying their E4M3 form as `rows.fp8 = (q, scale)`: the FP8 expert up-projection
        (fp8/linear.py `swiglu_experts`) takes it as its operand instead of quantising the rows again."""
        from fp8.quant import dequantize

        q, scale = tensors
        q = q.view(torch.float8_e4m3fn)
        rows = dequantize(q, scale, (1, 128))
        rows.fp8 = (q, scale)
        return rows


def fp8_modules(model: nn.Module) -> list[Linear | GroupedLinear]:
    """The Linears and GroupedLinears the recipe runs in FP8 (see the module docstring)."""
    out: list[Linear | GroupedLinear] = []
    for block in (m for m in model.modules() if isinstance(m, Block)):
        out += [m for m in block.attn.modules() if isinstance(m, Linear)]
        ffn = block.ffn
        parts = [ffn.shared_experts, ffn.experts] if isinstance(ffn, MoE) else [ffn]
        out += [m for part in parts if part is not None for m in part.modules()
                if isinstance(m, (Linear, GroupedLinear))]
    return out


def apply_recipe(model: nn.Module, cfg: FP8Config) -> int:
    """Switch the recipe's GEMMs to FP8 (and the dispatch payload, where experts are parallel); returns how many
    modules run in FP8. Raises if the GEMM backend is not available here, with the reason."""
    if not cfg.enabled:
        return 0
    from fp8.gemm import get_backend

    spec = FP8Spec(get_backend(cfg.gemm_backend()), cfg.pow2_scales)
    after_attention = {id(m.attn.wo) for m in model.modules() if isinstance(m, Block)}
    modules = fp8_modules(model)
    for m in modules:
        m.fp8 = FP8Spec(spec.gemm, spec.pow2, e5m6_cache=True) if cfg.e5m6_cache and id(m) in after_attention \
            else spec
    if cfg.dispatch:
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            if hasattr(moe.dispatcher, "payload"):  # the expert-parallel dispatcher (parallel/expert.py)
                moe.dispatcher.payload = FP8Payload()
    return len(modules)
