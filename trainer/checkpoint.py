"""Atomic, pickle-free training checkpoints under `<run_dir>/checkpoints/`.

    checkpoints/
      step_00000100/            one complete checkpoint
        model.safetensors       one file per tensor group ("model", "optim", "ema", "rng", ...)
        optim.safetensors
        rng.safetensors
        meta.json               the caller's meta + {"format", "step", "files": {file name: bytes}}
      step_00000200/
      latest                    "step_00000200": the newest checkpoint, updated last

A checkpoint is written into `step_<8-digit step>.tmp-<pid>`, every file and the directory are fsynced, the
directory is renamed into place and only then does `latest` move (write, fsync, rename). A crash at any
point leaves the previous checkpoint readable: `latest_checkpoint` checks that the directory it returns is
complete and otherwise falls back to the newest complete one. Only safetensors and JSON are read back, so
loading a checkpoint never executes code from it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
FORMAT = 1
# memory savers (paper 3.2.3) and the expert-GEMM backend: the same weights, so a checkpoint may switch them
RUNTIME_ONLY_FIELDS = ("recompute_norm", "recompute_mla_up_proj", "expert_gemm")

_STEP_DIR = re.compile(r"step_(\d{8,})")
_WRITER_DIR = re.compile(r"step_\d{8,}\.(?:tmp|old)-(\d+)")
_GROUP = re.compile(r"[A-Za-z0-9_]+")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------------- writing


def ensure_writable(run_dir: Path) -> None:
    """Create `run_dir` if needed and prove that files can be written there, before any work starts."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CheckpointError(f"run directory {run_dir} is not writable ({err.strerror or err}); choose another "
                              "with trainer.run_dir=<path> or fix its permissions") from err


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                    keep: int) -> Path:
    """Write `tensors` (group -> name -> tensor) and `meta` as checkpoint `step`, atomically; return its path.

    Each group becomes `<group>.safetensors` (contiguous CPU copies, one group in memory at a time); `meta`
    must be JSON-serialisable and goes to meta.json with the step and the files written. Saving a step that
    exists replaces it. Afterwards only the newest `keep` complete checkpoints remain (`latest` is always one
    of them) and temporary directories of dead writers are removed.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the checkpoint just written must be kept")
    if "files" in meta or meta.get("step", step) != step:
        raise ValueError(f"meta may not hold 'files' and its 'step' must equal step={step}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {f"{group}.safetensors": _write_group(tmp, group, named) for group, named in tensors.items()}
        record = {**meta, "format": FORMAT, "step": step, "files": files}
        try:
            text = json.dumps(record, indent=1)
        except (TypeError, ValueError) as err:
            raise ValueError(f"checkpoint meta is not JSON-serialisable: {err}") from err
        _write_durable(tmp / META, text.encode())
        _fsync_dir(tmp)
        final = _move_into_place(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_durable(root / f"{LATEST}.tmp-{os.getpid()}", (name + "\n").encode())
    os.replace(root / f"{LATEST}.tmp-{os.getpid()}", root / LATEST)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _write_group(directory: Path, group: str, named: dict[str, torch.Tensor]) -> int:
    """Write one group as <group>.safetensors, fsynced; return its size in bytes."""
    if not _GROUP.fullmatch(group):
        raise ValueError(f"tensor group name {group!r}: use letters, digits and '_' (it becomes a file name)")
    # fresh contiguous CPU copies: safetensors refuses views sharing storage, and GPU tensors must come home
    copies = {n: torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()) for n, t in named.items()}
    path = directory / f"{group}.safetensors"
    save_file(copies, str(path), metadata={"format": "pt", "group": group})
    # safetensors creates files as 0600; give them the umask's mode, as the directory got, for other readers
    os.chmod(path, directory.stat().st_mode & 0o666)
    _fsync_file(path)
    return path.stat().st_size


def _move_into_place(tmp: Path, final: Path) -> Path:
    """Rename the finished directory to its final name; an existing checkpoint of that step is set aside first
    (renames of non-empty directories cannot overwrite) and removed once the new one is in place."""
    aside = None
    if final.exists():
        aside = final.with_name(f"{final.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    """Keep `latest` plus the newest complete checkpoints up to `keep`; remove leftovers of dead writers."""
    latest = _pointer_target(root)
    complete = sorted((p for p in _step_dirs(root) if _is_complete(p)), key=_step_of, reverse=True)
    kept = [latest] if latest in complete else []
    kept += [p for p in complete if p != latest][: keep - len(kept)]
    for path in complete:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        match = _WRITER_DIR.fullmatch(path.name)
        if match and path.is_dir() and not _writer_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _writer_alive(pid: int) -> bool:
    # our own pid cannot be writing (saves run one at a time): a directory with it is from an earlier process
    # that had the same pid, which happens across container restarts
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------- reading


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json of checkpoint directory `path`; CheckpointError when missing or not a checkpoint's meta."""
    meta_file = path / META
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{meta_file}: missing, so {path} is not a complete checkpoint; resume from "
                              "another step_* directory (trainer.resume=<path>) or delete this one") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_file}: unreadable ({err}); the checkpoint is damaged, resume from "
                              "another step_* directory (trainer.resume=<path>) or delete this one") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
        raise CheckpointError(f"{meta_file}: not written by save_checkpoint (no 'step' or 'files'); point "
                              "trainer.resume at a step_* directory of a run")
    return meta


def _is_complete(path: Path) -> bool:
    try:
        meta = _read_meta(path)
    except CheckpointError:
        return False
    return all(_has_size(path / name, size) for name, size in meta["files"].items())


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _pointer_target(root: Path) -> Path | None:
    """The directory named by `latest`, if the pointer is readable and names a step_* directory."""
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if _STEP_DIR.fullmatch(name) else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume `run_dir` from: the one `latest` names when it is complete, else the newest
    complete step_* directory (a crash before the pointer moved, or a damaged pointer); None if there is none."""
    root = Path(run_dir) / CHECKPOINTS
    target = _pointer_target(root)
    if target is not None and _is_complete(target):
        return target
    complete = [p for p in _step_dirs(root) if _is_complete(p)]
    return max(complete, key=_step_of) if complete else None


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory `path` means: itself if it holds meta.json, or a run directory's latest."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; give a step_* directory or a run directory")
    if (path / CHECKPOINTS).is_dir() and not (path / META).exists():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path / CHECKPOINTS}: no complete checkpoint; start without resuming "
                                  "(trainer.resume=null) or point at a step_* directory")
        return found
    if not (path / META).exists() and not _STEP_DIR.fullmatch(path.name):
        raise CheckpointError(f"{path}: neither a checkpoint (no {META}) nor a run directory (no {CHECKPOINTS}/); "
                              "give a step_* directory or a run directory")
    return path  # a step_* directory without meta.json fails in _read_meta, which says so


def load_checkpoint(path: Path, groups: Iterable[str] | None = None,
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint: (group -> name -> CPU tensor, meta.json as a dict).

    `path` is a step_* directory, or a run directory (its `latest_checkpoint` is read). `groups` limits the
    tensor groups read (e.g. ("model",) for an export); None reads all. Only safetensors and JSON are parsed,
    never pickle. A missing, truncated or corrupt file raises CheckpointError naming it.
    """
    path = resolve_checkpoint(path)
    meta = _read_meta(path)
    wanted = None if groups is None else set(groups)
    tensors = {}
    for name, size in meta["files"].items():
        group = name.removesuffix(".safetensors")
        if wanted is None or group in wanted:
            tensors[group] = _read_group(path / name, size)
    missing = sorted((wanted or set()) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: no tensor group(s) {missing}; it holds {sorted(meta['files'])}")
    return tensors, meta


def _read_group(file: Path, size: int) -> dict[str, torch.Tensor]:
    fix = "the checkpoint is damaged; resume from another step_* directory (trainer.resume=<path>) or delete it"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {fix}")
    if file.stat().st_size != size:
        raise CheckpointError(f"{file}: {file.stat().st_size} bytes, meta.json recorded {size} (truncated?); {fix}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err}); {fix}") from err


# ---------------------------------------------------------------------------------------------- compatibility


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    # a JSON round trip makes tuples lists and keys strings on both sides, as they are in meta.json
    saved, current = (_flatten(json.loads(json.dumps(d))) for d in (saved, current))
    missing = "<absent>"
    return [f"{key}: checkpoint {saved.get(key, missing)!r}, now {current.get(key, missing)!r}"
            for key in sorted(set(saved) | set(current))
            if key not in ignore and saved.get(key, missing) != current.get(key, missing)]


def check_compatible(meta: dict, model_config: dict, layout: dict | None) -> None:
    """Raise CheckpointError unless the checkpoint was written by the same model and parallel layout.

    `model_config` is ModelConfig.to_dict(); every field counts except RUNTIME_ONLY_FIELDS, which change
    memory or speed but not the weights. `layout` is the process grid's degrees, e.g. {"pp": 1, "ep": 1,
    "dp": 1}, or None when the checkpoint is layout-independent (full tensors, loadable into any layout).
    The checkpoint's values come from meta["config"]["model"] and meta["layout"].
    """
    fix = "start a new trainer.run_dir, or set trainer.resume=null to train from scratch"
    saved_model = (meta.get("config") or {}).get("model")
    if saved_model is None:
        raise CheckpointError(f"checkpoint of step {meta.get('step')}: meta.json has no config.model, so it cannot "
                              f"be checked against this run; {fix}")
    diffs = _differences(saved_model, model_config, RUNTIME_ONLY_FIELDS)
    if diffs:
        raise CheckpointError("the checkpoint was written by another model: model." + "; model.".join(diffs)
                              + f". Resume with the checkpoint's model config, or {fix}")
    diffs = [] if layout is None else _differences(meta.get("layout") or {}, layout)
    if diffs:
        raise CheckpointError("the checkpoint was written by another parallel layout: " + "; ".join(diffs)
                              + f". Resume with the checkpoint's layout, or {fix}")


# ------------------------------------------------------------------------------------------------------ rng


def rng_state() -> dict[str, torch.Tensor]:
    """Every random generator the run draws from, as tensors (no pickle): torch CPU, each CUDA device, and
    Python's `random` (numpy's global generator is unused: the data pipeline keys its own generators)."""
    version, words, gauss = random.getstate()
    state = {"torch_cpu": torch.get_rng_state(),
             "python_random": torch.tensor([version, *words], dtype=torch.int64),
             "python_random_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64)}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = cuda_state
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore generators saved by `rng_state`. CUDA states are restored on the devices present (a CPU run
    ignores them)."""
    if "torch_cpu" not in state:
        raise CheckpointError(f"rng group has no torch_cpu state (keys {sorted(state)}); the checkpoint was not "
                              "written by this trainer, resume with trainer.resume=null")
    torch.set_rng_state(state["torch_cpu"])
    if "python_random" in state:
        version, *words = state["python_random"].tolist()
        gauss = state["python_random_gauss"].item()
        random.setstate((version, tuple(words), None if gauss != gauss else gauss))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in state:
                torch.cuda.set_rng_state(state[f"torch_cuda_{i}"], i)
