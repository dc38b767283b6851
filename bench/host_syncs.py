"""Host syncs per training step and per MoE layer, counted on the CPU with core/syncs.py's HostSyncCounter (the
calls that would stall the host on CUDA: item, tolist, bool(t), nonzero, bincount, .cpu(), blocking copies...).

For each layout (the main job's PP=2 DualPipe x DP=2 x EP=2 on 4 gloo processes, and one process), after one
warm-up step, one optimizer step of `trainer.train.optimizer_step` is counted on every rank, by region: the
micro-batches' forward and backward (`Pipeline.train_step`), the optimizer, the bias loop, and the rest (loss
reads, metrics). The data loader's calls are shown apart, in brackets: it works on host tensors by design (its
batches reach the device as pinned, non-blocking copies). A MoE layer pass is one layer's forward (and its
backward) for one micro-batch; "per MoE pass" divides the micro-batch syncs by the passes the rank ran.

    python -m bench.host_syncs [--out bench/results/host_syncs.json]   # prints a table
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from bench.gloo import run_gloo

RESULTS = Path(__file__).resolve().parent / "results" / "host_syncs.json"
SMALL = ["data.seq_len=64", "trainer.eval_every=0", "trainer.checkpoint_every=0", "logging.plot=false"]
LAYOUTS = {"PP=2 DualPipe x DP=2 x EP=2 (main job)": (4, ["experiment=tiny_parallel"]),
           "one process": (1, ["trainer.micro_batch_size=2"])}


def measure(rank: int, world: int, overrides: list[str]) -> dict:
    from core.syncs import HostSyncCounter
    from model.moe import MoE
    from parallel.grid import ProcessGrid
    from trainer.config import compose_config, load_config
    from trainer.state import TrainState
    from trainer.train import build, optimizer_step

    torch.set_num_threads(1)
    cfg = load_config(compose_config([*SMALL, *overrides]), world_size=world)
    grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
    run, state = build(cfg, grid), TrainState()
    passes = [0]
    for moe in (m for m in run.model.modules() if isinstance(m, MoE)):
        route = moe.route

        def counted(h, route=route):
            passes[0] += 1
            return route(h)
        moe.route = counted
    optimizer_step(cfg, grid, state, run, None, Path("."))  # warm-up
    passes[0] = 0
    regions = {name: HostSyncCounter(where=True) for name in ("micro_batches", "data", "optimizer", "bias_loop")}
    for name, (owner, attr) in {"micro_batches": (run.pipeline, "train_step"), "data": (run.data, "next_batch"),
                                "optimizer": (run.opt, "step"), "bias_loop": (run.balancer, "step")}.items():
        setattr(owner, attr, _counted(getattr(owner, attr), regions[name]))
    with HostSyncCounter(where=True) as whole:
        optimizer_step(cfg, grid, state, run, None, Path("."))
    n_micro = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * grid.dp)
    # modes stack: the outer counter sees the regions' calls too; the rest of the step is the difference
    rest = whole.counts - sum((c.counts for c in regions.values()), Counter())
    rest_sites = whole.sites - sum((c.sites for c in regions.values()), Counter())
    micro = regions["micro_batches"]
    return {"rank": rank, "micro_batches": n_micro, "moe_layer_passes": passes[0],
            **{f"{name}_syncs": c.total for name, c in regions.items()}, "rest_of_step_syncs": sum(rest.values()),
            "micro_batch_by_call": dict(micro.counts), "micro_batch_sites": dict(micro.sites.most_common(12)),
            "optimizer_by_call": dict(regions["optimizer"].counts),
            "bias_loop_by_call": dict(regions["bias_loop"].counts),
            "rest_by_call": dict(rest), "rest_sites": dict(rest_sites.most_common(8))}


def _counted(method, counter):
    def wrapped(*args, **kwargs):
        with counter:
            return method(*args, **kwargs)
    return wrapped


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.host_syncs", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = {}
    print(f"{'layout':40} {'rank':>4} {'micro':>5} {'MoE passes':>10} {'fwd+bwd':>8} {'per MoE pass':>12} "
          f"{'optimizer':>9} {'bias loop':>9} {'rest':>5} {'(data)':>7}")
    for name, (world, overrides) in LAYOUTS.items():
        rows = run_gloo(measure, world, overrides) if world > 1 else [_alone(overrides)]
        result[name] = rows
        for r in rows:
            per = r["micro_batches_syncs"] / max(1, r["moe_layer_passes"])
            print(f"{name:40} {r['rank']:>4} {r['micro_batches']:>5} {r['moe_layer_passes']:>10} "
                  f"{r['micro_batches_syncs']:>8} {per:>12.1f} {r['optimizer_syncs']:>9} {r['bias_loop_syncs']:>9} "
                  f"{r['rest_of_step_syncs']:>5} {r['data_syncs']:>7}")
    first = next(iter(result.values()))[0]
    print("\nrank 0 of the main job, micro-batch syncs by call:", first["micro_batch_by_call"])
    print("by site:")
    for site, n in first["micro_batch_sites"].items():
        print(f"  {n:>4}  {site}")
    print("optimizer:", first["optimizer_by_call"], "bias loop:", first["bias_loop_by_call"], "rest of the step:",
          first["rest_by_call"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _alone(overrides: list[str]) -> dict:
    return measure(0, 1, overrides)


if __name__ == "__main__":
    main()
