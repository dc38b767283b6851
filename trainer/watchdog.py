"""A per-rank watchdog for a rank that stops making progress (stuck, not dead: a peer that hangs in a collective,
a deadlock, a stalled file system), which would otherwise hold the whole job until a collective timeout, or
forever (trainer.hang_timeout_s).

A daemon thread watches the training loop's heartbeat (`beat`, once per step). When none comes for the timeout
it writes every thread's Python stack (faulthandler) and, on NCCL, the flight recorder's record of the last
collectives into the run directory (`hang.rank<r>.txt`, `nccl_trace/hang_rank_<r>.pkl`), prints one line naming
the rank, the step and the files, and ends the process with exit code 3, so that torchrun ends (or, with
--max-restarts, restarts) the job. Checkpoint saves have their own, longer timeout (parallel.checkpoint_timeout_s)
and pause it (`paused`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

EXIT_CODE = 3


class Watchdog:
    def __init__(self, timeout_s: float, run_dir: Path, rank: int, step: int = 0) -> None:
        """`timeout_s` 0 = off; `step`: the step the loop starts after (a resumed run's)."""
        self.timeout_s, self.run_dir, self.rank = timeout_s, Path(run_dir), rank
        self.step, self.last = step, time.monotonic()
        self._pause = 0
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hai-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """Step `step` is done."""
        self.step, self.last = step, time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._pause += 1
        try:
            yield
        finally:
            self._pause -= 1
            self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        interval = min(5.0, self.timeout_s / 4)
        while not self._stop.wait(interval):
            if not self._pause and time.monotonic() - self.last > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        stacks = self.run_dir / f"hang.rank{self.rank}.txt"
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank}: no progress for {self.timeout_s:.0f} s after step {self.step}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        trace = _dump_flight_recorder(self.run_dir, self.rank)
        print(f"error (rank {self.rank}): no progress for {self.timeout_s:.0f} s in step {self.step + 1} "
              f"(trainer.hang_timeout_s); every thread's stack: {stacks}"
              + (f"; last NCCL collectives: {trace}" if trace else "") + "; ending the job", file=sys.stderr,
              flush=True)
        os._exit(EXIT_CODE)


def _dump_flight_recorder(run_dir: Path, rank: int) -> Path | None:
    """NCCL's flight recorder (its last collectives, TORCH_FR_BUFFER_SIZE of them) into the run directory; None
    without NCCL. torch has no public call for an on-demand dump, hence the private one, guarded."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"):
        return None
    try:
        from torch._C._distributed_c10d import _dump_nccl_trace

        data = _dump_nccl_trace()
    except Exception:  # an older or newer torch without it: the stacks still tell where each thread waits
        return None
    path = run_dir / "nccl_trace" / f"hang_rank_{rank}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
