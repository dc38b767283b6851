"""`trainer.init_from`: a run that starts from another run's weights, or from released ones (paper 4.3: each
long-context stage continues from the previous stage's model).

Only the model's weights and router biases are taken; the optimizer, the schedules, the data position and the
step count start fresh. The source is a checkpoint directory (`checkpoints/step_*`), a run directory (its newest
complete checkpoint) or a Hugging Face DeepseekV3 directory (`hai-export`'s output, or DeepSeek's release in its
FP8 format: trainer/hf.py). Any layout reads any source: each rank reads just the tensors (and, for routed
experts, the experts) it holds.

The rule for a source is its own, not resume's `check_compatible`: the run's model must have the same tensors
with the same shapes; fields that change no tensor (model.yarn, model.max_seq_len, the balance and recompute
settings) may differ. MTP weights the source lacks are an error unless `trainer.init_missing=mtp`, which keeps
them as initialised. A run directory that already holds a checkpoint resumes from it instead (`trainer.resume=
auto` wins), so that a restarted stage continues rather than starting over.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.config import ConfigError
from parallel.grid import ProcessGrid
from trainer.checkpoint import CHECKPOINTS, META, CheckpointError, agree_on_rank0, latest_checkpoint, open_checkpoint
from trainer.hf import HFReader
from trainer.shards import Shards

INIT_MISSING = (None, "mtp")  # trainer.init_missing values


def init_source(spec: str) -> tuple[str, Path]:
    """("checkpoint", its step_* directory) or ("hf", the directory) for a `trainer.init_from` value."""
    path = Path(spec).expanduser()
    fix = ("give a checkpoint directory (checkpoints/step_*), a run directory with checkpoints, or a Hugging Face "
           "directory (config.json + *.safetensors)")
    if not path.exists():
        raise CheckpointError(f"trainer.init_from={spec}: no such file or directory; {fix}")
    if (path / META).is_file():
        return "checkpoint", path
    if (path / "config.json").is_file():
        return "hf", path
    if (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"trainer.init_from={spec}: {path / CHECKPOINTS} holds no complete checkpoint; "
                                  f"{fix}")
        return "checkpoint", found
    raise CheckpointError(f"trainer.init_from={spec}: {path} is neither a checkpoint ({META}), nor a run directory "
                          f"({CHECKPOINTS}/), nor a Hugging Face directory (config.json); {fix}")


def check_init_compatible(source: str, saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]],
                          init_missing: str | None) -> set[str]:
    """The names of `wanted` (the run's whole model: name -> shape) that keep their initialisation; raises naming
    the tensors when the source's names or shapes do not fit."""
    missing = sorted(set(wanted) - set(saved))
    mtp = [n for n in missing if n.startswith("mtp.")]
    other = [n for n in missing if not n.startswith("mtp.")]
    unexpected = sorted(set(saved) - set(wanted))
    wrong = [f"{n} {list(saved[n])} (the run's model: {list(wanted[n])})" for n in sorted(set(saved) & set(wanted))
             if tuple(saved[n]) != tuple(wanted[n])]
    if wrong:
        raise CheckpointError(f"trainer.init_from={source}: tensors of another shape: {', '.join(wrong[:8])}"
                              f"{' ...' if len(wrong) > 8 else ''} ({len(wrong)} in all); init_from keeps every "
                              "shape: the model config must match the source's in the fields that size tensors")
    if other or unexpected:
        raise CheckpointError(f"trainer.init_from={source}: the source does not hold this model's tensors (another "
                              f"architecture or model config?): missing {other[:8]}, unexpected {unexpected[:8]}")
    if mtp and init_missing != "mtp":
        raise CheckpointError(f"trainer.init_from={source}: the source has no MTP weights ({mtp[:4]} ...); set "
                              "trainer.init_missing=mtp to initialise them fresh, or model.n_mtp_depth=0")
    return set(mtp)


def _reader(spec: str, kind: str, path: Path, grid: ProcessGrid):
    if kind == "checkpoint":
        return open_checkpoint(path, grid.checkpoint_group)

    def metadata() -> dict:
        try:  # config.json and every safetensors header (no tensor yet), checked against the config
            return HFReader(path).metadata()
        except (ConfigError, KeyError, ValueError, OSError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise CheckpointError(f"trainer.init_from={spec}: {message}") from err

    # rank 0 reads the metadata and broadcasts it: every rank reading every header of a 163-shard release would be
    # a metadata storm on a shared file system at 2048 ranks
    return HFReader(path, agree_on_rank0(metadata, grid.checkpoint_group))


def load_init(spec: str, init_missing: str | None, model: nn.Module, shards: Shards, grid: ProcessGrid) -> str:
    """Copy the source's weights into this rank's part of the model (before the optimizer is built, so that its
    masters start from them); returns a line for the log. Collective over the checkpoint group."""
    kind, path = agree_on_rank0(lambda: [str(x) for x in init_source(spec)], grid.checkpoint_group)
    path = Path(path)
    reader = _reader(spec, kind, path, grid)
    saved = {name: reader.shape("model", name) for name in reader.names("model")}
    wanted = {name: tuple(shape) for name, shape in shards.global_shapes.items()}
    fresh = agree_on_rank0(lambda: sorted(check_init_compatible(spec, saved, wanted, init_missing)),
                           grid.checkpoint_group)
    shapes = {name: t.shape for name, t in model.state_dict().items() if name not in fresh}
    state = shards.read_local(reader, "model", shapes, set(saved))
    with torch.no_grad():
        own = model.state_dict()
        for name, tensor in state.items():
            own[name].copy_(tensor)  # rounds to the model's dtype once
    kept = f"; kept initialised: {len(fresh)} MTP tensors (trainer.init_missing=mtp)" if fresh else ""
    return f"initialised the weights from {path} ({'checkpoint' if kind == 'checkpoint' else 'Hugging Face'})" + kept
