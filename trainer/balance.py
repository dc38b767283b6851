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


def _max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio of one layer's per-expert token counts, as a 0-d tensor on their device."""
    load = load.float()
    mean = load.mean()
    return torch.where(mean > 0, load.max() / mean - 1, torch.zeros_like(mean))


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer's per-expert token counts."""
    return float(_max_violation(load))


class BiasBalancer:
    def __init__(self, model: nn.Module, update: bool, group: dist.ProcessGroup | None = None,
                 replicas: list[tuple[list[str], dist.ProcessGroup]] = (),
                 report_group: dist.ProcessGroup | None = None, all_gates: list[str] | None = None,
                 device: torch.device | str = "cpu") -> None:
        """update: apply the sign rule (balance == aux_free); group: the data-parallel group (None = all ranks
        when torch.distributed is initialised, else this process alone); replicas: (router names, group of the
        pipeline ranks holding copies of them), the same names in the same order on every rank of that group;
        report_group: the pipeline group, whose ranks' MaxVio reports are merged; all_gates: the routers of the
        whole model (`Transformer.gate_names`; default: this model's); device: where the report is reduced (the
        grid's)."""
        self.gates = dict(sorted(gates(model).items()))
        self.update = update
        self.group = group
        self.replicas = [(sorted(names), g) for names, g in replicas]
        self.report_group = report_group
        self.all_gates = sorted(all_gates if all_gates is not None else self.gates)
        self.device = torch.device(device)

    def step(self, gamma: float) -> dict[str, object]:
        """Reduce the counts, update the biases, reset; returns {"maxvio": mean over layers, "maxvio_layer": {...}}.
        Everything stays on the device until the report, which is read to the host once."""
        report = torch.full((len(self.all_gates),), float("-inf"), dtype=torch.float64, device=self.device)
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
                held = [self.all_gates.index(name) for name in self.gates]
                report[held] = torch.stack([_max_violation(load) for load in loads]).double().to(self.device)
                for gate, load in zip(self.gates.values(), loads):
                    if self.update and gamma:
                        gate.bias.copy_(update_bias(gate.bias, load, gamma))
                    gate.tokens_per_expert.zero_()
        if self.report_group is not None:
            dist.all_reduce(report, op=dist.ReduceOp.MAX, group=self.report_group)
        per_layer = {name: v for name, v in zip(self.all_gates, report.tolist()) if v != float("-inf")}
        if not per_layer:
            return {"maxvio": 0.0, "maxvio_layer": {}}
        return {"maxvio": sum(per_layer.values()) / len(per_layer), "maxvio_layer": per_layer}
    def discard(self) -> None:
        """Drop the counts of a step that is skipped (non-finite loss)."""
        for gate in self.gates.values():
            gate.tokens_per_expert.zero_()
