"""What checkpoints at 2048 ranks rest on, in one process: each file carries its own piece index (rank 0 builds
meta.json from the files, not from objects gathered in memory), the collective helpers behave as their
one-process selves, and the two collective timeouts are typed, validated and listed in every parallel preset
(several ranks: tests/dist/test_checkpoint_scale.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from core.config import ConfigError
from parallel.config import ParallelConfig
from trainer.checkpoint import (
    INDEX_KEY,
    CheckpointError,
    Shard,
    agree_on_rank0,
    open_checkpoint,
    raise_if_any_failed,
    save_checkpoint,
)
from trainer.config import compose_config

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "parallel").glob("*.yaml"))


def test_each_file_holds_its_index_and_meta_json_is_assembled_from_the_files(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    path = save_checkpoint(tmp_path, 1, {"model": {"w": Shard(flat, (3, 4), 0), "b": torch.ones(2)}}, {}, keep=1)
    with safe_open(str(path / "rank_00000.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()[INDEX_KEY])
    meta = json.loads((path / "meta.json").read_text())
    assert header == meta["tensors"]
    assert header["model"]["w"] == {"shape": [3, 4], "dtype": "float32",
                                    "pieces": [["rank_00000.safetensors", "model/w/0", 0, 12]]}


def test_open_checkpoint_in_one_process_checks_and_reads(tmp_path):
    save_checkpoint(tmp_path, 4, {"model": {"w": torch.arange(6.0)}}, {"step": 4, "config": {"v": 1}}, keep=1)
    reader = open_checkpoint(tmp_path, check=lambda meta: None)
    assert reader.meta["step"] == 4 and torch.equal(reader.read("model", "w", 2, 5), torch.arange(2.0, 5.0))

    def refuse(meta):
        raise CheckpointError(f"config v={meta['config']['v']} is not wanted")

    with pytest.raises(CheckpointError, match="config v=1 is not wanted"):
        open_checkpoint(tmp_path, check=refuse)


def test_one_process_collective_helpers_keep_the_error_type_and_message():
    assert agree_on_rank0(lambda: {"a": [1]}) == {"a": [1]}
    with pytest.raises(ValueError, match="bad keep") as err:
        agree_on_rank0(lambda: (_ for _ in ()).throw(ValueError("bad keep")))
    assert type(err.value) is ValueError
    with pytest.raises(CheckpointError, match="disk gone"):  # an OSError is a CheckpointError on every rank
        agree_on_rank0(lambda: (_ for _ in ()).throw(OSError("disk gone")))
    raise_if_any_failed(None)
    with pytest.raises(CheckpointError, match="rank 0: disk gone"):
        raise_if_any_failed(OSError("disk gone"), where="rank 0: ")
    with pytest.raises(KeyError, match="'x'"):  # an unexpected error stays itself where it happened
        raise_if_any_failed(KeyError("x"), where="rank 0: ")


@pytest.mark.parametrize("name", ["timeout_s", "checkpoint_timeout_s"])
@pytest.mark.parametrize("value,words", [(0, ": must be >= 1, got 0"), (-5, ": must be >= 1, got -5"),
                                         (1.5, "=1.5: must be a whole number of seconds"),
                                         (True, "=True: must be a whole number of seconds")])
def test_timeouts_are_positive_whole_seconds(name, value, words):
    with pytest.raises(ConfigError, match=f"parallel.{name}{words}"):
        ParallelConfig(**{name: value}).validate(1)


def test_checkpoint_timeout_default_override_and_presets():
    assert (ParallelConfig().timeout_s, ParallelConfig().checkpoint_timeout_s) == (120, 1800)
    assert compose_config(["parallel.checkpoint_timeout_s=3600"]).parallel.checkpoint_timeout_s == 3600
    with pytest.raises(ConfigError, match="parallel.checkpoint_timeout_s"):
        compose_config(["parallel.checkpoint_timeout_s=soon"])
    assert PRESETS
    for preset in PRESETS:
        values = yaml.safe_load(preset.read_text())
        assert (values["timeout_s"], values["checkpoint_timeout_s"]) == (120, 1800), preset.name
