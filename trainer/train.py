"""`hai-train`: the training loop, one path for every layout (DESIGN.md principle 5): one process is a grid of one
rank and a pipeline of one stage.

Building a run (`build`): the data of this DP rank; the whole model on the meta device (shapes, no memory);
`parallel.parallelize` (pipeline stages, then expert parallelism, then the FP8 recipe, in that order) cuts it to
this rank's part; that part is allocated on the grid's device and initialised from the run's seed, each tensor
from a generator keyed by its global name (model/init.py: every layout starts from the single-process weights),
in the compute dtype with fp32 main gradients; the optimizer (AdamW in one process, ZeRO-1
otherwise); the checkpoint geometry of this rank.

One optimizer step (paper 4.2):
  1. batch size, MTP lambda, bias speed gamma and learning rate from the schedules (optim/schedules.py), keyed by
     tokens consumed so far;
  2. the step's micro-batches of packed sequences (data/) through this rank's pipeline: forward with the main +
     MTP loss, backward (the balance loss rides along through autograd, model/moe.py), gradients accumulated;
  3. a non-finite loss or gradient norm stops the run naming the step (or skips the step, up to
     trainer.max_skipped_steps in a row); the last good checkpoint is kept;
  4. gradient clipping and the AdamW update over fp32 master weights (the optimizer's `step`), then the
     aux-loss-free bias update from this step's expert loads (trainer/balance.py; it changes routing from the
     next step on), then the CPU EMA;
  5. metrics, validation and atomic checkpoints at their intervals.

    hai-train                                   # the main job: configs/config.yaml
    hai-train model=tiny optim.lr=1e-3 trainer.max_steps=100
    hai-train -m model.balance=aux_free,aux_loss    # an ablation: one run directory per point
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from core.config import ConfigError, describe, torch_dtype
from data import DataError
from data.dataset import DataPipeline, build_data, check_vocab
from fp8.gemm import check_backend
from model import Transformer
from model.grads import attach_main_grads
from model.init import materialize
from model.moe import Gate
from optim.optimizer import Optimizer
from optim.schedules import batch_size_at, bias_gamma_at, lr_at, mtp_lambda_at
from parallel.grid import ProcessGrid
from parallel.parallelize import build_optimizer, parallelize
from parallel.pipeline.pipeline import LOSS_KEYS, Batch, Pipeline
from trainer import reduce
from trainer.balance import BiasBalancer
from trainer.checkpoint import CheckpointError, ensure_writable, latest_checkpoint
from trainer.compile import compile_dense
from trainer.config import CONFIG_MODULE, RunConfig, TrainerConfig, compose_config, load_config
from trainer.ema import EMA
from trainer.init_from import load_init
from trainer.metrics import Metrics
from trainer.mfu import Throughput
from trainer.rundir import rank_log, record_config, run_dir_for
from trainer.shards import Shards, model_index
from trainer.state import TrainState, restore, resume_from, save
from trainer.watchdog import Watchdog, record_collectives


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def preflight(cfg: RunConfig) -> None:
    """What must hold on this machine before any process group is made, beyond the config itself (the launch and
    the device are checked by ProcessGrid.build): the FP8 recipe's GEMM backend runs here (a Hopper GPU for
    fp8=hopper), else a ConfigError naming the backend, the capability found and the one needed. With the hang
    watchdog on, the flight recorder is switched on for the process groups to come (its dump is the watchdog's)."""
    if cfg.fp8.enabled:
        check_backend(cfg.fp8.gemm_backend())
    if cfg.trainer.hang_timeout_s > 0:
        record_collectives()


def configure_torch(cfg: TrainerConfig, device: torch.device) -> None:
    """The process-wide torch settings of the run: TF32 for fp32 matmuls on CUDA (trainer.tf32), and with
    trainer.deterministic, deterministic kernels: torch's deterministic mode (its index_add_ and scatter_add_ then
    take deterministic CUDA paths, so no segment sum of our own is needed), cuBLAS's fixed workspaces, and the
    math SDPA backend on CUDA (the fused attention backwards accumulate in a nondeterministic order)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)


def cast_for_compute(model: Transformer, dtype: torch.dtype) -> None:
    """Weights in the compute dtype, except the router, which routes in fp32 (paper 3.3)."""
    gates = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in gates:
                p.data = p.data.to(dtype)


@dataclass
class Run:
    """What one rank trains with."""

    model: Transformer
    pipeline: Pipeline
    opt: Optimizer
    data: DataPipeline
    shards: Shards
    balancer: BiasBalancer


@dataclass
class ModelPart:
    """This rank's part of the model with its pipeline and optimizer, and the whole model's index."""

    model: Transformer
    pipeline: Pipeline
    opt: Optimizer
    shapes: dict[str, torch.Size]  # `model_index` of the whole model (the checkpoint's names and shapes)
    params: set[str]


def build_model(cfg: RunConfig, grid: ProcessGrid, init_from: str | None = None) -> ModelPart:
    """The model part, pipeline and optimizer of this rank: the whole model on the meta device (shapes, no
    memory), cut by `parallelize`, then only the kept part allocated on the grid's device and initialised
    (model/init.py), or given `init_from`'s weights (trainer/init_from.py), in the compute dtype with fp32 main
    gradients. On a "meta" grid (hai-plan --dry-run) nothing is allocated or initialised at all."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    shapes, params = model_index(model)
    dtype = torch_dtype(cfg.trainer.dtype)
    pipeline = parallelize(model, grid, cfg.parallel, cfg.fp8, dtype)
    materialize(model, grid.device, cfg.trainer.seed, cfg.model.init_std)
    if init_from is not None:
        line = load_init(init_from, cfg.trainer.init_missing, model, Shards(grid, pipeline, shapes, params), grid)
        if grid.is_main:
            print(line, flush=True)
    cast_for_compute(model, dtype)
    attach_main_grads(model.parameters())
    if cfg.trainer.compile:
        compile_dense(model)
    opt = build_optimizer(model, grid, pipeline, cfg.optim)
    return ModelPart(model, pipeline, opt, shapes, params)


def build(cfg: RunConfig, grid: ProcessGrid, init_from: str | None = None) -> Run:
    """This rank's run: data, model part (initialised, or from `init_from`), pipeline, optimizer, balancer."""
    configure_torch(cfg.trainer, grid.device)
    torch.manual_seed(cfg.trainer.seed)
    data = build_data(cfg.data, seed=cfg.trainer.seed, dp_rank=grid.dp_rank, dp_size=grid.dp)
    check_vocab(data.vocab_size, cfg.model.vocab_size)
    part = build_model(cfg, grid, init_from)
    model, pipeline, opt, shapes, params = part.model, part.pipeline, part.opt, part.shapes, part.params
    balancer = BiasBalancer(model, update=cfg.model.balance == "aux_free", group=grid.dp_group,
                            replicas=pipeline.gate_replicas(), report_group=grid.pp_group if grid.pp > 1 else None,
                            all_gates=Transformer.gate_names(cfg.model), device=grid.device, ep=grid.ep,
                            n_experts=cfg.model.n_routed_experts)
    return Run(model, pipeline, opt, data, Shards(grid, pipeline, shapes, params), balancer)


@torch.no_grad()
def validation(grid: ProcessGrid, pipeline: Pipeline, batches: list[Batch], buckets: int = 0) -> dict:
    """{"val_loss": the mean next-token loss of `batches` on every DP rank, and with `buckets` (trainer.
    eval_position_buckets) "val_loss_by_position": the same of each 1/buckets of the positions, first to last}."""
    keys = ("val_loss", *(f"pos{b}" for b in range(buckets)))
    means = reduce.step_means(grid, pipeline.evaluate(batches, buckets), len(batches), keys)
    out = {"val_loss": means["val_loss"]}
    if buckets:
        out["val_loss_by_position"] = [means[f"pos{b}"] for b in range(buckets)]
    return out


def evaluate(grid: ProcessGrid, pipeline: Pipeline, batches: list[Batch]) -> float:
    """The validation loss: the mean next-token loss of `batches` on every DP rank."""
    return validation(grid, pipeline, batches)["val_loss"]


def train_step(cfg: RunConfig, grid: ProcessGrid, state: TrainState, run: Run) -> dict[str, float]:
    """Forward and backward over this rank's part of one global batch; returns the step's losses (summed over
    the pipeline, averaged over micro-batches and DP; gradients are left in .grad / .main_grad)."""
    per_pass = cfg.trainer.micro_batch_size * grid.dp  # sequences of one micro-batch on every DP rank
    seqs = batch_size_at(cfg.optim, state.tokens, cfg.trainer.global_batch_size, per_pass)
    n_micro = seqs // per_pass
    mtp_lambda = mtp_lambda_at(cfg.optim, state.tokens)
    batches = [run.data.next_batch(cfg.trainer.micro_batch_size) for _ in range(n_micro)]
    losses = reduce.step_means(grid, run.pipeline.train_step(batches, mtp_lambda), n_micro, LOSS_KEYS)
    return {**losses, "mtp_lambda": mtp_lambda, "sequences": seqs, "tokens_in_step": seqs * cfg.data.seq_len}


class _Quiet:
    """Metrics of the ranks other than 0: nothing is printed or written."""

    def log_step(self, record: dict) -> None: ...

    def log_eval(self, step: int, record: dict) -> None: ...

    def log_expert_loads(self, step: int, loads: dict) -> None: ...

    def close(self) -> None: ...


def optimizer_step(cfg: RunConfig, grid: ProcessGrid, state: TrainState, run: Run, ema: EMA | None,
                   run_dir: Path) -> dict:
    """Steps 1-4 of the module docstring: the step's micro-batches, the optimizer, the bias update and the EMA
    (or the skip of a non-finite step); advances `state` and returns the step's record (timings excluded)."""
    record = train_step(cfg, grid, state, run)
    lr = lr_at(cfg.optim, state.step, state.tokens)
    loss_finite = math.isfinite(record["loss"])  # the same on every rank (a DP mean)
    grad_norm = run.opt.step(lr, cfg.optim.grad_clip) if loss_finite else float(run.opt.grad_norm())
    finite = loss_finite and math.isfinite(grad_norm)
    if finite:
        # the bias update uses this step's loads and changes routing from the next step on (paper 2.1.2)
        balance = run.balancer.step(bias_gamma_at(cfg.optim, state.tokens))
        if ema is not None:
            ema.update(run.model)
        state.skipped_in_row = 0
    else:
        run.balancer.discard()
        state.skipped_in_row += 1
        if state.skipped_in_row > cfg.trainer.max_skipped_steps:
            last = latest_checkpoint(run_dir)
            raise NonFiniteLossError(
                f"step {state.step + 1}: non-finite loss {record['loss']} (grad norm {grad_norm}); "
                f"stopped without saving. Last good checkpoint: {last or 'none'}. Resume from it with a "
                "lower optim.lr, or allow isolated spikes with trainer.max_skipped_steps=N")
        balance = {"maxvio": float("nan"), "maxvio_layer": {}, "experts": {}, "expert_loads": {}}
    run.opt.zero_grad()
    state.step += 1
    state.tokens += record["tokens_in_step"]
    return {"step": state.step, "tokens": state.tokens, **record, "lr": lr, "grad_norm": grad_norm, **balance,
            "force_balance": cfg.model.force_balance, "skipped": not finite}


def train(cfg: RunConfig, run_dir: Path, grid: ProcessGrid | None = None) -> TrainState:
    """Run (or resume) the configured training in `run_dir` on this process's rank; returns the final state."""
    if grid is None:
        preflight(cfg)
        grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
    if not cfg.validated_for(grid.world_size):
        cfg.validate(grid.world_size)
    ensure_writable(run_dir)
    checkpoint = resume_from(cfg, run_dir, grid)
    init_from = cfg.trainer.init_from if checkpoint is None else None
    if checkpoint is not None and cfg.trainer.init_from and grid.is_main:
        print(f"{run_dir} holds a checkpoint: resuming it (trainer.resume={cfg.trainer.resume}); "
              f"trainer.init_from={cfg.trainer.init_from} is not used", flush=True)
    run = build(cfg, grid, init_from)
    state, reader = TrainState(), None
    if checkpoint is not None:
        state, reader = restore(checkpoint, cfg, grid, run.shards, run.model, run.opt, run.data)
        if grid.is_main:
            print(f"resumed from {checkpoint} at step {state.step}", flush=True)
    # built after the restore, so that an EMA switched on at resume starts from the trained weights
    ema = EMA(run.model, cfg.trainer.ema_decay, owned=run.opt.owned()) if cfg.trainer.ema_decay else None
    if ema is not None and reader is not None and "ema" in reader.groups:
        run.shards.load_ema(ema, reader)
    metrics = Metrics(run_dir, cfg.logging, cfg.trainer.max_steps, cfg.to_dict(), resume_step=state.step) \
        if grid.is_main else _Quiet()
    valid = run.data.valid_batches(cfg.trainer.eval_batches, cfg.trainer.micro_batch_size) \
        if cfg.trainer.eval_every else []
    rank_stats = reduce.RankStats(grid, run.model, run.pipeline, cfg.parallel.fabric is not None,
                                  cfg.logging.per_rank_every)
    throughput = Throughput.for_run(cfg.model, cfg.data.seq_len, grid.world_size, cfg.trainer.peak_tflops,
                                    grid.device, torch_dtype(cfg.trainer.dtype))
    if grid.is_main:
        print(throughput.line(), flush=True)
    watchdog = Watchdog(cfg.trainer.hang_timeout_s, run_dir, grid.rank, state.step)
    try:
        while state.step < cfg.trainer.max_steps:
            t0 = time.perf_counter()
            record = optimizer_step(cfg, grid, state, run, ema, run_dir)
            ranks = rank_stats.collect(state.step, time.perf_counter() - t0)
            step_time = ranks["step_time_s_max"]  # the step ends with its slowest rank
            loads = record.pop("expert_loads")
            tokens_per_s = record["tokens_in_step"] / step_time
            metrics.log_step({**record, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
                              **throughput.record(tokens_per_s), **ranks})
            metrics.log_expert_loads(state.step, loads)
            if cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0:
                metrics.log_eval(state.step, validation(grid, run.pipeline, valid, cfg.trainer.eval_position_buckets))
            every = cfg.trainer.checkpoint_every
            if (every and state.step % every == 0) or state.step == cfg.trainer.max_steps:
                with watchdog.paused():
                    save(run_dir, cfg, grid, run.shards, state, run.model, run.opt, run.data, ema)
            watchdog.beat(state.step)
    finally:
        watchdog.stop()
        metrics.close()
        if ema is not None:
            ema.wait()
    return state


USER_ERRORS = (ConfigError, CheckpointError, DataError, NonFiniteLossError, ValueError, FileNotFoundError)


def _fail(err: BaseException) -> None:
    """A user error: one paragraph on stderr (naming the rank under torchrun), exit code 2, no traceback."""
    rank = os.environ.get("RANK")
    print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base=None)
def hydra_main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        preflight(cfg)
        grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
        run_dir = Path(reduce.broadcast(grid, str(run_dir_for(cfg.trainer.run_dir))))  # rank 0's choice
        ensure_writable(run_dir)
        with rank_log(run_dir, grid.rank):
            if grid.is_main:
                record_config(run_dir, raw)
                layout = grid.describe(cfg.parallel.schedule, cfg.parallel.dispatch)
                print(f"run directory: {run_dir}\nlayout: {layout}", flush=True)
            try:
                train(cfg, run_dir, grid)
            except USER_ERRORS as err:
                _fail(err)
        grid.close()
    except USER_ERRORS as err:
        _fail(err)


def composition_error(argv: list[str]) -> str | None:
    """The one-paragraph message of what stops the command line's overrides from composing (a wrong type or
    choice, an unknown key or group option, bad override syntax), or None. Sweeps (`a,b` under -m) and hydra.*
    overrides are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # Hydra's OverrideParseException
        return describe(err)
    plain = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    try:
        compose_config(plain)
    except ConfigError as err:
        return str(err)
    return None


def main() -> None:
    problem = composition_error(sys.argv[1:])
    if problem is not None:
        _fail(ConfigError(problem))
    hydra_main()


if __name__ == "__main__":
    main()
