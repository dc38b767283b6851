"""The real trainer under torchrun (`hai-launch`, DP=2): a rank killed by SIGKILL mid-run ends the whole job
within seconds, with a non-zero exit naming the rank; the same command run again resumes from the last
checkpoint both ranks wrote and ends with exactly the losses of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_launch import root_cause
from tests.e2e.test_train import FAST, ROOT, train_losses

STEPS = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.micro_batch_size=2"]


def launch(run: Path, cache: Path, tag: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.launch", "--dp", "2", *FAST, *STEPS, f"data.cache_dir={cache}",
           f"trainer.run_dir={run}"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HAI_TEST_TAG": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def worker_pid(tag: str, rank: int) -> int | None:
    """The process torchrun started as `rank` for this test (found by its environment)."""
    want = {f"HAI_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = set((entry / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                return int(entry.name)
    return None


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_the_run_resumes(tmp_path):
    cache = tmp_path / "cache"
    straight = launch(tmp_path / "straight", cache)
    out = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, out[-3000:]

    tag, run = uuid.uuid4().hex, tmp_path / "killed"
    job = launch(run, cache, tag)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "latest").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = worker_pid(tag, 1)
    assert pid is not None and job.poll() is None, "the job ended before its first checkpoint"
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    out = job.communicate(timeout=120)[0]
    seconds = time.monotonic() - t0
    assert job.returncode != 0
    assert "rank      : 1" in root_cause(out) and "SIGKILL" in root_cause(out), out[-3000:]
    assert seconds < 60, seconds
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    again = launch(run, cache)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert train_losses(run) == train_losses(tmp_path / "straight")
