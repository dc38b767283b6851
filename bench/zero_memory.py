"""Optimizer-state memory per rank: ZeRO-1 (parallel/zero.py) against the replicated optim.adamw.AdamW.

For the `tiny` model preset, weights in fp32 or bf16 (bf16 as the trainer casts them: everything but the router),
AdamW moments in fp32 or bf16, and DP = 1, 2, 4 (gloo processes on CPU, EP = 1): the bytes of fp32 master
weights and moments that one rank holds (`ZeroOptimizer.optimizer_state_bytes`), and the same for AdamW, which
every rank holds whole. Rank 0's numbers are reported (ranks differ by at most a shard's padding).

Expected: ZeRO holds (4 + 2 x moment bytes) x N / DP per rank, AdamW (masters of non-fp32 weights + 2 x moment
bytes) x N. With fp32 weights ZeRO keeps a separate fp32 master that AdamW does not need (an fp32 parameter is
its own master), so at DP = 1 it holds more; from DP = 2 on it holds less. This is accounting, not timing.

    python -m bench.zero_memory   # writes bench/results/zero_memory.json and zero_memory.png
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.gloo import run_gloo
from model import Transformer, presets
from optim.adamw import AdamW
from optim.config import OptimConfig
from parallel.expert import is_expert_param
from parallel.zero import ZeroOptimizer
from trainer.train import cast_for_compute

RESULTS = Path(__file__).resolve().parent / "results"
DP_SIZES = (1, 2, 4)
VARIANTS = [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "fp32"), ("bf16", "bf16")]  # (weights, moments)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(dp: int) -> list[dict]:
    """Bytes of optimizer state on this rank for every variant (collective-free: construction only)."""
    rows = []
    for weights, moments in VARIANTS:
        torch.manual_seed(0)
        model = Transformer(presets.load("tiny"))
        cast_for_compute(model, DTYPES[weights])
        cfg = OptimConfig(moment_dtype=moments)
        zero = ZeroOptimizer(model.named_parameters(), cfg, None, None, is_expert_param)
        replicated = AdamW(model.named_parameters(), cfg)
        adamw_bytes = sum(t.nbytes for t in replicated.state_dict().values() if t.dim() > 0)
        rows.append(dict(dp=dp, weights=weights, moments=moments, params=sum(p.numel() for p in model.parameters()),
                         zero_bytes=zero.optimizer_state_bytes(), adamw_bytes=adamw_bytes))
    return rows


def _measure_rank(rank: int, world: int) -> list[dict]:
    return measure(world)


def run(dp: int) -> list[dict]:
    if dp == 1:
        return measure(1)  # no torch.distributed: ZeroOptimizer runs unsharded
    return run_gloo(_measure_rank, dp)[0]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / (len(DP_SIZES) + 1)
    labels = [f"w {w}\nm {m}" for w, m in VARIANTS]
    for i, (weights, moments) in enumerate(VARIANTS):
        mine = [r for r in rows if r["weights"] == weights and r["moments"] == moments]
        ax.bar(i, mine[0]["adamw_bytes"] / 2**20, width, color="0.6", label="AdamW (replicated)" if i == 0 else None)
        for j, r in enumerate(mine):
            ax.bar(i + (j + 1) * width, r["zero_bytes"] / 2**20, width, color=f"C{j}",
                   label=f"ZeRO-1 DP={r['dp']}" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(VARIANTS))], labels)
    ax.set_ylabel("optimizer state per rank (MiB)")
    ax.set_title(f"Optimizer state per rank, tiny preset ({rows[0]['params'] / 1e6:.2f}M parameters)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    rows = [r for dp in DP_SIZES for r in run(dp)]
    rows.sort(key=lambda r: (VARIANTS.index((r["weights"], r["moments"])), r["dp"]))
    print(f"tiny preset: {rows[0]['params']:,} parameters; bytes of optimizer state per rank")
    print(f"{'weights':>7} {'moments':>7} {'DP':>3} {'ZeRO-1 MiB':>11} {'AdamW MiB':>10} {'ZeRO/AdamW':>10} "
          f"{'B/param':>8}")
    for r in rows:
        r["ratio"] = r["zero_bytes"] / r["adamw_bytes"]
        print(f"{r['weights']:>7} {r['moments']:>7} {r['dp']:>3} {r['zero_bytes'] / 2**20:>11.2f} "
              f"{r['adamw_bytes'] / 2**20:>10.2f} {r['ratio']:>10.3f} {r['zero_bytes'] / r['params']:>8.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zero_memory.json").write_text(json.dumps({"preset": "tiny", "rows": rows}, indent=1) + "\n")
    plot(rows, RESULTS / "zero_memory.png")
    print(f"wrote {RESULTS / 'zero_memory.json'} and {RESULTS / 'zero_memory.png'}")


if __name__ == "__main__":
    main()
