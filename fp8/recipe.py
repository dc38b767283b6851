"""Which GEMMs of the model run in FP8, applied from outside (paper 3.3, Figure 6; DESIGN.md principle 1).

FP8: every projection of MLA (wq / wq_a, wq_b, wkv_a, wkv_b, wo), the dense FFNs, the shared experts and the routed
experts, in the main blocks and in the MTP modules' blocks. Kept in bf16/fp32, as in the paper: the embedding, the
output head, the router (fp32), the norms, the attention core (softmax), the MTP projection `eh_proj`, and the
optimizer's master weights, gradients and (bf16) moments.

With `fp8.e5m6_cache` the Linear after attention (`attn.wo`) keeps its input for backward in E5M6 with power-of-two
scales (fp8/e5m6.py) rather than E4M3, as the paper does for this precision-sensitive activation.

With `fp8.dispatch` the expert-parallel dispatch sends each row as E4M3 bytes with power-of-two 1x128 scales
(`dispatch_payload` gives the `FP8Payload` that parallel/parallelize.py hands to the dispatcher), which the expert
up-projection consumes without quantising again, and so does the matching gradient exchange in the combine's
backward (the activation gradient before the down-projection); the combine itself stays in the compute dtype.

`apply_fp8` runs after the pipeline split and expert parallelism (parallel/parallelize.py says why): it sets the
strategy of the modules this rank holds.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8.config import FP8Config
from fp8.gemm import get_backend
from fp8.linear import FP8Spec
from fp8.quant import dequantize, quantize_1x128
from model.block import Block
from model.linear import GroupedLinear, Linear
from model.moe import MoE


class FP8Payload:
    """Dispatch payload (parallel/expert.py `Payload`): rows [N, dim] -> [E4M3 bytes as uint8, fp32 scales per
    1x128 tile]; always power-of-two scales (paper 3.3), so the receiver's dequantised rows are exactly the FP8
    values and quantising them again for the up-projection loses nothing."""

    def pack(self, rows: torch.Tensor) -> list[torch.Tensor]:
        q, scale = quantize_1x128(rows, pow2=True)
        return [q.view(torch.uint8), scale]

    def unpack(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(the rows dequantised, their E4M3 form (q, scale)): the FP8 expert up-projection (fp8/linear.py
        `FP8Spec.swiglu_experts`) takes the second as its operand instead of quantising the rows again."""
        q, scale = tensors
        q = q.view(torch.float8_e4m3fn)
        return dequantize(q, scale, (1, 128)), (q, scale)


def dispatch_payload(cfg: FP8Config) -> FP8Payload | None:
    """The expert dispatch's payload under this recipe: FP8 rows when the recipe is on with `fp8.dispatch`."""
    return FP8Payload() if cfg.enabled and cfg.dispatch else None


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


def apply_fp8(model: nn.Module, cfg: FP8Config) -> int:
    """Switch the recipe's GEMMs to FP8; returns how many modules run in FP8. Raises if the GEMM backend is not
    available here, with the reason."""
    if not cfg.enabled:
        return 0
    spec = FP8Spec(get_backend(cfg.gemm_backend()), cfg.pow2_scales)
    after_attention = {id(m.attn.wo) for m in model.modules() if isinstance(m, Block)}
    modules = fp8_modules(model)
    for m in modules:
        m.fp8 = FP8Spec(spec.gemm, spec.pow2, e5m6_cache=True) if cfg.e5m6_cache and id(m) in after_attention \
            else spec
    return len(modules)
