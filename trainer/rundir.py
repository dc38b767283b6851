"""One run directory per run, whatever the number of processes.

Hydra makes an output directory (and its job log and `.hydra/`) in every process before the trainer starts, named
by each process's own clock: under torchrun a rank whose clock ticks a second later would make a second
`runs/<experiment>/<time>/`. So configs/config.yaml tells Hydra to write nothing itself (no `.hydra/`, no job
logging) and to name its output directory through `hai_run_dir`, which gives rank 0 the real one (trainer.run_dir
when set, else runs/<experiment>/<time>) and every other rank ".", which exists. Rank 0 then broadcasts its
choice (trainer/train.py), writes `.hydra/` (the composed config, the overrides, Hydra's own config) there, and
every rank copies its console output into `train.rank<r>.log` there. With trainer.run_dir set nothing is written
anywhere else.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def _hydra_run_dir(run_dir: str | None, default: str) -> str:
    """hydra.run.dir: rank 0's directory on rank 0 (trainer.run_dir, else the timestamped default), "." on every
    other rank (RANK, set by torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return "."
    return run_dir if run_dir else default


OmegaConf.register_new_resolver("hai_run_dir", _hydra_run_dir, replace=True)


def run_dir_for(trainer_run_dir: str | None) -> Path:
    """This process's choice of run directory: trainer.run_dir, else Hydra's output directory of this job."""
    if trainer_run_dir:
        return Path(trainer_run_dir).expanduser()
    return Path(HydraConfig.get().runtime.output_dir)


def record_config(run_dir: Path, raw: DictConfig) -> None:
    """Write `.hydra/` into the run directory as Hydra would (rank 0 only): config.yaml (the composed config),
    overrides.yaml (the command line's overrides), hydra.yaml."""
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(raw, out / "config.yaml")
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        OmegaConf.save(OmegaConf.create(list(hydra.overrides.task)), out / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra, resolve=False)}), out / "hydra.yaml")


class _Tee:
    """A text stream writing to the console stream and to a log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextmanager
def rank_log(run_dir: Path, rank: int) -> Iterator[Path]:
    """Copy this process's stdout and stderr into `<run_dir>/train.rank<rank>.log` (appending: a resumed run
    continues its log) while the block runs; an exception leaving the block is written there with its traceback
    (the console gets it from whoever catches it)."""
    path = run_dir / f"train.rank{rank}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield path
        except Exception:
            log.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = out, err
