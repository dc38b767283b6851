"""What a checkpoint of a run holds and how a run gets it back: the loop's counters, this rank's pieces of the model,
optimizer, EMA and random generators (trainer/shards.py says which pieces), the data position and the config.

Every rank writes its own pieces at once (trainer/checkpoint.py's format); a checkpoint written with any layout
resumes on any other, each rank reading only the ranges it holds. Saving, finding and loading a checkpoint are
collectives over the grid's checkpoint group (long timeout: parallel.checkpoint_timeout_s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.dataset import DataPipeline
from optim.optimizer import Optimizer
from parallel.grid import ProcessGrid
from trainer.checkpoint import (
    CheckpointError,
    CheckpointReader,
    agree_on_rank0,
    check_compatible,
    latest_checkpoint,
    open_checkpoint,
    raise_if_any_failed,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.config import RunConfig
from trainer.ema import EMA
from trainer.shards import Shards


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (or skipped)
    tokens: int = 0  # training tokens consumed
    skipped_in_row: int = 0  # consecutive steps skipped for a non-finite loss


def resume_from(cfg: RunConfig, run_dir: Path, grid: ProcessGrid | None = None) -> Path | None:
    """The checkpoint trainer.resume names: the newest complete one of `run_dir` for "auto", a given path, or
    None (train from scratch). Collective: rank 0 alone looks at the file system and every rank gets its answer
    (over `grid`'s checkpoint group; without a grid the default group, if any)."""
    group = None if grid is None else grid.checkpoint_group
    found = agree_on_rank0(lambda: _resume_path(cfg, run_dir), group)
    return None if found is None else Path(found)


def _resume_path(cfg: RunConfig, run_dir: Path) -> str | None:
    if cfg.trainer.resume is None:
        return None
    if cfg.trainer.resume == "auto":
        found = latest_checkpoint(run_dir)
        return None if found is None else str(found)
    path = Path(cfg.trainer.resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"trainer.resume={cfg.trainer.resume}: no such checkpoint; give a checkpoint "
                              "directory, a run directory, 'auto' or null")
    return str(path)


def save(run_dir: Path, cfg: RunConfig, grid: ProcessGrid, shards: Shards, state: TrainState, model, opt: Optimizer,
         data: DataPipeline, ema: EMA | None) -> None:
    """Checkpoint `state.step`; collective (every rank writes its pieces)."""
    tensors = {"model": shards.model(model.state_dict(), opt), "optim": shards.optim(opt),
               "rng": {f"{grid.rank}.{name}": t for name, t in rng_state().items()}}
    if ema is not None:
        tensors["ema"] = shards.ema(ema)
    meta = {"step": state.step, "tokens": state.tokens, "skipped_in_row": state.skipped_in_row,
            "data": data.state_dict(), "config": cfg.to_dict(),
            "layout": {"pp": grid.pp, "ep": grid.ep, "dp": grid.dp, "world_size": grid.world_size,
                       "schedule": str(cfg.parallel.schedule)}}
    save_checkpoint(run_dir, state.step, tensors, meta, keep=cfg.trainer.keep_checkpoints,
                    group=grid.checkpoint_group)


def restore(path: Path, cfg: RunConfig, grid: ProcessGrid, shards: Shards, model, opt: Optimizer,
            data: DataPipeline) -> tuple[TrainState, CheckpointReader]:
    """Load a checkpoint written with any layout: rank 0 checks its index and model config once (`open_checkpoint`),
    then each rank reads only what it holds. Random generators come back per rank (rank r takes the saved rank
    r's, or rank 0's when the saving job was smaller). Collective: an error on any rank is raised on all."""
    model_config = cfg.model.to_dict()
    reader = open_checkpoint(path, grid.checkpoint_group,
                             check=lambda meta: check_compatible(meta, model_config, layout=None))
    meta, error = reader.meta, None
    try:
        shards.load_model(model, reader)
        shards.load_optim(opt, reader)
        data.load_state_dict(meta["data"])
        rank = grid.rank if reader.has("rng", f"{grid.rank}.torch_cpu") else 0
        set_rng_state({name.split(".", 1)[1]: reader.tensor("rng", name) for name in reader.names("rng")
                       if name.startswith(f"{rank}.")})
    except Exception as err:  # a rank that cannot read its part: every rank stops with its message
        error = err
    raise_if_any_failed(error, grid.checkpoint_group, where=f"rank {grid.rank}: " if grid.world_size > 1 else "")
    return TrainState(meta["step"], meta["tokens"], meta.get("skipped_in_row", 0)), reader
