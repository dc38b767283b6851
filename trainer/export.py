"""`hai-export`: a training checkpoint to a Hugging Face DeepseekV3 directory (config.json + safetensors).

    hai-export runs/tiny/2025-01-01_12-00-00 out/tiny-hf          # the run's latest checkpoint
    hai-export runs/tiny/.../checkpoints/step_00000300 out/tiny-hf --ema   # the EMA weights (paper 3.2.3)

The model is rebuilt from meta.json's config.model (the trainer stores RunConfig.to_dict() as meta["config"])
and written in fp32, which holds bf16 and fp32 training weights exactly. With --ema the averaged parameters
replace the trained ones; buffers (the router biases) come from the model group either way. Each rank of a
multi-rank run saved only its ZeRO-1 ranges of the EMA (trainer/ema.py); the checkpoint's index assembles every
tensor from the pieces of all ranks (trainer/checkpoint.py: load_checkpoint), so the export is the whole average.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import ConfigError
from model import Transformer
from model.config import model_config
from model.hf import save_hf
from trainer.checkpoint import META, CheckpointError, load_checkpoint, resolve_checkpoint


def export(checkpoint: Path, out_dir: Path, ema: bool = False) -> tuple[Path, int]:
    """Write the checkpoint's model (or EMA) weights to `out_dir`; returns (the checkpoint read, its step)."""
    path = resolve_checkpoint(checkpoint)
    tensors, meta = load_checkpoint(path, groups=("model",))
    saved = (meta.get("config") or {}).get("model")
    if saved is None:
        raise CheckpointError(f"{path / META}: no config.model, so the model cannot be rebuilt; export a "
                              "checkpoint written by hai-train")
    model = Transformer(model_config(saved))  # fp32, whatever the training dtype was
    state = tensors["model"]
    if ema:
        if "ema" not in meta["tensors"]:
            raise CheckpointError(f"{path}: no EMA weights in this checkpoint; train with trainer.ema_decay "
                                  "(e.g. 0.999) or export without --ema")
        averaged = load_checkpoint(path, groups=("ema",))[0]["ema"]
        extra = sorted(set(averaged) - set(state))
        missing = sorted({n for n, _ in model.named_parameters()} - set(averaged))
        if extra or missing:
            raise CheckpointError(f"{path}: the EMA tensors do not fit the model: unexpected {extra[:10]}, "
                                  f"missing {missing[:10]}; the checkpoint is damaged or was not written by "
                                  "hai-train, export without --ema")
        state = {**state, **averaged}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the model tensors do not fit config.model of meta.json "
                              f"({' '.join(str(err).split())[:300]})") from err
    save_hf(model, out_dir)
    return path, meta["step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hai-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step_* directory or a run directory (latest)")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    args = parser.parse_args(argv)
    try:
        path, step = export(args.checkpoint, args.out_dir, ema=args.ema)
    except (CheckpointError, ConfigError, OSError) as err:
        print(f"hai-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {'EMA' if args.ema else 'model'} weights of {path} (step {step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
