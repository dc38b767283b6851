"""Training-step throughput of our DeepSeek-V3 model against transformers' DeepseekV3ForCausalLM, on CPU in fp32.

What it measures, on one token batch shared by every variant:

- ours:   `model.loss(tokens, labels, mtp_lambda=0)` + backward: the main model's training objective, with the head
          fused into its cross-entropy (model/loss.py), on the next tokens (no MTP), for
          each routed-expert GEMM backend (`expert_gemm` = grouped_mm, loop);
- ours + MTP: `model.loss(tokens, labels, mtp_lambda)` + backward, the full training objective (extra row);
- ours: its GEMMs alone: every matrix product of one recorded step of ours (forward and backward, attention's
          batched products and the grouped expert GEMMs), with their operands, replayed back to back: the limit of
          this step's shape on this CPU; step time / GEMM-only time says how much of ours is not GEMM;
- HF:     DeepseekV3ForCausalLM loaded from `trainer.hf.save_hf` of the same weights, `labels=` loss + backward, with
          attn_implementation "eager" and "sdpa" (use_cache=False, as in training).

The variants run interleaved (A, B, C, ... then B, C, ..., A; the order rotates) after warm-up, so that machine
noise hits all of them alike; the median step time gives tokens/s. The machine's fp32 GEMM peak is measured in the
same rounds with a large square matmul, so model FLOP/s can be read as a fraction of what this CPU can do at all.
The load average is recorded too: on a shared machine, other processes skew every number.
Finally torch.profiler runs a few steps of ours and lists the top operators by self CPU time.

Why: the issue asks our step to be >= 1.5x transformers' on the same work, and to know where our time goes. This
is a measurement, not a test: nothing is asserted, and speed is never part of the test suite.

    python -m bench.model_step [--batch 8 --seq 256 --warmup 2 --iters 9]   # writes bench/results/model_step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from model import ModelConfig, Transformer, presets
from model.flops import flops_per_token
from model.transformer import IGNORE_INDEX, shift_left
from trainer.hf import save_hf

RESULTS = Path(__file__).resolve().parent / "results" / "model_step.json"
Step = Callable[[], torch.Tensor]  # runs forward + loss + backward, returns the (detached) loss


# ---- model FLOPs ---------------------------------------------------------------------------------------------
# model/flops.py's count (forward + backward = 3 x forward, causal attention over (T+1)/2 keys): useful work only;
# HF's eager attention also multiplies the masked upper triangle, which is not counted.

def train_flops_per_token(cfg: ModelConfig, seq: int, mtp: bool = False) -> float:
    """Model FLOPs per token of the step: the main model (no MTP modules) or, with `mtp`, the whole objective."""
    return flops_per_token(cfg if mtp else dataclasses.replace(cfg, n_mtp_depth=0), seq)


# ---- the step's GEMMs alone ----------------------------------------------------------------------------------
# Every matrix product a step runs (forward and backward, attention's batched products and the grouped expert
# GEMMs included), recorded with its operands by a dispatch mode and replayed back to back: the time the step
# would take if it were nothing but its own GEMMs, the limit for this shape on this CPU.

GEMM_OPS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
            torch.ops.aten._grouped_mm}


class _GemmRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in GEMM_OPS:
            copy = tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
            self.calls.append((func, *copy))
        return func(*args, **kwargs)


def gemms_alone(step: Step) -> tuple[Step, dict[str, int]]:
    """A step that replays `step`'s GEMMs (one recorded run of it) without anything else, and the calls per op."""
    recorder = _GemmRecorder()
    with recorder:
        step()
    calls = recorder.calls
    counts: dict[str, int] = {}
    for func, _, _ in calls:
        counts[str(func.overloadpacket)] = counts.get(str(func.overloadpacket), 0) + 1

    def replay() -> torch.Tensor:
        out = None
        for func, args, kwargs in calls:
            out = func(*args, **kwargs)
        return out.flatten()[0].detach()

    return replay, counts


# ---- machine peak --------------------------------------------------------------------------------------------

def gemm_step(n: int) -> Step:
    """One n x n x n fp32 matmul (2 n^3 FLOPs); timed in the same rounds as the model steps."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def step() -> torch.Tensor:
        return (a @ b)[0, 0]

    return step


def gemm_peak(n: int, times: list[float]) -> dict[str, float]:
    flops, med = 2 * n**3, statistics.median(times)
    return {"n": n, "samples": len(times), "median_s": med, "flops_per_s": flops / med,
            "best_flops_per_s": flops / min(times), "times_s": times}


# ---- the steps -----------------------------------------------------------------------------------------------

def build_ours(cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> Transformer:
    model = Transformer(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.float().train()


def ours_step(model: Transformer, tokens: torch.Tensor) -> Step:
    """Main model only: the training objective without MTP (head fused with its cross-entropy, model/loss.py)
    against the shifted tokens, the same work as HF's `labels=` loss, then backward."""
    labels = shift_left(tokens, 1, IGNORE_INDEX)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model.loss(tokens, labels, mtp_lambda=0.0).loss
        loss.backward()
        return loss.detach()

    return step


def ours_mtp_step(model: Transformer, tokens: torch.Tensor, mtp_lambda: float) -> Step:
    """The full objective: main CE + (lambda / D) * MTP CEs, backward."""
    labels = shift_left(tokens, 1, IGNORE_INDEX)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model.loss(tokens, labels, mtp_lambda=mtp_lambda).loss
        loss.backward()
        return loss.detach()

    return step


def load_hf(path: Path, attn: str) -> nn.Module:
    """transformers' DeepseekV3ForCausalLM from `path` in fp32 with the given attention implementation."""
    import transformers

    transformers.logging.set_verbosity_error()  # the unused MTP layer is reported as unexpected weights
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.train()


def hf_step(model: nn.Module, tokens: torch.Tensor) -> Step:
    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        return loss.detach()

    return step


# ---- timing --------------------------------------------------------------------------------------------------

def time_interleaved(steps: dict[str, Step], warmup: int,
                     iters: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Step seconds per variant over `iters` rounds; every round runs each variant once, in a rotated order."""
    names = list(steps)
    losses = {}
    for _ in range(warmup):
        for name in names:
            losses[name] = float(steps[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times, losses


def profile_top(step: Step, iters: int, top: int) -> list[dict]:
    """The `top` operators by self CPU time, per step, averaged over `iters` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    rows = [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / iters,
             "calls_per_step": e.count / iters, "self_cpu_pct": 100 * e.self_cpu_time_total / total} for e in ranked]
    return rows


# ---- report --------------------------------------------------------------------------------------------------

def summarize(times: dict[str, list[float]], losses: dict[str, float], flops: dict[str, float], tokens: int,
              peak: float) -> dict[str, dict]:
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "times_s": ts, "tokens_per_s": tokens / med,
                     "flops_per_token": flops[name], "flops_per_s": flops[name] * tokens / med,
                     "peak_fraction": flops[name] * tokens / med / peak, "loss": losses[name]}
    return out


def format_table(rows: dict[str, dict]) -> str:
    header = ["variant", "median ms", "min ms", "tokens/s", "GFLOP/tok", "GFLOP/s", "% peak", "loss"]
    body = [[name, f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}",
             f"{r['flops_per_token'] / 1e9:.4f}", f"{r['flops_per_s'] / 1e9:.2f}", f"{100 * r['peak_fraction']:.1f}",
             f"{r['loss']:.4f}"] for name, r in rows.items()]
    return aligned(header, body)


def format_profile(ops: list[dict]) -> str:
    body = [[o["op"][:60], f"{o['self_cpu_ms_per_step']:.1f}", f"{o['calls_per_step']:.0f}", f"{o['self_cpu_pct']:.1f}"]
            for o in ops]
    return aligned(["op", "self ms/step", "calls/step", "% self"], body)


def aligned(header: list[str], body: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info() -> dict[str, object]:
    import transformers

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpu and cpuinfo.is_file():  # platform.processor() is empty on most Linux systems
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"processor": cpu, "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--iters", type=int, default=9, help="timed rounds (each runs every variant once)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    p.add_argument("--peak-n", type=int, default=2048,
                   help="size of the square fp32 matmul that measures the peak (one sample per round)")
    p.add_argument("--profile-iters", type=int, default=3, help="profiled steps of ours (0 = no profile)")
    p.add_argument("--top", type=int, default=15, help="operators listed by the profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


GEMMS_ALONE = "ours: its GEMMs alone"


def build_steps(cfg: ModelConfig, tokens: torch.Tensor, mtp_lambda: float,
                tmp: Path) -> tuple[dict[str, Step], dict[str, float], dict[str, int]]:
    """Every variant's step on the same weights, each variant's model FLOPs per token, and the GEMM calls per op
    of our step (replayed alone as the GEMMS_ALONE variant)."""
    base = build_ours(cfg)
    state = base.state_dict()
    seq = tokens.shape[1]
    main_flops = train_flops_per_token(cfg, seq)
    steps: dict[str, Step] = {f"ours (expert_gemm={cfg.expert_gemm})": ours_step(base, tokens)}
    for backend in ("grouped_mm", "loop"):
        if backend == cfg.expert_gemm:
            continue
        model = build_ours(dataclasses.replace(cfg, expert_gemm=backend), state)
        steps[f"ours (expert_gemm={backend})"] = ours_step(model, tokens)
    steps[GEMMS_ALONE], gemm_calls = gemms_alone(next(iter(steps.values())))
    steps[f"ours + MTP (lambda={mtp_lambda})"] = ours_mtp_step(base, tokens, mtp_lambda)
    save_hf(base, tmp)
    for attn in ("eager", "sdpa"):
        steps[f"HF ({attn})"] = hf_step(load_hf(tmp, attn), tokens)
    flops = {name: main_flops for name in steps}
    flops[f"ours + MTP (lambda={mtp_lambda})"] = train_flops_per_token(cfg, seq, mtp=True)
    return steps, flops, gemm_calls


def speedups(rows: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Tokens/s ratios (median and best step) of ours against HF, of grouped_mm against loop, and of our step's
    GEMMs alone against our step (1 / (step time / GEMM-only time): how close the step is to its own GEMMs)."""
    ours = next(iter(rows))
    pairs = [(ours, hf) for hf in rows if hf.startswith("HF")]
    pairs.append((GEMMS_ALONE, ours))
    pairs.append(("ours (expert_gemm=grouped_mm)", "ours (expert_gemm=loop)"))
    return {f"{a} / {b}": {"median": rows[b]["median_s"] / rows[a]["median_s"],
                           "best": rows[b]["min_s"] / rows[a]["min_s"]} for a, b in pairs}


def report(args: argparse.Namespace, rows: dict[str, dict], ratios: dict[str, dict[str, float]], peak: dict,
           load: dict[str, list[float]]) -> None:
    print(f"{args.preset}: batch {args.batch} x seq {args.seq}, fp32, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.iters} timed rounds, interleaved; median step")
    print(f"fp32 GEMM peak ({args.peak_n}^3, median of {peak['samples']}): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"(best {peak['best_flops_per_s'] / 1e9:.1f}); load average before/after "
          f"{load['before'][0]:.2f}/{load['after'][0]:.2f} (other processes skew every number)\n")
    print(format_table(rows) + "\n")
    for name, r in ratios.items():
        if name.startswith(GEMMS_ALONE):
            print(f"step time / GEMM-only time ({name.split(' / ')[1]}): {r['median']:.2f} median, {r['best']:.2f} "
                  "best (1.0 = the step is nothing but its own GEMMs)")
            continue
        target = "  (target >= 1.5x)" if "HF" in name else ""
        print(f"speed-up {name}: {r['median']:.2f}x median, {r['best']:.2f}x best{target}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = presets.load(args.preset)
    tokens = torch.randint(cfg.vocab_size, (args.batch, args.seq))
    with tempfile.TemporaryDirectory() as tmp:
        steps, flops, gemm_calls = build_steps(cfg, tokens, args.mtp_lambda, Path(tmp))
    gemm = f"fp32 GEMM {args.peak_n}^3"
    load = {"before": list(os.getloadavg())}
    times, losses = time_interleaved({**steps, gemm: gemm_step(args.peak_n)}, args.warmup, args.iters)
    load["after"] = list(os.getloadavg())
    peak = gemm_peak(args.peak_n, times.pop(gemm))
    losses.pop(gemm)
    rows = summarize(times, losses, flops, tokens.numel(), peak["flops_per_s"])
    ratios = speedups(rows)
    report(args, rows, ratios, peak, load)
    ours = next(iter(rows))
    profile = profile_top(steps[ours], args.profile_iters, args.top) if args.profile_iters else []
    if profile:
        print(f"\nprofile of {ours}, top {args.top} ops by self CPU time (mean of {args.profile_iters} steps):")
        print(format_profile(profile))
    result = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens.numel(),
              "warmup": args.warmup, "iters": args.iters, "seed": args.seed, "machine": machine_info(),
              "load_average": load, "gemm_peak": peak,
              "model_flops_per_token": {"main": train_flops_per_token(cfg, args.seq),
                                        "with_mtp": train_flops_per_token(cfg, args.seq, mtp=True)},
              "gemm_only": {"variant": GEMMS_ALONE, "calls": gemm_calls}, "variants": rows,
              "speedups": ratios, "profile": {"variant": ours, "iters": args.profile_iters, "top_ops": profile}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
