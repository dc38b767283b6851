"""The run's configuration: one dataclass per Hydra group (configs/<group>/), registered as Hydra structured configs,
and validated once, in one call, before anything starts (DESIGN.md principle 7).

`RunConfig` is the root schema (`SCHEMA` in Hydra's ConfigStore; configs/config.yaml lists it first in its
defaults), so Hydra itself rejects a wrongly typed value, an unknown choice or an unknown key of any group while it
composes, and the YAML files hold values only: what each field means is said once, by its comment in its
dataclass. `load_config` turns a composed config into a `RunConfig`, applies the one resolution step (`resolved`),
and runs `validate(world_size)`, which checks every group and every rule that spans groups, the model-versus-layout
rule included. `compose_config` composes the tree with overrides for the tools that do not go through `hai-train`'s
own Hydra entry (hai-launch, hai-plan, tests) and turns Hydra's errors into one-paragraph ConfigErrors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from core.config import Config, ConfigError, choice, describe, from_dict
from data.config import DataConfig
from fp8.config import FP8Config
from model.config import ModelConfig
from optim.config import OptimConfig
from optim.schedules import batch_size_at
from parallel.config import ParallelConfig, check_model_layout, microbatches_per_step
from parallel.grid import device_type
from parallel.pipeline.validate import validate_schedule

SCHEMA = "hai_train_schema"  # the root schema's name in Hydra's ConfigStore
CONFIG_MODULE = "configs"  # the Hydra config tree, a package shipped with the code (configs/__init__.py)

Device = choice("Device", "auto cpu cuda", __name__)
ComputeDType = choice("ComputeDType", "auto bf16 fp32", __name__)
WandbMode = choice("WandbMode", "offline online", __name__)


@dataclass
class TrainerConfig(Config):
    """The loop: steps, batches, precision, checkpoints, evaluation."""

    prefix = "trainer"

    max_steps: int = 300  # optimizer steps
    run_dir: str | None = None  # where checkpoints and metrics go; None = Hydra's output directory
    seed: int = 0  # seeds the model init, the data order and FIM
    micro_batch_size: int = 8  # sequences per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step (after any ramp): micro-batches x DP
    # compute dtype: bf16 (fp32 master weights, router fp32) | fp32 everywhere | auto: bf16 on CUDA (whose grouped
    # expert GEMM is fast in bf16 only), fp32 on the CPU
    dtype: ComputeDType = ComputeDType("auto")
    device: Device = Device("auto")  # auto (this rank's GPU when CUDA is present) | cpu | cuda
    tf32: bool = True  # on CUDA, fp32 matmuls on TF32 tensor cores (10-bit mantissa products); no effect on the CPU
    # deterministic kernels (torch.use_deterministic_algorithms, math SDPA on CUDA): run-to-run reproducible on the
    # same hardware and layout, slower; the CPU is deterministic without it
    deterministic: bool = False
    checkpoint_every: int = 100  # steps between checkpoints (one is always written at the end); 0 = end only
    keep_checkpoints: int = 3  # complete checkpoints kept (oldest removed first)
    resume: str | None = "auto"  # auto = newest complete checkpoint in run_dir if any | a checkpoint path | None
    # start from these weights only (a checkpoint, a run directory or a Hugging Face directory, DeepSeek's FP8
    # release included): optimizer, schedules, data position and step start fresh; a checkpoint in run_dir wins
    init_from: str | None = None
    init_missing: str | None = None  # mtp = initialise MTP weights the init_from source lacks | None = an error
    eval_every: int = 50  # steps between validation passes; 0 = off
    eval_batches: int = 4  # micro-batches per validation pass
    # validation loss also per 1/N of the positions (val_loss_by_position, first to last); 0 = off
    eval_position_buckets: int = 8
    ema_decay: float = 0.0  # EMA of the weights kept on CPU (paper 3.2.3); 0 = off, e.g. 0.999
    max_skipped_steps: int = 0  # non-finite loss: skip up to this many steps in a row, then stop
    # a rank with no finished step for this long dumps its stacks into the run directory and ends the job
    # (trainer/watchdog.py; checkpoint saves excepted); 0 = off
    hang_timeout_s: float = 1800.0
    # peak FLOP/s per device (TFLOP/s) that `mfu` divides by; None = the GPU's dense BF16 peak from trainer/mfu.py's
    # table (found by its NVML name), or on the CPU this machine's GEMM peak measured at start-up
    peak_tflops: float | None = None
    compile: bool = False  # torch.compile MLA/MLPs/norms (trainer/compile.py); off: CPU tiny ~1.1x/step, 33 s compiling

    def validate(self) -> TrainerConfig:
        for name in ("max_steps", "micro_batch_size", "global_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "eval_every", "eval_batches", "eval_position_buckets", "max_skipped_steps",
                     "hang_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}: must be >= 0, got {getattr(self, name)}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"trainer.peak_tflops: must be > 0 (TFLOP/s per device) or null (the GPU table or the "
                              f"measured CPU peak), got {self.peak_tflops}")
        if self.init_missing not in (None, "mtp"):
            raise ConfigError(f"trainer.init_missing={self.init_missing!r}: must be mtp (initialise MTP weights the "
                              "trainer.init_from source lacks) or null")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"trainer.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"trainer.micro_batch_size={self.micro_batch_size}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"trainer.ema_decay: must lie in [0, 1), got {self.ema_decay}")
        return self


@dataclass
class LoggingConfig(Config):
    """Where metrics go besides the console and metrics.jsonl."""

    prefix = "logging"

    log_every: int = 10  # steps between console progress lines (metrics.jsonl gets every step)
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "hai-llm"  # the W&B project of the run
    wandb_mode: WandbMode = WandbMode("offline")  # offline (default: nothing leaves the machine) | online
    plot: bool = True  # write loss.png into the run directory at the end
    # steps between records that also hold every rank's value of each per-rank quantity (`per_rank` in
    # metrics.jsonl, never W&B); every record holds their max, mean and argmax rank; 0 = never
    per_rank_every: int = 100
    # steps between records of every MoE layer's tokens per expert (expert_load.jsonl; expert_load.png, the view
    # of the paper's Figure 9, at the end); 0 = never
    expert_load_every: int = 10

    def validate(self) -> LoggingConfig:
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every: must be >= 1, got {self.log_every}")
        if self.expert_load_every < 0:
            raise ConfigError(f"logging.expert_load_every: must be >= 0 (0 = never), got {self.expert_load_every}")
        if self.per_rank_every < 0:
            raise ConfigError(f"logging.per_rank_every: must be >= 0 (0 = never), got {self.per_rank_every}")
        return self


@dataclass
class ExperimentConfig(Config):
    """A named bundle of overrides (configs/experiment/*.yaml) for reproducing a setting."""

    prefix = "experiment"

    name: str = "tiny"  # names the run directories: runs/<name>/<time>
    description: str = ""  # one line on what the bundle reproduces
    # a stage that continues an earlier one (the long-context extensions, paper 4.3): needs trainer.init_from
    continues: str | None = None  # what it continues, e.g. "the pre-training run"; None = a stage of its own

    def validate(self) -> ExperimentConfig:
        if not self.name or "/" in self.name:
            raise ConfigError(f"experiment.name: a non-empty name without '/', got {self.name!r}")
        return self


@dataclass
class RunConfig:
    """The whole run: one field per config group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    def resolved(self) -> RunConfig:
        """The values the run uses where one setting stands for another: `trainer.dtype=auto` becomes bf16 on CUDA
        and fp32 on the CPU (the device trainer.device resolves to here), and while FP8 is on, `fp8.moment_dtype`
        (the paper's bf16 optimizer storage) replaces `optim.moment_dtype` unless it is null."""
        out = self
        if self.trainer.dtype == "auto":
            dtype = "bf16" if device_type(self.trainer.device) == "cuda" else "fp32"
            out = dataclasses.replace(out, trainer=dataclasses.replace(out.trainer, dtype=dtype))
        if self.fp8.enabled and self.fp8.moment_dtype is not None:
            out = dataclasses.replace(out, optim=dataclasses.replace(out.optim, moment_dtype=self.fp8.moment_dtype))
        return out

    def validate(self, world_size: int = 1) -> RunConfig:
        """Every group and every rule across groups, for a job of `world_size` processes; the one validation of
        a run (train() skips it for a config already validated for its world size)."""
        for group in (self.model, self.fp8, self.data, self.optim, self.trainer, self.logging, self.experiment):
            group.validate()
        self.parallel.validate(world_size)
        if self.experiment.continues and not self.trainer.init_from:
            raise ConfigError(f"experiment={self.experiment.name} continues {self.experiment.continues}: give "
                              "trainer.init_from=<its run directory, one of its checkpoints or its hai-export>")
        check_model_layout(self.parallel, self.model)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; shorten the sequences or raise max_seq_len")
        dp = world_size // self.parallel.pp
        ramp = self.optim.batch_ramp_start and self.optim.batch_ramp_tokens
        if ramp and self.optim.batch_ramp_start > self.trainer.global_batch_size:
            raise ConfigError(f"optim.batch_ramp_start={self.optim.batch_ramp_start} exceeds "
                              f"trainer.global_batch_size={self.trainer.global_batch_size}; the ramp grows the "
                              "batch, so start below the final size or set optim.batch_ramp_start=0")
        self._check_microbatches(dp)
        self._validated_for = world_size
        return self

    def validated_for(self, world_size: int) -> bool:
        return getattr(self, "_validated_for", None) == world_size

    def _check_microbatches(self, dp: int) -> None:
        """The pipeline's micro-batches per step, at the end of the batch-size ramp and at its start, must suit
        the schedule (DualPipe: even and at least 2 x pp), and the schedule's p2p order must run under NCCL's rules
        for them (validate.validate_schedule); parallel.microbatches, when set, must be the first."""
        t = self.trainer
        final = microbatches_per_step(self.parallel, t.global_batch_size, t.micro_batch_size, dp)
        per_pass = t.micro_batch_size * dp
        first = batch_size_at(self.optim, 0, t.global_batch_size, per_pass) // per_pass
        schedule = self.parallel.pipeline_schedule()
        for n in sorted({first, final}):
            validate_schedule(schedule, n)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in GROUPS}


GROUPS = {"model": ModelConfig, "parallel": ParallelConfig, "fp8": FP8Config, "data": DataConfig,
          "optim": OptimConfig, "trainer": TrainerConfig, "logging": LoggingConfig, "experiment": ExperimentConfig}

ConfigStore.instance().store(name=SCHEMA, node=RunConfig)


def run_config(cfg: DictConfig | dict[str, Any], resolve: bool = True) -> RunConfig:
    """A RunConfig from a composed Hydra config or a plain mapping of groups (the `hydra` node, if present, is
    ignored), each group typed and checked by `from_dict`, the rules across groups not yet; `resolved()` unless
    `resolve` is False."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    values.pop("hydra", None)
    unknown = sorted(set(values) - set(GROUPS))
    if unknown:
        raise ConfigError(f"unknown config group(s) {unknown}; known groups are {sorted(GROUPS)}")
    groups = {name: from_dict(cls, values.get(name) or {}, prefix=name) for name, cls in GROUPS.items()}
    return RunConfig(**groups).resolved() if resolve else RunConfig(**groups)


def load_config(cfg: DictConfig | dict[str, Any], world_size: int = 1) -> RunConfig:
    """A resolved, validated RunConfig (`run_config`, then `RunConfig.validate` for `world_size` processes)."""
    return run_config(cfg).validate(world_size)


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/config.yaml composed with Hydra `overrides`, as hai-train composes it; a bad override, value, key
    or group option is a ConfigError naming it, the value and what is allowed."""
    from hydra import compose, initialize_config_module

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            return compose("config", overrides=overrides)
    except Exception as err:  # Hydra's composition and override errors share no public base class
        raise ConfigError(describe(err)) from None
