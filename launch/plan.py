"""`hai-plan`: what a config costs before anything runs.

Without a cluster: parameter counts per component (paper 2.1: 671B total, 37B activated per token, plus the MTP
module), from the model built on the meta device. With a cluster (--cluster FILE and/or cluster flags, which
override the file's fields; the file defaults to configs/cluster/h800_2048.yaml): memory per pipeline rank, the
expert all-to-all per MoE layer, the schedule's bubble, the step time and GPU-hours per trillion tokens, every
assumption printed. The cost model is launch/cost.py.

    hai-plan model=deepseek_v3_671b
    hai-plan model=deepseek_v3_671b parallel.pp=16 parallel.ep=64 parallel.schedule=dualpipe \\
        parallel.dispatch=hierarchical --cluster configs/cluster/h800_2048.yaml --fp8 --json plan.json

The job shape is the paper's pre-training (4.2) unless flags change it: 4096-token sequences (or the model's
max_seq_len if shorter), 15360 per step (or parallel.microbatches x micro-batch x DP when that is set), micro-batches
of one; the config's trainer group describes local runs and is not read, unless an experiment is named
(`experiment=deepseek_v3_ext32k`): then its data.seq_len, trainer.global_batch_size and trainer.micro_batch_size are
the job (the flags still override them), so that each stage of a campaign is priced as it will run. The plan prices
the FP8 recipe (3.3) when
fp8.recipe is on or `--fp8` is given. A config, cluster or layout that does not work exits with code 2 and a
one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from configs import ROOT as CONFIGS
from core.config import ArgumentParser, ConfigError, from_dict
from fp8.config import FP8Config
from launch import cost
from launch.cost import GB, Cluster, Layout
from launch.dryrun import MEASURED
from model import ModelConfig, Transformer, count_params
from model.config import model_config
from parallel.config import ParallelConfig, check_model_layout, microbatches_per_step
from parallel.pipeline.schedule import ScheduleError
from trainer.config import compose_config

CLUSTERS = CONFIGS / "cluster"
DEFAULT_CLUSTER = Path(str(CLUSTERS / "h800_2048.yaml"))  # the paper's cluster, shipped in the configs package
PAPER_SEQ_LEN, PAPER_BATCH = 4096, 15360  # paper 4.2: 4K sequences, 15360 per step after the ramp
PAPER_GPU_HOURS_PER_T = 180e3  # paper 1: 180K H800 GPU hours per trillion tokens
PAPER_TOKENS_T = 14.8


def load_config(overrides: list[str]) -> ModelConfig:
    """Compose configs/config.yaml with Hydra overrides and validate the model group."""
    return model_config(OmegaConf.to_container(compose_config(overrides).model, resolve=True))


# ---- parameter counts (no cluster) ------------------------------------------------------------------------------

def _component(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp module"
    for key, label in ((".experts.", "routed experts"), (".shared_experts.", "shared experts"),
                       (".gate.", "router"), (".attn.", "attention (MLA)"), ("embed.", "embedding"),
                       ("head.", "output head"), ("_norm.", "norms"), ("norm.", "norms")):
        if key in f".{name}":
            return label
    return "dense FFN"


def breakdown(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Transformer(cfg)
    parts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        parts[_component(name)] += p.numel()
    return dict(parts)


def report(cfg: ModelConfig) -> str:
    counts = count_params(cfg)
    lines = [f"{'component':<18}{'parameters':>18}"]
    for part, n in sorted(breakdown(cfg).items(), key=lambda kv: -kv[1]):
        lines.append(f"{part:<18}{n:>18,}")
    lines += ["",
              f"{'total (main)':<18}{counts['total']:>18,}  ({counts['total'] / 1e9:.1f}B)",
              f"{'activated/token':<18}{counts['activated']:>18,}  ({counts['activated'] / 1e9:.1f}B)",
              f"{'MTP module':<18}{counts['mtp']:>18,}  ({counts['mtp'] / 1e9:.1f}B, shares embedding and head)",
              f"{'bf16 weights':<18}{counts['total'] * 2 / 2**30:>17,.1f} GiB (main model)"]
    return "\n".join(lines)


# ---- the plan ---------------------------------------------------------------------------------------------------

def cluster_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in CLUSTERS.iterdir() if p.name.endswith(".yaml"))


def cluster_path(given: str | Path | None) -> Path:
    """A cluster file: a path, or the name of one of configs/cluster/ (default DEFAULT_CLUSTER)."""
    if given is None:
        return DEFAULT_CLUSTER
    given = str(given)
    shipped = CLUSTERS / f"{given}.yaml"
    if "/" not in given and shipped.is_file():
        return Path(str(shipped))
    path = Path(given)
    if not path.is_file():
        shipped = ", ".join(f"{n} (configs/cluster/{n}.yaml)" for n in cluster_names())
        raise ConfigError(f"--cluster {given}: no such file; give a cluster file or the name of a shipped one: "
                          f"{shipped}")
    return path


def load_cluster(path: str | Path | None, overrides: dict[str, float]) -> Cluster:
    """A Cluster from a YAML file or shipped name (`cluster_path`) with `overrides` (field -> value) applied."""
    path = cluster_path(path)
    try:
        values = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # YAML syntax
        raise ConfigError(f"cluster file {path}: not readable YAML ({err})") from None
    names = {f.name: f for f in fields(Cluster)}
    if not isinstance(values, dict):
        raise ConfigError(f"cluster file {path}: must be a mapping of the fields {sorted(names)}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"cluster file {path}: unknown field(s) {unknown}; the fields are {sorted(names)}")
    values.update(overrides)
    for name, f in names.items():
        if name not in values:
            raise ConfigError(f"cluster file {path}: missing field '{name}' ({f.metadata['doc']}); add "
                              f"'{name}: <value>' to the file or pass --{name.replace('_', '-')}")
        try:
            number = float(values[name])
        except (TypeError, ValueError):
            number = None
        integral = f.type in ("int", int)
        if number is None or (integral and not number.is_integer()):
            kind = "a whole number" if integral else "a number"
            raise ConfigError(f"cluster {name}={values[name]!r} is not {kind} ({f.metadata['doc']}); fix it in "
                              f"{path} or pass --{name.replace('_', '-')}")
        values[name] = int(number) if integral else number
    return Cluster(**values).validate()


@dataclass
class Plan:
    """A priced layout: the inputs after validation and every number hai-plan prints."""

    model: ModelConfig
    parallel: ParallelConfig
    cluster: Cluster
    layout: Layout
    seq_len: int
    micro_batch: int
    ranks: list[cost.RankMemory]
    a2a: cost.AllToAll
    stages: list[cost.StageCost]
    step: cost.StepTime
    notes: list[str]

    @property
    def tokens_per_step(self) -> int:
        return self.layout.microbatches * self.layout.tokens * self.layout.dp

    @property
    def gpu_hours_per_t(self) -> float:
        return self.step.total * self.cluster.gpus / 3600 * 1e12 / self.tokens_per_step

    @property
    def heaviest(self) -> cost.RankMemory:
        return max(self.ranks, key=lambda m: m.total)

    @property
    def fits(self) -> bool:
        return self.heaviest.total <= self.cluster.gpu_memory_gb * GB

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs per token trained (model/flops.py: forward and backward = 3 x forward, MTP included), the
        sum of the stages' forward FLOPs x 3."""
        return 3 * sum(s.flops for s in self.stages) / self.layout.tokens


def build_plan(model: ModelConfig, parallel: ParallelConfig, cluster: Cluster, fp8: bool = False,
               seq_len: int | None = None, micro_batch: int = 1, global_batch: int | None = None,
               moment_bytes: int = cost.BF16, compute_bytes: int = cost.BF16,
               batch_names: tuple[str, str] = ("--global-batch", "--micro-batch"),
               shape_from: str | None = None) -> Plan:
    """Validate the layout on the cluster (ConfigError / ScheduleError naming the field and the fix) and price it.
    `global_batch` None: parallel.microbatches x micro-batch x DP when parallel.microbatches is set, else the
    paper's PAPER_BATCH. `moment_bytes`, `compute_bytes`: bytes of an AdamW moment and of a compute weight (the
    paper's bf16 unless a run's config says otherwise, as in the dry run). `batch_names`: the settings the global
    and micro-batch came from, as errors name them; `shape_from`: where the job shape came from, for the notes."""
    notes = [f"job shape from {shape_from}"] if shape_from else []
    if parallel.gpus_per_node != cluster.gpus_per_node:
        notes.append(f"parallel.gpus_per_node={parallel.gpus_per_node} replaced by the cluster's "
                     f"{cluster.gpus_per_node}")
        parallel = replace(parallel, gpus_per_node=cluster.gpus_per_node)
    parallel.validate(cluster.gpus)
    check_model_layout(parallel, model)
    seq_len = min(PAPER_SEQ_LEN, model.max_seq_len) if seq_len is None else seq_len
    if not 0 < seq_len <= model.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len}: must lie in [1, model.max_seq_len={model.max_seq_len}]")
    dp = cluster.gpus // parallel.pp
    if global_batch is None:
        global_batch = parallel.microbatches * micro_batch * dp if parallel.microbatches else PAPER_BATCH
    if micro_batch < 1 or global_batch < 1:
        raise ConfigError(f"--micro-batch {micro_batch} and --global-batch {global_batch} must be >= 1")
    microbatches = microbatches_per_step(parallel, global_batch, micro_batch, dp, batch_names)
    try:
        parallel.pipeline_schedule().check_microbatches(microbatches)
    except ScheduleError as err:
        if parallel.microbatches is None:
            raise ScheduleError(f"{err} (derived: {batch_names[0]} {global_batch} / ({batch_names[1]} {micro_batch} "
                                f"x DP {dp}); change them or set parallel.microbatches)") from None
        raise
    stage_layers = tuple(parallel.stage_layers) if parallel.stage_layers is not None else None
    layout = Layout(parallel.schedule, parallel.pp, dp, parallel.ep, microbatches, micro_batch * seq_len, fp8,
                    parallel.dispatch, stage_layers, moment_bytes, compute_bytes)
    parts = cost.model_parts(model, seq_len, fp8)
    ranks = [cost.rank_memory(model, parts, layout, r, cluster.reserved_gb * GB) for r in range(parallel.pp)]
    a2a = cost.all_to_all(model, layout, cluster)
    stages = cost.stage_costs(model, parts, layout, cluster, a2a)
    sync = cost.sync_seconds(model, parts, ranks, layout, cluster)
    step = cost.step_time(model, stages, layout, sync)
    return Plan(model, parallel, cluster, layout, seq_len, micro_batch, ranks, a2a, stages, step, notes)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _layers(mem: cost.RankMemory, mtp: bool) -> str:
    spans = [f"{s.layers.start}-{s.layers.stop - 1}" if len(s.layers) else "-" for s in mem.stages]
    extra = [label for label, cond in (("emb", any(s.first for s in mem.stages) or
                                        (mtp and any(s.last for s in mem.stages))),
                                       ("head+MTP" if mtp else "head", any(s.last for s in mem.stages))) if cond]
    return " ".join(spans + [f"+{e}" for e in extra])


def format_plan(plan: Plan, cluster_name: str) -> str:
    m, lay, cl = plan.model, plan.layout, plan.cluster
    edp = lay.dp // lay.ep
    nodes_ep = -(-lay.ep // cl.gpus_per_node)
    n_stages = len(plan.stages)
    copies = lay.pipeline.placement()
    gemm = "FP8 (--fp8: the paper's recipe, 3.3; the trainer's fp8.recipe is off)" if lay.fp8 else "BF16"
    out = [f"plan: PP {lay.pp} x DP {lay.dp} = {cl.gpus} GPUs ({cl.gpus // cl.gpus_per_node} x {cl.gpus_per_node}-GPU "
           f"nodes); EP {lay.ep} over {nodes_ep} node(s), expert-DP {edp}; ZeRO-1; no tensor parallelism",
           f"schedule {lay.schedule}: {n_stages} stages ({copies}), {lay.microbatches} micro-batches per step",
           "", "assumptions"]
    assume = [
        ("cluster", f"{cluster_name}: {cl.gpu_memory_gb:g} GB per GPU, BF16 {cl.peak_tflops_bf16:g} / FP8 "
                    f"{cl.peak_tflops_fp8:g} TFLOP/s, NVLink {cl.nvlink_gbps:g} GB/s, IB {cl.ib_gbps:g} GB/s"),
        ("MFU", f"{cl.mfu:g} of the peak of each GEMM's precision while computing; bubble, exposed all-to-all and "
                "gradient sync added on top"),
        ("batch", f"{lay.microbatches * plan.micro_batch * lay.dp} sequences x {plan.seq_len} tokens = "
                  f"{plan.tokens_per_step / 1e6:.1f}M tokens per step; micro-batch {plan.micro_batch} sequence(s); "
                  f"{lay.microbatches} micro-batches per pipeline"),
        ("precision", f"weights held in BF16 (router fp32); {gemm} GEMMs" + (
            " on a per-step FP8 copy of their weights (E4M3 + 128x128 block scales) and FP8-cached inputs"
            if lay.fp8 else "") + "; embedding, head, router, norms BF16"),
        ("gradients", "fp32 main gradients of every parameter held (paper 3.3), not sharded (ZeRO-1)"),
        ("optimizer", f"fp32 master + 2 AdamW moments of {lay.moment_bytes} B = {lay.optimizer_bytes} B/param; "
                      f"dense / DP {lay.dp}, "
                      f"experts / expert-DP {edp}"),
        ("activations", f"paper 3.2.3 policy (recompute norms: {m.recompute_norm}, MLA up-projections: "
                        f"{m.recompute_mla_up_proj}); balanced expert load; chunks alive from each rank's action "
                        "list (launch/cost.py: layer_activation_bytes, head_activation_bytes): what this repo's "
                        "autograd graph keeps, with a fused attention kernel (measured on CPU to 0.2%: bench.scale)"),
        ("reserved", f"{cl.reserved_gb:g} GB per GPU: CUDA context, communication buffers, allocator slack"),
        ("all-to-all", f"{lay.dispatch} dispatch; a token reaches {plan.a2a.nodes_per_token:g} node(s) (the "
                       "node-limited bound); IB and NVLink legs pipelined; hidden under F&B pairs only"),
        ("FLOPs", "model/flops.py: 2 per weight per token forward, backward 2x forward (6N), W = the GEMM part "
                  "of F; causal attention over (T+1)/2 keys on average; MTP included; pipeline sends hidden"),
    ] + [("note", n) for n in plan.notes]
    out += [f"  {k:<12}{v}" for k, v in assume]

    cap = cl.gpu_memory_gb
    out += ["", f"memory per GPU, GB (1e9 bytes), every pipeline rank (one of its {lay.dp} DP replicas)",
            f"{'rank':>4}  {'layers':<24}{'params':>8}{'weights':>9}{'fp8':>6}{'grads':>8}{'optim':>8}"
            f"{'activ':>8}{'live':>5}{'rsrv':>6}{'total':>8}  of {cap:g}"]
    for r in plan.ranks:
        out.append(f"{r.rank:>4}  {_layers(r, m.n_mtp_depth > 0):<24}{r.params / 1e9:>7.2f}B{r.weights / GB:>9.1f}"
                   f"{r.fp8_cache / GB:>6.1f}{r.grads / GB:>8.1f}{r.optimizer / GB:>8.1f}{r.activations / GB:>8.1f}"
                   f"{r.live_chunks:>5}"
                   f"{r.reserved / GB:>6.1f}{r.total / GB:>8.1f}  {'ok' if r.total <= cap * GB else 'OVER'}")
    h = plan.heaviest
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    out.append(f"{verdict}: heaviest rank {h.rank} needs {h.total / GB:.1f} GB of {cap:g} GB")

    a = plan.a2a
    out += ["", f"expert all-to-all per MoE layer, per micro-batch ({lay.tokens} tokens), per GPU, one direction",
            f"  dispatch ({'FP8 + scales' if lay.fp8 else 'BF16'}): IB {a.dispatch_ib / 1e6:.0f} MB, NVLink "
            f"{a.dispatch_nvlink / 1e6:.0f} MB, {_ms(a.dispatch_s)}",
            f"  combine (BF16): IB {a.combine_ib / 1e6:.0f} MB, NVLink {a.combine_nvlink / 1e6:.0f} MB, "
            f"{_ms(a.combine_s)}"]

    st, c = plan.step, plan.step.costs
    heavy = max(range(n_stages), key=lambda s: plan.stages[s].F + plan.stages[s].B + 2 * plan.stages[s].comm)
    hs = plan.stages[heavy]
    if not cost.overlapped(lay):
        hidden = f"exposed: {lay.schedule} has no F&B overlap"
    else:
        hidden = "hidden in F&B" if 2 * hs.comm <= hs.F + hs.B else "exceeds the F&B compute"
    busiest = max(range(lay.pp), key=lambda r: st.rank_busy[r])
    mean = sum(st.rank_busy) / lay.pp
    balance = f"rank {busiest}; mean over ranks {mean:.2f} s"
    if st.busy > 1.1 * mean:
        balance += ": parallel.stage_layers can even the ranks out"
    out += ["", "time",
            f"  heaviest stage {heavy}: compute F {_ms(hs.F)}, B {_ms(hs.B)}, W {_ms(hs.W)}; all-to-all "
            f"{_ms(hs.comm)} per direction ({hidden})",
            f"  Table 2 chunk costs: F {_ms(c.F)}, B {_ms(c.B)}, W {_ms(c.W)}"
            + (f", F&B {_ms(c.overlapped)}" if c.FB is not None else "") + " (plain chunks expose their all-to-all)",
            f"  busiest rank      {st.busy:8.2f} s  chunks of one step ({balance})",
            f"  bubble            {st.bubble:8.2f} s  {lay.schedule} Table 2 formula, heaviest chunk",
            f"  gradient sync     {st.sync:8.2f} s  ZeRO-1 reduce-scatter + all-gather, replica sums; IB, "
            "not overlapped",
            f"  step              {st.total:8.2f} s  (simulated schedule, per-stage costs: {st.simulated:.2f} s)",
            f"  throughput        {plan.tokens_per_step / st.total / 1e6:8.2f} M tokens/s, "
            f"{plan.flops_per_token * plan.tokens_per_step / st.total / cl.gpus / 1e12:.0f} model TFLOP/s per GPU"]
    paper_tflops = plan.flops_per_token / (PAPER_GPU_HOURS_PER_T * 3600)  # 1e12 tokens, TFLOP/s
    total, paper_total = (h * PAPER_TOKENS_T / 1e6 for h in (plan.gpu_hours_per_t, PAPER_GPU_HOURS_PER_T))
    out += ["", f"GPU-hours per trillion tokens: {plan.gpu_hours_per_t / 1e3:.0f}K   (paper: "
                f"{PAPER_GPU_HOURS_PER_T / 1e3:.0f}K H800 GPU hours); x {PAPER_TOKENS_T}T tokens = {total:.2f}M "
                f"(paper {paper_total:.2f}M)",
            f"  180K at this model's {plan.flops_per_token / 1e9:.0f} GFLOP per token would be {paper_tflops:.0f} "
            f"TFLOP/s per GPU: {paper_tflops / cl.peak_tflops_bf16:.2f} of BF16 peak, "
            f"{paper_tflops / cl.peak_tflops_fp8:.2f} of FP8 peak, all overheads included"]
    return "\n".join(out)


def plan_json(plan: Plan) -> dict:
    return {
        "cluster": asdict(plan.cluster), "layout": asdict(plan.layout),
        "seq_len": plan.seq_len, "micro_batch": plan.micro_batch, "tokens_per_step": plan.tokens_per_step,
        "ranks": [{"rank": r.rank, "stages": [s.index for s in r.stages], "params": r.params, "dense": r.dense,
                   "expert": r.expert, "weights": r.weights, "fp8_cache": r.fp8_cache, "grads": r.grads,
                   "optimizer": r.optimizer,
                   "activations": r.activations, "live_chunks": r.live_chunks, "reserved": r.reserved,
                   "total": r.total} for r in plan.ranks],
        "fits": plan.fits, "all_to_all": asdict(plan.a2a), "stages": [asdict(s) for s in plan.stages],
        "step": {**asdict(plan.step), "costs": asdict(plan.step.costs), "total": plan.step.total},
        "flops_per_token": plan.flops_per_token, "gpu_hours_per_trillion_tokens": plan.gpu_hours_per_t,
        "paper_gpu_hours_per_trillion_tokens": PAPER_GPU_HOURS_PER_T, "notes": plan.notes,
    }


# ---- command line -----------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="hai-plan", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for hai-train (model=..., parallel.pp=...)")
    p.add_argument("--cluster", help=f"cluster file, or the name of a shipped one ({', '.join(cluster_names())}); "
                                     f"default when a cluster flag is given: {DEFAULT_CLUSTER.stem}")
    for f in fields(Cluster):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=float, help=f.metadata["doc"])
    p.add_argument("--fp8", action="store_true", help="price the paper's FP8 recipe (3.3) whatever fp8.recipe says")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {PAPER_SEQ_LEN}, or model.max_seq_len; "
                                               "a named experiment's data.seq_len)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per micro-batch (default 1; a named experiment's trainer.micro_batch_size)")
    p.add_argument("--global-batch", type=int, default=None,
                   help=f"sequences per step (default: parallel.microbatches x micro-batch x DP when that is set, "
                        f"else {PAPER_BATCH}, paper 4.2; a named experiment's trainer.global_batch_size)")
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="also write the numbers as JSON to this file (no file: to standard output); with "
                        "--dry-run one JSON object per line per rank")
    dry = p.add_argument_group("dry run (launch/dryrun.py)")
    dry.add_argument("--dry-run", action="store_true",
                     help="build ranks of the job for real on the meta device over torch's fake process group and "
                          "hold what they allocate against the plan")
    dry.add_argument("--world", type=int, help="ranks of the job (the cluster's GPUs by default)")
    dry.add_argument("--rank", default="0", help="rank(s) to build: a number, a comma list, or all (default 0)")
    dry.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="processes building ranks in parallel (default: the CPU count)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_intermixed_args(argv)
        if args.json is not None and "=" in args.json:  # `--json model=...`: a bare --json before an override
            args.overrides.append(args.json)
            args.json = "-"
        if args.dry_run:
            return _dry_run(args)
        cfg = compose_config(args.overrides)
        model = model_config(OmegaConf.to_container(cfg.model, resolve=True))
        flags = {f.name: getattr(args, f.name) for f in fields(Cluster) if getattr(args, f.name) is not None}
        plan = None
        if args.cluster is not None or flags:
            fp8 = from_dict(FP8Config, OmegaConf.to_container(cfg.fp8, resolve=True), "fp8").validate()
            parallel = from_dict(ParallelConfig, OmegaConf.to_container(cfg.parallel, resolve=True), "parallel")
            cluster = load_cluster(args.cluster, flags)
            plan = build_plan(model, parallel, cluster, args.fp8 or fp8.recipe != "off", **job_shape(args, cfg))
    except (ConfigError, ScheduleError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(plan_json(plan) if plan is not None else {"params": count_params(model)}, indent=1))
        return 0
    print(report(model))
    if plan is None:
        print(f"\n(memory, communication and time: add --cluster {DEFAULT_CLUSTER.stem})")
        return 0
    print()
    print(format_plan(plan, cluster_path(args.cluster).name))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(plan_json(plan), indent=1))
    return 0


def job_shape(args: argparse.Namespace, cfg) -> dict:
    """build_plan's job-shape arguments: the flags, else, when the command line names an experiment, that
    experiment's data.seq_len, trainer.global_batch_size and trainer.micro_batch_size (a campaign's stage priced as
    it runs), else the paper's pre-training (None: build_plan's default)."""
    named = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0].lstrip("+~") == "experiment"]
    if not named:
        return {"seq_len": args.seq_len, "micro_batch": 1 if args.micro_batch is None else args.micro_batch,
                "global_batch": args.global_batch}
    shape = {"seq_len": cfg.data.seq_len if args.seq_len is None else args.seq_len,
             "shape_from": f"experiment={named[-1]} (its data.seq_len, trainer.global_batch_size and "
                           "trainer.micro_batch_size; the flags override them)"}
    names = []
    for key, flag, setting in (("global_batch", "--global-batch", "trainer.global_batch_size"),
                               ("micro_batch", "--micro-batch", "trainer.micro_batch_size")):
        given = getattr(args, key)
        shape[key] = getattr(cfg.trainer, setting.split(".")[1]) if given is None else given
        names.append(setting if given is None else flag)
    return {**shape, "batch_names": tuple(names)}


def _dry_run(args: argparse.Namespace) -> int:
    """hai-plan --dry-run (launch/dryrun.py): reports per rank, a summary, exit 1 if a rank does not fit."""
    import time

    from core.config import torch_dtype
    from launch import dryrun
    from trainer.config import run_config

    t0 = time.perf_counter()
    cfg = run_config(compose_config(args.overrides), resolve=False)
    flags = {f.name: getattr(args, f.name) for f in fields(Cluster) if getattr(args, f.name) is not None}
    cluster = load_cluster(args.cluster, flags)
    world = args.world if args.world is not None else cluster.gpus
    cfg = dryrun.dry_run_config(cfg, world)
    ranks = dryrun.parse_ranks(args.rank, world)
    if cluster.gpus != world:
        cluster = replace(cluster, gpus=world).validate()
    plan = build_plan(cfg.model, cfg.parallel, cluster, cfg.fp8.enabled, **job_shape(args, cfg),
                      moment_bytes=torch_dtype(cfg.optim.moment_dtype).itemsize,
                      compute_bytes=torch_dtype(cfg.trainer.dtype).itemsize)
    out = open(args.json, "w") if args.json not in (None, "-") else sys.stdout  # noqa: SIM115 (closed below)
    reports, overflows = [], []
    try:
        if args.json is None:
            print(_dry_header())
        for r in dryrun.run(cfg, world, ranks, plan, args.workers):
            reports.append(r)
            if args.json is not None:
                out.write(json.dumps(r.to_json()) + "\n")
            elif len(ranks) <= 32:
                print(_dry_line(r))
            problem = dryrun.overflow(r, plan)
            if problem is not None:
                overflows.append(problem)
    finally:
        if out is not sys.stdout:
            out.close()
    summary = _dry_summary(cfg, reports, len(ranks) == world, time.perf_counter() - t0)
    print(summary, file=sys.stderr if args.json == "-" else sys.stdout)
    for problem in overflows[:10]:
        print(f"error: {problem}", file=sys.stderr)
    if len(overflows) > 10:
        print(f"error: ... and {len(overflows) - 10} more ranks do not fit", file=sys.stderr)
    return 1 if overflows else 0


def _dry_header() -> str:
    return (f"{'rank':>5} {'pp':>3} {'dp':>4} {'ep':>3} {'edp':>3} {'held':>8} {'owned':>8}  "
            + "  ".join(f"{k.split('_')[0] + ' GB':>16}" for k in MEASURED) + f"  {'activ GB':>8}"
            + "\n" + " " * 43 + "  ".join(f"{'measured/planned':>16}" for _ in MEASURED) + f"  {'planned':>8}")


def _dry_line(r) -> str:
    cells = "  ".join(f"{r.__dict__[k] / GB:>7.2f}/{r.planned[k] / GB:<8.2f}" for k in MEASURED)
    return (f"{r.rank:>5} {r.pp_rank:>3} {r.dp_rank:>4} {r.ep_rank:>3} {r.edp_rank:>3} {_count(r.params_held):>8} "
            f"{_count(r.params_owned):>8}  {cells}  {r.planned['activation_bytes'] / GB:>8.2f}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _rss_gb() -> float:
    import resource

    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1e6


def _dry_summary(cfg, reports: list, every_rank: bool, seconds: float) -> str:
    from launch.dryrun import expected_owned

    worst = max((abs(r.__dict__[k] / r.planned[k] - 1) for r in reports for k in MEASURED if r.planned[k]),
                default=0.0)
    heavy = max(reports, key=lambda r: sum(r.__dict__[k] for k in MEASURED))
    lines = [f"dry run: {len(reports)} rank(s) built in {seconds:.0f} s; peak RSS {_rss_gb():.2f} GB (this process, "
             "or its largest worker)",
             f"measured vs planned parameter, gradient and optimizer bytes: worst deviation {worst:.2%} "
             f"(heaviest rank {heavy.rank}: " + ", ".join(f"{k} {heavy.__dict__[k] / GB:.2f} GB" for k in MEASURED)
             + f", activations planned {heavy.planned['activation_bytes'] / GB:.2f} GB)"]
    if every_rank:
        owned, expected = sum(r.params_owned for r in reports if r.edp_rank == 0), expected_owned(cfg)
        lines.append(f"parameters owned over the ranks with edp_rank 0: {owned:,} = model + MTP {expected:,}: "
                     + ("ok" if owned == expected else "MISMATCH"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
