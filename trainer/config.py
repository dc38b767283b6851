"""The run's configuration: one dataclass per Hydra group (configs/<group>/), validated before anything
starts (DESIGN.md principle 7). `load_config` turns a composed Hydra config into a `RunConfig`, rejecting
unknown keys by name and checking the rules that span groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from fp8.config import FP8Config
from model.config import ConfigError, ModelConfig, from_dict
from parallel.config import ParallelConfig
from trainer.optim import OptimConfig


@dataclass
class TrainerConfig:
    """The loop: steps, batches, precision, checkpoints, evaluation."""

    max_steps: int = 300  # optimizer steps
    run_dir: str | None = None  # where checkpoints and metrics go; None = Hydra's output directory
    seed: int = 0  # seeds the model init, the data order and FIM
    micro_batch_size: int = 8  # sequences per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step (after any ramp): micro-batches x DP
    dtype: str = "fp32"  # compute dtype: bf16 (fp32 master weights, router fp32) | fp32 everywhere
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    checkpoint_every: int = 100  # steps between checkpoints (one is always written at the end); 0 = end only
    keep_checkpoints: int = 3  # complete checkpoints kept (oldest removed first)
    resume: str | None = "auto"  # auto = newest complete checkpoint in run_dir if any | a checkpoint path | None
    eval_every: int = 50  # steps between validation passes; 0 = off
    eval_batches: int = 4  # micro-batches per validation pass
    ema_decay: float = 0.0  # EMA of the weights kept on CPU (paper 3.2.3); 0 = off, e.g. 0.999
    max_skipped_steps: int = 0  # non-finite loss: skip up to this many steps in a row, then stop

    def validate(self) -> TrainerConfig:
        for name in ("max_steps", "micro_batch_size", "global_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "eval_every", "eval_batches", "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}: must be >= 0, got {getattr(self, name)}")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"trainer.dtype: bf16 or fp32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"trainer.device: auto, cpu or cuda, got {self.device!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"trainer.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"trainer.micro_batch_size={self.micro_batch_size}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"trainer.ema_decay: must lie in [0, 1), got {self.ema_decay}")
        return self


@dataclass
class LoggingConfig:
    """Where metrics go besides the console and metrics.jsonl."""

    log_every: int = 10  # steps between console progress lines (metrics.jsonl gets every step)
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "hai-llm"
    wandb_mode: str = "offline"  # offline (default: nothing leaves the machine) | online
    plot: bool = True  # write loss.png into the run directory at the end

    def validate(self) -> LoggingConfig:
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every: must be >= 1, got {self.log_every}")
        if self.wandb_mode not in ("offline", "online"):
            raise ConfigError(f"logging.wandb_mode: offline or online, got {self.wandb_mode!r}")
        return self


@dataclass
class ExperimentConfig:
    """A named bundle of overrides (configs/experiment/*.yaml) for reproducing a setting."""

    name: str = "tiny"  # names the run directories: runs/<name>/<time>
    description: str = ""

    def validate(self) -> ExperimentConfig:
        if not self.name or "/" in self.name:
            raise ConfigError(f"experiment.name: a non-empty name without '/', got {self.name!r}")
        return self


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    def validate(self, world_size: int = 1) -> RunConfig:
        for group in (self.model, self.fp8, self.data, self.optim, self.trainer, self.logging, self.experiment):
            group.validate()
        self.parallel.validate(world_size)
        if self.fp8.enabled and self.fp8.moment_dtype is not None:  # the paper's optimizer storage under FP8
            self.optim.moment_dtype = self.fp8.moment_dtype
            self.optim.validate()
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; shorten the sequences or raise max_seq_len")
        dp = world_size // self.parallel.pp
        if self.trainer.global_batch_size % (self.trainer.micro_batch_size * dp):
            raise ConfigError(f"trainer.global_batch_size={self.trainer.global_batch_size} is not a multiple of "
                              f"micro_batch_size x data-parallel size = {self.trainer.micro_batch_size * dp}")
        ramp = self.optim.batch_ramp_start and self.optim.batch_ramp_tokens
        if ramp and self.optim.batch_ramp_start > self.trainer.global_batch_size:
            raise ConfigError(f"optim.batch_ramp_start={self.optim.batch_ramp_start} exceeds "
                              f"trainer.global_batch_size={self.trainer.global_batch_size}; the ramp grows the "
                              "batch, so start below the final size or set optim.batch_ramp_start=0")
        self._check_microbatches(dp)
        return self

    def _check_microbatches(self, dp: int) -> None:
        """The pipeline's micro-batches per step: global batch / (micro-batch x DP), at the end of the batch-size
        ramp and at its start, must suit the schedule (DualPipe: even and at least 2 x pp)."""
        if self.parallel.pp == 1:
            return
        from parallel.pipeline.schedule import check_schedule_args
        from trainer.optim import batch_size_at

        per_pass = self.trainer.micro_batch_size * dp
        final = self.trainer.global_batch_size // per_pass
        if self.parallel.microbatches is not None and self.parallel.microbatches != final:
            raise ConfigError(f"parallel.microbatches={self.parallel.microbatches} but trainer.global_batch_size="
                              f"{self.trainer.global_batch_size} / (trainer.micro_batch_size="
                              f"{self.trainer.micro_batch_size} x DP={dp}) = {final}; set one consistent with the "
                              "other, or parallel.microbatches=null")
        first = batch_size_at(self.optim, 0, self.trainer.global_batch_size, per_pass) // per_pass
        for n in sorted({first, final}):
            check_schedule_args(self.parallel.schedule, self.parallel.pp, n)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


GROUPS = {"model": ModelConfig, "parallel": ParallelConfig, "fp8": FP8Config, "data": DataConfig,
          "optim": OptimConfig, "trainer": TrainerConfig, "logging": LoggingConfig, "experiment": ExperimentConfig}


def load_config(cfg: DictConfig | dict[str, Any], world_size: int = 1) -> RunConfig:
    """A validated RunConfig from a composed Hydra config (the `hydra` node, if present, is ignored)."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    values.pop("hydra", None)
    unknown = sorted(set(values) - set(GROUPS))
    if unknown:
        raise ConfigError(f"unknown config group(s) {unknown}; known groups are {sorted(GROUPS)}")
    groups = {name: from_dict(cls, values.get(name) or {}, prefix=name) for name, cls in GROUPS.items()}
    return RunConfig(**groups).validate(world_size)
