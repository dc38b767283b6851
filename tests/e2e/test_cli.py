"""The command-line entry points as a user runs them: hai-plan and the main job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.plan import main as plan_main
from model import presets
from trainer.train import TrainerConfig, train

ROOT = Path(__file__).resolve().parents[2]


def test_hai_plan_reports_the_671b_counts(capsys):
    assert plan_main(["model=deepseek_v3_671b"]) == 0
    out = capsys.readouterr().out
    assert "(671.0B)" in out and "(36.6B)" in out and "MTP module" in out


@pytest.mark.parametrize("args,words", [
    (["model=deepseek_v4"], "deepseek_v3_671b"),  # lists the presets that exist
    (["model.n_group=3"], "model.n_routed_experts"),  # names the field
])
def test_hai_plan_bad_input_exits_2_with_a_message(capsys, args, words):
    assert plan_main(args) == 2
    assert words in capsys.readouterr().err


def test_hai_plan_console_script_runs():
    exe = Path(sys.executable).with_name("hai-plan")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "launch.plan"]
    result = subprocess.run(cmd + ["model=small"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "total (main)" in result.stdout


@pytest.mark.slow
def test_main_job_loss_falls():
    cfg = TrainerConfig(steps=30, batch_size=4, seq_len=64, warmup=5, log_every=10, text_bytes=300_000)
    losses = train(presets.load("tiny"), cfg)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
