"""Expert parallelism applied to a model from outside (DESIGN.md principle 1, paper 3.2).

`apply_expert_parallel` keeps, on each rank of an expert-parallel group of size EP, only its contiguous
block of E / EP routed experts (rank r owns experts [r E/EP, (r+1) E/EP)) and swaps every MoE layer's
dispatcher for the all-to-all one. Parameter names do not change: `layers.3.ffn.experts.w1.weight` is
[E/EP, ...] on every rank. The router, shared experts and all dense weights stay replicated.

Checkpoints store the full expert tensors; `parallel.runtime.Runtime` maps each rank's block into them.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from model.moe import MoE


def expert_range(n_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """The global ids [start, end) of the routed experts that EP rank `ep_rank` owns."""
    per_rank = n_experts // ep_size
    return ep_rank * per_rank, (ep_rank + 1) * per_rank


def is_expert_param(name: str) -> bool:
    """Routed-expert parameters are sharded by EP (and reduced over expert-DP); all others are dense."""
    return ".experts." in name


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup, ep_rank: int, ep_size: int,
                          gpus_per_node: int, hierarchical: bool, fabric=None) -> None:
    """Keep this rank's experts and route tokens to the others through all-to-all."""
    from parallel.expert import ExpertParallelDispatcher

    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        n_experts = moe.gate.weight.shape[0]
        start, end = expert_range(n_experts, ep_size, ep_rank)
        for linear in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            linear.weight = nn.Parameter(linear.weight.detach()[start:end].clone())
            linear.n_groups = end - start
        moe.experts.n_experts = end - start
        moe.dispatcher = ExpertParallelDispatcher(group, n_experts, gpus_per_node=gpus_per_node,
                                                  hierarchical=hierarchical, fabric=fabric)
