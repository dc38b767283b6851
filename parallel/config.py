"""ParallelConfig: the process grid (paper 3.2: PP x EP x ZeRO-1 DP). Mirrored by configs/parallel/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline-parallel stages
    ep: int = 1  # expert-parallel ranks (inside the data-parallel group)

    def validate(self, world_size: int = 1) -> ParallelConfig:
        for name in ("pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if world_size % self.pp:
            raise ConfigError(f"parallel.pp={self.pp} does not divide the world size {world_size}")
        dp = world_size // self.pp
        if dp % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide the data-parallel size {dp} "
                              f"(world {world_size} / pp {self.pp})")
        if self.pp > 1 or self.ep > 1:
            raise ConfigError(f"parallel.pp={self.pp}, parallel.ep={self.ep}: this build runs one process per "
                              "data-parallel rank only (pipeline and expert parallelism are not built yet); "
                              "set parallel.pp=1 parallel.ep=1")
        return self
