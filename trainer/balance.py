"""The aux-loss-free bias-update loop (paper 2.1.2), run once per optimizer step.

After the optimizer step (trainer/train.py; the new bias changes routing from the next step on): collect every
MoE layer's token counts of the step (main model and MTP), sum them over the data-parallel group (so the load is
the whole batch's, as in the paper), apply `update_bias` (b += gamma * sign(mean - load)) when balancing is
aux-loss-free, and reset the counts. MaxVio = max load / mean load - 1 (Wang et al. 2024) is reported per layer
and averaged, with the other signs of a layer's health (`STATS`: idle experts, the biases' spread, the EP-rank
overload).

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


STATS = ("maxvio", "idle", "bias_min", "bias_mean", "bias_max", "ep_overload")  # per layer, in this order


def layer_stats(load: torch.Tensor, bias: torch.Tensor, ep: int) -> torch.Tensor:
    """`STATS` of one layer, [6] fp64 on the device: MaxVio, experts that received no token, the bias's min /
    mean / max, and the EP-rank overload: tokens routed to the busiest EP rank's experts (E/ep consecutive ones)
    over the mean per EP rank (1 = even; what the slowest rank's expert GEMMs wait for)."""
    load, bias = load.double(), bias.double()
    per_rank = load.view(ep, -1).sum(-1)
    mean = per_rank.mean()
    overload = torch.where(mean > 0, per_rank.max() / mean, torch.ones_like(mean))
    return torch.stack([_max_violation(load).double(), (load == 0).sum().double(), bias.min(), bias.mean(),
                        bias.max(), overload])


class BiasBalancer:
    def __init__(self, model: nn.Module, update: bool, group: dist.ProcessGroup | None = None,
                 replicas: list[tuple[list[str], dist.ProcessGroup]] = (),
                 report_group: dist.ProcessGroup | None = None, all_gates: list[str] | None = None,
                 device: torch.device | str = "cpu", ep: int = 1, n_experts: int | None = None) -> None:
        """update: apply the sign rule (balance == aux_free); group: the data-parallel group (None = all ranks
        when torch.distributed is initialised, else this process alone); replicas: (router names, group of the
        pipeline ranks holding copies of them), the same names in the same order on every rank of that group;
        report_group: the pipeline group, whose ranks' MaxVio reports are merged; all_gates: the routers of the
        whole model (`Transformer.gate_names`; default: this model's); device: where the report is reduced (the
        grid's); ep: expert-parallel ranks, over which the EP overload is measured; n_experts: routed experts per
        layer (default: this model's routers')."""
        self.gates = dict(sorted(gates(model).items()))
        self.update = update
        self.group = group
        self.replicas = [(sorted(names), g) for names, g in replicas]
        self.report_group = report_group
        self.all_gates = sorted(all_gates if all_gates is not None else self.gates)
        self.device = torch.device(device)
        self.ep = ep
        self.n_experts = n_experts if n_experts is not None else next(
            (g.tokens_per_expert.numel() for g in self.gates.values()), 0)

    def step(self, gamma: float) -> dict[str, object]:
        """Reduce the counts, update the biases, reset; returns {"maxvio": mean over layers, "maxvio_layer":
        {layer: MaxVio}, "experts": {layer: the other `STATS` after the update}, "expert_loads": {layer: tokens
        per expert}} and the step's summaries ("idle_experts" over all layers, "ep_overload" of the worst layer,
        "bias_min", "bias_max"). Everything stays on the device until the report, read to the host once."""
        report = torch.full((len(self.all_gates), len(STATS) + self.n_experts), float("-inf"), dtype=torch.float64,
                            device=self.device)  # per layer: STATS, then the load of each expert
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
                for gate, load in zip(self.gates.values(), loads):
                    if self.update and gamma:
                        gate.bias.copy_(update_bias(gate.bias, load, gamma))
                held = [self.all_gates.index(name) for name in self.gates]
                report[held] = torch.stack([torch.cat([layer_stats(load, gate.bias, self.ep), load.double()])
                                            for gate, load in zip(self.gates.values(), loads)]).to(self.device)
                for gate in self.gates.values():
                    gate.tokens_per_expert.zero_()
        if self.report_group is not None:
            dist.all_reduce(report, op=dist.ReduceOp.MAX, group=self.report_group)
        values = report.tolist()
        rows = {name: dict(zip(STATS, v)) for name, v in zip(self.all_gates, values) if v[0] != float("-inf")}
        loads = {name: v[len(STATS):] for name, v in zip(self.all_gates, values) if v[0] != float("-inf")}
        if not rows:
            return {"maxvio": 0.0, "maxvio_layer": {}, "experts": {}, "expert_loads": {}}
        return {"maxvio": sum(r["maxvio"] for r in rows.values()) / len(rows),
                "maxvio_layer": {name: r["maxvio"] for name, r in rows.items()},
                "experts": {name: {k: r[k] for k in STATS[1:]} for name, r in rows.items()},
                "idle_experts": int(sum(r["idle"] for r in rows.values())),
                "ep_overload": max(r["ep_overload"] for r in rows.values()),
                "bias_min": min(r["bias_min"] for r in rows.values()),
                "bias_max": max(r["bias_max"] for r in rows.values()), "expert_loads": loads}

    def discard(self) -> None:
        """Drop the counts of a step that is skipped (non-finite loss)."""
        for gate in self.gates.values():
            gate.tokens_per_expert.zero_()
