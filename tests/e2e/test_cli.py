"""hai-plan as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.plan import main as plan_main

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
