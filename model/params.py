"""Parameter counts of a config without allocating memory (the model is built on the meta device).

`total` and `activated` cover the main model (embedding, blocks, final norm, output head), as the paper's
671B / 37B do; `mtp` counts the MTP modules' own parameters (they share the embedding and head).
Activated = the parameters a token's computation multiplies: every dense weight, the shared experts and K
of the routed experts per MoE layer; the embedding table is excluded, since a token reads only its own row.
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
    routed_active = routed_main * cfg.n_activated_experts // cfg.n_routed_experts
    activated = total - main["embed.weight"] - routed_main + routed_active
    mtp = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    return {"total": total, "activated": activated, "mtp": mtp}
