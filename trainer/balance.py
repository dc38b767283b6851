"""The aux-loss-free bias-update loop (paper 2.1.2), run once per optimizer step.

After the last micro-batch's backward and before the optimizer step: collect every MoE layer's token counts
(main model and MTP), sum them over the data-parallel group (so the load is the whole batch's, as in the
paper), apply `update_bias` (b += gamma * sign(mean - load)) when balancing is aux-loss-free, and reset
the counts. MaxVio = max load / mean load - 1 (Wang et al. 2024) is reported per layer and averaged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.moe import Gate, update_bias


def moe_gates(model: nn.Module) -> dict[str, Gate]:
    """Every router of the model, keyed by its module path (e.g. "layers.5.ffn.gate", "mtp.0.block.ffn.gate")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Gate)}


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer's per-expert token counts."""
    mean = load.float().mean()
    return float(load.float().max() / mean - 1) if mean > 0 else 0.0


class BiasBalancer:
    def __init__(self, model: nn.Module, update: bool, group: dist.ProcessGroup | None = None) -> None:
        """update: apply the sign rule (balance == aux_free); group: the data-parallel group (None = all ranks
        when torch.distributed is initialised, else this process alone)."""
        self.gates = moe_gates(model)
        self.update = update
        self.group = group

    def step(self, gamma: float) -> dict[str, object]:
        """Reduce the counts, update the biases, reset; returns {"maxvio": mean over layers, "maxvio_layer": {...}}."""
        if not self.gates:
            return {"maxvio": 0.0, "maxvio_layer": {}}
        loads = torch.stack([g.tokens_per_expert for g in self.gates.values()])  # (layers, experts)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads, group=self.group)
        per_layer = {}
        with torch.no_grad():
            for (name, gate), load in zip(self.gates.items(), loads):
                per_layer[name] = max_violation(load)
                if self.update and gamma:
                    gate.bias.copy_(update_bias(gate.bias, load, gamma))
                gate.tokens_per_expert.zero_()
        return {"maxvio": sum(per_layer.values()) / len(per_layer), "maxvio_layer": per_layer}

    def discard(self) -> None:
        """Drop the counts of a step that is skipped (non-finite loss)."""
        for gate in self.gates.values():
            gate.tokens_per_expert.zero_()
