"""Our ZeRO-1 (parallel/zero.py, paper 3.2 "ZeRO-1 data parallel") next to DeepSpeed's ZeRO stage 1 and torch's
ZeroRedundancyOptimizer: optimizer-state bytes per rank and optimizer-step time, side by side in one run.

DP = 2 and 4 gloo processes on CPU (one thread each, OMP_NUM_THREADS=1 for DeepSpeed's OpenMP kernel), each
holding three copies of one seeded fp32 model of DEPTH Linear(WIDTH, WIDTH) layers with tanh between them (about 25M
parameters), one per implementation, with the hyper-parameters aligned as tests/dist/test_zero_peers.py aligns them
(AdamW, decoupled decay on matrices only, eps outside the square root, global-norm clip, fp32 moments); that test
checks that the three compute the same step, and the bench checks it again on its first step (MAX_PARAM_DIFF).

State bytes, counted from the optimizers' tensors after a step (rank by rank; the table shows the largest rank):
- ours: `ZeroOptimizer`'s fp32 master shard and the two moment shards (1/DP of the flat buffer each, padding
  included);
- DeepSpeed: `DeepSpeedZeroOptimizer.single_partition_of_fp32_groups` (its fp32 master partition, 1/DP of each
  parameter group's flat buffer, padded) and the FusedAdam moments of that partition;
- torch: the moments of the parameters the rank owns (whole parameters, assigned greedily by size, so ranks differ by
  up to a parameter). No master: torch's AdamW updates the replicated fp32 model parameters in place, which every
  rank holds in all three implementations (N x 4 bytes, not counted here).
Not counted in any: the model's parameters and the gradients (ours keeps one persistent fp32 flat gradient buffer
with the parameters' .grad as views; DeepSpeed and torch keep .grad per parameter plus their reduction buffers).

Step time: every rank first runs a forward and backward of the implementation's model on its own batch (untimed),
which leaves each rank with its local, unreduced gradients; then, after a barrier, the timed region takes those
gradients to updated parameters on every rank:
- ours: `ZeroOptimizer.step`: fp32 reduce-scatter of the flat gradient buffer, norm all-reduce, clip, AdamW on the
  master shard, all-gather of the parameters;
- DeepSpeed: `engine.step()` with "managed_gradient_accumulation": false, under which `engine.backward` only
  accumulates and `step()` does the reduction: the gradients averaged and all-reduced in buckets (its default
  use_multi_rank_bucket_allreduce), each rank keeping its partition, the norm, the clip, FusedAdam on the fp32
  partition, the copy into the model's flat buffer and the all-gather;
- torch: the gradient all-reduce done the way DDP does it without overlap (the gradients copied into one flat
  buffer, pre-divided by DP, all-reduced, copied back), `clip_grad_norm_` over all parameters (each rank, on the
  full averaged gradients), and `ZeroRedundancyOptimizer.step()`: AdamW (torch's default, which on CPU is the
  per-tensor loop) on the owned parameters and a broadcast of every rank's parameters. In training DDP would overlap
  that all-reduce with the backward; none of the three overlaps here.
A step's time is the slowest rank's; each round steps the three once, in an order that rotates from round to round
so that the machine's drift falls on all of them alike; the table shows the median of ROUNDS rounds after WARMUP.
The machine is shared (other engineers' jobs ran on its two cores during the recorded run, load averages in the
JSON), so absolute times are noisy; the ratios, measured side by side, are the result.

The second table times the bare collectives (same barrier and slowest-rank rule, one fp32 buffer of the model's
size) so that the step times can be read: on gloo, `reduce_scatter_single` and `all_gather_single` of a buffer take
longer than an `all_reduce` of the whole buffer and a broadcast of each rank's share, which is where torch's shorter
step comes from, not from its update. (A ring all-reduce is a reduce-scatter followed by an all-gather, so on NCCL the
two pairs move the same bytes.)

    python -m bench.zero_peers   # prints the table, writes bench/results/zero_peers.json and zero_peers.md
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bench.gloo import run_gloo
from optim.adamw import param_groups
from optim.config import OptimConfig
from parallel.zero import ZeroOptimizer

RESULTS = Path(__file__).resolve().parent / "results"
DP_SIZES = (2, 4)
WIDTH, DEPTH, BATCH = 2048, 6, 4
WARMUP, ROUNDS = 1, 5
LR, BETAS, EPS, WD, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
MAX_PARAM_DIFF = 1e-5  # after the first step, |param - ours| of each peer: the same step, up to fp32 rounding
IMPLS = ("ours", "deepspeed", "torch")
MIB = 2**20
# torch 2.13's names, with the older ones as parallel/zero.py falls back to them
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Stack(nn.Module):
    """DEPTH Linear(WIDTH, WIDTH) layers with tanh between them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())][:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Peer:
    """One implementation on this rank: `backward` (untimed) leaves local gradients, `step` is the timed region,
    `state` the bytes of (masters, moments) it holds."""

    def __init__(self, model: nn.Module, backward: Callable[[torch.Tensor, torch.Tensor], None],
                 step: Callable[[], None], state: Callable[[], tuple[int, int]]) -> None:
        self.model, self.backward, self.step, self.state = model, backward, step, state


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def _ours(base: nn.Module, cfg: OptimConfig) -> _Peer:
    model = copy.deepcopy(base)
    zero = ZeroOptimizer(model.named_parameters(), cfg, None, None, is_expert=lambda name: False)

    def step() -> None:
        zero.step(LR, CLIP)
        zero.zero_grad()

    def state() -> tuple[int, int]:
        return (sum(b.master.nbytes for b in zero.buckets),
                sum(t.nbytes for b in zero.buckets for t in (b.exp_avg, b.exp_avg_sq)))

    return _Peer(model, lambda x, y: _loss(model(x), y).backward(), step, state)


def _deepspeed(base: nn.Module, cfg: OptimConfig) -> _Peer:
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    rank, world = str(dist.get_rank()), str(dist.get_world_size())  # what a launcher would have set
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world)
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the group run_gloo initialised
    model = copy.deepcopy(base)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
              "managed_gradient_accumulation": False,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                         "weight_decay": WD}},
              "gradient_clipping": CLIP, "zero_optimization": {"stage": 1},
              "fp16": {"enabled": False}, "bf16": {"enabled": False}, "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model.parameters(), cfg),
                                             config=config)
    assert isinstance(opt, DeepSpeedZeroOptimizer), type(opt)

    def state() -> tuple[int, int]:
        return (sum(t.nbytes for t in opt.single_partition_of_fp32_groups),
                sum(s[k].nbytes for s in opt.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")))

    return _Peer(engine.module, lambda x, y: engine.backward(_loss(engine(x), y)), engine.step, state)


def _torch(base: nn.Module, cfg: OptimConfig) -> _Peer:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = copy.deepcopy(base)
    params = list(model.parameters())
    zro = ZeroRedundancyOptimizer(param_groups(params, cfg), optimizer_class=torch.optim.AdamW, lr=LR, betas=BETAS,
                                  eps=EPS)

    def step() -> None:
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads).div_(dist.get_world_size())
        dist.all_reduce(flat)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        zro.step()
        zro.zero_grad(set_to_none=True)

    def state() -> tuple[int, int]:
        return 0, sum(s[k].nbytes for s in zro.optim.state.values() for k in ("exp_avg", "exp_avg_sq"))

    return _Peer(model, lambda x, y: _loss(model(x), y).backward(), step, state)


def _collectives(n: int, world: int) -> dict[str, float]:
    """Median seconds (slowest rank) of the bare collectives the three steps are built on, over an fp32 buffer of
    the model's size: ours reduce-scatters and all-gathers; DeepSpeed all-reduces its gradient bucket (its default
    use_multi_rank_bucket_allreduce) and all-gathers; torch all-reduces (as DDP) and broadcasts every rank's share."""
    shard = -(-n // world)
    full, part = torch.zeros(shard * world), torch.zeros(shard)
    ops = {"all_reduce": lambda: dist.all_reduce(full),
           "reduce_scatter": lambda: _reduce_scatter(part, full),
           "all_gather": lambda: _all_gather(full, part),
           "broadcast_each": lambda: [dist.broadcast(full[r * shard:(r + 1) * shard], src=r) for r in range(world)]}
    out = {}
    for name, op in ops.items():
        times = []
        for _ in range(WARMUP + ROUNDS):
            dist.barrier()
            t0 = time.perf_counter()
            op()
            elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(elapsed.item())
        out[name] = statistics.median(times[WARMUP:])
    return out


def measure(rank: int, world: int) -> dict:
    cfg = OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, grad_clip=CLIP,
                      moment_dtype="fp32")
    torch.manual_seed(0)
    base = Stack()
    peers = {"ours": _ours(base, cfg), "deepspeed": _deepspeed(base, cfg), "torch": _torch(base, cfg)}
    del base
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    diffs: dict[str, float] = {}
    for round_ in range(WARMUP + ROUNDS):
        g = torch.Generator().manual_seed(1000 * round_ + rank)
        x, y = torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)
        for k in range(len(IMPLS)):
            name = IMPLS[(k + round_) % len(IMPLS)]
            peers[name].backward(x, y)
            dist.barrier()
            t0 = time.perf_counter()
            peers[name].step()
            elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_ >= WARMUP:
                times[name].append(elapsed.item())
        if round_ == 0:  # the three took the same first step
            ours = dict(peers["ours"].model.named_parameters())
            for name in ("deepspeed", "torch"):
                diff = torch.tensor(max((p - ours[n]).abs().max().item()
                                        for n, p in peers[name].model.named_parameters()))
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                diffs[name] = diff.item()
                assert diffs[name] <= MAX_PARAM_DIFF, (name, diffs[name])
    n = sum(p.numel() for p in peers["ours"].model.parameters())
    return {"dp": world, "rank": rank, "params": n, "state": {name: peers[name].state() for name in IMPLS},
            "step_s": times, "first_step_diff": diffs, "collectives_s": _collectives(n, world)}


def _rows(ranks: list[dict]) -> list[dict]:
    rows = []
    for name in IMPLS:
        masters = [r["state"][name][0] for r in ranks]
        moments = [r["state"][name][1] for r in ranks]
        totals = [a + b for a, b in zip(masters, moments)]
        top = max(range(len(ranks)), key=lambda i: totals[i])
        steps = ranks[0]["step_s"][name]  # the slowest rank's times: the same on every rank
        rows.append(dict(dp=ranks[0]["dp"], impl=name, params=ranks[0]["params"], master_bytes=masters[top],
                         moment_bytes=moments[top], state_bytes=totals[top], state_bytes_per_rank=totals,
                         step_s=statistics.median(steps), steps_s=steps,
                         first_step_max_diff=ranks[0]["first_step_diff"].get(name, 0.0)))
    ours = rows[0]
    for r in rows:
        r["state_vs_ours"] = r["state_bytes"] / ours["state_bytes"]
        r["step_vs_ours"] = r["step_s"] / ours["step_s"]
    return rows


def _table(rows: list[dict]) -> list[str]:
    lines = ["| DP | implementation | masters MiB | moments MiB | state MiB (largest rank) | state / ours | "
             "step ms (median) | step / ours | first step: max abs param diff to ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dp']} | {r['impl']} | {r['master_bytes'] / MIB:.1f} | {r['moment_bytes'] / MIB:.1f} | "
                     f"{r['state_bytes'] / MIB:.1f} | {r['state_vs_ours']:.2f} | {1e3 * r['step_s']:.0f} | "
                     f"{r['step_vs_ours']:.2f} | {r['first_step_max_diff']:.1e} |")
    return lines


def _comm_table(collectives: dict[int, dict[str, float]], n: int) -> list[str]:
    lines = [f"Bare gloo collectives on a {4 * n / MIB:.0f} MiB fp32 buffer (ms, median, slowest rank), as each "
             "step uses them:", "",
             "| DP | all_reduce | reduce_scatter | all_gather | broadcast of each rank's share | "
             "ours: RS + AG | DeepSpeed: AR + AG | torch: AR + broadcasts |", "|---|---|---|---|---|---|---|---|"]
    for dp, c in collectives.items():
        ms = {k: 1e3 * v for k, v in c.items()}
        lines.append(f"| {dp} | {ms['all_reduce']:.0f} | {ms['reduce_scatter']:.0f} | {ms['all_gather']:.0f} | "
                     f"{ms['broadcast_each']:.0f} | {ms['reduce_scatter'] + ms['all_gather']:.0f} | "
                     f"{ms['all_reduce'] + ms['all_gather']:.0f} | {ms['all_reduce'] + ms['broadcast_each']:.0f} |")
    return lines


def main() -> None:
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # inherited by the spawned ranks
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ranks = {dp: run_gloo(measure, dp) for dp in DP_SIZES}
    rows = [r for dp in DP_SIZES for r in _rows(ranks[dp])]
    collectives = {dp: ranks[dp][0]["collectives_s"] for dp in DP_SIZES}
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    n = rows[0]["params"]
    head = (f"{n / 1e6:.1f}M fp32 parameters ({DEPTH} x Linear({WIDTH}, {WIDTH})), batch {BATCH}; median of {ROUNDS} "
            f"interleaved rounds after {WARMUP} warm-up; load average {load_before[0]:.1f} before, "
            f"{load_after[0]:.1f} after ({wall:.0f} s)")
    table = _table(rows)
    comm = _comm_table(collectives, n)
    print(head)
    print("\n".join(table))
    print("\n".join(comm))
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(width=WIDTH, depth=DEPTH, batch=BATCH, warmup=WARMUP, rounds=ROUNDS, params=n,
                loadavg_before=load_before, loadavg_after=load_after, wall_s=wall, torch=torch.__version__,
                deepspeed=_deepspeed_version())
    (RESULTS / "zero_peers.json").write_text(json.dumps({"meta": meta, "rows": rows, "collectives_s": collectives},
                                                        indent=1) + "\n")
    doc = (__doc__ or "").split("\n\n    python -m")[0]
    md = ["# ZeRO-1 next to DeepSpeed's and torch's (`python -m bench.zero_peers`)", "", head, "", *table, "", *comm,
          "", doc]
    (RESULTS / "zero_peers.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'zero_peers.json'} and {RESULTS / 'zero_peers.md'}")


def _deepspeed_version() -> str:
    from importlib.metadata import version

    return version("deepspeed")


if __name__ == "__main__":
    main()
