"""Checkpoints as they must behave at 2048 ranks (trainer/checkpoint.py, trainer/state.py), on 3 gloo processes
over the grid's checkpoint group (parallel/grid.py: its own long timeout).

Per rank, the file-system calls of a save, of finding the checkpoint to resume and of a load are recorded: a rank
other than 0 touches only its own file (no stat of another rank's file, no meta.json), rank 0 reads the index once
and checks each file once. No collective of Python objects runs at all. An index rank 0 finds damaged or
incompatible, a missing resume path, and a file only one rank reads being corrupt each stop every rank with the
same message, within seconds; an unexpected error keeps its type on its rank.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import time
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.dist.conftest import run_distributed

BOUNDS = [0, 5, 17, 24]  # rank r writes elements [BOUNDS[r], BOUNDS[r + 1]) of W
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")
FS_CALLS = {os: ("stat", "lstat", "open", "listdir", "scandir"), builtins: ("open",), io: ("open",)}


def _grid(timeout_s: int):
    from parallel.config import ParallelConfig
    from parallel.grid import ProcessGrid

    return ProcessGrid.build(ParallelConfig(checkpoint_timeout_s=timeout_s), "cpu")


def _pieces(rank: int) -> dict[str, dict]:
    from trainer.checkpoint import Shard

    flat = torch.arange(24, dtype=torch.float64) / 7
    lo, hi = BOUNDS[rank], BOUNDS[rank + 1]
    return {"model": {"w": Shard(flat[lo:hi], (4, 6), lo), f"own_{rank}": torch.full((2,), rank)}}


@contextmanager
def _recorded(root: Path):
    """Every file-system call of this process on a path under `root`, as (call, path relative to root)."""
    import trainer.checkpoint as ckpt

    calls: list[tuple[str, str]] = []

    def spy(name, fn):
        def wrapped(path=None, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and Path(os.fspath(path)).is_relative_to(root):
                calls.append((name, str(Path(os.fspath(path)).relative_to(root))))
            return fn(path, *args, **kwargs)
        return wrapped

    with ExitStack() as stack:
        for module, names in FS_CALLS.items():
            for name in names:
                stack.enter_context(mock.patch.object(module, name, spy(name, getattr(module, name))))
        # safetensors opens files in Rust, past Python's os: count its opens where the checkpoint code calls it
        stack.enter_context(mock.patch.object(ckpt, "safe_open", spy("safe_open", ckpt.safe_open)))
        yield calls


def _no_object_collectives(stack: ExitStack) -> None:
    for name in OBJECT_COLLECTIVES:
        stack.enter_context(mock.patch.object(dist, name, side_effect=AssertionError(f"dist.{name} was called")))


def _touches(rank: int, world: int, run_dir: str) -> None:
    from trainer.checkpoint import open_checkpoint, save_checkpoint
    from trainer.state import resume_from

    run = Path(run_dir)
    grid = _grid(timeout_s=77)
    group = grid.checkpoint_group
    assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=77)  # the long timeout
    mine, step = f"rank_{rank:05d}.safetensors", "checkpoints/step_00000001"
    with ExitStack() as stack:
        _no_object_collectives(stack)
        with _recorded(run) as calls:
            path = save_checkpoint(run, 1, _pieces(rank), {"step": 1}, keep=2, group=group)
        others = {c for c in calls if "rank_" in c[1] and mine not in c[1] or c[1].endswith("meta.json")}
        assert rank == 0 or not others, others  # a writer touches its own file and the temporary directory only
        # a rank's bad piece: every rank raises, naming it, without any object collective
        bad = _pieces(rank)
        if rank == 2:
            bad["model"]["w"] = type(bad["model"]["w"])(torch.zeros(10, dtype=torch.float64), (4, 6), 20)
        with pytest.raises(ValueError, match="rank 2: .*outside"):
            save_checkpoint(run, 2, bad, {"step": 2}, keep=2, group=group)
        dist.barrier()

        with _recorded(run) as calls:
            found = resume_from(SimpleNamespace(trainer=SimpleNamespace(resume="auto")), run, grid)
        assert found == path
        assert rank == 0 or calls == [], calls  # only rank 0 looks for the latest checkpoint

        with _recorded(run) as calls:
            reader = open_checkpoint(found, group)
            lo, hi = BOUNDS[rank], BOUNDS[rank + 1]
            assert torch.equal(reader.read("model", "w", lo, hi), torch.arange(lo, hi, dtype=torch.float64) / 7)
            assert torch.equal(reader.tensor("model", f"own_{rank}"), torch.full((2,), rank))
        opened = [p for call, p in calls if call == "safe_open"]
        assert opened == [f"{step}/{mine}"], calls  # just the file holding what this rank read
        # the file it reads is also opened once to check its checksum (meta.json's), and nothing else is touched
        assert [p for call, p in calls if call == "open" and "rank_" in p] == opened, calls
        rest = sorted(c for c in calls if c[0] != "safe_open" and not (c[0] == "open" and c[1] in opened))
        if rank == 0:  # the index read once, every file's size checked once
            assert [p for call, p in rest if call == "open" and p.endswith("meta.json")] == [f"{step}/meta.json"], rest
            stats = sorted(p for call, p in rest if call == "stat" and "rank_" in p)
            assert stats == [f"{step}/rank_{r:05d}.safetensors" for r in range(world)], rest
        else:
            assert rest == [], rest  # no stat, open or listing of anything in the checkpoint
    grid.close()


def test_each_rank_touches_only_its_own_files_and_no_object_collective_runs(tmp_path):
    run_distributed(_touches, 3, str(tmp_path / "run"))


def _same_error_everywhere(rank: int, world: int, run_dir: str) -> None:
    from trainer.checkpoint import (
        CheckpointError,
        check_compatible,
        open_checkpoint,
        raise_if_any_failed,
        save_checkpoint,
    )
    from trainer.state import resume_from

    run = Path(run_dir)
    grid = _grid(timeout_s=30)  # a hang would end in 30 s, and fail the time bound below
    group = grid.checkpoint_group
    meta = {"step": 1, "config": {"model": {"dim": 32, "n_layers": 2}}}
    path = save_checkpoint(run, 1, _pieces(rank), meta, keep=2, group=group)
    messages = {}
    checked = []

    def incompatible(saved: dict) -> None:
        checked.append(rank)
        check_compatible(saved, {"dim": 64, "n_layers": 2}, layout=None)

    def expect(what: str, error: type, fn) -> None:
        t0 = time.monotonic()
        with pytest.raises(error) as caught:
            fn()
        assert time.monotonic() - t0 < 10, what
        messages[what] = str(caught.value)

    expect("incompatible", CheckpointError, lambda: open_checkpoint(path, group, check=incompatible))
    assert checked == ([0] if rank == 0 else [])  # rank 0 checked the config, once, for everyone
    missing = SimpleNamespace(trainer=SimpleNamespace(resume=str(run / "nope")))
    expect("missing", CheckpointError, lambda: resume_from(missing, run, grid))

    dist.barrier()
    if rank == 0:
        with open(path / "rank_00002.safetensors", "r+b") as f:
            f.truncate(100)
    dist.barrier()
    expect("truncated", CheckpointError, lambda: open_checkpoint(path, group))
    dist.barrier()
    if rank == 0:
        (path / "meta.json").write_text("{not json")
    dist.barrier()
    expect("unreadable", CheckpointError, lambda: open_checkpoint(path, group))

    # a file only rank 1 reads is damaged (same size, so rank 0's check passes): every rank stops with its error
    path = save_checkpoint(run, 2, _pieces(rank), {"step": 2}, keep=2, group=group)
    if rank == 1:
        file = path / "rank_00001.safetensors"
        file.write_bytes(b"\0" * file.stat().st_size)
    dist.barrier()
    reader = open_checkpoint(path, group)

    def read_mine() -> None:
        error = None
        try:
            reader.read("model", "w", BOUNDS[rank], BOUNDS[rank + 1])
        except CheckpointError as err:
            error = err
        raise_if_any_failed(error, group, where=f"rank {rank}: ")

    expect("read", CheckpointError, read_mine)
    # an unexpected error stays itself (with its traceback) where it happened and is named everywhere else
    with pytest.raises(KeyError if rank == 1 else CheckpointError, match="'x'" if rank == 1 else "rank 1: KeyError"):
        raise_if_any_failed(KeyError("x") if rank == 1 else None, group, where=f"rank {rank}: ")
    (run / f"messages_{rank}.json").write_text(json.dumps(messages))
    grid.close()


def test_an_error_rank_0_or_any_rank_finds_stops_every_rank_with_its_message(tmp_path):
    run = tmp_path / "run"
    run_distributed(_same_error_everywhere, 3, str(run), timeout=120)
    seen = [json.loads((run / f"messages_{r}.json").read_text()) for r in range(3)]
    assert seen[0] == seen[1] == seen[2], seen
    messages = seen[0]
    assert "model.dim: checkpoint 32, now 64" in messages["incompatible"]
    assert "trainer.resume=" in messages["missing"] and "no such checkpoint" in messages["missing"]
    assert "rank_00002.safetensors" in messages["truncated"] and "truncated" in messages["truncated"]
    assert "meta.json: unreadable" in messages["unreadable"]
    assert messages["read"].startswith("rank 1: ") and "rank_00001.safetensors" in messages["read"]
