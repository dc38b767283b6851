"""Run a benchmark function in N gloo processes on this machine (the benches' one way to spawn ranks).

`run_gloo(fn, world, *args)` starts `world` processes, initialises the default gloo group on a free localhost
port with one thread per rank, calls `fn(rank, world, *args)` in each and returns the list of their results in
rank order (each must be picklable). The test suite has its own spawner (tests/dist/conftest.py) with hang
timeouts; benches are not imported by tests and tests are not imported by benches.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable[..., Any], world: int, port: int, queue: mp.SimpleQueue, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, *args)))
        dist.barrier()  # no rank leaves while another still talks to it (an exit mid-exchange aborts gloo)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(fn, world, port, queue, args), nprocs=world, join=True)
    results = dict(queue.get() for _ in range(world))
    return [results[r] for r in range(world)]
