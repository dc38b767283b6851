"""Expert all-to-all throughput and cross-node traffic: parallel/expert.py, flat against hierarchical (paper 3.2).

For EP = 2 and 4 (gloo processes on CPU, spawned here), tokens per rank in TOKENS, dim 256, K = 8 of 32
experts chosen uniformly at random (no node limit), each rank times `dispatch` + `combine` (forward only;
the experts are the identity: y = rows) in both modes. A round is barrier-aligned; its time is the slowest
rank's, and the median over ITERS rounds after a warm-up gives tokens/s per rank. Nodes are simulated with
gpus_per_node = 2 for EP 4 (two nodes) and 1 for EP 2 (two nodes of one rank, where hierarchical mode runs the
flat exchange, which already crosses once per (token, node)). Cross-node bytes per token are the dispatcher's
own `stats()` (fp32 payload, forward dispatch only), summed over ranks and divided by all ranks' tokens.

This is a measurement on a shared 2-core CPU: ranks share cores, so absolute numbers mostly show the cost of
the extra hierarchical stage, not network behaviour; the byte counts are exact.

    python -m bench.expert_dispatch   # prints a table, writes bench/results/expert_dispatch.json
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.gloo import run_gloo
from parallel.expert import ExpertParallelDispatcher

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = (512, 2048, 8192)
DIM, K, EXPERTS = 256, 8, 32
WARMUP, ITERS = 2, 9
SETUPS = ((2, 1), (4, 2))  # (EP, gpus_per_node)


def measure(rank: int, ep: int, gpn: int) -> list[dict]:
    rows = []
    for n in TOKENS:
        gen = torch.Generator().manual_seed(1000 * rank + n)
        h = torch.randn(n, DIM, generator=gen)
        idx = torch.rand(n, EXPERTS, generator=gen).topk(K, dim=-1).indices  # (n, K) uniform routing
        w = torch.rand(n, K, generator=gen)
        for hierarchical in (False, True):
            disp = ExpertParallelDispatcher(None, EXPERTS, gpus_per_node=gpn, hierarchical=hierarchical)
            times = []
            for it in range(WARMUP + ITERS):
                dist.barrier()
                start = time.perf_counter()
                with torch.no_grad():
                    recv, _, _, layout, *_ = disp.dispatch(h, idx, w)
                    disp.combine(recv, layout)
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if it == WARMUP - 1:
                    disp.stats()  # count the timed rounds only
                if it >= WARMUP:
                    times.append(elapsed.item())
            stats = disp.stats()
            totals = torch.tensor([stats["cross_node_bytes"], stats["tokens"], stats["dispatch_rows"]],
                                  dtype=torch.float64)
            dist.all_reduce(totals)
            median = statistics.median(times)
            rows.append(dict(ep=ep, gpus_per_node=gpn, tokens_per_rank=n, mode="hierarchical" if hierarchical
                             else "flat", median_s=median, tokens_per_s=n / median,
                             cross_node_bytes_per_token=(totals[0] / totals[1]).item(),
                             rows_per_token=(totals[2] / totals[1]).item()))
    return rows


def run(ep: int, gpn: int) -> list[dict]:
    return run_gloo(measure, ep, gpn)[0]


def main() -> None:
    rows = [r for ep, gpn in SETUPS for r in run(ep, gpn)]
    print(f"dispatch + combine (forward), dim {DIM}, K {K} of {EXPERTS} experts, uniform routing, fp32 rows")
    print(f"{'EP':>3} {'gpn':>4} {'tokens/rank':>11} {'mode':>12} {'median ms':>10} {'tokens/s':>10} "
          f"{'rows/token':>10} {'cross-node B/token':>18}")
    for r in rows:
        print(f"{r['ep']:>3} {r['gpus_per_node']:>4} {r['tokens_per_rank']:>11} {r['mode']:>12} "
              f"{r['median_s'] * 1e3:>10.2f} {r['tokens_per_s']:>10.0f} {r['rows_per_token']:>10.2f} "
              f"{r['cross_node_bytes_per_token']:>18.1f}")
    RESULTS.mkdir(exist_ok=True)
    meta = dict(dim=DIM, k=K, experts=EXPERTS, warmup=WARMUP, iters=ITERS, routing="uniform", payload="fp32",
                threads_per_rank=1, cpus=os.cpu_count(), torch=torch.__version__)
    (RESULTS / "expert_dispatch.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS / 'expert_dispatch.json'}")


if __name__ == "__main__":
    main()
