"""Atomic, pickle-free, sharded training checkpoints under `<run_dir>/checkpoints/`, written by every rank.

    checkpoints/
      step_00000100/              one complete checkpoint
        rank_00000.safetensors    the pieces rank 0 owns, of every tensor group ("model", "optim", "ema", "rng")
        rank_00001.safetensors    ... one file per rank, all written at the same time
        meta.json                 the caller's meta + {"format", "step", "files": {name: bytes}, "tensors": index}
      step_00000200/
      latest                      "step_00000200": the newest checkpoint, updated last

Layout independence. Every tensor is stored under its global name and shape, as the single-process model
holds it (all routed experts, the whole optimizer state), cut into pieces: a piece is a contiguous range
[start, end) of the tensor flattened in row-major order, held by one rank. A ZeRO-1 shard is such a range of
each parameter it touches, and an expert-parallel rank's block of experts is one too (experts are dim 0), so
every rank writes exactly what it holds and nothing is gathered. meta.json indexes every piece (file, key,
range); a reader of any layout reads the ranges it needs, partially, from the files that hold them
(`CheckpointReader.read`). The pieces of a tensor must cover it exactly once: the save checks that before it
commits, so a checkpoint with a hole or an overlap is never published.

Why not torch.distributed.checkpoint: its metadata file is a pickle (we never unpickle what we load), and
ZeRO-1's flat shards, which cut across parameter boundaries at arbitrary offsets, are not DTensor placements.
The format here is safetensors (a field library) plus a JSON index.

Atomicity (all ranks must see `run_dir`, as on a cluster's shared file system): rank 0 creates
`step_<8-digit step>.tmp-<pid>`; every rank writes and fsyncs its file there, with its piece index in the file's
safetensors header; rank 0 reads the indexes back from the files, checks the coverage, writes meta.json, renames
the directory into place and only then moves `latest` (write, fsync, rename). A crash or an error on any rank at
any point leaves the previous checkpoint readable and raises on every rank; `latest_checkpoint` checks that the
directory it returns is complete and otherwise falls back to the newest complete one. Only safetensors and JSON
are read back, so loading never executes code.

At scale (2048 ranks). Ranks agree through byte broadcasts and fixed-size all-reduces on one process group (the
grid's checkpoint group, with the long parallel.checkpoint_timeout_s), never by gathering Python objects: a save
gathers nothing in memory, and a load (`open_checkpoint`) has rank 0 alone read and check the index and every
file's size, then broadcast it, so any other rank opens only the files holding the ranges it reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
INDEX_KEY = "hai_index"  # the safetensors header entry holding its file's piece index
FORMAT = 2
# memory savers (paper 3.2.3) and the expert-GEMM backend: the same weights, so a checkpoint may switch them
RUNTIME_ONLY_FIELDS = ("recompute_norm", "recompute_mla_up_proj", "expert_gemm", "force_balance")

_STEP_DIR = re.compile(r"step_(\d{8,})")
_WRITER_DIR = re.compile(r"step_\d{8,}\.(?:tmp|old)-(\d+)")
_GROUP = re.compile(r"[A-Za-z0-9_]+")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names the file and the fix."""


@dataclass(frozen=True)
class Shard:
    """Elements [start, start + data.numel()) of a tensor of `shape`, flattened in row-major order: the part of
    a global tensor one rank writes. A plain tensor passed to `save_checkpoint` is the whole of itself."""

    data: torch.Tensor
    shape: tuple[int, ...]
    start: int = 0

    @staticmethod
    def whole(tensor: torch.Tensor) -> Shard:
        return Shard(tensor, tuple(tensor.shape), 0)

    @property
    def end(self) -> int:
        return self.start + self.data.numel()


# ---------------------------------------------------------------------------------------------- coordination
# (a `group` below spans every rank; None is the default group)


def _world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def _device(group: dist.ProcessGroup | None) -> torch.device:
    """Where coordination tensors live: the host, unless the group is NCCL alone (the grid's groups carry gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_bytes(data: bytes | None, src: int, group: dist.ProcessGroup | None) -> bytes:
    """`data` of rank `src` (group rank) on every rank: its length, then the bytes, as two tensor broadcasts."""
    device = _device(group)
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, group=group, group_src=src)
    if data is not None:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, group=group, group_src=src)
    return buffer.cpu().numpy().tobytes()


def _failure(err: BaseException, where: str = "") -> dict[str, str]:
    """An exception as it travels between ranks: its kind (ValueError for a wrong argument, CheckpointError for
    anything else) and its message, which names the cause of an unexpected error."""
    kind = "ValueError" if isinstance(err, ValueError) and not isinstance(err, CheckpointError) else "CheckpointError"
    text = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
    return {"kind": kind, "message": where + text}


def _raise(failure: dict[str, str], cause: BaseException | None) -> NoReturn:
    """Raise a travelling error: a ValueError or CheckpointError with its message; on a rank whose own `cause`
    was unexpected (neither a ValueError nor an OSError), that exception itself, with its traceback."""
    if cause is not None and not isinstance(cause, (ValueError, OSError)):
        raise cause
    raise (ValueError if failure["kind"] == "ValueError" else CheckpointError)(failure["message"]) from cause


def agree_on_rank0(compute: Callable[[], Any], group: dist.ProcessGroup | None = None) -> Any:
    """Collective: run `compute` on rank 0 alone and return its JSON-serialisable result on every rank. An
    exception there is raised on every rank with the same type and message (ValueError, or CheckpointError for
    the rest; `_raise`), so that no rank waits out the timeout for a result that never comes."""
    world, rank = _world(group)
    outcome, cause = None, None
    if rank == 0:
        try:
            outcome = {"ok": compute()}
        except Exception as err:  # any error: the other ranks are waiting for this outcome
            outcome, cause = _failure(err), err
    if world > 1:
        payload = _broadcast_bytes(json.dumps(outcome).encode() if rank == 0 else None, 0, group)
        outcome = outcome if rank == 0 else json.loads(payload)
    if "ok" in outcome:
        return outcome["ok"]
    _raise(outcome, cause)


def raise_if_any_failed(error: BaseException | None, group: dist.ProcessGroup | None = None,
                        where: str = "") -> None:
    """Collective: when any rank passes an `error`, raise on every rank the error of the lowest such rank (its
    type, `where` + its message, and how many ranks failed); return when none did. Who failed travels as a
    fixed-size all-reduce, the message as one broadcast from that rank."""
    world, rank = _world(group)
    if world == 1:
        if error is not None and not where:
            raise error  # nothing to add: the error itself, as it was raised
        if error is not None:
            _raise(_failure(error, where), error)
        return
    failed = torch.zeros(world, dtype=torch.int32, device=_device(group))
    failed[rank] = int(error is not None)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    ranks = failed.nonzero().flatten().tolist()
    if not ranks:
        return
    mine = json.dumps(_failure(error, where)).encode() if rank == ranks[0] else None
    failure = json.loads(_broadcast_bytes(mine, ranks[0], group))
    if len(ranks) > 1:
        shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
        failure["message"] += f" ({len(ranks)} ranks failed: {shown})"
    _raise(failure, error)


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


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor | Shard]], meta: dict,
                    keep: int, group: dist.ProcessGroup | None = None) -> Path:
    """Write checkpoint `step` from every rank's pieces, atomically; return its path. Collective: with
    torch.distributed initialised, every rank of `group` (all ranks; None: the default group) calls it with its
    own `tensors`; rank 0's `meta` is written.

    `tensors` is group -> global name -> a `Shard` this rank writes (or a whole tensor). Across ranks the pieces
    of each name must agree on shape and dtype and cover it exactly once; otherwise nothing is published and
    every rank raises. `meta` must be JSON-serialisable; it goes to meta.json with the step, the files and the
    index. Saving a step that exists replaces it. Afterwards only the newest `keep` complete checkpoints remain
    (`latest` is always one of them) and temporary directories of dead writers are removed.

    Each rank writes its piece index into its own file's header; rank 0 assembles meta.json from the files (a
    header and a size per rank), so nothing of every rank is gathered in memory.
    """
    world, rank = _world(group)
    root = Path(run_dir) / CHECKPOINTS
    name = f"step_{step:08d}"
    tmp = Path(agree_on_rank0(lambda: str(_prepare(root, name, step, meta, keep)), group))
    error = None
    try:
        _write_pieces(tmp, _rank_file(rank), tensors)
    except Exception as err:  # reported to every rank below
        error = err
    try:
        raise_if_any_failed(error, group, where=f"rank {rank}: ")
    except Exception as err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(root.parent)
        raise CheckpointError(f"checkpoint step {step} was not saved ({err}); {root / LATEST} still names "
                              f"{kept.name if kept else 'no checkpoint'}, the last complete one: free the disk (or "
                              "fix the cause) and resume with trainer.resume=auto") from err
    return Path(agree_on_rank0(lambda: str(_publish(tmp, root / name, step, meta, world, keep)), group))


def _prepare(root: Path, name: str, step: int, meta: dict, keep: int) -> Path:
    """Rank 0: check the arguments and create the empty temporary directory every rank writes into."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the checkpoint just written must be kept")
    if "files" in meta or "tensors" in meta or meta.get("step", step) != step:
        raise ValueError(f"meta may not hold 'files' or 'tensors' and its 'step' must equal step={step}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint meta is not JSON-serialisable: {err}") from err
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, step: int, meta: dict, world: int, keep: int) -> Path:
    """Rank 0, once every rank wrote its file: merge the indexes in the files' headers, check the coverage, write
    meta.json, rename the directory into place, move `latest`, prune. On an error the temporary is removed."""
    root = final.parent
    try:
        files, digests, indexes = {}, {}, []
        for rank in range(world):
            path = tmp / _rank_file(rank)
            files[path.name] = path.stat().st_size
            indexes.append(_read_index(path))
            sidecar = tmp / (path.name + DIGEST)
            digests[path.name] = sidecar.read_text().strip()
            sidecar.unlink()
        record = {**meta, "format": FORMAT, "step": step, "files": files, "checksums": digests,
                  "tensors": _merge_indexes(indexes)}
        _write_durable(tmp / META, json.dumps(record, indent=1).encode())
        _fsync_dir(tmp)
        final = _move_into_place(tmp, final)
        _write_durable(root / f"{LATEST}.tmp-{os.getpid()}", (final.name + "\n").encode())
        os.replace(root / f"{LATEST}.tmp-{os.getpid()}", root / LATEST)
        _fsync_dir(root)
        _prune(root, keep)
        return final
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DIGEST = ".blake2b"  # suffix of the file in which a rank leaves its file's checksum for rank 0 (then removed)


def file_digest(path: Path, block: int = 16 << 20) -> str:
    """blake2b-128 of a file's bytes, read in blocks (the checksum meta.json records per rank file)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _write_pieces(directory: Path, file: str, tensors: dict[str, dict[str, torch.Tensor | Shard]]) -> None:
    """Write this rank's pieces as one safetensors file, fsynced, with their index in its header."""
    copies, index = {}, {}
    for group, named in tensors.items():
        if not _GROUP.fullmatch(group):
            raise ValueError(f"tensor group name {group!r}: use letters, digits and '_' (it prefixes keys)")
        for name, piece in named.items():
            piece = piece if isinstance(piece, Shard) else Shard.whole(piece)
            if not 0 <= piece.start <= piece.end <= math.prod(piece.shape):
                raise ValueError(f"{group}/{name}: piece [{piece.start}, {piece.end}) lies outside a tensor of "
                                 f"shape {list(piece.shape)}")
            key = f"{group}/{name}/{piece.start}"
            # fresh contiguous CPU copies: safetensors refuses views sharing storage, and GPU tensors must come home
            staged = torch.empty(piece.data.numel(), dtype=piece.data.dtype, device="cpu")
            copies[key] = staged.copy_(piece.data.detach().reshape(-1))
            index.setdefault(group, {})[name] = {"shape": list(piece.shape), "dtype": _dtype_name(piece.data.dtype),
                                                 "pieces": [[file, key, piece.start, piece.end]]}
    path = directory / file
    save_file(copies, str(path), metadata={"format": "pt", INDEX_KEY: json.dumps(index)})
    # safetensors creates files as 0600; give them the umask's mode, as the directory got, for other readers
    os.chmod(path, directory.stat().st_mode & 0o666)
    _fsync_file(path)
    _write_durable(directory / (file + DIGEST), file_digest(path).encode())


def _read_index(path: Path) -> dict:
    """The piece index a rank wrote into the header of its file (`_write_pieces`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[INDEX_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: no readable piece index in its header ({err}); the rank that wrote it "
                              "failed or another program replaced it, so this save is not published") from err


def _merge_indexes(indexes: list[dict]) -> dict:
    """One index from every rank's; checks that each tensor's pieces agree and cover it exactly once."""
    merged: dict[str, dict[str, dict]] = {}
    for index in indexes:
        for group, named in index.items():
            for name, entry in named.items():
                seen = merged.setdefault(group, {}).get(name)
                if seen is None:
                    merged[group][name] = {**entry, "pieces": list(entry["pieces"])}
                    continue
                if (seen["shape"], seen["dtype"]) != (entry["shape"], entry["dtype"]):
                    raise ValueError(f"{group}/{name}: ranks disagree on its shape or dtype ({seen['shape']} "
                                     f"{seen['dtype']} vs {entry['shape']} {entry['dtype']})")
                seen["pieces"] += entry["pieces"]
    for group, named in merged.items():
        for name, entry in named.items():
            entry["pieces"].sort(key=lambda p: p[2])
            at = 0
            for file, _, start, end in entry["pieces"]:
                if start != at:
                    what = "overlaps the previous piece" if start < at else f"leaves [{at}, {start}) unwritten"
                    raise ValueError(f"{group}/{name}: the piece from {file} at [{start}, {end}) {what}; every "
                                     "element must be written by exactly one rank")
                at = end
            if at != math.prod(entry["shape"]):
                raise ValueError(f"{group}/{name}: the pieces leave [{at}, {math.prod(entry['shape'])}) unwritten; "
                                 "every element must be written by exactly one rank")
    return merged


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


class CheckpointReader:
    """Reads a checkpoint of any layout: whole tensors, or just a range of one (what a rank of another layout
    owns), from the files that hold it, without reading the rest. Only JSON and safetensors are parsed."""

    def __init__(self, path: Path, meta: dict[str, Any] | None = None) -> None:
        """Resolve `path`, read its meta.json and check that every file is there with its recorded size; with
        `meta` (a checkpoint directory's index already read and checked, as `open_checkpoint` hands it to the
        ranks other than 0) no file is touched until a range is read."""
        self._fix = ("the checkpoint is damaged; resume from another step_* directory (trainer.resume=<path>) or "
                     "delete it")
        self._open: dict[str, Any] = {}
        if meta is not None:
            self.path, self.meta = Path(path), meta
            return
        self.path = resolve_checkpoint(path)
        self.meta = _read_meta(self.path)
        if self.meta.get("format") != FORMAT or not isinstance(self.meta.get("tensors"), dict):
            raise CheckpointError(f"{self.path / META}: checkpoint format {self.meta.get('format')!r}, this version "
                                  f"reads format {FORMAT} (sharded, with a tensor index); resume it with the "
                                  "version that wrote it, or start anew (trainer.resume=null)")
        for file, size in self.meta["files"].items():
            self._check_size(self.path / file, size)

    def _check_size(self, path: Path, size: int) -> None:
        try:
            found = path.stat()  # one metadata call per file
        except FileNotFoundError:
            found = None
        if found is None or not stat.S_ISREG(found.st_mode):
            raise CheckpointError(f"{path}: missing; {self._fix}")
        if found.st_size != size:
            raise CheckpointError(f"{path}: {found.st_size} bytes, meta.json recorded {size} (truncated?); {self._fix}")

    @property
    def groups(self) -> list[str]:
        return sorted(self.meta["tensors"])

    def names(self, group: str) -> list[str]:
        return list(self._group(group))

    def shape(self, group: str, name: str) -> tuple[int, ...]:
        return tuple(self._entry(group, name)["shape"])

    def has(self, group: str, name: str) -> bool:
        return name in self.meta["tensors"].get(group, {})

    def read(self, group: str, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor (all of it by default), as a 1-D CPU tensor."""
        entry = self._entry(group, name)
        numel = math.prod(entry["shape"])
        end = numel if end is None else end
        if not 0 <= start <= end <= numel:
            raise CheckpointError(f"{self.path}: {group}/{name} has {numel} elements, range [{start}, {end}) asked")
        out = torch.empty(end - start, dtype=getattr(torch, entry["dtype"]), device="cpu")
        for file, key, lo, hi in entry["pieces"]:
            a, z = max(start, lo), min(end, hi)
            if a < z:
                out[a - start:z - start] = self._slice(file, key, a - lo, z - lo)
        return out

    def tensor(self, group: str, name: str) -> torch.Tensor:
        return self.read(group, name).view(self.shape(group, name))

    def _group(self, group: str) -> dict:
        if group not in self.meta["tensors"]:
            raise CheckpointError(f"{self.path}: no tensor group {group!r}; it holds {self.groups}")
        return self.meta["tensors"][group]

    def _entry(self, group: str, name: str) -> dict:
        named = self._group(group)
        if name not in named:
            raise CheckpointError(f"{self.path}: {group} has no tensor {name!r}; it was written by another model "
                                  "config. Resume with the config it was written with, or start anew")
        return named[name]

    def _verify(self, file: str) -> None:
        """The file's checksum against meta.json's (checkpoints written before checksums were recorded: none)."""
        want = (self.meta.get("checksums") or {}).get(file)
        if want is None:
            return
        found = file_digest(self.path / file)
        if found != want:
            raise CheckpointError(f"{self.path / file}: checksum {found}, meta.json recorded {want}: the file is "
                                  f"corrupt; {self._damaged()}")

    def _damaged(self) -> str:
        """What to do about a damaged checkpoint: resume from the newest complete one before it, if any."""
        if not _STEP_DIR.fullmatch(self.path.name):
            return self._fix
        older = [p for p in _step_dirs(self.path.parent) if _step_of(p) < _step_of(self.path) and _is_complete(p)]
        if older:
            return f"resume from the previous complete checkpoint: trainer.resume={max(older, key=_step_of)}"
        return self._fix

    def _slice(self, file: str, key: str, a: int, z: int) -> torch.Tensor:
        if file not in self._open:
            self._verify(file)  # once per file this rank reads
        try:
            if file not in self._open:
                self._open[file] = safe_open(str(self.path / file), framework="pt")
            return self._open[file].get_slice(key)[a:z]
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{self.path / file}: not a readable safetensors file or lacks {key!r} "
                                  f"({err}); {self._fix}") from err


def open_checkpoint(path: Path, group: dist.ProcessGroup | None = None,
                    check: Callable[[dict[str, Any]], None] | None = None) -> CheckpointReader:
    """A `CheckpointReader` on every rank of `group` (collective; None: the default group, or one process).

    Rank 0 alone resolves `path`, reads meta.json, checks every file's size and runs `check(meta)` (e.g.
    `check_compatible`); the index goes to the other ranks as one broadcast of bytes, so a rank touches only the
    files holding the ranges it reads, and an error rank 0 finds is raised on every rank with the same message.
    """
    def checked() -> dict[str, Any]:
        reader = CheckpointReader(path)
        if check is not None:
            check(reader.meta)
        return {"path": str(reader.path), "meta": reader.meta}

    found = agree_on_rank0(checked, group)
    return CheckpointReader(Path(found["path"]), found["meta"])


def load_checkpoint(path: Path, groups: Iterable[str] | None = None,
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint as whole tensors: (group -> name -> CPU tensor, meta.json as a dict).

    `path` is a step_* directory, or a run directory (its `latest_checkpoint` is read). `groups` limits the
    tensor groups read (e.g. ("model",) for an export); None reads all. Only safetensors and JSON are parsed,
    never pickle. A missing, truncated or corrupt file raises CheckpointError naming it.
    """
    reader = CheckpointReader(path)
    wanted = reader.groups if groups is None else list(groups)
    tensors = {group: {name: reader.tensor(group, name) for name in reader.names(group)} for group in wanted}
    return tensors, reader.meta


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
             "python_random": torch.tensor([version, *words], dtype=torch.int64, device="cpu"),
             "python_random_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64,
                                                 device="cpu")}
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
