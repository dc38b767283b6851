"""Pipeline stages of the model (paper 3.2.1): which layers each stage holds, what each rank keeps of the model,
and the forward of one stage. Applied from outside (parallel/parallelize.py): the model is built whole (same seed
on every rank, so every copy starts equal) and each rank drops what its stages do not hold; parameter names stay
those of the single-process model. One process is a pipeline of one stage holding everything.

Split. `split_layers` gives each stage a contiguous block of layers. By default the blocks are as even as
possible and the larger ones go to the middle stages, because the first stage also runs the embedding and the
last one the output head and the MTP modules (paper: "the first and last stages may hold fewer layers");
`parallel.stage_layers` sets the counts explicitly.

What a rank keeps. Its stages' layers; the embedding if it runs stage 0, or the last stage with MTP (MTP embeds
the future tokens with the very same embedding, paper 2.2); the final norm, output head and MTP modules if it
runs the last stage. Under DualPipe rank r runs stages r and PP-1-r, so rank 0 and rank PP-1 both hold the
embedding and the head; under DualPipeV rank 0 holds stages 0 and 2PP-1, so one rank holds all of them and the
MTP modules use the same tensors as the embedding lookup and the main head.

Parameters held by several pipeline ranks (DualPipe's two copies of every stage; the embedding on the first and
last rank of 1F1B with MTP) get their gradients summed over those ranks before the optimizer step
(`sync_replicated_grads`), so the copies stay equal.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from core.config import ConfigError
from model.block import run_steps
from model.grads import grad_of
from model.transformer import LossOutput, Transformer
from parallel.pipeline.schedule import Schedule


def split_layers(n_layers: int, n_stages: int, stage_layers: list[int] | None = None) -> list[range]:
    """The layers of each stage, in model order. Raises ConfigError naming parallel.stage_layers if the explicit
    counts do not fit."""
    if n_stages < 1:
        raise ConfigError(f"a pipeline needs at least one stage, got {n_stages}")
    if stage_layers is None:
        base, extra = divmod(n_layers, n_stages)
        # the `extra` larger blocks go to the middle stages, the first and last carry embedding and head
        middle = sorted(range(n_stages), key=lambda s: (abs(2 * s - (n_stages - 1)), s))[:extra]
        counts = [base + (s in middle) for s in range(n_stages)]
    else:
        counts = list(stage_layers)
        if len(counts) != n_stages or any(c < 0 for c in counts) or sum(counts) != n_layers:
            raise ConfigError(f"parallel.stage_layers={counts}: needs {n_stages} non-negative layer counts (one per "
                              f"pipeline stage) summing to model.n_layers={n_layers}; e.g. "
                              f"{[c.stop - c.start for c in split_layers(n_layers, n_stages)]}, or null for an "
                              "even split")
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return [range(a, a + c) for a, c in zip(starts, counts)]


@dataclass(frozen=True)
class StageSpec:
    """Stage `index` of `n_stages`: its layers; the first stage embeds the tokens, the last computes the loss."""

    index: int
    n_stages: int
    layers: range

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1


def rank_stages(schedule: Schedule, pp_rank: int, n_layers: int,
                stage_layers: list[int] | None = None) -> list[StageSpec]:
    """The stages `pp_rank` runs, by phase (one, or two for dualpipe and dualpipev)."""
    n = schedule.n_stages
    blocks = split_layers(n_layers, n, stage_layers)
    specs = []
    for phase in range(schedule.phases):
        s = schedule.stage_of(pp_rank, phase)
        specs.append(StageSpec(s, n, blocks[s]))
    return specs


def keep_stages(model: Transformer, specs: list[StageSpec]) -> Transformer:
    """Drop, in place, every part of `model` that none of `specs` runs; returns the model."""
    keep = {str(i) for spec in specs for i in spec.layers}
    model.layers = nn.ModuleDict({k: layer for k, layer in model.layers.items() if k in keep})
    last = any(spec.last for spec in specs)
    mtp = last and model.mtp is not None and len(model.mtp) > 0
    if not (any(spec.first for spec in specs) or mtp):
        model.embed = None
    if not last:
        model.norm = model.head = model.mtp = None
    return model


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    document_ids: torch.Tensor | None = None


def stage_steps(model: Transformer, spec: StageSpec, x: torch.Tensor | None, batch: MicroBatch,
                mtp_lambda: float = 0.0, output: bool = True) -> Generator[None, None, torch.Tensor | LossOutput]:
    """One stage's forward as a generator that pauses after each all-to-all it launches (`Block.steps`): tokens
    (first stage) or the previous stage's hidden states `x` through its blocks, then on the last stage (unless
    `output` is False) the micro-batch's LossOutput (main + MTP); otherwise its hidden states."""
    h = model.embed(batch.tokens) if spec.first else x
    h = yield from model.layer_steps(h, spec.layers, batch.document_ids)
    if spec.last and output:
        return model.output_loss(h, batch.labels, mtp_lambda, batch.document_ids)
    return h


def stage_forward(model: Transformer, spec: StageSpec, x: torch.Tensor | None, batch: MicroBatch,
                  mtp_lambda: float = 0.0, output: bool = True) -> torch.Tensor | LossOutput:
    """`stage_steps` run without pausing."""
    return run_steps(stage_steps(model, spec, x, batch, mtp_lambda, output))


def holders(schedule: Schedule, n_layers: int, stage_layers: list[int] | None, mtp: bool) -> dict[str, list[int]]:
    """Which pipeline ranks hold each part ("embed", "head" for norm/head/MTP, "layers.<i>"): the sets of ranks
    whose gradients must be summed."""
    out: dict[str, list[int]] = {}
    for r in range(schedule.pp):
        specs = rank_stages(schedule, r, n_layers, stage_layers)
        parts = [f"layers.{i}" for spec in specs for i in spec.layers]
        if any(spec.first for spec in specs) or (mtp and any(spec.last for spec in specs)):
            parts.append("embed")
        if any(spec.last for spec in specs):
            parts.append("head")
        for part in parts:
            out.setdefault(part, []).append(r)
    return out


_HEAD_PARTS = ("norm.", "head.", "mtp.")


def part_of(name: str) -> str:
    """The part (as in `holders`) a parameter name belongs to."""
    if name.startswith("embed."):
        return "embed"
    if name.startswith(_HEAD_PARTS):
        return "head"
    return ".".join(name.split(".")[:2])


@torch.no_grad()
def sync_replicated_grads(model: nn.Module, groups: dict[tuple[int, ...], dist.ProcessGroup | None],
                          holder_of: dict[str, list[int]]) -> None:
    """Sum the gradients of parameters held by several pipeline ranks over those ranks. `groups` maps each rank
    set (pipeline ranks, sorted) to its process group; every rank in a set calls this with the same model parts,
    and the parameters are reduced in name order, one flat buffer per rank set. A low-precision parameter's
    gradient is its fp32 `main_grad` (model.grads.grad_of). This is the path of a pipeline without a ZeRO-1
    optimizer (tests, benches); training reduces in place on the optimizer's buckets (parallel/grad_reduce.py)."""
    by_set: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for name, p in sorted(model.named_parameters()):
        ranks = tuple(holder_of[part_of(name)])
        if len(ranks) > 1 and grad_of(p) is not None:
            by_set.setdefault(ranks, []).append(grad_of(p))
    for ranks, grads in sorted(by_set.items()):
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=groups[ranks])
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
