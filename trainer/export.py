"""`hai-export`: a training checkpoint to a Hugging Face DeepseekV3 directory (config.json + safetensors).

    hai-export runs/tiny/2025-01-01_12-00-00 out/tiny-hf          # the run's latest checkpoint
    hai-export runs/tiny/.../checkpoints/step_00000300 out/tiny-hf --ema   # the EMA weights (paper 3.2.3)
    hai-export runs/tiny/2025-01-01_12-00-00 out/tiny-fp8 --fp8   # DeepSeek's released FP8 form (trainer/hf.py)

The model's shapes come from meta.json's config.model (the trainer stores RunConfig.to_dict() as meta["config"]);
the weights are written in fp32, which holds bf16 and fp32 training weights exactly (with --fp8: the release's
FP8 weights with their block scales, the rest bf16, the router bias fp32). With --ema the averaged parameters
replace the trained ones; buffers (the router biases) come from the model group either way. Each rank of a
multi-rank run saved only its ZeRO-1 ranges (trainer/ema.py); the checkpoint's index assembles every tensor from
the pieces of all ranks (trainer/checkpoint.py: CheckpointReader). The export streams: it reads one tensor (one
expert) at a time and holds at most one output shard, so its memory does not grow with the model.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from core.config import ConfigError
from model import Transformer
from model.config import model_config
from trainer.checkpoint import META, CheckpointError, CheckpointReader
from trainer.hf import write_hf


def export(checkpoint: Path, out_dir: Path, ema: bool = False, fp8: bool = False) -> tuple[Path, int]:
    """Write the checkpoint's model (or EMA) weights to `out_dir`; returns (the checkpoint read, its step)."""
    reader = CheckpointReader(checkpoint)
    path, meta = reader.path, reader.meta
    saved = (meta.get("config") or {}).get("model")
    if saved is None:
        raise CheckpointError(f"{path / META}: no config.model, so the model cannot be rebuilt; export a "
                              "checkpoint written by hai-train")
    cfg = model_config(saved)
    with torch.device("meta"):
        whole = Transformer(cfg)
    shapes = {name: tuple(t.shape) for name, t in whole.state_dict().items()}
    params = {name for name, _ in whole.named_parameters()}
    group_of = dict.fromkeys(shapes, "model")
    if ema:
        if "ema" not in reader.groups:
            raise CheckpointError(f"{path}: no EMA weights in this checkpoint; train with trainer.ema_decay "
                                  "(e.g. 0.999) or export without --ema")
        averaged = set(reader.names("ema"))
        extra, missing = sorted(averaged - set(shapes)), sorted(params - averaged)
        if extra or missing:
            raise CheckpointError(f"{path}: the EMA tensors do not fit the model: unexpected {extra[:10]}, "
                                  f"missing {missing[:10]}; the checkpoint is damaged or was not written by "
                                  "hai-train, export without --ema")
        group_of.update(dict.fromkeys(averaged, "ema"))
    have = set(reader.names("model"))
    wrong = sorted(set(shapes) ^ have) + [n for n in sorted(have & set(shapes)) if reader.shape("model", n)
                                          != shapes[n]]
    if wrong:
        raise CheckpointError(f"{path}: the model tensors do not fit config.model of meta.json ({wrong[:10]})")

    def tensor(name: str, expert: int | None) -> torch.Tensor:
        group, shape = group_of[name], shapes[name]
        if expert is None:
            return reader.tensor(group, name).float()
        per = math.prod(shape[1:])
        return reader.read(group, name, expert * per, (expert + 1) * per).view(shape[1:]).float()

    write_hf(out_dir, cfg, tensor, torch.float32, fp8=fp8)
    return path, meta["step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hai-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step_* directory or a run directory (latest)")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    parser.add_argument("--fp8", action="store_true",
                        help="write DeepSeek's released FP8 form (128x128 block scales) instead of fp32")
    args = parser.parse_args(argv)
    try:
        path, step = export(args.checkpoint, args.out_dir, ema=args.ema, fp8=args.fp8)
    except (CheckpointError, ConfigError, OSError) as err:
        print(f"hai-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {'EMA' if args.ema else 'model'} weights of {path} (step {step})"
          f"{' in the FP8 release form' if args.fp8 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
