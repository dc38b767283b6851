"""Model FLOPs per token (model/flops.py) by component, for the shipped model presets and the paper's sequence
lengths, next to the public figure for DeepSeek-V3 671B at 4K (about 260 GFLOP per token, derived from
Megatron's published runs).

What the table says about that figure: 6 x the activated GEMM weights (the embedding is a lookup) plus causal
attention gives the main model; the MTP module trains with it and adds its block and a second pass of the head;
counting the full T x T attention square (what profilers count for SDPA) would overstate it.

    python -m bench.flops   # prints the tables, writes bench/results/flops.json and flops.md
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from model import presets
from model.flops import flops_per_token, forward_flops, recompute_flops_per_token

RESULTS = Path(__file__).resolve().parent / "results"
PUBLIC_671B_4K = 260e9  # FLOPs per token, the figure derived from Megatron's DeepSeek-V3 runs
CASES = (("tiny", 256), ("small", 1024), ("deepseek_v3_671b", 4096), ("deepseek_v3_671b", 32768),
         ("deepseek_v3_671b", 131072))


def case(preset: str, seq: int) -> dict:
    cfg = presets.load(preset)
    # the long-context stages run the same weights with YaRN, which changes no FLOP
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq))
    parts = {k: 3 * v for k, v in forward_flops(cfg, seq).items()}
    main = flops_per_token(dataclasses.replace(cfg, n_mtp_depth=0), seq)
    square = 3 * sum(forward_flops(cfg, seq, keys_per_query=seq).values())
    full = dataclasses.replace(cfg, recompute_mla_up_proj=True)
    return {"preset": preset, "seq_len": seq, "training_flops_per_token": flops_per_token(cfg, seq),
            "main_model_flops_per_token": main, "by_component": parts, "full_square_attention": square,
            "recompute_mla_up_proj_extra": recompute_flops_per_token(full, seq)}


def table(rows: list[dict]) -> str:
    keys = list(rows[0]["by_component"])
    head = ["preset", "T", "total", "main", *keys, "square attn", "+ recompute"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = [f"{r['training_flops_per_token'] / 1e9:.4g}", f"{r['main_model_flops_per_token'] / 1e9:.4g}",
             *(f"{r['by_component'][k] / 1e9:.3g}" for k in keys), f"{r['full_square_attention'] / 1e9:.4g}",
             f"{r['recompute_mla_up_proj_extra'] / 1e9:.3g}"]
        lines.append("| " + " | ".join([r["preset"], str(r["seq_len"]), *g]) + " |")
    return "\n".join(lines)


def main() -> dict:
    rows = [case(p, t) for p, t in CASES]
    at4k = next(r for r in rows if r["preset"] == "deepseek_v3_671b" and r["seq_len"] == 4096)
    ratio = at4k["training_flops_per_token"] / PUBLIC_671B_4K
    main_ratio = at4k["main_model_flops_per_token"] / PUBLIC_671B_4K
    core = at4k["by_component"]["attention_core"]
    gemm = at4k["main_model_flops_per_token"] - core
    mtp = at4k["by_component"]["mtp"]
    summary = (f"671B at 4K: {at4k['training_flops_per_token'] / 1e9:.1f} GFLOP per token with the MTP module "
               f"({ratio:.3f} x the public ~260), {at4k['main_model_flops_per_token'] / 1e9:.1f} for the main model "
               f"alone ({main_ratio:.3f} x); attention counted over the whole square would give "
               f"{at4k['full_square_attention'] / 1e9:.1f}.")
    why = (f"Why ours lands there: the main model is 6 x its {gemm / 6e9:.1f}B GEMM weights per token (the "
           f"activated weights less the embedding, which is a lookup) = {gemm / 1e9:.1f}, plus {core / 1e9:.1f} for "
           "causal attention at 4K; the MTP module adds its MoE block, M_k and a second pass of the head "
           f"({mtp / 1e9:.1f}). The public figure is reproduced when the MTP module, which trains with the model, "
           "is counted.")
    md = "\n".join([
        "# Model FLOPs per token (`python -m bench.flops`, model/flops.py)",
        "",
        "GFLOP per token trained (forward + backward = 3 x forward; causal attention over (T+1)/2 keys). `total`",
        "includes the MTP module, `main` leaves it out; `square attn` counts the whole T x T attention (what",
        "FlopCounterMode counts for SDPA); `+ recompute` is the extra work of `recompute_mla_up_proj`, not model",
        "FLOPs.",
        "",
        table(rows),
        "",
        summary,
        "",
        why,
    ])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flops.json").write_text(json.dumps({"public_671b_4k": PUBLIC_671B_4K, "rows": rows}, indent=2) + "\n")
    (RESULTS / "flops.md").write_text(md + "\n")
    print(md)
    return {"rows": rows}


if __name__ == "__main__":
    main()
