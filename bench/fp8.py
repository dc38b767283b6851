"""FP8 training against BF16/FP32 training (paper 3.3: relative loss error below 0.25%), and what the FP8 input cache
saves.

1. Loss curves: the tiny preset on the default corpus, one process, the same seed and data, with `fp8=off` and
   `fp8=emulate` (the paper's recipe with the exact reference GEMM of fp8/gemm.py; FP8 dispatch does not apply to
   one process). Both runs use bf16 AdamW moments, so the FP8 GEMMs are the only difference. Reported: the relative
   gap of the training loss (the objective: next-token + MTP term) averaged over the last 10% of the steps,
   (fp8 - off) / off, and a PNG of both curves.
2. Activation memory per layer: the bytes autograd keeps for backward while one MoE block runs forward in bf16
   (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, the parameters themselves excluded),
   with and without the recipe; the FP8 weight copies a recipe keeps are listed apart.

    python -m bench.fp8 [--steps 200]   # prints a table, writes bench/results/fp8.json and fp8_loss.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _train(recipe: str, steps: int, run_dir: Path) -> list[float]:
    from trainer.config import load_config
    from trainer.train import train

    overrides = [f"fp8={recipe}", f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                 "optim.moment_dtype=bf16", f"trainer.run_dir={run_dir}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = load_config(compose("config", overrides=overrides))
    train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _saved_bytes(recipe: str) -> dict[str, int]:
    """Bytes saved for backward by one forward of a MoE block in bf16: activations, and FP8 weight copies."""
    from fp8.config import FP8Config
    from fp8.recipe import apply_fp8
    from model import Transformer
    from model.presets import load

    torch.manual_seed(0)
    cfg = load("tiny")
    model = Transformer(cfg).to(torch.bfloat16)
    apply_fp8(model, FP8Config(recipe=recipe))
    block = model.layers[str(cfg.first_k_dense)]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, torch.dtype, tuple]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
        return t

    x = torch.randn(8, 256, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = model.rope_cos[:256], model.rope_sin[:256]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    weight_shapes = {tuple(p.shape[-2:]) for p in block.parameters()}  # an expert's weight: its [out, in]
    fp8_weights = sum(n for n, dtype, shape in seen.values() if dtype == torch.float8_e4m3fn and shape in weight_shapes)
    return {"saved_bytes": sum(n for n, _, _ in seen.values()), "fp8_weight_copy_bytes": fp8_weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in ("off", "emulate"):
            curves[recipe] = _train(recipe, args.steps, Path(tmp) / recipe)
    tail = max(1, len(curves["off"]) // 10)
    off, fp8 = (sum(curves[r][-tail:]) / tail for r in ("off", "emulate"))
    gap = (fp8 - off) / off
    memory = {recipe: _saved_bytes(recipe) for recipe in ("off", "emulate")}
    print(f"tiny preset, {args.steps} steps, same seed and data; mean training loss (next-token + MTP objective) "
          f"over the last {tail} steps")
    print(f"  fp8=off {off:.4f}   fp8=emulate {fp8:.4f}   relative gap {gap:+.3%} (paper: below 0.25%)")
    a, b = memory["off"]["saved_bytes"], memory["emulate"]["saved_bytes"]
    print(f"saved for backward by one MoE block (bf16, 8 x 256 tokens): off {a / 2**20:.2f} MiB, emulate "
          f"{b / 2**20:.2f} MiB ({b / a:.2f}x; of which FP8 weight copies "
          f"{memory['emulate']['fp8_weight_copy_bytes'] / 2**20:.2f} MiB)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for recipe, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), ys, label=f"fp8={recipe}", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"tiny preset: FP8 (emulated) vs off, relative gap {gap:+.3%} over the last 10%")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "fp8_loss.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    (RESULTS / "fp8.json").write_text(json.dumps({"steps": args.steps, "curves": curves, "tail_steps": tail,
                                                  "tail_loss": {"off": off, "emulate": fp8}, "relative_gap": gap,
                                                  "memory": memory}, indent=1))
    print(f"wrote {RESULTS / 'fp8.json'} and fp8_loss.png")


if __name__ == "__main__":
    main()
