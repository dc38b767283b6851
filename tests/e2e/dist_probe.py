"""A tiny distributed job for the launcher tests: what torchrun (alone, via hai-launch, or under SLURM) gives
each rank, checked by a real collective, without depending on the trainer.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.e2e.dist_probe --out DIR
    ... -m tests.e2e.dist_probe --out DIR --fail-rank 1     # rank 1 raises after the first all-reduce
    ... -m tests.e2e.dist_probe --out DIR --kill-rank 1     # rank 1 SIGKILLs itself after it

Every rank joins a gloo group, all-reduces its rank (the sum must be world*(world-1)/2) and writes
`DIR/rank<R>.json` with its rank, local rank, node rank (torchrun's GROUP_RANK), world size, host, the sum and
OMP_NUM_THREADS. With a failing rank, the others wait in a second all-reduce whose timeout (10 minutes) is far
longer than any test allows: only the launcher's teardown can end them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for rank<R>.json")
    p.add_argument("--fail-rank", type=int, default=None, help="this rank raises RuntimeError")
    p.add_argument("--kill-rank", type=int, default=None, help="this rank kills itself with SIGKILL")
    args = p.parse_args(argv)

    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    record = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
              "node_rank": int(os.environ.get("GROUP_RANK", "0")), "world_size": world,
              "host": socket.gethostname(), "sum": int(total.item()),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"rank {rank}/{world}: all_reduce sum {record['sum']}", flush=True)

    if rank == args.fail_rank:
        raise RuntimeError(f"dist_probe: rank {rank} fails on purpose")
    if rank == args.kill_rank:
        print(f"rank {rank}: killing myself with SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if args.fail_rank is not None or args.kill_rank is not None:
        dist.all_reduce(total)  # blocks: the failed rank never joins
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
