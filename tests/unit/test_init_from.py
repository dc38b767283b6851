"""`trainer.init_from` (trainer/init_from.py): a stage-2 run starts from stage 1's weights only, whether given the
run directory, one of its checkpoints or its `hai-export`, with YaRN switched on and a longer context; a restarted
stage resumes instead; bad sources fail naming what does not fit. Other layouts: tests/dist/test_init_from_dist.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist.test_train_parallel import config, losses
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.export import export
from trainer.hf import save_hf
from trainer.train import build, train

STAGE2 = ["model.yarn={factor:2,original_max_seq_len:32}", "model.max_seq_len=64", "data.seq_len=64",
          "trainer.max_steps=2", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage1")
    run = root / "run"
    train(config([f"data.cache_dir={root / 'cache'}", f"trainer.run_dir={run}", "trainer.max_steps=3"], 1), run)
    return run


def _stage2_config(stage1: Path, source: Path | None, run: Path | None, extra: list[str] = ()):
    init = [] if source is None else [f"trainer.init_from={source}"]
    where = [] if run is None else [f"trainer.run_dir={run}"]
    return config([*STAGE2, f"data.cache_dir={stage1.parent / 'cache'}", *where, *init, *extra], 1)


def _stage2(tmp_path: Path, stage1: Path, source: Path | None, name: str, extra: list[str] = ()) -> Path:
    run = tmp_path / name
    train(_stage2_config(stage1, source, run, extra), run)
    return run


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_stage_two_starts_from_the_weights_only_whatever_the_source_form(stage1, tmp_path, capsys):
    checkpoint = stage1 / "checkpoints" / "step_00000003"
    export(stage1, tmp_path / "exported")
    runs = {name: _stage2(tmp_path, stage1, source, name) for name, source in
            (("run_dir", stage1), ("checkpoint", checkpoint), ("export", tmp_path / "exported"))}
    out = capsys.readouterr().out
    assert out.count("initialised the weights from") == 3
    curves = {name: losses(run) for name, run in runs.items()}
    assert curves["run_dir"] == curves["checkpoint"] == curves["export"] and len(curves["run_dir"]) == 2
    # fresh optimizer, schedule and counters: the records of a run from scratch, but for the losses
    scratch = _stage2(tmp_path, stage1, None, "scratch")
    for ours, theirs in zip(_records(runs["run_dir"]), _records(scratch)):
        assert (ours["step"], ours["tokens"], ours["lr"]) == (theirs["step"], theirs["tokens"], theirs["lr"])
        assert ours["loss"] != theirs["loss"]  # other weights (which ones: below)
    # the weights it started from are stage 1's last ones, router biases included
    from parallel.grid import ProcessGrid

    cfg = _stage2_config(stage1, stage1, None)
    run = build(cfg, ProcessGrid.build(cfg.parallel, "cpu"), init_from=cfg.trainer.init_from)
    saved = load_checkpoint(checkpoint, groups=("model",))[0]["model"]
    state = run.model.state_dict()
    assert any(name.endswith("gate.bias") and saved[name].abs().sum() > 0 for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name


def test_a_restarted_stage_resumes_instead_of_starting_over(stage1, tmp_path, capsys):
    run = _stage2(tmp_path, stage1, stage1, "stage2")
    again = _stage2(tmp_path, stage1, stage1, "stage2", ["trainer.max_steps=3"])
    assert again == run
    out = capsys.readouterr().out
    assert "trainer.init_from" in out and "resumed from" in out and "not used" in out
    assert [r["step"] for r in _records(run)] == [1, 2, 3]


def test_missing_mtp_is_an_error_unless_asked_to_initialise_it(stage1, tmp_path):
    no_mtp = tmp_path / "no_mtp"
    cfg = config(["model.n_mtp_depth=0"], 1)
    from model import Transformer

    save_hf(Transformer(cfg.model), no_mtp)
    with pytest.raises(CheckpointError, match="init_missing=mtp"):
        _stage2(tmp_path, stage1, no_mtp, "refused")
    run = _stage2(tmp_path, stage1, no_mtp, "mtp_fresh", ["trainer.init_missing=mtp"])
    assert len(losses(run)) == 2


@pytest.mark.parametrize("problem, match", [
    ("nothing", "no such file or directory"),
    ("empty_dir", "neither a checkpoint"),
    ("other_shapes", "another shape: .*embed.weight"),
    ("other_architecture", "llama"),
])
def test_bad_sources_fail_naming_the_problem(stage1, tmp_path, problem, match):
    source = tmp_path / problem
    extra = []
    if problem == "empty_dir":
        source.mkdir()
    elif problem == "other_shapes":
        source = stage1
        extra = ["model.dim=32"]
    elif problem == "other_architecture":
        export(stage1, source)
        hf = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=match):
        _stage2(tmp_path, stage1, source, "bad", extra)
