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

What runs. `python -m torch.distributed.run --standalone --nproc_per_node N -m trainer.train <overrides>`
(or, with `--nnodes M` > 1, c10d rendezvous at `--rdzv-endpoint` instead of --standalone). The exact
command is printed first, then hai-launch replaces itself with it (exec), so signals reach torchrun directly
and its exit code is hai-launch's. OMP_NUM_THREADS, when unset, becomes max(1, usable CPUs // nproc) so the
ranks of a CPU run do not oversubscribe the cores. Arguments hai-launch does not know (Hydra overrides and
flags such as `--cfg job`) go to the module unchanged, in order; everything after `--` does too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

DEFAULT_MODULE = "trainer.train"


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
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    return p


def world_size(args: argparse.Namespace, overrides: list[str]) -> int:
    """Total ranks: nproc * nnodes when --nproc is given, else pp * DP (DP = --dp or parallel.ep); the whole
    config is validated for that world size (layout, model split, micro-batches) before anything starts."""
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
        load_config(cfg, world)
    except ValueError as err:
        raise LaunchError(f"world size {world}: {err}") from err
    return world


def omp_threads(nproc: int) -> int:
    """Threads per rank so that the ranks of one node share its usable CPUs: max(1, cpus // nproc)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // nproc)


def build(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and the environment additions for `argv` (hai-launch's arguments)."""
    head, sep, tail = argv, [], []
    if "--" in argv:
        cut = argv.index("--")
        head, sep, tail = argv[:cut], ["--"], argv[cut + 1:]
    args, rest = parser().parse_known_args(head)
    passthrough = rest + tail if sep else rest
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes must be >= 1, got {args.nnodes}")
    if args.nproc is not None and args.nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise LaunchError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the first node's address); "
                          "under SLURM use launch/slurm/train.sbatch")
    nproc = args.nproc
    if nproc is None:
        world = world_size(args, passthrough) if args.module == DEFAULT_MODULE else (args.dp or 1)
        if world % args.nnodes:
            raise LaunchError(f"world size {world} is not divisible by --nnodes {args.nnodes}; give --nproc")
        nproc = world // args.nnodes
    elif args.module == DEFAULT_MODULE:
        world_size(args, passthrough)  # validate the layout now rather than in every rank
    if args.nnodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = ["--nnodes", str(args.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", args.rdzv_endpoint,
                "--rdzv_id", args.rdzv_id]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc_per_node", str(nproc),
           "-m", args.module, *passthrough]
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(omp_threads(nproc))}
    return cmd, env


def render(cmd: list[str], env: dict[str, str]) -> str:
    """The command as a shell line, environment additions first."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)])


def main(argv: list[str] | None = None) -> int:
    """Build the torchrun command, print it, and exec it (its exit code becomes ours); 2 on a bad launch."""
    argv = sys.argv[1:] if argv is None else argv
    dry_run = "--dry-run" in argv[: argv.index("--")] if "--" in argv else "--dry-run" in argv
    try:
        cmd, env = build(argv)
    except (LaunchError, ValueError) as err:
        print(f"hai-launch: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(render(cmd, env), flush=True)
    if dry_run:
        return 0
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **env})
    return 1  # not reached: execve replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
