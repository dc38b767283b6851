"""How much expert all-to-all time DualPipe's overlapped chunk hides (paper 3.2.1: "nearly all"; our target: under
10% of it left exposed).

Four gloo processes: PP=2 DualPipe x EP=2, two MoE layers per stage, 8 and 24 micro-batches of 1 x 512 tokens (dim 256,
top-2 of 8 experts). Timing mode per phase (bench/timing_mode.py, `sleep_moe_runners`): each layer's
attention and MLP sleep their modelled time (forward 4 ms each, backward 8 ms with a 4 ms W), so 4 processes on 2
cores behave like dedicated GPUs; the dispatch and the combine are the real all-to-alls of
parallel/expert.py on the simulated fabric (parallel/fabric.py), whose latency makes each exchange last about 4 ms:
all-to-all time about equal to the forward compute it sits between, as in the paper's setting. Everything else is
real: the executor, DualPipe's action lists, the pipeline transfers.

The same step runs with `overlap` off (every FB chunk: forward, then backward) and on (the forward inside the
backward's exchanges, DeepSeek's pairing). Per action kind the executor reports the seconds the compute waited on
all-to-alls (exposed) and their modelled duration; the table gives the exposed fraction inside FB chunks (the only
place DualPipe overlaps) and over the whole step, and the step time, median over steps, worst rank.

Second table: the gradient reduction (paper 3.2.1; parallel/grad_reduce.py). The main job's layout (PP=2
DualPipe x DP=2 x EP=2, the tiny preset, real compute, 4 micro-batches of 1 x 256 tokens) with
`parallel.overlap_grad_reduce` off (mirror-pair sums and ZeRO-1 reduce-scatters after the step's last action)
and on (each bucket started as soon as its last weight gradient is final). Both runs are built in the same 4
processes and their steps interleaved. Exposed reduction = the time between the executor's last action and the
gradients sitting reduced in the optimizer's shards (the rest of `Pipeline.train_step` plus the optimizer's
remaining `_reduce_grads`), worst rank, median over steps; also the whole optimizer step (micro-batches, then
clipping, AdamW and the all-gather).

    python -m bench.overlap   # prints both tables, writes bench/results/overlap.json
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from bench.gloo import run_gloo
from bench.timing_mode import SleepMoELayer, sleep_moe_runners
from parallel.config import ParallelConfig
from parallel.expert import ExpertParallelDispatcher
from parallel.fabric import Fabric
from parallel.grid import ProcessGrid
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.simulate import Costs
from parallel.pipeline.stage import rank_stages

RESULTS = Path(__file__).resolve().parent / "results"
PP, EP, LAYERS = 2, 2, 4
MICROBATCHES = (8, 24)
SHAPE = (1, 512, 256)
N_EXPERTS, TOPK = 8, 2
ATTN = MLP = Costs(F=0.004, B=0.008, W=0.004)
FABRIC = Fabric(intra_gbps=1000, inter_gbps=1000, latency_us=4000)  # ~4 ms per exchange, bytes nearly free
WARMUP, STEPS = 1, 5


def measure(rank: int, world: int, n_micro: int, overlap: bool) -> dict:
    grid = ProcessGrid.build(ParallelConfig(pp=PP, ep=EP, gpus_per_node=EP, schedule="dualpipe"))
    specs = rank_stages(grid.schedule, grid.pp_rank, LAYERS)
    layers = {i: SleepMoELayer(ExpertParallelDispatcher(grid.ep_group, N_EXPERTS, gpus_per_node=EP, fabric=FABRIC,
                                                        bwd_group=grid.ep_bwd_group), ATTN, MLP, N_EXPERTS, TOPK,
                               seed=i)
              for spec in specs for i in spec.layers}
    runners = sleep_moe_runners(specs, layers, SHAPE)
    executor = PipelineExecutor(grid.schedule, grid.pp_rank, grid.pp_ranks, runners, SHAPE, torch.float32,
                                channels=grid.channels, overlap=overlap)
    actions = grid.schedule.actions(grid.pp_rank, n_micro)
    rows = []
    for step in range(WARMUP + STEPS):
        dist.barrier()
        stats = executor.run(actions, n_micro)
        if step >= WARMUP:
            wait, link = stats.exchange_wait, stats.exchange_link
            rows.append({"total_s": stats.total, "fb_wait_s": wait.get("FB", 0.0), "fb_link_s": link.get("FB", 0.0),
                         "wait_s": sum(wait.values()), "link_s": sum(link.values()),
                         "overlapped": stats.overlapped})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


GRAD_STEPS = 6
GRAD_RUN = ["experiment=tiny_parallel", "trainer.eval_every=0", "trainer.checkpoint_every=0", "logging.plot=false"]


def measure_grad_reduce(rank: int, world: int) -> dict[str, dict]:
    """Exposed gradient-reduction seconds and whole-step seconds per step, overlap_grad_reduce off and on."""
    import time

    from trainer.config import compose_config, load_config
    from trainer.state import TrainState
    from trainer.train import build, optimizer_step

    torch.set_num_threads(1)
    runs = {}
    for on in (False, True):
        cfg = load_config(compose_config([*GRAD_RUN, f"parallel.overlap_grad_reduce={on}"]), world_size=world)
        grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device) if not runs else runs[False][1]
        runs[on] = (cfg, grid, build(cfg, grid), TrainState())
    facts: dict[bool, dict[str, list[float]]] = {on: {"exposed_s": [], "step_s": []} for on in runs}
    for i in range(1 + GRAD_STEPS):  # one warm-up step each
        for on in ((False, True) if i % 2 else (True, False)):
            cfg, grid, run, state = runs[on]
            timed = {"train_step": 0.0, "reduce": 0.0}
            train_step, reduce_grads = run.pipeline.train_step, run.opt._reduce_grads

            def timed_train_step(*a, **k):
                t = time.perf_counter()
                out = train_step(*a, **k)
                timed["train_step"] += time.perf_counter() - t
                return out

            def timed_reduce():
                t = time.perf_counter()
                reduce_grads()
                timed["reduce"] += time.perf_counter() - t

            run.pipeline.train_step, run.opt._reduce_grads = timed_train_step, timed_reduce
            dist.barrier()
            t0 = time.perf_counter()
            optimizer_step(cfg, grid, state, run, None, Path("."))
            elapsed = time.perf_counter() - t0
            run.pipeline.train_step, run.opt._reduce_grads = train_step, reduce_grads
            exposed = timed["train_step"] - run.pipeline.last_stats.total + timed["reduce"]
            worst = torch.tensor([exposed, elapsed], dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if i > 0:
                facts[on]["exposed_s"].append(worst[0].item())
                facts[on]["step_s"].append(worst[1].item())
    return {"on" if on else "off": {k: statistics.median(v) for k, v in f.items()} for on, f in facts.items()}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"PP={PP} DualPipe x EP={EP}, {LAYERS} MoE layers, micro-batches of {SHAPE[1]} tokens; attention and MLP "
          f"F {ATTN.F * 1e3:.0f} ms, B {ATTN.B * 1e3:.0f} ms; each all-to-all ~{FABRIC.latency_us / 1e3:.0f} ms on the "
          "simulated fabric. Exposed = all-to-all time waited for / its modelled time (worst rank).")
    print(f"{'micro':>5} {'overlap':>7} {'exposed in FB':>14} {'exposed, step':>14} {'a2a in FB':>10} {'step (ms)':>10}"
          f" {'on/off':>7}")
    for n_micro in MICROBATCHES:
        for overlap in (False, True):
            ranks = run_gloo(measure, PP * EP, n_micro, overlap)
            row = {"microbatches": n_micro, "overlap": overlap, "ranks": ranks,
                   "fb_exposed_fraction": max(r["fb_wait_s"] / r["fb_link_s"] for r in ranks),
                   "step_exposed_fraction": max(r["wait_s"] / r["link_s"] for r in ranks),
                   "fb_share_of_a2a": min(r["fb_link_s"] / r["link_s"] for r in ranks),
                   "step_s": max(r["total_s"] for r in ranks)}
            rows.append(row)
            ratio = f"{row['step_s'] / rows[-2]['step_s']:>7.2f}" if overlap else ""
            print(f"{n_micro:>5} {'on' if overlap else 'off':>7} {row['fb_exposed_fraction']:>14.1%} "
                  f"{row['step_exposed_fraction']:>14.1%} {row['fb_share_of_a2a']:>10.1%} "
                  f"{row['step_s'] * 1e3:>10.1f} {ratio}")
    setup = {"pp": PP, "ep": EP, "layers": LAYERS, "shape": SHAPE, "experts": N_EXPERTS, "topk": TOPK,
             "attn_s": vars(ATTN), "mlp_s": vars(MLP), "fabric": vars(FABRIC)}
    grad = run_gloo(measure_grad_reduce, 4)[0]
    print("\nGradient reduction, the main job's layout (PP=2 DualPipe x DP=2 x EP=2, tiny, real compute), worst "
          f"rank, median of {GRAD_STEPS} interleaved steps")
    print(f"{'overlap_grad_reduce':>19} {'exposed (ms)':>13} {'step (ms)':>10}")
    for key in ("off", "on"):
        print(f"{key:>19} {grad[key]['exposed_s'] * 1e3:>13.1f} {grad[key]['step_s'] * 1e3:>10.1f}")
    print(f"on/off: exposed {grad['on']['exposed_s'] / grad['off']['exposed_s']:.2f}, "
          f"step {grad['on']['step_s'] / grad['off']['step_s']:.2f}")
    (RESULTS / "overlap.json").write_text(json.dumps({"setup": setup, "rows": rows, "grad_reduce": grad},
                                                     indent=1))
    print(f"wrote {RESULTS / 'overlap.json'}")


if __name__ == "__main__":
    main()
