"""The paper's training schedules (section 4.2) as configs/optim/deepseek_v3.yaml gives them, over 14.8T tokens.

Walks the run step by step the way the trainer does: each step's batch size comes from `batch_size_at` at the
tokens consumed so far, and adds batch x 4096 tokens, so the steps axis of the learning rate follows the
batch-size ramp. Plots learning rate (against tokens and steps, and the warm-up), batch size, MTP lambda and the
bias update speed gamma into bench/results/schedules.png, and prints their values at the phase boundaries.

    python -m bench.schedules
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from core.config import from_dict  # noqa: E402
from optim.config import OptimConfig  # noqa: E402
from optim.schedules import batch_size_at, bias_gamma_at, lr_at, mtp_lambda_at  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "schedules.png"
TOTAL_TOKENS = 14.8e12
SEQ_LEN = 4096
GLOBAL_BATCH = 15360  # trainer.global_batch_size, sequences per step after the ramp
GRANULARITY = 1 * 128  # micro_batch_size x data-parallel size: the ramp adds whole micro-batches


def simulate(cfg: OptimConfig) -> dict[str, list[float]]:
    """Per optimizer step: tokens consumed before it, its batch size, lr, MTP lambda and bias gamma."""
    run: dict[str, list[float]] = {"tokens": [], "batch": [], "lr": [], "lambda": [], "gamma": []}
    step, tokens = 0, 0.0
    while tokens < TOTAL_TOKENS:
        batch = batch_size_at(cfg, tokens, GLOBAL_BATCH, GRANULARITY)
        for key, value in (("tokens", tokens), ("batch", batch), ("lr", lr_at(cfg, step, tokens)),
                           ("lambda", mtp_lambda_at(cfg, tokens)), ("gamma", bias_gamma_at(cfg, tokens))):
            run[key].append(value)
        step += 1
        tokens += batch * SEQ_LEN
    return run


def boundaries(cfg: OptimConfig) -> dict[float, str]:
    """Token counts where a schedule changes phase -> their names (coinciding boundaries share a row)."""
    decay_end = cfg.constant_tokens + cfg.decay_tokens
    named = [(0.0, "start"), (cfg.batch_ramp_tokens, "batch ramp end"), (cfg.constant_tokens, "cosine start"),
             (cfg.mtp_lambda_switch_tokens, "MTP lambda switch"),
             (cfg.constant_tokens + cfg.decay_tokens / 2, "cosine midpoint"), (decay_end, "cosine end, tail 1"),
             (cfg.bias_gamma_stop_tokens, "bias gamma stop"), (decay_end + cfg.tail_tokens[0], "tail 2"),
             (TOTAL_TOKENS, "end of training")]
    out: dict[float, str] = {}
    for tokens, label in sorted(named, key=lambda x: x[0]):
        out[tokens] = f"{out[tokens]}, {label}" if tokens in out else label
    return out


def table(cfg: OptimConfig, run: dict[str, list[float]]) -> str:
    """Values at the first step that starts at or after each boundary, at the last warm-up step and the last step."""
    def row(label: str, i: int) -> str:
        return (f"{label:<36} {run['tokens'][i] / 1e12:>8.4f} {i:>7d} {run['batch'][i]:>6.0f} {run['lr'][i]:>9.3g} "
                f"{run['lambda'][i]:>6g} {run['gamma'][i]:>6g}")

    n = len(run["tokens"])
    first = {tokens: next((i for i, t in enumerate(run["tokens"]) if t >= tokens), n) for tokens in boundaries(cfg)}
    first[run["tokens"][cfg.warmup_steps - 1]] = cfg.warmup_steps - 1
    labels = {**boundaries(cfg), run["tokens"][cfg.warmup_steps - 1]: "last warm-up step"}
    rows = [f"{'boundary':<36} {'tokens/T':>8} {'step':>7} {'batch':>6} {'lr':>9} {'lambda':>6} {'gamma':>6}"]
    for tokens in sorted(labels):
        rows.append(row(labels[tokens], first[tokens]) if first[tokens] < n else row("last step", n - 1))
    end = run["tokens"][-1] + run["batch"][-1] * SEQ_LEN
    rows.append(f"{n} optimizer steps, {end / 1e12:.4f}T tokens ({SEQ_LEN} tokens per sequence, final batch "
                f"{GLOBAL_BATCH}, granularity {GRANULARITY})")
    return "\n".join(rows)


def plot(cfg: OptimConfig, run: dict[str, list[float]], path: Path) -> None:
    tera = [t / 1e12 for t in run["tokens"]]
    steps = range(len(tera))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    ax = axes[0, 0]
    ax.plot(tera, run["lr"])
    decay_end = cfg.constant_tokens + cfg.decay_tokens
    for tokens in (cfg.constant_tokens, decay_end, decay_end + cfg.tail_tokens[0]):
        ax.axvline(tokens / 1e12, color="grey", lw=0.6, ls=":")
    ax.set(title="learning rate vs tokens", xlabel="tokens (T)", ylabel="lr")
    ax = axes[0, 1]
    ax.plot([s / 1e3 for s in steps], run["lr"])
    ax.set(title=f"learning rate vs steps, log scale ({len(tera) / 1e3:.0f}K steps)", xlabel="optimizer step (K)",
           ylabel="lr", yscale="log", ylim=(1e-6, 5e-4))
    ax = axes[0, 2]
    warm = min(len(tera), 2 * cfg.warmup_steps)
    ax.plot(steps[:warm], run["lr"][:warm])
    ax.axvline(cfg.warmup_steps, color="grey", lw=0.6, ls=":")
    ax.set(title=f"warm-up: {cfg.warmup_steps} steps (~{run['tokens'][cfg.warmup_steps] / 1e9:.0f}B tokens)",
           xlabel="optimizer step", ylabel="lr")
    ax = axes[1, 0]
    ramp = sum(t < 2 * cfg.batch_ramp_tokens for t in run["tokens"])
    ax.plot([t * 1e3 for t in tera[:ramp]], run["batch"][:ramp])
    ax.axvline(cfg.batch_ramp_tokens / 1e9, color="grey", lw=0.6, ls=":")
    ax.set(title=f"batch size (multiples of {GRANULARITY})", xlabel="tokens (B)", ylabel="sequences per step")
    ax = axes[1, 1]
    ax.plot(tera, run["lambda"])
    ax.set(title="MTP loss weight lambda", xlabel="tokens (T)", ylim=(0, 0.35))
    ax = axes[1, 2]
    ax.plot(tera, run["gamma"])
    ax.set(title="bias update speed gamma", xlabel="tokens (T)", ylim=(0, 1.2e-3))
    fig.suptitle("DeepSeek-V3 schedules (paper 4.2), configs/optim/deepseek_v3.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    values = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "optim" / "deepseek_v3.yaml"))
    cfg = from_dict(OptimConfig, values, prefix="optim").validate()
    run = simulate(cfg)
    print(table(cfg, run))
    plot(cfg, run, RESULTS)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
