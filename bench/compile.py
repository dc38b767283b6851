"""Training-step time of the tiny model eager against `trainer.compile=true` (trainer/compile.py), side by side in
one process, on CPU in fp32.

Two variants, each its own copy of the same weights with its own AdamW (optim/adamw.py), on one token batch:

- eager: the model as hai-train runs it by default;
- compiled: `compile_dense` (what trainer.compile=true applies): MLA, the SwiGLU MLPs and the norms compiled by
  inductor, every Linear call eager inside them (a graph break each), the MoE routing and routed experts eager;
  or with --gemms-in-graph the same modules compiled whole, Linears included: not something the trainer offers (a
  compiled backward cannot defer its weight gradients to a pipeline's W, nor run an FP8 strategy), measured to
  show what keeping the GEMMs eager costs. The two compiled forms run in separate processes: dynamo shares its
  compiled frames between instances of a module class, and would mix them.

One training step is the full objective (main + MTP loss) forward and backward, then the optimizer step. The first
step of each compiled variant compiles it (an empty inductor cache, so the time is what a fresh machine pays,
unless --warm-cache); its compile time is that step's time less the eager step's median, and dynamo's own count of
the seconds spent compiling frames is listed beside it. After warm-up the variants run interleaved (the order
rotates every round), so that noise from other processes hits all alike; the report is the median step. Then a
no-grad validation pass at the training shape and at a second batch size shows what evaluation costs the first
time (recompiles for grad mode and for a new shape, since frames are compiled with `dynamic=False`).
The load average is recorded: on a shared machine other processes skew every number. With 2 threads on a 2-core
machine whose other core another job holds, every OpenMP parallel region waits for a time slice (the tiny experts'
`torch._grouped_mm`: about 125 ms a call instead of 20 us), which swamps both variants; `--threads 1` is steady.

    python -m bench.compile [--batch 8 --seq 256 --warmup 2 --iters 9]   # writes bench/results/compile.{json,md}
    python -m bench.compile --gemms-in-graph                          # writes compile_gemms_in_graph.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.model_step import aligned, machine_info, time_interleaved
from model import Transformer, presets
from model.transformer import IGNORE_INDEX, shift_left
from optim.adamw import AdamW
from optim.config import OptimConfig
from trainer.compile import compile_dense, compile_stats, compiled_modules, dense_modules

RESULTS = Path(__file__).resolve().parent / "results" / "compile.json"
EAGER, COMPILED, IN_GRAPH = "eager", "compiled (trainer.compile)", "compiled, GEMMs in graph (not offered)"
STATS = ("frames", "graphs", "graph_breaks", "recompiles", "compile_s")


def compile_whole(model: Transformer) -> int:
    """The same modules as `compile_dense`, compiled with their Linears inside the graphs."""
    modules = [m for _, m in dense_modules(model)]
    for m in modules:
        m.compile(dynamic=False)
    return len(modules)


def train_step(model: Transformer, opt: AdamW, tokens: torch.Tensor, mtp_lambda: float) -> Callable[[], torch.Tensor]:
    labels = shift_left(tokens, 1, IGNORE_INDEX)

    def step() -> torch.Tensor:
        loss = model.loss(tokens, labels, mtp_lambda=mtp_lambda).loss
        loss.backward()
        opt.step(1e-4, 1.0)
        opt.zero_grad()
        return loss.detach()

    return step


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in STATS}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def validation_costs(model: Transformer, tokens: torch.Tensor, batch2: int) -> dict[str, dict[str, float]]:
    """First and second no-grad loss pass at the training shape and at batch `batch2`, with dynamo's counts."""
    out = {}
    for name, x in (("train_shape", tokens), (f"batch_{batch2}", tokens[:batch2])):
        labels = shift_left(x, 1, IGNORE_INDEX)
        with torch.no_grad():
            before = compile_stats()
            first = timed(lambda x=x, labels=labels: model.loss(x, labels))
            after = compile_stats()
            second = timed(lambda x=x, labels=labels: model.loss(x, labels))
        out[name] = {"first_s": first, "second_s": second, **delta(before, after)}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after each variant's first step")
    p.add_argument("--iters", type=int, default=9, help="timed rounds (each runs every variant once)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads (1 steadies the figures when another job holds the other cores)")
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    p.add_argument("--eval-batch", type=int, default=2, help="the second batch size of the validation passes")
    p.add_argument("--gemms-in-graph", action="store_true",
                   help="compile the modules with their Linears inside the graphs (not what the trainer does)")
    p.add_argument("--warm-cache", action="store_true", help="use inductor's default cache instead of an empty one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/compile[_gemms_in_graph].json")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS.with_stem("compile_gemms_in_graph") if args.gemms_in_graph else RESULTS
    return args


def markdown(result: dict) -> str:
    rows, eager = result["variants"], result["variants"][EAGER]["median_s"]
    header = ["variant", "median ms", "min ms", "speed-up", "first step s", "compile s", "dynamo s", "frames",
              "graphs", "breaks", "recompiles"]
    body = []
    for name, r in rows.items():
        c = r.get("compile", {})
        body.append([name, f"{r['median_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}", f"{eager / r['median_s']:.3f}x",
                     f"{r['first_step_s']:.1f}", f"{r.get('compile_s', 0.0):.1f}", f"{c.get('compile_s', 0.0):.1f}",
                     *(str(int(c.get(k, 0))) for k in ("frames", "graphs", "graph_breaks", "recompiles"))])
    val = []
    for name, r in rows.items():
        for shape, v in r["validation"].items():
            val.append([f"{name}, {shape}", f"{v['first_s']:.2f}", f"{v['second_s']:.3f}", str(int(v["recompiles"]))])
    load = result["load_average"]
    name = next(n for n in rows if n != EAGER)
    r = rows[name]
    saved = eager - r["median_s"]
    payback = (f"pays for itself after {r['compile_s'] / saved:.0f} steps" if saved > 0 else
               "is never paid back (no step is faster)")
    summary = (f"Speed-up {r['speedup']:.3f}x (eager median / compiled median, {saved * 1e3:+.0f} ms per step); the "
               f"compilation ({r['compile_s']:.0f} s) {payback}. Loss after {1 + result['warmup']} steps: eager "
               f"{rows[EAGER]['loss']:.6f}, compiled {r['loss']:.6f} (difference {r['loss_minus_eager']:.1e}).")
    command = " ".join(["python -m bench.compile", *result["argv"]])
    lines = [
        "# trainer.compile: eager vs compiled training step",
        "",
        f"`{command}`: preset {result['preset']}, batch {result['batch']} x seq {result['seq']}, fp32, "
        f"{result['machine']['threads']} threads, torch {result['machine']['torch']}; main + MTP loss, backward, "
        f"AdamW; {result['warmup']} warm-up + {result['iters']} timed rounds, interleaved; median step. Inductor "
        f"cache: {'warm' if result['warm_cache'] else 'empty at the start'}.",
        "",
        f"**The CPU ({result['machine']['cpu_count']} cores) was shared with other jobs during the measurement** "
        f"(load average before/after {load['before'][0]:.2f}/{load['after'][0]:.2f}): ratios of medians taken in "
        "the same rounds are the robust figures, absolute times are not.",
        "",
        "```",
        aligned(header, body),
        "```",
        "",
        "compile s: the first step less the eager median; dynamo s: dynamo's own count of seconds compiling frames; "
        "frames / graphs / breaks / recompiles: dynamo's counters over the variant's first steps (graph breaks "
        "counted once per compiled frame).",
        "",
        summary,
        "",
        "No-grad validation pass (first call compiles for grad mode and each new shape, `dynamic=False`):",
        "",
        "```",
        aligned(["variant, shape", "first s", "second s", "recompiles"], val),
        "```",
        "",
        f"Compiled modules: {result['compiled_modules']} (MLA, SwiGLU MLPs, norms); the MoE routing and routed "
        "experts stay eager, " + ("the Linears compiled inside the graphs (not offered by the trainer: no deferred "
                                  "W, no FP8 strategy)." if result["gemms_in_graph"] else
                                  "and every Linear call (trainer/compile.py says why)."),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cache = None if args.warm_cache else tempfile.TemporaryDirectory()
    if cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # read when inductor first compiles
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = presets.load(args.preset)
    base = Transformer(cfg)
    tokens = torch.randint(cfg.vocab_size, (args.batch, args.seq))
    variant = IN_GRAPH if args.gemms_in_graph else COMPILED
    models = {EAGER: base, variant: Transformer(cfg)}
    models[variant].load_state_dict(base.state_dict())
    n_compiled = (compile_whole if args.gemms_in_graph else compile_dense)(models[variant])
    steps = {name: train_step(m, AdamW(m.named_parameters(), OptimConfig()), tokens, args.mtp_lambda)
             for name, m in models.items()}
    load = {"before": list(os.getloadavg())}
    first, compiled, losses = {}, {}, {}
    for name, step in steps.items():
        before = compile_stats()
        t0 = time.perf_counter()
        losses[name] = float(step())
        first[name] = time.perf_counter() - t0
        for _ in range(args.warmup):
            losses[name] = float(step())  # after the same number of steps in every variant
        compiled[name] = delta(before, compile_stats())
        print(f"{name}: first step {first[name]:.1f} s, dynamo {compiled[name]}", flush=True)
    times, _ = time_interleaved(steps, 0, args.iters)
    load["after"] = list(os.getloadavg())
    eager = statistics.median(times[EAGER])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"median_s": med, "min_s": min(ts), "times_s": ts, "speedup": eager / med, "first_step_s": first[name],
               "loss": losses[name], "loss_minus_eager": losses[name] - losses[EAGER],
               "validation": validation_costs(models[name], tokens, args.eval_batch)}
        if name != EAGER:
            row["compile_s"] = first[name] - eager
            row["compile"] = compiled[name]
        rows[name] = row
    result = {"argv": sys.argv[1:] if argv is None else argv, "preset": args.preset, "batch": args.batch,
              "seq": args.seq, "warmup": args.warmup, "iters": args.iters, "mtp_lambda": args.mtp_lambda,
              "warm_cache": args.warm_cache, "gemms_in_graph": args.gemms_in_graph, "seed": args.seed,
              "compiled_modules": n_compiled, "compiled_names": compiled_modules(models[variant]),
              "machine": machine_info(), "load_average": load, "variants": rows,
              "note": "the CPU was shared with other jobs during the measurement"}
    md = markdown(result)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if cache is not None:
        cache.cleanup()
    return result


if __name__ == "__main__":
    main()
