"""`hai-train`: the training loop every layout reuses (DESIGN.md principle 5), single process today.

One optimizer step (paper 4.2):
  1. batch size, MTP lambda, bias speed gamma and learning rate from the schedules (trainer/optim.py), keyed
     by tokens consumed so far;
  2. micro-batches of packed sequences (data/), forward with the main + MTP loss, backward (the balance loss
     rides along through autograd, model/moe.py), gradients accumulated;
  3. a non-finite loss or gradient norm stops the run naming the step (or skips the step, up to
     trainer.max_skipped_steps in a row); the last good checkpoint is kept;
  4. gradient clipping, then the aux-loss-free bias update from the step's expert loads (trainer/balance.py),
     then AdamW over fp32 master weights, then the CPU EMA;
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
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from data.dataset import DataPipeline, build_data, check_vocab
from fp8.recipe import apply_recipe
from model import ConfigError, Transformer
from model.moe import Gate, MoE
from parallel.config import check_model_layout
from parallel.pipeline.schedule import check_schedule_args
from parallel.runtime import Runtime
from trainer.balance import BiasBalancer
from trainer.checkpoint import (
    CheckpointError,
    CheckpointReader,
    check_compatible,
    ensure_writable,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.config import RunConfig, load_config
from trainer.ema import EMA
from trainer.metrics import Metrics
from trainer.optim import AdamW, attach_main_grads, batch_size_at, bias_gamma_at, clip_grad_norm_, lr_at, mtp_lambda_at

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (or skipped)
    tokens: int = 0  # training tokens consumed
    skipped_in_row: int = 0  # consecutive steps skipped for a non-finite loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device(name)


def cast_for_compute(model: Transformer, dtype: torch.dtype) -> None:
    """Weights in the compute dtype, except the router, which routes in fp32 (paper 3.3)."""
    gates = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in gates:
                p.data = p.data.to(dtype)


def build(cfg: RunConfig, rt: Runtime, device: torch.device) -> tuple[Transformer, object, DataPipeline]:
    """Data for this DP rank, the model (same seed everywhere, then parallelised), its optimizer."""
    torch.manual_seed(cfg.trainer.seed)
    data = build_data(cfg.data, seed=cfg.trainer.seed, dp_rank=rt.dp_rank, dp_size=rt.dp)
    check_vocab(data.vocab_size, cfg.model.vocab_size)
    model = Transformer(cfg.model)
    rt.parallelize(model)
    apply_recipe(model, cfg.fp8)
    model.to(device)
    cast_for_compute(model, DTYPES[cfg.trainer.dtype])
    if rt.pipeline is not None:
        rt.pipeline.to(device, DTYPES[cfg.trainer.dtype])
    attach_main_grads(model.parameters())
    return model, rt.optimizer(model, cfg.optim), data


def resume_from(cfg: RunConfig, run_dir: Path) -> Path | None:
    if cfg.trainer.resume is None:
        return None
    if cfg.trainer.resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(cfg.trainer.resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"trainer.resume={cfg.trainer.resume}: no such checkpoint; give a checkpoint "
                              "directory, a run directory, 'auto' or null")
    return path


def save(run_dir: Path, cfg: RunConfig, rt: Runtime, state: TrainState, model: Transformer, opt,
         data: DataPipeline, ema: EMA | None) -> None:
    """Every rank writes its own pieces at once (trainer/checkpoint.py); collective."""
    tensors = {"model": rt.model_shards(model.state_dict(), opt), "optim": rt.optim_shards(opt),
               "rng": {f"{rt.rank}.{name}": t for name, t in rng_state().items()}}
    if ema is not None:
        tensors["ema"] = rt.model_shards(ema.state_dict(), opt)
    meta = {"step": state.step, "tokens": state.tokens, "skipped_in_row": state.skipped_in_row,
            "data": data.state_dict(), "config": cfg.to_dict(),
            "layout": {"pp": cfg.parallel.pp, "ep": rt.ep, "dp": rt.dp, "world_size": rt.world_size,
                       "schedule": cfg.parallel.schedule}}
    save_checkpoint(run_dir, state.step, tensors, meta, keep=cfg.trainer.keep_checkpoints)


def restore(path: Path, cfg: RunConfig, rt: Runtime, model: Transformer, opt, data: DataPipeline,
            ) -> tuple[TrainState, CheckpointReader]:
    """Load a checkpoint written with any (DP, EP) layout: each rank reads only what it holds. Random generators
    come back per rank (rank r takes the saved rank r's, or rank 0's when the saving job was smaller)."""
    reader = CheckpointReader(path)
    meta = reader.meta
    check_compatible(meta, cfg.model.to_dict(), layout=None)
    rt.load_model_state(model, reader)
    rt.load_optim_state(opt, reader)
    data.load_state_dict(meta["data"])
    rank = rt.rank if reader.has("rng", f"{rt.rank}.torch_cpu") else 0
    set_rng_state({name.split(".", 1)[1]: reader.tensor("rng", name) for name in reader.names("rng")
                   if name.startswith(f"{rank}.")})
    return TrainState(meta["step"], meta["tokens"], meta.get("skipped_in_row", 0)), reader


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], rt: Runtime,
             device: torch.device) -> float:
    if rt.pipeline is not None:
        total = rt.pp_sum({"val": rt.pipeline.evaluate(batches)})["val"]
    else:
        total = sum(model.loss(x.to(device), y.to(device)).main.item() for x, y in batches)
    return rt.mean({"val": total / len(batches)})["val"]


def train_step(cfg: RunConfig, rt: Runtime, state: TrainState, model: Transformer, data: DataPipeline,
               device: torch.device) -> dict[str, float]:
    """Forward and backward over this rank's part of one global batch; returns the step's DP-mean losses
    (gradients are left in .grad / .main_grad)."""
    per_pass = cfg.trainer.micro_batch_size * rt.dp  # sequences of one micro-batch on every DP rank
    seqs = batch_size_at(cfg.optim, state.tokens, cfg.trainer.global_batch_size, per_pass)
    n_micro = seqs // per_pass
    mtp_lambda = mtp_lambda_at(cfg.optim, state.tokens)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        moe.aux_loss_scale = 1.0 / n_micro  # the attached balance loss is averaged like the main loss
    if rt.pipeline is not None:
        check_schedule_args(cfg.parallel.schedule, rt.pp, n_micro)
        batches = [data.next_batch(cfg.trainer.micro_batch_size) for _ in range(n_micro)]
        sums = rt.pp_sum(rt.pipeline.train_step(batches, mtp_lambda))
        losses = rt.mean({key: value / n_micro for key, value in sums.items()})
        return {**losses, "mtp_lambda": mtp_lambda, "sequences": seqs, "tokens_in_step": seqs * cfg.data.seq_len}
    total = lm = mtp = aux = 0.0
    for _ in range(n_micro):
        tokens, labels = data.next_batch(cfg.trainer.micro_batch_size)
        out = model.loss(tokens.to(device), labels.to(device), mtp_lambda=mtp_lambda)
        (out.loss / n_micro).backward()
        total += out.loss.item() / n_micro
        lm += out.main.item() / n_micro
        mtp += sum(x.item() for x in out.mtp) / max(1, len(out.mtp)) / n_micro
        aux += sum(m.last_aux_loss.item() for m in moes if m.last_aux_loss is not None) / n_micro
    losses = rt.mean({"loss": total, "lm_loss": lm, "mtp_loss": mtp, "aux_loss": aux})
    return {**losses, "mtp_lambda": mtp_lambda, "sequences": seqs, "tokens_in_step": seqs * cfg.data.seq_len}


def clip_and_step(opt, params: list[torch.Tensor], lr: float, max_norm: float, update: bool) -> float:
    """The global gradient norm (before clipping); when `update` and the norm is finite, clip and step."""
    if isinstance(opt, AdamW):
        norm = float(clip_grad_norm_(params, max_norm))
        if update and math.isfinite(norm):
            opt.step(lr)
        return norm
    norm = float(opt.grad_norm())  # ZeRO-1: reduce-scatter, then the norm from the shards
    if update and math.isfinite(norm):
        opt.step(lr, max_norm)
    return norm


class _Quiet:
    """Metrics of the ranks other than 0: nothing is printed or written."""

    def log_step(self, record: dict) -> None: ...

    def log_eval(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


def train(cfg: RunConfig, run_dir: Path, rt: Runtime | None = None) -> TrainState:
    """Run (or resume) the configured training in `run_dir` on this process's rank; returns the final state."""
    rt = rt or Runtime.start(cfg.parallel)
    cfg.validate(rt.world_size)
    check_model_layout(cfg.parallel, cfg.model, rt.world_size)
    ensure_writable(run_dir)
    device = resolve_device(cfg.trainer.device)
    model, opt, data = build(cfg, rt, device)
    balancer = BiasBalancer(model, update=cfg.model.balance == "aux_free", group=rt.dp_group,
                            replicas=rt.gate_replicas(model), report_group=rt.pp_group)
    state, reader = TrainState(), None
    checkpoint = resume_from(cfg, run_dir)
    if checkpoint is not None:
        state, reader = restore(checkpoint, cfg, rt, model, opt, data)
        if rt.is_main:
            print(f"resumed from {checkpoint} at step {state.step}", flush=True)
    # built after the restore, so that an EMA switched on at resume starts from the trained weights
    ema = EMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None
    if ema is not None and reader is not None and "ema" in reader.groups:
        rt.load_ema_state(ema, reader)
    metrics = Metrics(run_dir, cfg.logging, cfg.trainer.max_steps, cfg.to_dict(), resume_step=state.step) \
        if rt.is_main else _Quiet()
    valid = data.valid_batches(cfg.trainer.eval_batches, cfg.trainer.micro_batch_size) if cfg.trainer.eval_every \
        else []
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        while state.step < cfg.trainer.max_steps:
            t0 = time.perf_counter()
            record = train_step(cfg, rt, state, model, data, device)
            lr = lr_at(cfg.optim, state.step, state.tokens)
            loss_finite = math.isfinite(record["loss"])  # the same on every rank (a DP mean)
            grad_norm = clip_and_step(opt, params, lr, cfg.optim.grad_clip, update=loss_finite)
            finite = loss_finite and math.isfinite(grad_norm)
            if finite:
                # the bias update uses this step's loads and changes routing from the next step on (paper 2.1.2)
                balance = balancer.step(bias_gamma_at(cfg.optim, state.tokens))
                if ema is not None:
                    ema.update(model)
                state.skipped_in_row = 0
            else:
                balancer.discard()
                state.skipped_in_row += 1
                if state.skipped_in_row > cfg.trainer.max_skipped_steps:
                    last = latest_checkpoint(run_dir)
                    raise NonFiniteLossError(
                        f"step {state.step + 1}: non-finite loss {record['loss']} (grad norm {grad_norm}); "
                        f"stopped without saving. Last good checkpoint: {last or 'none'}. Resume from it with a "
                        "lower optim.lr, or allow isolated spikes with trainer.max_skipped_steps=N")
                balance = {"maxvio": float("nan"), "maxvio_layer": {}}
            opt.zero_grad()
            state.step += 1
            state.tokens += record["tokens_in_step"]
            dt = time.perf_counter() - t0
            times = rt.gather(dt)
            metrics.log_step({"step": state.step, "tokens": state.tokens, **record, "lr": lr, "grad_norm": grad_norm,
                              "maxvio": balance["maxvio"], "maxvio_layer": balance["maxvio_layer"],
                              "skipped": not finite, "step_time_s": max(times), "step_time_rank_s": times,
                              "tokens_per_s": record["tokens_in_step"] / max(times), **rt.dispatch_stats(),
                              **rt.pipeline_stats()})
            if cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0:
                metrics.log_eval(state.step, {"val_loss": evaluate(model, valid, rt, device)})
            every = cfg.trainer.checkpoint_every
            if (every and state.step % every == 0) or state.step == cfg.trainer.max_steps:
                save(run_dir, cfg, rt, state, model, opt, data, ema)
    finally:
        metrics.close()
        if ema is not None:
            ema.wait()
    return state


def run_dir_for(cfg: RunConfig) -> Path:
    if cfg.trainer.run_dir:
        return Path(cfg.trainer.run_dir).expanduser()
    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def hydra_main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        rt = Runtime.start(cfg.parallel)
        run_dir = rt.broadcast(run_dir_for(cfg))  # rank 0's: Hydra's timestamps may differ between ranks
        if rt.is_main:
            print(f"run directory: {run_dir}\nlayout: {rt.describe()}", flush=True)
        train(cfg, run_dir, rt)
        rt.close()
    except (ConfigError, CheckpointError, NonFiniteLossError, ValueError, FileNotFoundError) as err:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
