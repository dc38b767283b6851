"""ParallelConfig: the process grid (paper 3.2: PP x EP x ZeRO-1 DP). Mirrored by configs/parallel/*.yaml.

DP is the world size divided by PP; EP divides DP; `gpus_per_node` groups ranks into (simulated) nodes.
Every rule is checked before any process group is built, with the numbers and the fix in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError, ModelConfig

DISPATCH_MODES = ("flat", "hierarchical")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline-parallel stages (DP = world size / pp)
    ep: int = 1  # expert-parallel ranks, contiguous inside the data-parallel group; divides DP
    gpus_per_node: int = 8  # ranks per (simulated) node; node-limited routing uses the nodes of the EP group
    dispatch: str = "flat"  # expert all-to-all: flat | hierarchical (across nodes once, then inside the node)
    timeout_s: int = 120  # collective timeout in seconds: a failed rank ends the job within it
    schedule: str = "1f1b"  # pipeline schedule: 1f1b | zb1p | dualpipe | dualpipev (parallel/pipeline/schedule.py)
    microbatches: int | None = None  # micro-batches per step and pipeline; None: global batch / (micro-batch x DP)
    stage_layers: list[int] | None = None  # explicit layer count per pipeline stage; None: an even split
    fabric: dict | None = None  # simulated links for CPU runs: {intra_gbps, inter_gbps, latency_us}; parallel/fabric.py
    overlap: bool = True  # run an FB chunk's forward inside its backward (pipeline/overlap.py); false: F then B

    def validate(self, world_size: int = 1) -> ParallelConfig:
        """The arithmetic of the grid and the schedule's rules that do not depend on the batch."""
        for name in ("pp", "ep", "gpus_per_node", "timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if self.dispatch not in DISPATCH_MODES:
            raise ConfigError(f"parallel.dispatch={self.dispatch!r} is not a dispatch mode; choose one of "
                              f"{', '.join(DISPATCH_MODES)}")
        if world_size % self.pp:
            raise ConfigError(f"parallel.pp={self.pp} does not divide the world size {world_size} "
                              f"(DP = world / pp); choose pp among {_divisors(world_size)}")
        dp = world_size // self.pp
        if dp % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide the data-parallel size {dp} "
                              f"(world {world_size} / pp {self.pp}); choose ep among {_divisors(dp)}")
        if world_size > self.gpus_per_node and world_size % self.gpus_per_node:
            raise ConfigError(f"parallel.gpus_per_node={self.gpus_per_node} does not divide the world size "
                              f"{world_size}; every node holds the same number of ranks: choose "
                              f"gpus_per_node among {_divisors(world_size)} (or >= {world_size} for one node)")
        from parallel.pipeline.action import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"parallel.schedule={self.schedule!r} does not exist; choose one of "
                              f"{', '.join(SCHEDULES)}")
        if self.schedule == "dualpipe" and self.pp % 2:
            raise ConfigError(f"parallel.schedule=dualpipe needs an even number of pipeline ranks, got parallel.pp="
                              f"{self.pp}; use an even pp, or parallel.schedule=dualpipev (any pp)")
        from parallel.fabric import Fabric

        Fabric.from_config(self.fabric)
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"parallel.overlap={self.overlap!r}: must be true or false")
        if self.microbatches is not None and self.microbatches < 1:
            raise ConfigError(f"parallel.microbatches={self.microbatches}: must be >= 1, or null to derive it")
        gpn = self.gpus_per_node
        if world_size > gpn and self.ep % gpn and gpn % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} with parallel.gpus_per_node={gpn}: an expert-parallel group "
                              f"must fit inside one node or fill whole nodes; choose ep among {_divisors(gpn)} "
                              f"or a multiple of {gpn}")
        return self

    def nodes_in_ep(self) -> int:
        """Nodes spanned by one EP group (its ranks are contiguous)."""
        return max(1, -(-self.ep // self.gpus_per_node))


def check_model_layout(cfg: ParallelConfig, model: ModelConfig, world_size: int) -> None:
    """The model must split over the grid: its layers over the pipeline stages, experts divisible by EP, and
    under node-limited routing across several nodes, one router group per node of the EP group (paper 3.2: a
    token reaches at most M nodes)."""
    from parallel.pipeline.action import num_stages
    from parallel.pipeline.stage import split_layers

    split_layers(model.n_layers, num_stages(cfg.schedule, cfg.pp), cfg.stage_layers)
    if model.n_routed_experts % cfg.ep:
        raise ConfigError(f"model.n_routed_experts={model.n_routed_experts} is not divisible by parallel.ep="
                          f"{cfg.ep}; choose ep among {_divisors(model.n_routed_experts)}")
    nodes = cfg.nodes_in_ep()
    if cfg.ep > 1 and nodes > 1 and model.n_group != nodes:
        raise ConfigError(f"model.n_group={model.n_group} must equal the {nodes} nodes spanned by the EP group "
                          f"(parallel.ep={cfg.ep} / parallel.gpus_per_node={cfg.gpus_per_node}), so that each "
                          f"expert group is one node; set model.n_group={nodes} (and model.topk_group <= {nodes})")
