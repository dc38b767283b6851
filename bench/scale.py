"""671B on 2048 ranks, measured on one CPU (issue 14): the dry run against the planner, and the host memory of
building one rank before and after meta-first construction.

1. Dry run (launch/dryrun.py, the code of `hai-plan --dry-run`): for three layouts of `deepseek_v3_671b` on 2048
   H800 (PP16 x EP64 DualPipe, PP8 x EP64 DualPipeV, PP16 x EP64 ZB1P; FP8 recipe, bf16 compute, bf16 moments),
   one rank per pipeline position (DP rank 0) is built for real on the meta device over torch's fake process
   group; its parameter, gradient-buffer and optimizer bytes, measured from its tensors, are shown next to the
   planner's, with the planned activations, for the heaviest rank and as the worst deviation over the ranks.
2. Host memory of building one rank, peak RSS of a fresh process: before (the whole model built on the CPU in
   fp32 and then cut, the trainer before issue 14) and after (`trainer.train.build_model`: meta, cut, then the
   rank's part materialised and initialised) for the `small` preset at PP4 x EP4 (rank 0 of 16, fake group),
   measured; and for 671B at PP16 x EP64 derived from the tensors (before: every parameter in fp32; after: the
   rank's part, as the dry run measures it).

3. Activations: the planner's per-token bytes of one block (launch/cost.py: `layer_activation_bytes`, the paper's
   storage policy) against the bytes autograd really saves for the block's backward, measured with
   `torch.autograd.graph.saved_tensors_hooks` (unique storages, parameters excluded) on a bf16 forward of 256
   tokens, for the dense and a MoE block of `tiny` and `small`, with and without FP8 (emulated) and recompute.

    python -m bench.scale   # prints the three tables, writes bench/results/scale.json
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path

from launch.dryrun import MEASURED

RESULTS = Path(__file__).resolve().parent / "results"
BASE = ["experiment=deepseek_v3", "fp8=emulate", "parallel.gpus_per_node=8"]
LAYOUTS = {"PP16 x EP64 DualPipe": ["parallel.pp=16", "parallel.ep=64", "parallel.schedule=dualpipe"],
           "PP8 x EP64 DualPipeV": ["parallel.pp=8", "parallel.ep=64", "parallel.schedule=dualpipev"],
           "PP16 x EP64 ZB1P": ["parallel.pp=16", "parallel.ep=64", "parallel.schedule=zb1p"]}
WORLD = 2048
SMALL = ["model=small", "parallel.pp=4", "parallel.ep=4", "parallel.schedule=1f1b", "parallel.gpus_per_node=4",
         "model.n_group=1", "model.topk_group=1"]
SMALL_WORLD = 16
GB = 1e9


def _config(overrides: list[str], world: int):
    from launch.dryrun import dry_run_config
    from trainer.config import compose_config, run_config

    return dry_run_config(run_config(compose_config(overrides), resolve=False), world)


def dry_run_table() -> list[dict]:
    import torch

    from launch import dryrun
    from launch.plan import build_plan, load_cluster

    rows = []
    for name, layout in LAYOUTS.items():
        cfg = _config(BASE + layout, WORLD)
        plan = build_plan(cfg.model, cfg.parallel, load_cluster("h800_2048", {}), cfg.fp8.enabled,
                          moment_bytes=torch.tensor([], dtype=torch.bfloat16).element_size())
        dp = WORLD // cfg.parallel.pp
        reports = list(dryrun.run(cfg, WORLD, [p * dp for p in range(cfg.parallel.pp)], plan))
        heavy = max(reports, key=lambda r: r.total(plan))
        worst = max(abs(r.__dict__[k] / r.planned[k] - 1) for r in reports for k in MEASURED)
        rows.append({"layout": name, "heaviest_rank": heavy.rank, "pp_rank": heavy.pp_rank,
                     **{f"measured_{k}": heavy.__dict__[k] for k in MEASURED},
                     **{f"planned_{k}": heavy.planned[k] for k in (*MEASURED, "activation_bytes")},
                     "total_gb": heavy.total(plan) / GB, "worst_deviation": worst})
    return rows


def _rss_child(mode: str) -> None:
    """In a fresh process: build rank 0 of the small layout `before` or `after` and print the peak RSS (GB)."""
    import torch
    import torch.distributed as dist

    from model import Transformer
    from parallel.grid import ProcessGrid
    from trainer.train import build_model

    torch.set_num_threads(1)
    cfg = _config(SMALL, SMALL_WORLD)
    dist.init_process_group("fake", rank=0, world_size=SMALL_WORLD)
    # the fake group's grid (groups that move no data), with the host as the device the rank's part lives on
    grid = dataclasses.replace(ProcessGrid.build(cfg.parallel, "meta"), device=torch.device("cpu"))
    if mode == "before":  # the trainer before issue 14: the whole fp32 model on the host, then cut
        from model.grads import attach_main_grads
        from parallel.parallelize import build_optimizer, parallelize
        from trainer.train import cast_for_compute

        model = Transformer(cfg.model)
        pipeline = parallelize(model, grid, cfg.parallel, cfg.fp8, torch.bfloat16)
        cast_for_compute(model, torch.bfloat16)
        attach_main_grads(model.parameters())
        build_optimizer(model, grid, pipeline, cfg.optim)
    else:
        model = build_model(cfg, grid).model
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "held_gb": held / GB}))


def rss_table() -> dict:
    out = {}
    for mode in ("before", "after"):
        res = subprocess.run([sys.executable, "-m", "bench.scale", "--rss", mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    from model.params import count_params

    counts = count_params(_config(BASE, WORLD).model)
    out["671b_before_gb"] = 4 * (counts["total"] + counts["mtp"]) / GB  # every parameter in fp32 on every rank
    return out


ACTIVATION_CASES = {"tiny": {}, "tiny, one head width": {"qk_nope_head_dim": 16},
                    "tiny, recompute": {"recompute_norm": True, "recompute_mla_up_proj": True}, "small": {},
                    # the full model's widths, two blocks, 16 of its 256 experts (the per-token bytes do not
                    # depend on E beyond the router's 4E)
                    "deepseek_v3_671b, 2 blocks": {"n_layers": 2, "first_k_dense": 1, "n_routed_experts": 16,
                                                   "n_group": 4, "topk_group": 2, "vocab_size": 1024,
                                                   "n_mtp_depth": 0}}
TOKENS = 256


def activation_table() -> list[dict]:
    from launch.activations import cpu_attention, saved_bytes_per_token
    from launch.cost import layer_activation_bytes
    from model.presets import load

    rows = []
    for name, overrides in ACTIVATION_CASES.items():
        cfg = load(name.split(",")[0], **overrides)
        attention = cpu_attention(cfg)
        for fp8 in (False, True):
            for layer in (0, cfg.first_k_dense):
                moe = layer >= cfg.first_k_dense
                measured = saved_bytes_per_token(cfg, layer, fp8, TOKENS)
                planned = layer_activation_bytes(cfg, moe, fp8, attention, TOKENS)
                fused = layer_activation_bytes(cfg, moe, fp8, "fused")
                rows.append({"case": name, "fp8": fp8, "block": "MoE" if moe else "dense", "attention": attention,
                             "measured": measured, "planned": planned, "ratio": measured / planned,
                             "planned_gpu": fused})
    return rows


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = dry_run_table()
    print(f"dry run, deepseek_v3_671b on {WORLD} H800 (FP8 recipe), heaviest rank of one per pipeline position; "
          "GB, measured / planned")
    print(f"{'layout':22} {'rank':>5} {'params':>13} {'grads':>13} {'optimizer':>13} {'activ (plan)':>12} "
          f"{'total':>7} {'worst dev':>9}")
    for r in rows:
        cells = " ".join(f"{r[f'measured_{k}'] / GB:>6.2f}/{r[f'planned_{k}'] / GB:<6.2f}" for k in MEASURED)
        print(f"{r['layout']:22} {r['heaviest_rank']:>5} {cells} {r['planned_activation_bytes'] / GB:>12.2f} "
              f"{r['total_gb']:>7.1f} {r['worst_deviation']:>9.2%}")
    rss = rss_table()
    print(f"\nbuilding rank 0 of model=small at PP4 x EP4 ({SMALL_WORLD} ranks): peak RSS before "
          f"{rss['before']['peak_rss_gb']:.2f} GB, after {rss['after']['peak_rss_gb']:.2f} GB "
          f"({rss['after']['peak_rss_gb'] / rss['before']['peak_rss_gb']:.2f}x; the rank holds "
          f"{rss['after']['held_gb']:.2f} GB of parameters)")
    heavy = rows[0]
    print(f"671B at PP16 x EP64, rank {heavy['heaviest_rank']}: before {rss['671b_before_gb']:.0f} GB of fp32 "
          f"parameters on the host per rank (derived), after {heavy['measured_param_bytes'] / GB:.1f} GB of "
          "parameters, on the rank's device (measured by the dry run)")
    acts = activation_table()
    print(f"\nactivations saved by one block for its backward, bytes per token ({TOKENS} tokens, bf16): measured "
          "(saved-tensor hooks) / planned (launch/cost.py, with the attention kernel the CPU ran) and the planner's "
          "figure for a GPU's fused attention kernel")
    for a in acts:
        print(f"  {a['case']:27} {'FP8' if a['fp8'] else 'bf16':4} {a['block']:5} {a['attention']:5} "
              f"{a['measured']:>10.0f} / {a['planned']:<10.0f} {a['ratio']:.3f}x   GPU {a['planned_gpu']:>8.0f}")
    (RESULTS / "scale.json").write_text(json.dumps({"dry_run": rows, "build_memory": rss, "activations": acts},
                                                   indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss":
        _rss_child(sys.argv[2])
    else:
        main()
