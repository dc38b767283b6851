"""ParallelConfig: the process grid (paper 3.2: PP x EP x ZeRO-1 DP), the `parallel` group of the run config.

DP is the world size divided by PP; EP divides DP; `gpus_per_node` groups ranks into (simulated) nodes. Every
rule is checked before any process group is built, with the numbers and the fix in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.config import Config, ConfigError, choice
from model.config import ModelConfig
from parallel.fabric import Fabric
from parallel.pipeline.action import ScheduleName
from parallel.pipeline.schedule import Schedule, make_schedule
from parallel.pipeline.stage import split_layers

Dispatch = choice("Dispatch", "flat hierarchical", __name__, refusal="is not a dispatch mode")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass
class ParallelConfig(Config):
    prefix = "parallel"

    pp: int = 1  # pipeline-parallel ranks (DP = world size / pp)
    ep: int = 1  # expert-parallel ranks, contiguous inside the data-parallel group; divides DP and the experts
    gpus_per_node: int = 8  # ranks per (simulated) node; node-limited routing uses the nodes of the EP group
    dispatch: Dispatch = Dispatch("flat")  # expert all-to-all: flat | hierarchical (across nodes once, then inside)
    timeout_s: int = 120  # collective timeout in seconds: a failed rank ends the job within it
    # timeout in seconds of the checkpoint's own process group, whose ranks wait while every rank writes or reads
    # its shard of a save or a resume (5-10 GB a rank for 671B on 2048 ranks)
    checkpoint_timeout_s: int = 1800
    schedule: ScheduleName = ScheduleName("1f1b")  # 1f1b | zb1p | dualpipe | dualpipev (parallel/pipeline/schedule.py)
    # micro-batches per step and pipeline; null derives them from the global batch (trainer.global_batch_size, or
    # hai-plan's --global-batch) / (micro-batch x DP); when set, the global batch must be that product
    microbatches: int | None = None
    stage_layers: list[int] | None = None  # layers per pipeline stage (dualpipev: 2 x pp stages); null: even split
    # simulated links for CPU runs (a parallel.fabric.Fabric: {intra_gbps, inter_gbps, latency_us}); null = none.
    # Typed Any for Hydra, as model.yarn (OmegaConf 2.3 cannot merge an override into a None structured field).
    fabric: Any = None
    overlap: bool = True  # DualPipe: run each FB chunk's forward inside its backward (pipeline/overlap.py)
    # SMs (NCCL CTAs) the expert all-to-all may take on CUDA, set on the EP groups (paper 3.2.2: 20 of the H800's
    # 132 SMs); null: NCCL's own choice. Ignored on the CPU.
    a2a_sms: int | None = 20
    # reduce each ZeRO bucket's gradients (copies' sum, then reduce-scatter) as soon as they are final, during the
    # pipeline's cool-down, instead of after the step (parallel/grad_reduce.py); bitwise the same results
    overlap_grad_reduce: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fabric = Fabric.from_config(self.fabric)

    def validate(self, world_size: int = 1) -> ParallelConfig:
        """The arithmetic of the grid and the schedule's rules that do not depend on the batch."""
        for name in ("pp", "ep", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        self._check_timeouts()
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
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
        self.pipeline_schedule()
        if self.a2a_sms is not None and self.a2a_sms < 1:
            raise ConfigError(f"parallel.a2a_sms={self.a2a_sms}: must be >= 1 (SMs for the all-to-all), or null for "
                              "NCCL's default")
        for name in ("overlap", "overlap_grad_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"parallel.{name}={getattr(self, name)!r}: must be true or false")
        if self.microbatches is not None and self.microbatches < 1:
            raise ConfigError(f"parallel.microbatches={self.microbatches}: must be >= 1, or null to derive it")
        gpn = self.gpus_per_node
        if world_size > gpn and self.ep % gpn and gpn % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} with parallel.gpus_per_node={gpn}: an expert-parallel group "
                              f"must fit inside one node or fill whole nodes; choose ep among {_divisors(gpn)} "
                              f"or a multiple of {gpn}")
        return self

    def _check_timeouts(self) -> None:
        for name in ("timeout_s", "checkpoint_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"parallel.{name}={value!r}: must be a whole number of seconds >= 1")
            if value < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {value}; give the seconds a collective may "
                                  "wait before the job stops")

    def pipeline_schedule(self) -> Schedule:
        """The schedule object of parallel.schedule over parallel.pp (its pp rules checked)."""
        return make_schedule(self.schedule, self.pp)

    def nodes_in_ep(self) -> int:
        """Nodes spanned by one EP group (its ranks are contiguous)."""
        return max(1, -(-self.ep // self.gpus_per_node))


def check_model_layout(cfg: ParallelConfig, model: ModelConfig) -> None:
    """The model must split over the grid: its layers over the pipeline stages, experts divisible by EP, and
    under node-limited routing across several nodes, one router group per node of the EP group (paper 3.2: a
    token reaches at most M nodes)."""
    split_layers(model.n_layers, cfg.pipeline_schedule().n_stages, cfg.stage_layers)
    if model.n_routed_experts % cfg.ep:
        raise ConfigError(f"model.n_routed_experts={model.n_routed_experts} is not divisible by parallel.ep="
                          f"{cfg.ep}; choose ep among {_divisors(model.n_routed_experts)}")
    nodes = cfg.nodes_in_ep()
    if cfg.ep > 1 and nodes > 1 and model.n_group != nodes:
        raise ConfigError(f"model.n_group={model.n_group} must equal the {nodes} nodes spanned by the EP group "
                          f"(parallel.ep={cfg.ep} / parallel.gpus_per_node={cfg.gpus_per_node}), so that each "
                          f"expert group is one node; set model.n_group={nodes} (and model.topk_group <= {nodes})")


def microbatches_per_step(cfg: ParallelConfig, global_batch: int, micro_batch: int, dp: int,
                          names: tuple[str, str] = ("trainer.global_batch_size", "trainer.micro_batch_size")) -> int:
    """Micro-batches per step and pipeline: global batch / (micro-batch x DP), which must divide evenly; when
    parallel.microbatches is set it must be that number. The one meaning of parallel.microbatches, for hai-train
    and hai-plan alike; `names` are the global-batch and micro-batch settings as the caller's user sets them."""
    per_pass = micro_batch * dp
    if global_batch % per_pass:
        raise ConfigError(f"{names[0]}={global_batch} is not a multiple of {names[1]}={micro_batch} x "
                          f"data-parallel size {dp} = {per_pass}")
    derived = global_batch // per_pass
    if cfg.microbatches is not None and cfg.microbatches != derived:
        raise ConfigError(f"parallel.microbatches={cfg.microbatches} but {names[0]}={global_batch} / ({names[1]}="
                          f"{micro_batch} x DP={dp}) = {derived}; set one consistent with the other, or "
                          "parallel.microbatches=null")
    return derived
