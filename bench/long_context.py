"""The long-context extension at the main job's scale (paper 4.3 in miniature; configs/experiment/tiny_ext.yaml).

The tiny model is trained at 256 tokens (the main job, STAGE1_STEPS steps), then evaluated on held-out sequences of
1024 tokens, loss per 1/8 of the positions (trainer.eval_position_buckets), three ways: (a) as trained, without
YaRN (RoPE beyond the trained length); (b) with YaRN switched on (factor 4 over 256, the paper's alpha, beta and
sqrt(t) rule), no training; (c) after the short YaRN stage (`experiment=tiny_ext`, started with
`trainer.init_from` from the stage-1 run). The paper's claim in miniature: after the stage the loss beyond
position 256 is no worse than within the first 256, and clearly better than without YaRN.

    python -m bench.long_context   # prints the table, writes bench/results/long_context.{json,png}
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STAGE1_STEPS = 200
BUCKETS = 8
EVAL = ["trainer.eval_batches=8", f"trainer.eval_position_buckets={BUCKETS}", "logging.plot=false"]


def _validation(overrides: list[str], init_from: Path) -> list[float]:
    """The per-position validation loss of the weights of `init_from` under the config of `overrides`."""
    from parallel.grid import ProcessGrid
    from trainer.config import compose_config, load_config
    from trainer.train import build, validation

    cfg = load_config(compose_config([*overrides, *EVAL, f"trainer.init_from={init_from}"]), 1)
    grid = ProcessGrid.build(cfg.parallel, "cpu")
    run = build(cfg, grid, init_from=str(init_from))
    valid = run.data.valid_batches(cfg.trainer.eval_batches, cfg.trainer.micro_batch_size)
    return validation(grid, run.pipeline, valid, BUCKETS)["val_loss_by_position"]


def main() -> None:
    from trainer.config import compose_config, load_config
    from trainer.train import train

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="long_context_"))
    cache = [f"data.cache_dir={work / 'cache'}"]
    stage1, stage2 = work / "tiny", work / "tiny_ext"
    train(load_config(compose_config(["experiment=tiny", f"trainer.max_steps={STAGE1_STEPS}", "logging.plot=false",
                                      f"trainer.run_dir={stage1}", *cache]), 1), stage1)
    ext = ["experiment=tiny_ext", *cache]
    rows = {"no YaRN": _validation([*ext, "model.yarn=null"], stage1),
            "YaRN, no training": _validation(ext, stage1)}
    train(load_config(compose_config([*ext, f"trainer.init_from={stage1}", f"trainer.run_dir={stage2}",
                                      "logging.plot=false"]), 1), stage2)
    rows["after the YaRN stage"] = _validation(ext, stage2)
    seq = 1024
    edges = [round(seq * b / BUCKETS) for b in range(BUCKETS + 1)]
    print(f"validation loss at {seq} tokens per position range (tiny trained at 256 for {STAGE1_STEPS} steps; "
          "the YaRN stage: 40 steps of 4 x 1024)")
    print(f"{'':22}" + "".join(f"{f'{a}-{b - 1}':>10}" for a, b in zip(edges, edges[1:])) + f"{'>=256 mean':>12}")
    beyond = {}
    for name, losses in rows.items():
        beyond[name] = sum(loss for loss, a in zip(losses, edges) if a >= 256) / sum(a >= 256 for a in edges[:-1])
        print(f"{name:22}" + "".join(f"{x:>10.3f}" for x in losses) + f"{beyond[name]:>12.3f}")
    result = {"edges": edges, "losses": rows, "beyond_256": beyond, "stage1_steps": STAGE1_STEPS}
    (RESULTS / "long_context.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in rows.items():
        ax.plot(mids, losses, marker="o", label=name)
    ax.axvline(256, color="grey", linestyle=":", label="trained length")
    ax.set_xlabel("position")
    ax.set_ylabel("validation loss")
    ax.set_title("tiny: 256 -> 1024 tokens (paper 4.3 in miniature)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "long_context.png", dpi=120)


if __name__ == "__main__":
    main()
