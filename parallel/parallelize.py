"""Every parallelism applied to a model from outside, in one place and one order (DESIGN.md principle 1, paper 3.2).

    pipeline = parallelize(model, grid, cfg.parallel, cfg.fp8, dtype)
    opt = build_optimizer(model, grid, pipeline, cfg.optim)

1. `apply_pipeline` (parallel/pipeline/pipeline.py) cuts the model to this rank's pipeline stages first, so that
   everything after it sees only the layers this rank runs (and a one-process run keeps them all);
2. `apply_expert_parallel` then keeps, in each of those layers, this rank's block of routed experts and swaps the
   MoE layer's dispatcher for the all-to-all one; it needs the stages already cut (it must not create
   dispatchers for layers that other ranks hold) and the dispatch payload of the FP8 recipe, which is given to it
   explicitly (`fp8.recipe.dispatch_payload`), not discovered;
3. `fp8.recipe.apply_fp8` last sets the FP8 strategy of the Linears that remain: the experts' weights it sees are
   this rank's, and no module of another rank gets a strategy.

Parameter names never change: `layers.3.ffn.experts.w1.weight` is [E/EP, ...] on every EP rank, and a stage's
layers keep their global indices, so checkpoints are written under the single-process names (trainer/shards.py
maps each rank's pieces into the whole tensors).
"""

from __future__ import annotations

import torch
from torch import nn

from fp8.config import FP8Config
from fp8.recipe import apply_fp8, dispatch_payload
from model.moe import MoE
from model.transformer import Transformer
from optim.adamw import AdamW
from optim.config import OptimConfig
from optim.optimizer import Optimizer
from parallel.config import ParallelConfig
from parallel.expert import ExpertParallelDispatcher, Payload, expert_range, is_expert_param
from parallel.grad_reduce import OverlappedGradReduce
from parallel.grid import ProcessGrid
from parallel.pipeline.pipeline import Pipeline, apply_pipeline
from parallel.zero import ZeroOptimizer


def parallelize(model: Transformer, grid: ProcessGrid, parallel: ParallelConfig, fp8: FP8Config,
                dtype: torch.dtype) -> Pipeline:
    """Apply the pipeline split, expert parallelism and the FP8 recipe, in that order (see the module docstring);
    returns this rank's pipeline. `dtype` is the compute dtype (hidden states travel between stages in it)."""
    pipeline = apply_pipeline(model, grid, parallel, dtype)
    apply_expert_parallel(model, grid, parallel, payload=dispatch_payload(fp8))
    apply_fp8(model, fp8)
    return pipeline


def apply_expert_parallel(model: nn.Module, grid: ProcessGrid, cfg: ParallelConfig,
                          payload: Payload | None = None) -> None:
    """Keep this EP rank's contiguous block of E / EP routed experts (rank r owns [r E/EP, (r+1) E/EP)) and route
    tokens to the others through all-to-all; nothing changes with EP = 1. The router, shared experts and all
    dense weights stay replicated. `payload`: how dispatched rows travel (None: as they are)."""
    if grid.ep == 1:
        return
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        n_experts = moe.gate.weight.shape[0]
        start, end = expert_range(n_experts, grid.ep, grid.ep_rank)
        for linear in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            linear.weight = nn.Parameter(linear.weight.detach()[start:end].clone())
            linear.n_experts, linear.first_expert = end - start, start
        moe.experts.n_experts = end - start
        moe.dispatcher = ExpertParallelDispatcher(grid.ep_group, n_experts, gpus_per_node=grid.gpus_per_node,
                                                  hierarchical=cfg.dispatch == "hierarchical", fabric=cfg.fabric,
                                                  payload=payload, device=grid.device, bwd_group=grid.ep_bwd_group)


def build_optimizer(model: nn.Module, grid: ProcessGrid, pipeline: Pipeline, cfg: OptimConfig) -> Optimizer:
    """The run's optimizer: AdamW in one process (the reference), ZeRO-1 over the grid's data-parallel groups
    otherwise, its buckets cut by the pipeline's gradient groups (`Pipeline.grad_group`); with a pipeline the norm
    also sums over the pipeline group, each parameter counted with the pipeline's `norm_share` (1 / the pipeline
    ranks holding it). The pipeline reduces each bucket's flat gradient buffer in place into the optimizer's
    shards (parallel/grad_reduce.py): during the step's cool-down with parallel.overlap_grad_reduce, else after
    its last action."""
    if grid.world_size == 1:
        return AdamW(model.named_parameters(), cfg)
    piped = grid.pp > 1
    opt = ZeroOptimizer(model.named_parameters(), cfg, grid.dp_group, grid.edp_group, is_expert_param,
                        extra_group=grid.pp_group if piped else None,
                        norm_share=pipeline.norm_share if piped else None, bucket_key=pipeline.grad_group)
    pipeline.reducer = OverlappedGradReduce(opt, pipeline.schedule, grid.pp_rank, pipeline.replica_groups,
                                            grid.device, overlap=pipeline.cfg.overlap_grad_reduce)
    return opt
