"""`hai-plan`: what a config costs before anything runs. Today: parameter counts (paper 2.1: 671B total,
37B activated per token, plus the MTP module), per component, built on the meta device (no memory).

    hai-plan model=deepseek_v3_671b
    hai-plan model=tiny model.n_layers=8
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model import ConfigError, ModelConfig, Transformer, count_params
from model.config import model_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(overrides: list[str]) -> ModelConfig:
    """Compose configs/config.yaml with Hydra overrides and validate the model group."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    return model_config(OmegaConf.to_container(cfg.model, resolve=True))


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra's override and missing-config errors
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
