"""Parameter counts of a config without allocating memory (the model is built on the meta device).

`total` and `activated` cover the main model (embedding, blocks, final norm, output head), as the paper's
671B / 37B do; `mtp` counts the MTP modules' own parameters (they share the embedding and head).
Activated = everything a token passes through: all dense parameters, the shared experts and K of the
routed experts per MoE layer.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    routed = {name for name, _ in model.named_parameters() if ".experts." in name}
    main = {name: p.numel() for name, p in model.named_parameters() if not name.startswith("mtp.")}
    total = sum(main.values())
    routed_main = sum(n for name, n in main.items() if name in routed)
    activated = total - routed_main + routed_main * cfg.n_activated_experts // cfg.n_routed_experts
    mtp = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    return {"total": total, "activated": activated, "mtp": mtp}
