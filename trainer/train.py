"""The main job, single process: train a model preset on real text that every machine has.

Until the data pipeline lands (tokenizer, packed token files, FIM), the text is the Python standard
library's source read as bytes (token id = byte value, inside the preset's vocabulary), so nothing is
downloaded. The step is the paper's: next-token + MTP loss (lambda 0.3), AdamW (0.9, 0.95, wd 0.1),
clipping at 1.0, then the aux-loss-free bias update from the step's expert loads (paper 2.1.2).

    python -m trainer.train trainer.steps=200 model=tiny
"""

from __future__ import annotations

import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model import ModelConfig, Transformer
from model.config import from_dict, model_config
from model.moe import Gate, update_bias

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainerConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 2e-3  # peak learning rate (linear warm-up, then cosine to 10%)
    warmup: int = 20  # warm-up steps
    mtp_lambda: float = 0.3  # MTP loss weight (paper 4.2)
    bias_gamma: float = 1e-2  # aux-loss-free bias update speed
    log_every: int = 10  # steps between log lines
    seed: int = 0
    text_bytes: int = 4_000_000  # how much standard-library source to read


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first `limit` bytes of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def lr_at(step: int, cfg: TrainerConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model_cfg: ModelConfig, cfg: TrainerConfig) -> list[float]:
    torch.manual_seed(cfg.seed)
    data = stdlib_bytes(cfg.text_bytes)
    n_val = len(data) // 20
    train_data = data[:-n_val]
    model = Transformer(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        starts = torch.randint(0, len(train_data) - cfg.seq_len - 1, (cfg.batch_size,))
        window = torch.stack([train_data[s:s + cfg.seq_len + 1] for s in starts])
        out = model.loss(window[:, :-1], window[:, 1:], mtp_lambda=cfg.mtp_lambda)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.step()
        max_vio = 0.0
        with torch.no_grad():
            for gate in gates:
                load = gate.tokens_per_expert
                max_vio = max(max_vio, float(load.max() / load.mean() - 1))
                if model_cfg.balance == "aux_free":
                    gate.bias.copy_(update_bias(gate.bias, load, cfg.bias_gamma))
                load.zero_()
        losses.append(out.main.item())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            mtp = f" mtp {out.mtp[0].item():.3f}" if out.mtp else ""
            print(f"step {step:4d}  loss {out.main.item():.3f}{mtp}  grad_norm {grad_norm:.2f}  "
                  f"max_vio {max_vio:.2f}  lr {lr_at(step, cfg):.2e}  {time.perf_counter() - t0:.0f}s", flush=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    model_cfg = model_config(OmegaConf.to_container(cfg.model, resolve=True))
    trainer_cfg = from_dict(TrainerConfig, OmegaConf.to_container(cfg.trainer, resolve=True), prefix="trainer")
    losses = train(model_cfg, trainer_cfg)
    k = max(1, len(losses) // 10)
    print(f"mean loss, first {k} steps: {sum(losses[:k]) / k:.3f}; last {k} steps: {sum(losses[-k:]) / k:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
