"""Run a test function in N gloo processes on CPU (the dist tier of DESIGN.md's tests).

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, initialises the default process
group with gloo on a free localhost port, calls `fn(rank, world_size, *args)` in each (fn must be a
module-level function), and re-raises in the parent the first child failure, naming its rank; a job that
hangs past the timeout is killed.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = str(Path(__file__).resolve().parents[2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn: Callable[..., None], world_size: int, port: int, timeout: float, errors, args) -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., None], world_size: int, *args, timeout: float = 180) -> None:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; raise if any rank fails."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if ROOT not in paths:  # children unpickle `fn` (importing its test module) before _child runs
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, paths)])
    ctx = mp.start_processes(_child, args=(fn, world_size, _free_port(), timeout, errors, args),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout + 60  # collectives time out first; this catches anything else
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{world_size} processes did not finish within {timeout + 60:.0f} s")
    except Exception as err:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"rank {rank} failed:\n{tb}")
        raise RuntimeError("\n".join(details) or str(err)) from err
