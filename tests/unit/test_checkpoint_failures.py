"""Checkpoints against the failures of a long campaign (trainer/checkpoint.py): a rank file corrupted in place (same
size) is caught by its checksum in meta.json and the previous complete checkpoint is offered; a save that runs out
of disk publishes nothing, leaves `latest` on the previous checkpoint and says so."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.checkpoint import CheckpointError, CheckpointReader, load_checkpoint, save_checkpoint


def _tensors(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}}


def test_every_rank_file_has_a_checksum_and_a_corrupt_one_is_named(tmp_path):
    save_checkpoint(tmp_path, 1, _tensors(1), {}, keep=3)
    second = save_checkpoint(tmp_path, 2, _tensors(2), {}, keep=3)
    meta = json.loads((second / "meta.json").read_text())
    assert set(meta["checksums"]) == set(meta["files"]) and not list(second.glob("*" + ckpt.DIGEST))
    assert meta["checksums"]["rank_00000.safetensors"] == ckpt.file_digest(second / "rank_00000.safetensors")
    file = second / "rank_00000.safetensors"
    data = bytearray(file.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside a tensor: same size, valid header
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(second).tensor("model", "w")
    message = str(err.value)
    assert str(file) in message and "checksum" in message and "corrupt" in message
    assert f"trainer.resume={tmp_path / 'checkpoints' / 'step_00000001'}" in message
    assert torch.equal(load_checkpoint(tmp_path / "checkpoints" / "step_00000001")[0]["model"]["w"],
                       _tensors(1)["model"]["w"])


def test_a_save_out_of_disk_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _tensors(1), {}, keep=3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, 2, _tensors(2), {}, keep=3)
    message = str(err.value)
    assert "step 2 was not saved" in message and "No space left on device" in message
    assert "still names step_00000001" in message and "trainer.resume=auto" in message
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # no half-written directory
    assert torch.equal(load_checkpoint(tmp_path)[0]["model"]["b"], _tensors(1)["model"]["b"])
