"""A per-rank watchdog for a rank that stops making progress (stuck, not dead: a peer that hangs in a collective,
a deadlock, a stalled file system), which would otherwise hold the whole job until a collective timeout, or
forever (trainer.hang_timeout_s).

A daemon thread watches the training loop's heartbeat (`beat`, once per step). When none comes for the timeout
it writes every thread's Python stack (faulthandler) and torch's flight recorders' record of this rank's last
collectives (NCCL's own recorder, and the one gloo writes to) into the run directory (`hang.rank<r>.txt`,
`nccl_trace/hang_{gloo,nccl}_rank_<r>`, which torch's `torchfrtrace` reads), prints one line naming the rank, the
step, the collective it waits in (group and sequence number) and the files, and ends the process with exit code 3,
so that torchrun ends (or, with --max-restarts, restarts) the job. Checkpoint saves have their own, longer timeout
(parallel.checkpoint_timeout_s) and pause it (`paused`). `record_collectives` switches the recorder on before the
process group exists, for launchers that did not.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

EXIT_CODE = 3
DUMP_TIMEOUT_S = 60.0
RECORDED = "2000"  # collectives the flight recorder keeps, as launch/launch.py's flight_recorder_env
# torch 2.13 reads the new name first, the old one after it
BUFFER_NAMES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")


def record_collectives(environ: dict | None = None) -> None:
    """Let torch's flight recorder keep this rank's last collectives (torch reads the size when the first process
    group is made, so call it before): what hai-launch sets on GPUs, here for every backend and launcher (plain
    torchrun, SLURM, gloo). A size the user set, under either name, is kept, 0 included."""
    environ = os.environ if environ is None else environ
    if not any(name in environ for name in BUFFER_NAMES):
        environ[BUFFER_NAMES[0]] = RECORDED


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
        # the dump may need locks the stuck collective holds: it gets DUMP_TIMEOUT_S, then the job ends without it
        found: list = [[], None]

        def dump() -> None:
            found[:] = _dump_flight_recorder(self.run_dir, self.rank)

        dumper = threading.Thread(target=dump, name="hai-watchdog-dump", daemon=True)
        dumper.start()
        dumper.join(DUMP_TIMEOUT_S)
        traces, waiting = found
        print(f"error (rank {self.rank}): no progress for {self.timeout_s:.0f} s in step {self.step + 1} "
              f"(trainer.hang_timeout_s)" + (f", waiting in {waiting}" if waiting else "")
              + f"; every thread's stack: {stacks}"
              + (f"; its last collectives: {', '.join(map(str, traces))}" if traces else "")
              + "; ending the job", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)


def _dump_flight_recorder(run_dir: Path, rank: int) -> tuple[list[Path], str | None]:
    """(the files, the collective this rank waits in): torch's flight recorders, each with the last
    TORCH_FR_BUFFER_SIZE collectives, written to `nccl_trace/hang_<recorder>_rank_<rank>` in the run directory
    (torchfrtrace's naming: a prefix and the rank). NCCL keeps its own recorder (CUDA builds); gloo, which carries
    the host collectives next to NCCL on GPUs and everything on CPUs, writes to the generic one. None is written
    without a process group or with the recorder off. torch has no public call for an on-demand dump, hence the
    private ones, guarded."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [], None
    try:
        from torch._C import _distributed_c10d as c10d
    except ImportError:
        return [], None
    dumps = {"gloo": getattr(c10d, "_dump_fr_trace", None)}
    if "nccl" in str(dist.get_backend()):  # "cuda:nccl,cpu:gloo" for the grid's default group
        dumps["nccl"] = getattr(c10d, "_dump_nccl_trace", None)
    paths, entries = [], []
    for recorder, dump in dumps.items():
        try:
            trace = pickle.loads(dump())
        except Exception:  # a torch without it: the stacks still tell where each thread waits
            continue
        if not trace.get("entries"):
            continue
        if not any(pg.get("ranks", "[]") != "[]" for pg in trace.get("pg_config", {}).values()):
            trace["pg_config"] = _group_config()
        path = run_dir / "nccl_trace" / f"hang_{recorder}_rank_{rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(trace))
        paths.append(path)
        entries += trace["entries"]
    return paths, waiting_in(entries)


def _group_config() -> dict[str, dict[str, str]]:
    """The dump's table of process groups (name -> name, description, global ranks), which NCCL's recorder fills
    and the generic one (torch 2.13) leaves empty, though torchfrtrace needs it to match entries across ranks;
    from torch's registry of this process's groups (private, hence guarded: {} without it)."""
    import torch.distributed as dist

    try:
        from torch.distributed.distributed_c10d import _world

        return {name: {"name": name, "desc": group.group_desc, "ranks": str(dist.get_process_group_ranks(group))}
                for group, name in _world.pg_names.items()}
    except Exception:
        return {}


def waiting_in(entries: list[dict]) -> str | None:
    """The oldest collective of a flight-recorder dump that has not completed (None when all have), as
    'gloo:all_reduce #57 of group dp[0,2]' (the group's description, else its name)."""
    pending = [e for e in entries if not e.get("retired", True)]
    if not pending:
        return None
    e = min(pending, key=lambda e: e.get("time_created_ns", 0))
    name, desc = (tuple(e.get("process_group", ())) + ("", ""))[:2]
    seq = e.get("p2p_seq_id") if e.get("is_p2p") else e.get("collective_seq_id")
    group = desc if desc and desc != "undefined" else name
    return f"{e.get('profiling_name', '?')} #{seq} of group {group}"
