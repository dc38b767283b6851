"""`hai-launch`: start `hai-train` (or another module) on several processes with torchrun.

    hai-launch experiment=tiny_parallel                 # 4 processes: pp * dp, dp defaults to the config's ep ...
    hai-launch --dp 4 parallel=dp4_ep2 trainer.micro_batch_size=2   # ... so give the data-parallel size
    hai-launch --nproc 2 trainer.max_steps=10           # processes per node given outright
    hai-launch --dry-run experiment=tiny_parallel       # print the torchrun command, run nothing
    hai-launch --nnodes 2 --rdzv-endpoint host0:29500 --nproc 8 ...   # one call per node (SLURM: train.sbatch)

The process count. The config has no world size of its own (parallel/config.py: DP = world / pp, EP divides
DP), so hai-launch derives it: world = parallel.pp * DP, where DP is `--dp` (default: parallel.ep, the
smallest DP the config allows). `--nproc` (processes per node, torchrun's --nproc_per_node) overrides the
rule; otherwise nproc = world / nnodes. The config is composed exactly as hai-train composes it
(configs/config.yaml + the overrides), and the layout is validated before any process starts.

Restarts. `--max-restarts N` passes torchrun's elastic restarts on: when a worker dies, torchrun stops the others
and starts them all again, up to N times; with `trainer.resume=auto` (required) and the run directory fixed at
launch, each attempt resumes from the newest complete checkpoint (a torch 2.13 rendezvous-store trap is avoided:
`RESTART_ENV`).

What runs. `python -m torch.distributed.run --standalone --nproc_per_node N -m trainer.train <overrides>`
(or, with `--nnodes M` > 1, c10d rendezvous at `--rdzv-endpoint` instead of --standalone). The exact
command is printed first, then hai-launch replaces itself with it (exec), so signals reach torchrun directly
and its exit code is hai-launch's. OMP_NUM_THREADS, when unset, becomes max(1, usable CPUs // nproc) so the
ranks of a CPU run do not oversubscribe the cores. Arguments hai-launch does not know (Hydra overrides and
flags such as `--cfg job`) go to the module unchanged, in order; everything after `--` does too.

NCCL's flight recorder. On GPUs each rank keeps its last collectives and, when the NCCL watchdog times one out,
writes them to `<run dir>/nccl_trace/rank_<r>` (`flight_recorder_env`; a variable already set is kept). For
that the launcher must know the run directory: trainer.run_dir, or on one node the timestamped default, which
hai-launch then fixes itself and passes on as trainer.run_dir (rank 0 would otherwise choose it later).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import RunConfig

DEFAULT_MODULE = "trainer.train"
TRACE_DIR = "nccl_trace"  # the flight recorder's dumps, inside the run directory
# torch 2.13 reads TORCH_FR_BUFFER_SIZE and TORCH_FR_DUMP_TEMP_FILE first and their older names after them (with a
# deprecation warning), so a user's setting under either name is kept
OLD_NAMES = {"TORCH_FR_BUFFER_SIZE": "TORCH_NCCL_TRACE_BUFFER_SIZE",
             "TORCH_FR_DUMP_TEMP_FILE": "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"}


class LaunchError(ValueError):
    """The launch cannot be built: bad flags or a layout the config refuses."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hai-launch", allow_abbrev=False,
        description="Run hai-train on several processes with torchrun. Unknown arguments (Hydra overrides) are "
                    "passed to the trainer; world size = parallel.pp * DP, DP = --dp (default parallel.ep).")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per node (torchrun --nproc_per_node); default: world size / nnodes")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel size when --nproc is not given; default: parallel.ep of the config")
    p.add_argument("--nnodes", type=int, default=1, help="nodes; each runs hai-launch once (default 1)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of the c10d rendezvous, required with --nnodes > 1")
    p.add_argument("--rdzv-id", default="hai-launch", help="rendezvous (job) id shared by the nodes")
    p.add_argument("--module", default=DEFAULT_MODULE,
                   help=f"module each rank runs (default {DEFAULT_MODULE}); for another module the config is not "
                        "read and nproc = --nproc, else --dp, else 1")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart all workers this many times when one fails (torchrun's elastic restarts); each "
                        "restart resumes from the run directory's newest complete checkpoint (trainer.resume=auto)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    p.add_argument("--print-run-dir", action="store_true",
                   help="print the run directory of the trainer with these overrides (trainer.run_dir, else the "
                        "runs/<experiment>/<time> hai-launch would fix) and exit; launch/slurm/train.sbatch uses it")
    return p


def launch_config(args: argparse.Namespace, overrides: list[str]) -> tuple[int, RunConfig]:
    """The world size and the run config the trainer composes from `overrides`. Total ranks: nproc * nnodes when
    --nproc is given, else pp * DP (DP = --dp or parallel.ep); the whole config is validated for that world size
    (layout, model split, micro-batches) before anything starts."""
    from omegaconf import OmegaConf

    from core.config import from_dict
    from parallel.config import ParallelConfig
    from trainer.config import compose_config, load_config

    plain = [o for o in overrides if "=" in o and not o.startswith("-")]  # not Hydra's flags (`--cfg job`)
    try:
        cfg = compose_config(plain)
    except ValueError as err:
        raise LaunchError(f"cannot compose the config with {plain}: {err}") from None
    pcfg = from_dict(ParallelConfig, OmegaConf.to_container(cfg.parallel, resolve=True), "parallel")
    if args.nproc is not None:
        world = args.nproc * args.nnodes
    else:
        dp = args.dp if args.dp is not None else pcfg.ep
        if dp < 1:
            raise LaunchError(f"--dp must be >= 1, got {dp}")
        world = pcfg.pp * dp
    try:
        return world, load_config(cfg, world)
    except ValueError as err:
        raise LaunchError(f"world size {world}: {err}") from err


def uses_nccl(cfg: RunConfig) -> bool:
    """Whether the ranks run on this node's GPUs, over NCCL (trainer.device as parallel/grid.py resolves it)."""
    from parallel.grid import device_type

    return str(cfg.trainer.device) in ("auto", "cuda") and device_type(str(cfg.trainer.device)) == "cuda"


def planned_run_dir(cfg: RunConfig, overrides: list[str], nnodes: int = 1) -> str | None:
    """The trainer's run directory, where the launcher can know it: trainer.run_dir, else for a plain training
    run on one node the timestamped default of configs/config.yaml (runs/<experiment>/<time>), which the caller
    then passes on as trainer.run_dir. None when Hydra flags (a sweep, `--cfg`) are given, trainer.run_dir is
    overridden to null, or several nodes would each pick their own time."""
    if cfg.trainer.run_dir:
        return str(cfg.trainer.run_dir)
    named = any(o.lstrip("+").startswith("trainer.run_dir=") for o in overrides)
    if nnodes > 1 or named or any(o.startswith("-") for o in overrides):
        return None
    return f"runs/{cfg.experiment.name}/{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def flight_recorder_env(run_dir: str | Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of NCCL's flight recorder (torch 2.13's names, checked in its source): each rank records
    its last 2000 collectives (TORCH_FR_BUFFER_SIZE) and writes them when the NCCL watchdog times one out
    (TORCH_NCCL_DUMP_ON_TIMEOUT) to `<run_dir>/nccl_trace/rank_<rank>` (TORCH_FR_DUMP_TEMP_FILE is a prefix; torch
    appends the rank and does not create the directory). Without a run directory the dumps go to torch's default,
    ~/.cache/torch/. A variable already in `environ`, under its new or old name, is left out."""
    wanted = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    if run_dir is not None:
        wanted["TORCH_FR_DUMP_TEMP_FILE"] = str(Path(run_dir).expanduser().absolute() / TRACE_DIR / "rank_")
    return {k: v for k, v in wanted.items() if k not in environ and OLD_NAMES.get(k, k) not in environ}


def omp_threads(nproc: int) -> int:
    """Threads per rank so that the ranks of one node share its usable CPUs: max(1, cpus // nproc)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // nproc)


def build(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and the environment additions for `argv` (hai-launch's arguments)."""
    args, passthrough = _parse(argv)
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes must be >= 1, got {args.nnodes}")
    if args.nproc is not None and args.nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise LaunchError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the first node's address); "
                          "under SLURM use launch/slurm/train.sbatch")
    nproc, cfg, world = args.nproc, None, args.dp or 1  # another module: nproc = --nproc, else --dp, else 1
    if args.module == DEFAULT_MODULE:
        world, cfg = launch_config(args, passthrough)  # validates the layout now rather than in every rank
    if nproc is None:
        if world % args.nnodes:
            raise LaunchError(f"world size {world} is not divisible by --nnodes {args.nnodes}; give --nproc")
        nproc = world // args.nnodes
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(omp_threads(nproc))}
    restarts = []
    if args.max_restarts:
        restarts, fixed = restart_args(args, cfg, passthrough)
        passthrough = [*passthrough, *fixed]
        env.update({k: v for k, v in RESTART_ENV.items() if k not in os.environ})
    if cfg is not None and uses_nccl(cfg):
        run_dir = planned_run_dir(cfg, passthrough, args.nnodes)
        if run_dir is not None and not cfg.trainer.run_dir and not any(o.startswith("trainer.run_dir=")
                                                                       for o in passthrough):
            passthrough = [*passthrough, f"trainer.run_dir={run_dir}"]  # the dumps' directory is the run's
        env.update(flight_recorder_env(run_dir, os.environ))
    if args.nnodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = ["--nnodes", str(args.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", args.rdzv_endpoint,
                "--rdzv_id", args.rdzv_id]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, *restarts, "--nproc_per_node", str(nproc),
           "-m", args.module, *passthrough]
    return cmd, env


# After an elastic restart under --standalone, torch 2.13's agent hands the new workers its rendezvous store with
# the previous attempt's peer addresses, and gloo's init fails ("connectFullMesh failed ... Connection refused");
# a store of their own per attempt avoids it.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def restart_args(args: argparse.Namespace, cfg: RunConfig | None, overrides: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's flags, overrides to add) for --max-restarts: restarted workers must find the checkpoints of the
    attempt before, so the trainer resumes automatically and the run directory is fixed before the first start."""
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    fixed = []
    if cfg is not None:
        if cfg.trainer.resume != "auto":
            raise LaunchError(f"--max-restarts {args.max_restarts} restarts the workers from the run directory's "
                              f"newest checkpoint, but trainer.resume={cfg.trainer.resume}: a restart would train "
                              "from scratch (or from that fixed checkpoint) again; set trainer.resume=auto")
        run_dir = planned_run_dir(cfg, overrides, args.nnodes)
        if run_dir is None:
            raise LaunchError(f"--max-restarts {args.max_restarts} needs a run directory known before the start "
                              "(each attempt must write to the same one): give trainer.run_dir")
        if not cfg.trainer.run_dir:
            fixed.append(f"trainer.run_dir={run_dir}")
    return ["--max-restarts", str(args.max_restarts)], fixed


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """hai-launch's flags, and the arguments for the module: the unknown ones and everything after `--`."""
    head, sep, tail = argv, [], []
    if "--" in argv:
        cut = argv.index("--")
        head, sep, tail = argv[:cut], ["--"], argv[cut + 1:]
    args, rest = parser().parse_known_args(head)
    return args, rest + tail if sep else rest


def render(cmd: list[str], env: dict[str, str]) -> str:
    """The command as a shell line, environment additions first."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)])


def main(argv: list[str] | None = None) -> int:
    """Build the torchrun command, print it, and exec it (its exit code becomes ours); 2 on a bad launch."""
    argv = sys.argv[1:] if argv is None else argv
    head = argv[: argv.index("--")] if "--" in argv else argv
    try:
        if "--print-run-dir" in head:
            print(_print_run_dir(argv), flush=True)
            return 0
        cmd, env = build(argv)
    except (LaunchError, ValueError) as err:
        print(f"hai-launch: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(render(cmd, env), flush=True)
    if "--dry-run" in head:
        return 0
    if "TORCH_FR_DUMP_TEMP_FILE" in env:  # torch writes the dumps there but does not create the directory
        Path(env["TORCH_FR_DUMP_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **env})
    return 1  # not reached: execve replaces this process or raises


def _print_run_dir(argv: list[str]) -> str:
    """--print-run-dir: `planned_run_dir` of the trainer's overrides in `argv` (empty when it cannot be known)."""
    args, overrides = _parse(argv)
    _, cfg = launch_config(args, overrides)
    return planned_run_dir(cfg, overrides) or ""


if __name__ == "__main__":
    sys.exit(main())
