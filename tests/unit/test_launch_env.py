"""The launchers' NCCL flight-recorder environment (launch/launch.py: flight_recorder_env, build, main;
launch/slurm/train.sbatch): on GPUs every rank records its collectives and dumps them on a timeout into
`<run dir>/nccl_trace/`, the run directory being known at launch; what the user set stays; CPU runs get nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import launch.launch as launcher
from launch.launch import build, flight_recorder_env, main

ROOT = Path(__file__).resolve().parents[2]
FR_VARS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE",
           "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
ONE = ["--nproc", "1", "trainer.micro_batch_size=4"]


@pytest.fixture
def gpu_node(monkeypatch):
    """A node where the trainer would run on CUDA, and an environment without flight-recorder settings."""
    for name in FR_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launcher, "uses_nccl", lambda cfg: True)


def test_flight_recorder_env_points_into_the_run_directory(tmp_path):
    env = flight_recorder_env(tmp_path / "run", {})
    assert env == {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                   "TORCH_FR_DUMP_TEMP_FILE": f"{tmp_path}/run/nccl_trace/rank_"}
    relative = flight_recorder_env("runs/x", {})["TORCH_FR_DUMP_TEMP_FILE"]
    assert relative == str(Path.cwd() / "runs" / "x" / "nccl_trace" / "rank_")  # the ranks may change directory
    assert "TORCH_FR_DUMP_TEMP_FILE" not in flight_recorder_env(None, {})  # torch's default place then


@pytest.mark.parametrize("user", [{"TORCH_FR_BUFFER_SIZE": "0"}, {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"},
                                  {"TORCH_FR_DUMP_TEMP_FILE": "/elsewhere/r"},
                                  {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/elsewhere/r"},
                                  {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}])
def test_what_the_user_set_is_kept_under_either_name(tmp_path, user):
    env = flight_recorder_env(tmp_path, user)
    kinds = {"BUFFER": "TORCH_FR_BUFFER_SIZE", "DUMP_ON": "TORCH_NCCL_DUMP_ON_TIMEOUT",
             "TEMP_FILE": "TORCH_FR_DUMP_TEMP_FILE"}
    (given,) = user
    ours = next(v for k, v in kinds.items() if k in given)
    assert ours not in env and len(env) == 2, env


def test_gpu_launch_with_a_run_dir(gpu_node, tmp_path):
    cmd, env = build([*ONE, f"trainer.run_dir={tmp_path / 'run'}"])
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{tmp_path}/run/nccl_trace/rank_"
    assert env["TORCH_FR_BUFFER_SIZE"] == "2000" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert cmd[-1] == f"trainer.run_dir={tmp_path / 'run'}"  # nothing added


def test_gpu_launch_fixes_the_timestamped_run_dir_it_points_to(gpu_node):
    cmd, env = build(ONE)
    fixed = cmd[-1].removeprefix("trainer.run_dir=")
    assert re.fullmatch(r"runs/tiny/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", fixed), cmd
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(Path.cwd() / fixed / "nccl_trace" / "rank_")
    # several nodes would each pick their own time, and Hydra flags are no training run: nothing is fixed
    for argv in (["--nnodes", "2", "--rdzv-endpoint", "h:1", *ONE], [*ONE, "--cfg", "job"]):
        cmd, env = build(argv)
        assert not any(a.startswith("trainer.run_dir=") for a in cmd) and "TORCH_FR_DUMP_TEMP_FILE" not in env
        assert env["TORCH_FR_BUFFER_SIZE"] == "2000"


def test_cpu_launch_sets_no_flight_recorder(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "uses_nccl", lambda cfg: False)
    cmd, env = build([*ONE, f"trainer.run_dir={tmp_path}"])
    assert not set(env) & set(FR_VARS) and cmd[-1] == f"trainer.run_dir={tmp_path}"


def test_main_creates_the_dump_directory_before_torchrun_starts(gpu_node, monkeypatch, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--dry-run", *ONE, f"trainer.run_dir={run}"]) == 0
    assert "TORCH_FR_DUMP_TEMP_FILE=" in capsys.readouterr().out and not run.exists()  # a dry run writes nothing
    started = {}
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: started.update(env=env, ready=(run / "nccl_trace")
                                                                            .is_dir()))
    main([*ONE, f"trainer.run_dir={run}"])
    assert started["ready"] and started["env"]["TORCH_FR_DUMP_TEMP_FILE"] == f"{run}/nccl_trace/rank_"


def test_print_run_dir(capsys, tmp_path):
    assert main(["--print-run-dir", *ONE, f"trainer.run_dir={tmp_path}"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)
    assert main(["--print-run-dir", "--nproc", "2", "--nnodes", "2", "--", "trainer.micro_batch_size=2"]) == 0
    assert re.fullmatch(r"runs/tiny/[\d_-]+", capsys.readouterr().out.strip())  # fixed once, for every node


def test_sbatch_sets_the_flight_recorder_on_gpu_nodes(tmp_path):
    """train.sbatch with SLURM's commands faked: on a node with GPUs the ranks get the recorder's variables
    pointing into the run directory, which exists; on a node without GPUs nothing changes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node0\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nenv | grep "^TORCH_" | sort\necho "ARGS $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    run = tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if k not in FR_VARS}
    base.update(PATH=f"{bin_dir}:{base['PATH']}", HAI_ROOT=str(ROOT), HAI_PYTHON=sys.executable, SLURM_JOB_ID="7",
                SLURM_JOB_NODELIST="node0", SLURM_JOB_NUM_NODES="1", OMP_NUM_THREADS="1")

    def sbatch(**extra: str) -> str:
        result = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "trainer.micro_batch_size=4",
                                 f"trainer.run_dir={run}"], env={**base, **extra}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    out = sbatch(SLURM_GPUS_ON_NODE="1")
    assert f"TORCH_FR_DUMP_TEMP_FILE={run}/nccl_trace/rank_" in out and (run / "nccl_trace").is_dir()
    assert "TORCH_FR_BUFFER_SIZE=2000" in out and "TORCH_NCCL_DUMP_ON_TIMEOUT=1" in out
    assert f"trainer.run_dir={run}" in out.splitlines()[-1]
    out = sbatch(SLURM_GPUS_ON_NODE="1", TORCH_NCCL_DEBUG_INFO_TEMP_FILE=str(tmp_path / "mine" / "r_"))
    assert f"TORCH_FR_DUMP_TEMP_FILE={tmp_path}/mine/r_" in out  # the user's old-name setting, under the new name
    assert "TORCH_" not in sbatch(GPUS_PER_NODE="1").replace("ARGS", "")  # a CPU node
