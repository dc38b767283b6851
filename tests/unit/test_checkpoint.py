"""Checkpoints (trainer/checkpoint.py): atomic layout, the latest pointer, pruning, crash leftovers,
bitwise round trips, corrupt files, compatibility checks, RNG state and the writability check."""

from __future__ import annotations

import json
import os
import pickle
import random

import pytest
import torch

from tests.conftest import small_config
from trainer import checkpoint as ckpt
from trainer.checkpoint import (
    CheckpointError,
    CheckpointReader,
    Shard,
    check_compatible,
    ensure_writable,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g)
    return {"model": {"w": w, "w_t": w.t(), "b": torch.randn(3, generator=g).bfloat16()},  # a view and bf16
            "optim": {"step": torch.tensor(seed, dtype=torch.int64),
                      "m": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8)}}


RANK0 = "rank_00000.safetensors"


def save(run_dir, step, keep=3, **meta):
    return save_checkpoint(run_dir, step, tensors(step), {"step": step, "tokens": 10 * step, **meta}, keep=keep)


def test_layout_and_latest_pointer(tmp_path):
    path = save(tmp_path, 7)
    root = tmp_path / "checkpoints"
    assert path == root / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "rank_00000.safetensors"]
    assert (root / "latest").read_text().strip() == "step_00000007"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000007"]  # no temporaries left
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["tokens"] == 70
    assert set(meta["files"]) == {"rank_00000.safetensors"} and meta["format"] == ckpt.FORMAT
    assert meta["tensors"]["model"]["w_t"] == {"shape": [4, 6], "dtype": "float32",
                                               "pieces": [["rank_00000.safetensors", "model/w_t/0", 0, 24]]}
    assert latest_checkpoint(tmp_path) == path


def test_round_trip_is_bitwise_for_every_dtype(tmp_path):
    written = tensors(3)
    written["model"]["f64"] = torch.randn(2, 2, dtype=torch.float64)
    save_checkpoint(tmp_path, 3, written, {"nested": {"a": [1, 2]}}, keep=1)
    read, meta = load_checkpoint(tmp_path)  # a run directory resolves to its latest checkpoint
    assert meta["nested"] == {"a": [1, 2]} and meta["step"] == 3
    assert read.keys() == written.keys()
    for group, named in written.items():
        assert read[group].keys() == named.keys()
        for name, t in named.items():
            assert read[group][name].dtype == t.dtype and torch.equal(read[group][name], t), (group, name)
    only_model, _ = load_checkpoint(tmp_path / "checkpoints" / "step_00000003", groups=["model"])
    assert list(only_model) == ["model"]


def test_keep_prunes_oldest_but_never_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000004"]
    # a run rewound to step 3 and saving step 3 again: latest is step 3, and keep=1 keeps exactly it
    save(tmp_path, 3, keep=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003"]
    assert latest_checkpoint(tmp_path) == root / "step_00000003"


def test_saving_a_step_twice_replaces_it(tmp_path):
    save(tmp_path, 5, note="first")
    path = save(tmp_path, 5, note="second")
    _, meta = load_checkpoint(path)
    assert meta["note"] == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "step_00000005"]


def test_crash_leftovers_are_handled(tmp_path):
    save(tmp_path, 1)
    good = save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    # a writer that died mid-save (pid that cannot exist), and a complete step 3 renamed but never pointed to
    dead = root / "step_00000009.tmp-999999999"
    dead.mkdir()
    (dead / RANK0).write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good
    # latest names a directory that lost a file: fall back to the newest complete one
    (good / RANK0).unlink()
    assert latest_checkpoint(tmp_path) == root / "step_00000001"
    # a corrupt pointer
    (root / "latest").write_text("../../etc")
    assert latest_checkpoint(tmp_path) == root / "step_00000001"
    save(tmp_path, 3)
    assert not dead.exists()  # removed by the next save
    assert latest_checkpoint(tmp_path) == root / "step_00000003"


def test_nothing_to_resume(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)  # no meta.json: incomplete
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")


def test_missing_meta_and_corrupt_files_name_the_file(tmp_path):
    path = save(tmp_path, 1)
    (path / RANK0).write_bytes(b"\x00" * (path / RANK0).stat().st_size)
    with pytest.raises(CheckpointError, match=RANK0):
        load_checkpoint(path)
    path = save(tmp_path, 2)
    with open(path / RANK0, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=f"{RANK0}.*truncated"):
        load_checkpoint(path)
    path = save(tmp_path, 3)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json: missing"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this would create `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_loader_never_unpickles(tmp_path, monkeypatch):
    path = save(tmp_path, 1)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    (path / RANK0).write_bytes(payload)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"][RANK0] = len(payload)  # sizes agree, so the parser sees the payload
    (path / "meta.json").write_text(json.dumps(meta))

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint loader must not unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    with pytest.raises(CheckpointError, match=RANK0):
        load_checkpoint(path)
    assert not marker.exists()


def test_check_compatible_lists_every_difference(tmp_path):
    saved = small_config(dim=32).to_dict()
    meta = {"step": 1, "config": {"model": saved}, "layout": {"pp": 1, "ep": 1, "dp": 1}}
    check_compatible(meta, dict(saved, recompute_norm=True, expert_gemm="loop"), {"pp": 1, "ep": 1, "dp": 1})
    other = small_config(dim=64, n_layers=4).to_dict()
    with pytest.raises(CheckpointError) as err:
        check_compatible(meta, other, {"pp": 1, "ep": 1, "dp": 1})
    message = str(err.value)
    assert "model.dim: checkpoint 32, now 64" in message and "model.n_layers: checkpoint 3, now 4" in message
    assert "trainer.resume=null" in message and "run_dir" in message
    with pytest.raises(CheckpointError, match="parallel layout: dp: checkpoint 1, now 2"):
        check_compatible(meta, saved, {"pp": 1, "ep": 1, "dp": 2})
    with pytest.raises(CheckpointError, match="no config.model"):
        check_compatible({"step": 1}, saved, {"pp": 1})


def test_rng_round_trip_reproduces_sequences():
    state = rng_state()
    assert state["torch_cpu"].dtype == torch.uint8
    first = (torch.rand(5), random.random(), random.gauss(0, 1))
    random.gauss(0, 1)  # leaves a cached second normal in Python's state
    set_rng_state(state)
    assert torch.equal(torch.rand(5), first[0])
    assert (random.random(), random.gauss(0, 1)) == first[1:]
    with pytest.raises(CheckpointError, match="torch_cpu"):
        set_rng_state({})


def test_rng_state_survives_a_checkpoint(tmp_path):
    random.seed(1)
    random.gauss(0, 1)  # leaves a cached second normal, which must survive too
    save_checkpoint(tmp_path, 1, {"rng": rng_state()}, {}, keep=1)
    expected = (torch.rand(3), random.gauss(0, 1))
    set_rng_state(load_checkpoint(tmp_path)[0]["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.gauss(0, 1) == expected[1]


def test_ensure_writable(tmp_path):
    ensure_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=r"file/sub.*trainer.run_dir"):
        ensure_writable(blocker / "sub")  # can never be created: a regular file is in the way
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes through permissions
            with pytest.raises(CheckpointError, match="locked"):
                ensure_writable(locked)
    finally:
        locked.chmod(0o700)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save(tmp_path, 1, keep=0)
    with pytest.raises(ValueError, match="tensor group name"):
        save_checkpoint(tmp_path, 1, {"../x": {"a": torch.ones(1)}}, {}, keep=1)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, {}, {"path": tmp_path}, keep=1)
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))  # a failed save leaves no temporary
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_ranges_read_partially_and_bad_pieces_are_refused(tmp_path):
    """The reader returns any range of a flattened tensor; a save whose pieces leave a hole or lie outside their
    tensor is refused before anything is published (several ranks' pieces: tests/dist/test_checkpoint_dist.py)."""
    w = torch.arange(24, dtype=torch.float32).view(4, 6)
    flat = w.reshape(-1)
    save_checkpoint(tmp_path, 1, {"model": {"w": Shard.whole(w), "b": torch.tensor(3.0)}}, {}, keep=1)
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.tensor("model", "w"), w) and reader.tensor("model", "b").shape == ()
    assert torch.equal(reader.read("model", "w", 7, 15), flat[7:15])
    with pytest.raises(CheckpointError, match=r"24 elements, range \[20, 30\)"):
        reader.read("model", "w", 20, 30)
    with pytest.raises(ValueError, match=r"leave \[10, 24\) unwritten"):
        save_checkpoint(tmp_path, 2, {"model": {"w": Shard(flat[:10], (4, 6), 0)}}, {}, keep=1)
    with pytest.raises(ValueError, match=r"\[0, 14\) unwritten"):
        save_checkpoint(tmp_path, 2, {"model": {"w": Shard(flat[14:], (4, 6), 14)}}, {}, keep=1)
    with pytest.raises(ValueError, match="outside"):
        save_checkpoint(tmp_path, 2, {"model": {"w": Shard(flat, (4, 6), 3)}}, {}, keep=1)
    with pytest.raises(CheckpointError, match="no tensor 'nope'.*another model"):
        reader.read("model", "nope")
    with pytest.raises(CheckpointError, match="no tensor group 'ema'"):
        reader.names("ema")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000001"  # failed saves left nothing
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def test_an_older_format_is_refused_with_the_fix(tmp_path):
    path = save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    meta["format"] = 1
    del meta["tensors"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 1.*trainer.resume=null"):
        load_checkpoint(path)
