"""The aux-loss-free bias-update loop (paper 2.1.2), run once per optimizer step.

After the optimizer step (trainer/train.py; the new bias changes routing from the next step on): collect every
MoE layer's token counts of the step (main model and MTP), sum them over the data-parallel group (so the load is
the whole batch's, as in the paper), apply `update_bias` (b += gamma * sign(mean - load)) when balancing is
aux-loss-free, and reset the counts. MaxVio = max load / mean load - 1 (Wang et al. 2024) is reported per layer
and averaged.

Under pipeline parallelism each rank holds some layers' routers. Where several pipeline ranks hold copies of
a layer (DualPipe), each copy counted only the micro-batches it ran: the counts are summed over the copies too
(`replicas`), so every copy applies the same update. The report covers every layer of the pipeline
(`report_group`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.moe import gates, update_bias


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer's per-expert token counts."""
    mean = load.float().mean()
    return float(load.float().max() / mean - 1) if mean > 0 else 0.0


class BiasBalancer:
    def __init__(self, model: nn.Module, update: bool, group: dist.ProcessGroup | None = None,
                 replicas: list[tuple[list[str], dist.ProcessGroup]] = (),
                 report_group: dist.ProcessGroup | None = None) -> None:
        """update: apply the sign rule (balance == aux_free); group: the data-parallel group (None = all ranks
        when torch.distributed is initialised, else this process alone); replicas: (router names, group of the
        pipeline ranks holding copies of them), the same names in the same order on every rank of that group;
        report_group: the pipeline group, whose ranks' MaxVio reports are merged."""
        self.gates = dict(sorted(gates(model).items()))
        self.update = update
        self.group = group
        self.replicas = [(sorted(names), g) for names, g in replicas]
        self.report_group = report_group

    def step(self, gamma: float) -> dict[str, object]:
        """Reduce the counts, update the biases, reset; returns {"maxvio": mean over layers, "maxvio_layer": {...}}."""
        per_layer = {}
        if self.gates:
            loads = torch.stack([g.tokens_per_expert for g in self.gates.values()])  # (layers, experts)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(loads, group=self.group)
                index = {name: i for i, name in enumerate(self.gates)}
                for names, group in self.replicas:
                    rows = [index[n] for n in names]
                    summed = loads[rows].clone()
                    dist.all_reduce(summed, group=group)
                    loads[rows] = summed
            with torch.no_grad():
                for (name, gate), load in zip(self.gates.items(), loads):
                    per_layer[name] = max_violation(load)
                    if self.update and gamma:
                        gate.bias.copy_(update_bias(gate.bias, load, gamma))
                    gate.tokens_per_expert.zero_()
        if self.report_group is not None:
            reports: list[dict] = [{} for _ in range(dist.get_world_size(self.report_group))]
            dist.all_gather_object(reports, per_layer, group=self.report_group)
            per_layer = dict(sorted({k: v for r in reports for k, v in r.items()}.items()))
        if not per_layer:
            return {"maxvio": 0.0, "maxvio_layer": {}}
        return {"maxvio": sum(per_layer.values()) / len(per_layer), "maxvio_layer": per_layer}

    def discard(self) -> None:
        """Drop the counts of a step that is skipped (non-finite loss)."""
        for gate in self.gates.values():
            gate.tokens_per_expert.zero_()
