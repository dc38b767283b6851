"""ProcessGrid: the PP x DP process grid of paper 3.2, with EP inside DP (DESIGN.md "The process grid").

Rank order follows Megatron's tp-cp-ep-dp-pp convention, pipeline outermost:

    rank = pp_rank * DP + dp_rank          dp_rank = edp_rank * EP + ep_rank

so an expert-parallel group is a block of EP contiguous ranks (inside a node when EP <= gpus_per_node)
and an expert-data-parallel group is strided by EP. Node of a rank = rank // gpus_per_node. World 8,
pp 2, ep 2, gpus_per_node 4:

    rank      0  1  2  3 | 4  5  6  7        (node 0 | node 1)
    pp_rank   0  0  0  0 | 1  1  1  1
    dp_rank   0  1  2  3 | 0  1  2  3        DP groups  [0 1 2 3] [4 5 6 7]
    ep_rank   0  1  0  1 | 0  1  0  1        EP groups  [0 1] [2 3] [4 5] [6 7]
    edp_rank  0  0  1  1 | 0  0  1  1        EDP groups [0 2] [1 3] [4 6] [5 7]
                                             PP groups  [0 4] [1 5] [2 6] [3 7]   (ordered by stage)
                                             mirror pairs and embedding groups: the PP groups here

Pipeline point-to-point runs on channels (parallel/pipeline/p2p.py): one 2-rank group per (producer position,
consumer position, activation or gradient) that the schedule uses, in every pipeline, so that no p2p op needs a
tag or shares a communicator with another kind of tensor or with a collective. The expert all-to-alls of the
backward run on a second EP group (`ep_bwd`), so that a forward dispatch of DualPipe's overlapped chunk never
queues behind a backward payload on one communicator.

DualPipe keeps two copies of each stage: pipeline position s holds stages s and PP-1-s, so positions s and
PP-1-s with the same dp_rank form a mirror pair whose gradients are summed (for odd PP the middle position pairs
with itself). The embedding (stage 0) and the output head + MTP (last stage) therefore sit together on positions
0 and PP-1: the embedding group is that pair, the ranks whose embedding, head and MTP gradients are summed (the
rank alone when PP = 1; middle positions are in none).

`GridLayout` is the arithmetic alone (tests and the planner use it without processes); `ProcessGrid` is a layout
with this process's groups, backend and device, and the one place the rest of the code asks for any of them. A
one-process run has a grid too: world 1, every group None (nothing to communicate), so the loop has no branch
on the world size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta

import torch
import torch.distributed as dist

from core.config import ConfigError
from parallel.config import ParallelConfig
from parallel.pipeline.p2p import Channel, group_desc, new_channel_groups, warm_up
from parallel.pipeline.schedule import Schedule

__all__ = ["GridLayout", "ProcessGrid", "check_launch", "device_type", "resolve_device"]


@dataclass(frozen=True)
class GridLayout:
    """Rank arithmetic of one rank, without processes (used by tests and the planner)."""

    world_size: int
    rank: int
    pp: int
    dp: int
    ep: int
    edp: int
    gpus_per_node: int

    @classmethod
    def of(cls, world_size: int, cfg: ParallelConfig, rank: int) -> GridLayout:
        """The layout of `rank`; `cfg` must be valid for `world_size` (ParallelConfig.validate)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside the world of {world_size} ranks")
        dp = world_size // cfg.pp
        return cls(world_size, rank, cfg.pp, dp, cfg.ep, dp // cfg.ep, cfg.gpus_per_node)

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def node(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local_rank(self) -> int:
        """Index of this rank inside its node."""
        return self.rank % self.gpus_per_node

    @property
    def n_nodes(self) -> int:
        return max(1, -(-self.world_size // self.gpus_per_node))

    @property
    def nodes_in_ep(self) -> int:
        """Nodes spanned by one EP group (EP contiguous ranks): the router's expert groups must match them."""
        return max(1, -(-self.ep // self.gpus_per_node))

    # this rank's groups, as sorted member lists (None: a member of no group of that kind)
    @property
    def dp_ranks(self) -> list[int]:
        return self._member(self.dp_groups())

    @property
    def pp_ranks(self) -> list[int]:
        """Ordered by pipeline position."""
        return self._member(self.pp_groups())

    @property
    def ep_ranks(self) -> list[int]:
        return self._member(self.ep_groups())

    @property
    def edp_ranks(self) -> list[int]:
        return self._member(self.edp_groups())

    @property
    def mirror_ranks(self) -> list[int]:
        return self._member(self.mirror_groups())

    @property
    def embed_ranks(self) -> list[int] | None:
        return self.group_of(self.embed_groups())

    # every group of a kind, as rank lists, in a fixed order (new_group must be called identically everywhere)
    def dp_groups(self) -> list[list[int]]:
        return [[p * self.dp + d for d in range(self.dp)] for p in range(self.pp)]

    def pp_groups(self) -> list[list[int]]:
        return [[p * self.dp + d for p in range(self.pp)] for d in range(self.dp)]

    def ep_groups(self) -> list[list[int]]:
        return [[p * self.dp + e * self.ep + i for i in range(self.ep)]
                for p in range(self.pp) for e in range(self.edp)]

    def edp_groups(self) -> list[list[int]]:
        return [[p * self.dp + e * self.ep + i for e in range(self.edp)]
                for p in range(self.pp) for i in range(self.ep)]

    def mirror_groups(self) -> list[list[int]]:
        pairs = []
        for d in range(self.dp):
            for s in range((self.pp + 1) // 2):
                pairs.append(sorted({s * self.dp + d, (self.pp - 1 - s) * self.dp + d}))
        return pairs

    def embed_groups(self) -> list[list[int]]:
        last = (self.pp - 1) * self.dp
        return [sorted({d, last + d}) for d in range(self.dp)]

    def group_of(self, groups: list[list[int]]) -> list[int] | None:
        return next((g for g in groups if self.rank in g), None)

    def _member(self, groups: list[list[int]]) -> list[int]:
        mine = self.group_of(groups)
        if mine is None:  # every rank is in one group of each kind but the embedding's
            raise AssertionError(f"rank {self.rank} is in none of {groups}")
        return mine


def _group(kind: str) -> property:
    return property(lambda grid: grid.groups.get(kind), doc=f"this rank's {kind} group (None: no such group here)")


@dataclass(frozen=True)
class ProcessGrid(GridLayout):
    """A `GridLayout` with this process's groups: `<kind>_group` for the kinds dp, pp, ep, ep_bwd, edp, mirror,
    embed and checkpoint (every rank, `checkpoint_group`; `embed_group` is None on middle pipeline positions;
    every group is None in a one-process run), the pipeline `schedule` the grid was built for and its p2p
    `channels` (this rank's 2-rank group per channel, keyed in pipeline positions), the backend ("nccl", "gloo",
    or None without a process group) and the device every tensor of this rank lives on."""

    backend: str | None = None
    device: torch.device = torch.device("cpu")
    schedule: Schedule | None = field(default=None, compare=False)
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict, compare=False, repr=False)
    channels: dict[Channel, dist.ProcessGroup] = field(default_factory=dict, compare=False, repr=False)

    dp_group = _group("dp")
    pp_group = _group("pp")
    ep_group = _group("ep")
    ep_bwd_group = _group("ep_bwd")
    edp_group = _group("edp")
    mirror_group = _group("mirror")
    embed_group = _group("embed")
    checkpoint_group = _group("checkpoint")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def layout(world_size: int, cfg: ParallelConfig, rank: int) -> GridLayout:
        """The rank arithmetic of `rank` in a world of `world_size`, without processes."""
        return GridLayout.of(world_size, cfg, rank)

    @classmethod
    def build(cls, cfg: ParallelConfig, device: str = "auto") -> ProcessGrid:
        """This process's grid for a layout already validated for the world size (RunConfig.validate): alone when
        no process group exists and WORLD_SIZE is 1, else join the default process group (initialising it from
        torchrun's environment if needed) and create every group. `device`: trainer.device (auto = this rank's
        GPU, LOCAL_RANK, when CUDA is available). The launch is checked first (`check_launch`), before any group.

        On a CUDA device every group carries two backends, `cuda:nccl,cpu:gloo`: tensors on the GPU go over NCCL,
        host values (metrics, checkpoint indexes) over gloo, so that no collective needs a host tensor copied to
        the device or back; the p2p channels carry device tensors only (nccl). On the CPU it is gloo alone. No
        `device_id` is bound at init: with one, every new group would run a world-wide ncclCommSplit, and a
        large pipeline has 4 (PP-1) DP channel groups; each channel's communicator is made by `p2p.warm_up`
        instead. The EP groups get `parallel.a2a_sms` as NCCL's CTA cap (`nccl_options`)."""
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        layout = GridLayout.of(world, cfg, rank)
        schedule = cfg.pipeline_schedule()
        place = resolve_device(device)
        check_launch(cfg, world, place, os.environ, torch.cuda.device_count() if place.type == "cuda" else 0)
        if world == 1 and not dist.is_initialized():
            return cls(**_fields(layout), backend=None, device=place, schedule=schedule)
        if place.type == "cuda":
            torch.cuda.set_device(place)
        backend = BACKENDS[place.type]
        timeout = timedelta(seconds=cfg.timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout)
        options = {"ep": nccl_options(cfg.a2a_sms, place.type), "ep_bwd": nccl_options(cfg.a2a_sms, place.type)}
        # a real backend names groups by creation order, so every rank creates every group; the dry run's fake
        # one needs only this rank's (10K groups at 2048 ranks would cost a second per rank of `--rank all`)
        alone = backend == "fake"
        groups = {kind: _new_groups(kind, getattr(layout, f"{kind}_groups")(), rank, timeout, backend,
                                    options.get(kind), alone) for kind in ("dp", "pp", "ep", "edp", "mirror", "embed")}
        groups["ep_bwd"] = _new_groups("ep_bwd", layout.ep_groups(), rank, timeout, backend, options["ep_bwd"], alone)
        groups["checkpoint"] = checkpoint_group(cfg.checkpoint_timeout_s, place.type)
        channels = new_channel_groups(schedule, layout.pp_groups(), rank, P2P_BACKENDS[place.type], timeout,
                                      members_only=alone)
        warm_up(channels, layout.pp_ranks, place)
        return cls(**_fields(layout), backend=dist.get_backend(), device=place, schedule=schedule, groups=groups,
                   channels=channels)

    def describe(self, schedule: str, dispatch: str) -> str:
        """The layout line the trainer prints first."""
        if self.world_size == 1:
            return f"1 process, device {self.device}"
        pipe = f"PP={self.pp} ({schedule}) x " if self.pp > 1 else ""
        return (f"{self.world_size} processes: {pipe}DP={self.dp} (ZeRO-1) x EP={self.ep} on {self.n_nodes} "
                f"simulated node(s) of {self.gpus_per_node} ranks, backend {self.backend}, dispatch {dispatch}, "
                f"device {self.device}")

    def close(self) -> None:
        """Leave the process group after a finished run (all ranks), so that no communication thread is still
        running when the interpreter exits (which aborts the process)."""
        if self.backend is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _fields(layout: GridLayout) -> dict:
    return {f.name: getattr(layout, f.name) for f in fields(GridLayout)}


# by device type (ProcessGrid.build says why); "meta" is the dry run's: torch's fake group, which moves no data
BACKENDS = {"cuda": "cuda:nccl,cpu:gloo", "cpu": "gloo", "meta": "fake"}
P2P_BACKENDS = {"cuda": "nccl", "cpu": "gloo", "meta": "fake"}  # the pipeline's channels carry device tensors only


def nccl_options(a2a_sms: int | None, device_type: str) -> object | None:
    """ProcessGroupNCCL options capping the CTAs (one SM each) NCCL's kernels may take on a group's collectives at
    `a2a_sms` (parallel.a2a_sms; paper 3.2.2: 20 of the H800's 132 SMs for communication), for the EP groups;
    None on the CPU or without a cap."""
    if device_type != "cuda" or a2a_sms is None:
        return None
    options = dist.ProcessGroupNCCL.Options()
    options.config.max_ctas = a2a_sms
    return options


def checkpoint_group(timeout_s: int, device_type: str) -> dist.ProcessGroup:
    """Every rank with the long parallel.checkpoint_timeout_s, for the coordination of checkpoints
    (trainer/checkpoint.py): its ranks wait while every rank writes or reads its shard (minutes at 2048 ranks of
    671B), which parallel.timeout_s must not cut short. Gloo alone on CPUs and GPUs: it carries host bytes only."""
    backend = "gloo" if device_type in ("cpu", "cuda") else BACKENDS[device_type]
    return dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s), group_desc="checkpoint")


def _new_groups(kind: str, groups: list[list[int]], rank: int, timeout: timedelta, backend: str,
                options: object | None = None, members_only: bool = False) -> dist.ProcessGroup | None:
    mine = None
    extra = {"pg_options": options} if options is not None else {}
    for ranks in groups:  # every rank creates every group, in the same order
        if members_only and rank not in ranks:
            continue
        group = dist.new_group(ranks, timeout=timeout, backend=backend, group_desc=group_desc(kind, ranks), **extra)
        if rank in ranks:
            mine = group
    return mine


def device_type(name: str, cuda: bool | None = None) -> str:
    """The device type trainer.device names: auto is cuda when CUDA is available (`cuda`: the probe's answer,
    default torch.cuda.is_available()), else cpu."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "cpu" or (name == "auto" and not cuda):
        return "cpu"
    if not cuda:
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    return "cuda"


def resolve_device(name: str) -> torch.device:
    """trainer.device: auto (this rank's GPU, LOCAL_RANK, when CUDA is available, else the CPU), cpu or cuda; and
    "meta" for hai-plan's dry run (launch/dryrun.py: shapes only, over torch's fake process group)."""
    if name == "meta":
        return torch.device("meta")
    if device_type(name) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def check_launch(cfg: ParallelConfig, world: int, device: torch.device, env: Mapping[str, str],
                 device_count: int) -> None:
    """On GPUs, a job of several processes must come from a launcher that says which GPU is whose (torchrun or
    SLURM through launch/slurm/train.sbatch: LOCAL_RANK, LOCAL_WORLD_SIZE), with parallel.gpus_per_node the
    processes per node it started; without that every rank would take GPU 0, or node-limited routing would
    group the wrong ranks. CPU runs simulate nodes, so nothing is checked there."""
    if device.type != "cuda" or world == 1:
        return
    missing = [k for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE") if k not in env]
    if missing:
        raise ConfigError(f"{world} processes on CUDA but {' and '.join(missing)} not set: start the job with torchrun "
                          "(hai-launch) or under SLURM with launch/slurm/train.sbatch, which say which GPU each "
                          "process uses")
    local_world, local_rank = int(env["LOCAL_WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if local_world != cfg.gpus_per_node:
        raise ConfigError(f"parallel.gpus_per_node={cfg.gpus_per_node} but the launcher started LOCAL_WORLD_SIZE="
                          f"{local_world} processes on this node; set parallel.gpus_per_node={local_world} (the "
                          "ranks of one node, which node-limited routing and hierarchical dispatch rely on)")
    if not 0 <= local_rank < device_count:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {device_count} GPU(s): start at most "
                          f"{device_count} processes per node")
